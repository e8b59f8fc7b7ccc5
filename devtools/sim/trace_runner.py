"""Runs a meter trace (firmware/trace/README.md) through the Python meter core and prints every
effect as one JSON line, exactly like the firmware's host `trace_runner`.

    python -m devtools.sim.trace_runner firmware/trace/seed_and_reconcile.jsonl
    python -m devtools.sim.trace_runner TRACE.jsonl --expect TRACE.expected   # exit 1 on a difference
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TextIO

from devtools.sim.meter_core import (
    KEY_STATE,
    SOFT_RESET_REASONS,
    Delivery,
    EspMqttOutbox,
    ManualClock,
    MemoryKvStore,
    MeterConfig,
    MeterCore,
    ReportBuffer,
    RetainedMemory,
    XorShift32,
    relay_override_name,
)


def _line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _config_from(step: dict) -> MeterConfig:
    d = MeterConfig()
    return MeterConfig(
        meter_no=step.get("meterNo", d.meter_no),
        fw_version=step.get("fw", d.fw_version),
        report_interval_ms=int(step.get("reportIntervalMs", d.report_interval_ms)),
        sample_interval_ms=int(step.get("sampleIntervalMs", d.sample_interval_ms)),
        sensor_fail_timeout_ms=int(step.get("sensorFailTimeoutMs", d.sensor_fail_timeout_ms)),
        persist_interval_ms=int(step.get("persistIntervalMs", d.persist_interval_ms)),
        status_interval_ms=int(step.get("statusIntervalMs", d.status_interval_ms)),
        seq_block=int(step.get("seqBlock", d.seq_block)),
        replay_batch=int(step.get("replayBatch", d.replay_batch)),
        low_balance_threshold=step.get("lowBalanceThreshold", d.low_balance_threshold),
        rated_max_kw=step.get("ratedMaxKw", d.rated_max_kw),
        boot_gap_ms=int(step.get("bootGapMs", d.boot_gap_ms)),
        register_tolerance_kwh=step.get("registerToleranceKwh", d.register_tolerance_kwh),
        max_inflight=int(step.get("maxInflight", d.max_inflight)),
        max_outbox_bytes=int(step.get("maxOutboxBytes", d.max_outbox_bytes)),
        outbox_expiry_ms=int(step.get("outboxExpiryMs", d.outbox_expiry_ms)),
    )


def _payload_of(step: dict, reg_id: str) -> str:
    # A JSON string is sent byte for byte; anything else is serialised compactly, with the string
    # "$regId" replaced by the meter's current regId.
    p = step.get("payload")
    if isinstance(p, str):
        return p
    return json.dumps(p, separators=(",", ":"), ensure_ascii=False).replace('"$regId"', f'"{reg_id}"')


def run_trace(lines, out: Callable[[str], None]) -> None:
    """Runs the trace given as an iterable of JSON lines; `out` receives each output line."""

    def emit_message(event: str, topic: str, payload: str, qos: int, retain: bool) -> None:
        out(_line({"event": event, "topic": topic, "qos": qos, "retain": retain, "payload": payload}))

    def emit_delivery(d: Delivery) -> None:
        line = {"event": "publish", "topic": d.topic, "qos": d.qos, "retain": d.retain}
        if d.qos > 0:
            line["msgId"] = d.id
        if d.dup:
            line["dup"] = True
        line["payload"] = d.payload
        out(_line(line))

    def emit_expired(msg_id: int) -> None:
        out(_line({"event": "expired", "msgId": msg_id}))

    def set_relay(closed: bool) -> None:
        out(_line({"event": "relay", "closed": closed}))

    sensor: list[float | None] = [None]  # the PZEM's register; None = not answering
    clock = ManualClock()
    state = {"core": None, "buffer": None, "cfg": MeterConfig(), "step": 1000, "rssi": -65,
             "kv": MemoryKvStore(), "rng": XorShift32(1), "capacity": 64, "mqtt": None, "rtc": RetainedMemory()}

    def boot(reason: str) -> MeterCore:
        mqtt: EspMqttOutbox = state["mqtt"]
        core = MeterCore(
            state["cfg"], clock, state["kv"], state["buffer"], mqtt.publish, set_relay, lambda: sensor[0],
            reset_reason=reason, random32=state["rng"], retained=state["rtc"], outbox_bytes=mqtt.outbox_bytes,
        )
        core.set_wifi_rssi(state["rssi"])
        core.begin()
        state["core"] = core
        return core

    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        step = json.loads(text)
        op = step.get("op")
        core: MeterCore | None = state["core"]
        if op == "config":
            state["cfg"] = _config_from(step)
            state["step"] = int(step.get("loopStepMs", 1000))
            state["rssi"] = int(step.get("wifiRssi", state["rssi"]))
            state["capacity"] = int(step.get("bufferCapacity", 64))
            state["buffer"] = ReportBuffer(state["capacity"])
            state["rng"] = XorShift32(int(step.get("rngSeed", 1)))
            clock.restart(int(step.get("startMillis", 0)))
            mqtt = EspMqttOutbox(clock.monotonic, int(step.get("outboxExpiryMs", 30000)))
            mqtt.on_transmit = emit_delivery
            mqtt.on_expired = emit_expired
            mqtt.report_deleted = step.get("reportDeleted") is True
            id_seed = int(step.get("msgIdSeed", 0))
            if id_seed:
                mqtt.id_source = XorShift32(id_seed)
            mqtt.disconnect()  # the first connect is a step of its own
            state["mqtt"] = mqtt
            boot(step.get("resetReason", "poweron"))
            continue
        if core is None:
            raise ValueError(f"line {number}: the first step must be config")
        if op == "advance":
            remaining = int(step.get("ms", 0))
            while remaining > 0:
                d = min(remaining, state["step"])
                clock.advance(d)
                remaining -= d
                state["mqtt"].service_into(core)
                core.loop()
        elif op == "energy":
            sensor[0] = step.get("kwh", 0)
        elif op == "sensor_fail":
            sensor[0] = None
        elif op == "time_sync":
            clock.sync(int(step.get("unixMs", 0)))
        elif op == "rssi":
            state["rssi"] = int(step.get("dbm", state["rssi"]))
            core.set_wifi_rssi(state["rssi"])
        elif op == "connect":
            will = core.will_message()
            emit_message("will", will.topic, will.payload, will.qos, will.retain)
            state["mqtt"].connect()
            core.on_connected()
        elif op == "disconnect":
            state["mqtt"].disconnect()
            core.on_disconnected()
        elif op == "acks":
            state["mqtt"].acking = step.get("on") is True
        elif op == "blackhole":
            state["mqtt"].blackhole = step.get("on") is True
        elif op == "balance_cmd":
            core.on_message(core.topic("command/balance"), _payload_of(step, core.reg_id))
        elif op == "relay_cmd":
            core.on_message(core.topic("command/relay"), _payload_of(step, core.reg_id))
        elif op == "message":
            core.on_message(step.get("topic", ""), _payload_of(step, core.reg_id))
        elif op in ("reboot", "wipe_nvs", "corrupt_state", "wipe_ring", "swap_board"):
            # Storage faults happen while the meter is down; each of these ops ends with a boot.
            if op == "wipe_nvs":
                state["kv"].wipe()
            if op == "corrupt_state":
                state["kv"].corrupt(step.get("key", KEY_STATE))
            if op in ("wipe_ring", "swap_board"):
                state["buffer"] = ReportBuffer(state["capacity"])
            if op == "swap_board":
                state["kv"] = MemoryKvStore()  # a new board under the same meterNo
            reason = step.get("reason", "software" if op == "reboot" else "poweron")
            if reason not in SOFT_RESET_REASONS or op == "swap_board":
                state["rtc"].clear()
            state["mqtt"].power_cut()  # the client's outbox is RAM
            clock.restart(int(step.get("startMillis", 0)))
            boot(reason)
        else:
            raise ValueError(f"line {number}: unknown op {op!r}")

    core = state["core"]
    if core is None:
        raise ValueError("empty trace")
    out(
        _line(
            {
                "event": "final",
                "balance": core.balance,
                "energyTotal": core.energy_total,
                "relayClosed": core.relay_closed,
                "override": relay_override_name(core.relay_override),
                "condition": core.condition,
                "regId": core.reg_id,
                "unbilledKwh": core.unbilled_kwh,
                "nextSeq": core.next_seq,
                "buffered": core.buffered,
                "inflight": core.inflight,
                "outbox": len(state["mqtt"]),
            }
        )
    )


def _parsed(line: str) -> dict:
    obj = json.loads(line)
    if "payload" in obj:
        obj["payload"] = json.loads(obj["payload"])
    return obj


def main(argv: list[str] | None = None, stdout: TextIO = sys.stdout) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--expect"):
        print("usage: python -m devtools.sim.trace_runner TRACE.jsonl [--expect GOLDEN]", file=sys.stderr)
        return 2
    lines: list[str] = []
    with open(args[0], encoding="utf-8") as f:
        run_trace(f, lambda s: (lines.append(s), stdout.write(s + "\n")))
    if len(args) == 3:
        # Compared parsed (payloads too): the two runners print the same JSON differently.
        with open(args[2], encoding="utf-8") as f:
            expected = [line for line in f.read().splitlines() if line.strip()]
        for i in range(max(len(expected), len(lines))):
            want = _parsed(expected[i]) if i < len(expected) else "<end of golden file>"
            got = _parsed(lines[i]) if i < len(lines) else "<end of output>"
            if want != got:
                print(f"line {i + 1} differs from {args[2]}\n  expected: {want}\n  actual:   {got}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
