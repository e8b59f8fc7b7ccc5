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
    BootGuardConfig,
    Delivery,
    MeterConfig,
    OtaConfig,
    SimDevice,
    XorShift32,
    ota_state_name,
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


def _device_from(step: dict, out: Callable[[str], None]) -> SimDevice:
    g = BootGuardConfig()
    guard = BootGuardConfig(
        max_fast_boots=int(step.get("maxFastBoots", g.max_fast_boots)),
        stable_after_ms=int(step.get("stableAfterMs", g.stable_after_ms)),
        safe_mode_ms=int(step.get("safeModeMs", g.safe_mode_ms)),
    )
    key = bytes.fromhex(step["otaPublicKey"]) if step.get("otaPublicKey") else None
    if key is not None and len(key) != 65:
        raise ValueError("otaPublicKey must be 65 bytes of hex")
    o = OtaConfig()
    ota_config = OtaConfig(
        require_https=step.get("otaRequireHttps") is not False,
        download_timeout_ms=int(step.get("otaDownloadTimeoutMs", o.download_timeout_ms)),
        confirm_timeout_ms=int(step.get("otaConfirmTimeoutMs", o.confirm_timeout_ms)),
    )
    images = step.get("otaImages", {})
    by_content = {img.get("text", "").encode(): img for img in images.values()}

    def fetch(url: str) -> bytes | None:
        return images[url].get("text", "").encode() if url in images else None

    device = SimDevice(
        _config_from(step),
        random32=XorShift32(int(step.get("rngSeed", 1))),
        start_millis=int(step.get("startMillis", 0)),
        buffer_capacity=int(step.get("bufferCapacity", 64)),
        outbox_expiry_ms=int(step.get("outboxExpiryMs", 30000)),
        boot_guard=guard,
        ota_public_key=key,
        ota_config=ota_config,
        ota_fetch=fetch,
        ota_fetch_ms=int(step.get("otaFetchMs", 5000)),
        ota_valid=lambda image: by_content.get(image, {}).get("invalid") is not True,
        ota_crashes=lambda image: by_content.get(image, {}).get("crashes") is True,
        on_relay=lambda closed: out(_line({"event": "relay", "closed": closed})),
        on_restart=lambda into, reason: out(_line({"event": "restart", "into": into, "reason": reason})),
        reset_reason=step.get("resetReason", "poweron"),
        wifi_rssi=int(step.get("wifiRssi", -65)),
    )

    def emit_delivery(d: Delivery) -> None:
        line = {"event": "publish", "topic": d.topic, "qos": d.qos, "retain": d.retain}
        if d.qos > 0:
            line["msgId"] = d.id
        if d.dup:
            line["dup"] = True
        line["payload"] = d.payload
        out(_line(line))

    device.outbox.on_transmit = emit_delivery
    device.outbox.on_expired = lambda msg_id: out(_line({"event": "expired", "msgId": msg_id}))
    device.outbox.report_deleted = step.get("reportDeleted") is True
    id_seed = int(step.get("msgIdSeed", 0))
    if id_seed:
        device.outbox.id_source = XorShift32(id_seed)
    return device


def run_trace(lines, out: Callable[[str], None]) -> None:
    """Runs the trace given as an iterable of JSON lines; `out` receives each output line."""
    device: SimDevice | None = None
    step_ms = 1000
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        step = json.loads(text)
        op = step.get("op")
        if op == "config":
            step_ms = int(step.get("loopStepMs", 1000))
            device = _device_from(step, out)
            continue
        if device is None:
            raise ValueError(f"line {number}: the first step must be config")
        reg_id = device.core.reg_id if device.core is not None else ""
        if op == "advance":
            device.advance(int(step.get("ms", 0)), step_ms)
        elif op == "energy":
            device.sensor_kwh = step.get("kwh", 0)
        elif op == "sensor_fail":
            device.sensor_kwh = None
        elif op == "time_sync":
            device.clock.sync(int(step.get("unixMs", 0)))
        elif op == "rssi":
            device.set_wifi_rssi(int(step.get("dbm", device.wifi_rssi)))
        elif op == "connect":
            will = device.will_message()
            out(_line({"event": "will", "topic": will.topic, "qos": will.qos, "retain": will.retain,
                       "payload": will.payload}))
            device.connect()
        elif op == "disconnect":
            device.disconnect()
        elif op == "acks":
            device.outbox.acking = step.get("on") is True
        elif op == "blackhole":
            device.outbox.blackhole = step.get("on") is True
        elif op in ("balance_cmd", "relay_cmd", "ota_cmd", "message"):
            topic = step.get("topic", "") if op == "message" else \
                f"smartmeter/{device.config.meter_no}/command/{op[:-4]}"
            device.message(topic, _payload_of(step, reg_id))
        elif op in ("reboot", "wipe_nvs", "corrupt_state", "wipe_ring", "swap_board"):
            # Storage faults happen while the meter is down; each of these ops ends with a boot.
            reason = step.get("reason", "software" if op == "reboot" else "poweron")
            start = int(step.get("startMillis", 0))
            if op == "reboot":
                device.reboot(reason, start)
            elif op == "wipe_nvs":
                device.wipe_nvs(reason, start)
            elif op == "corrupt_state":
                device.corrupt_state(step.get("key", KEY_STATE), reason, start)
            elif op == "wipe_ring":
                device.wipe_ring(reason, start)
            else:
                device.swap_board(reason, start)
        else:
            raise ValueError(f"line {number}: unknown op {op!r}")

    if device is None:
        raise ValueError("empty trace")
    ota_state = ota_state_name(device.ota.state) if device.ota is not None else "none"
    if device.safe is not None:
        out(_line({"event": "final", "safeMode": True, "fastBoots": device.guard.fast_boots, "fw": device.fw,
                   "otaState": ota_state, "outbox": len(device.outbox)}))
        return
    core = device.core
    out(
        _line(
            {
                "event": "final",
                "fw": device.fw,
                "otaState": ota_state,
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
                "outbox": len(device.outbox),
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
