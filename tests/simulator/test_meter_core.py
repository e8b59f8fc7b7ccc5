"""Unit tests of the Python meter core (devtools/sim/meter_core.py)."""

import json

import pytest

from devtools.sim.meter_core import (
    KEY_SEQ,
    KEY_STATE,
    ManualClock,
    MemoryKvStore,
    MeterConfig,
    MeterCore,
    RelayOverride,
    ReportBuffer,
    decode_balance_command,
    decode_relay_command,
    elapsed_ms,
    round6,
)


class Bench:
    """One simulated meter with a recording transport."""

    def __init__(self, start_millis=0, **cfg):
        cfg.setdefault("status_interval_ms", 0)
        self.config = MeterConfig(**cfg)
        self.clock = ManualClock(start_millis)
        self.kv = MemoryKvStore()
        self.buffer = ReportBuffer(8)
        self.sent = []
        self.relay = []
        self.register = None
        self.refuse = False
        self.boot()

    def boot(self, reason="poweron"):
        self.core = MeterCore(self.config, self.clock, self.kv, self.buffer, self._publish,
                              self.relay.append, lambda: self.register, reset_reason=reason)
        self.core.begin()

    def _publish(self, topic, payload, qos, retain):
        if self.refuse:
            return False
        self.sent.append((topic.split("/", 2)[2], json.loads(payload), qos, retain))
        return True

    def run(self, ms, step=1000):
        while ms > 0:
            d = min(ms, step)
            self.clock.advance(d)
            ms -= d
            self.core.loop()

    def on(self, suffix):
        return [p for t, p, _, _ in self.sent if t == suffix]

    def balance_cmd(self, obj):
        self.core.on_message(self.core.topic("command/balance"), json.dumps(obj).encode())

    def relay_cmd(self, obj):
        self.core.on_message(self.core.topic("command/relay"), json.dumps(obj))


def test_round6_and_wrap_safe_elapsed():
    assert round6(10.495199999999954) == 10.4952
    assert round6(-0.0000004) == 0.0
    assert round6(1.0000005) == 1.000001
    assert elapsed_ms(5, 2**32 - 5) == 10
    assert elapsed_ms(0, 2**32 - 1) == 1


def test_seed_report_from_register_deltas():
    b = Bench()
    b.clock.sync(1698765402000)
    b.register = 1520.0
    b.core.on_connected()
    b.balance_cmd({"balance": 10.5, "timestamp": 1698765432000})
    b.run(1000)  # baseline only
    assert b.core.energy_total == 0
    b.register = 1520.0048
    b.run(29000)
    (report,) = b.on("consumption")
    assert report == {"meterNo": "METER001", "unitsConsumed": 0.0048, "remainingBalance": 10.4952,
                      "totalConsumed": 0.0048, "timestamp": 1698765432000, "seq": 0, "energyTotal": 0.0048}


def test_non_positive_deltas_are_ignored_and_a_reset_register_rebaselines():
    b = Bench()
    b.balance_cmd({"balance": 10, "timestamp": 1})
    b.register = 100.0
    b.run(1000)
    b.register = 99.0
    b.run(1000)
    assert b.core.balance == 10
    b.register = 99.5
    b.run(1000)
    assert b.core.balance == 9.5


def test_reconciliation_with_and_without_energy_total():
    b = Bench()
    b.core.on_connected()
    b.register = 0.0
    b.run(1000)
    b.register = 5.0
    b.run(1000)
    b.balance_cmd({"balance": 10.5, "timestamp": 1, "energyTotal": 4.75, "cmdId": "c-1"})
    assert b.core.balance == 10.25
    assert b.on("balance")[-1] == {"meterNo": "METER001", "balance": 10.25, "timestamp": 2000, "cmdId": "c-1"}
    b.balance_cmd({"balance": 5.25, "timestamp": 1})
    assert b.core.balance == 5.25
    assert "cmdId" not in b.on("balance")[-1]


@pytest.mark.parametrize("payload", [
    b"not json", b'{"balance": "1"}', b'{"balance": true}', b'{"balance": NaN}', b'{"balance": 01}',
    b'{"balance": 1.}', b'{"balance": 1e400}', b'{"balance": 5} x', b'{"balance": 5}\x01',
    b'{"balance": 5, "energyTotal": -1}', b'\xff{"balance": 5}', b'[1]', b'{"balance": 2e9}',
    b'{"balance": 5, "pad": "' + b"x" * 1100 + b'"}', b'{"balance": 5, "c": "\\ud800"}',
])
def test_malformed_balance_commands_are_rejected(payload):
    assert decode_balance_command(payload) is None


def test_command_decoding_mirrors_the_c_parser():
    assert decode_balance_command('{"balance": 2, "balance": 3}').balance == 2  # first key wins
    assert decode_balance_command('{"balance": 2, "cmdId": "a\\u0000b"}').cmd_id == "a"
    assert decode_balance_command('{"balance": 2, "cmdId": 7}').cmd_id == ""
    assert decode_balance_command('{"balance": 2, "cmdId": "' + "x" * 65 + '"}').cmd_id == ""
    assert decode_relay_command('{"state": "off", "cmdId": "r"}').state is RelayOverride.OFF
    assert decode_relay_command('{"state": "OFF"}') is None


def test_relay_policy_and_overrides():
    b = Bench(sensor_fail_timeout_ms=2000)
    assert b.relay == [False]
    b.balance_cmd({"balance": 1, "timestamp": 1})
    assert b.core.relay_closed
    b.balance_cmd({"balance": 0, "timestamp": 1})
    assert not b.core.relay_closed
    b.relay_cmd({"state": "on"})
    assert b.core.relay_closed
    b.register = None  # the sensor dies: fail-safe beats the forced "on"
    b.run(3000)
    assert not b.core.relay_closed
    b.register = 1.0
    b.run(1000)
    assert b.core.relay_closed
    b.relay_cmd({"state": "off"})
    b.clock.restart()
    b.boot()  # the maintenance override survives the reboot
    assert b.core.relay_override is RelayOverride.OFF
    assert not b.core.relay_closed


def test_offline_reports_replay_oldest_first_and_overflow_drops_the_oldest():
    b = Bench(report_interval_ms=1000, replay_batch=3)
    b.register = 0.0
    b.run(10000)  # 10 reports, buffer of 8
    assert len(b.buffer) == 8
    b.core.on_connected()
    b.run(3000)
    seqs = [r["seq"] for r in b.on("consumption")]
    assert seqs[:8] == list(range(2, 10))
    assert seqs == sorted(seqs)


def test_refused_publish_is_buffered_and_retried():
    b = Bench(report_interval_ms=1000)
    b.core.on_connected()
    b.refuse = True
    b.run(2000)
    assert len(b.buffer) == 2
    b.refuse = False
    b.run(1000)
    assert [r["seq"] for r in b.on("consumption")] == [0, 1, 2]


def test_seq_survives_reboots_without_repeating():
    b = Bench(report_interval_ms=1000, seq_block=4)
    b.core.on_connected()
    b.run(6000)
    b.clock.restart()
    b.boot()
    b.core.on_connected()
    b.run(1000)
    seqs = [r["seq"] for r in b.on("consumption")]
    assert seqs == [0, 1, 2, 3, 4, 5, 8]
    assert b.kv.writes(KEY_SEQ) == 3


def test_state_is_persisted_at_every_report_and_payments_at_once():
    b = Bench(persist_interval_ms=60000)
    b.balance_cmd({"balance": 100, "timestamp": 1})
    assert b.kv.writes(KEY_STATE) == 1
    for s in range(1, 601):
        b.register = s * 0.001
        b.run(1000)
    assert b.kv.writes(KEY_STATE) == 1 + 20  # one per 30 s report
    billed = b.core.energy_total
    b.clock.restart()
    b.boot()  # power cut right after the 20th report
    assert b.core.energy_total == billed


def test_power_cut_right_after_a_report_never_steps_the_register_backwards():
    b = Bench(persist_interval_ms=60000)
    b.core.on_connected()
    b.balance_cmd({"balance": 50, "timestamp": 1})
    b.register = 1200.0
    b.run(1000)
    b.register = 1200.25
    b.run(29000)
    assert [r["energyTotal"] for r in b.on("consumption")] == [0.25]
    b.register = 1200.5
    b.run(5000)  # billed but neither reported nor persisted when the power goes
    b.clock.restart()
    b.boot()
    assert b.core.energy_total == 0.25
    b.core.on_connected()
    b.run(1000)
    b.register = 1200.6
    b.run(30000)
    assert [r["energyTotal"] for r in b.on("consumption")] == [0.25, 0.35]


class _RefusingKv(MemoryKvStore):
    """NVS that silently stops storing the state record (partition full, flash fault)."""

    refuse_state = False

    def put(self, key, value):
        if not (self.refuse_state and key == KEY_STATE):
            super().put(key, value)


def test_report_log_is_a_second_witness_when_the_state_write_fails():
    b = Bench(report_interval_ms=10000)
    b.kv = _RefusingKv()
    b.boot()
    b.balance_cmd({"balance": 10, "timestamp": 1})
    b.kv.refuse_state = True
    b.register = 7.0
    b.run(1000)
    b.register = 7.5
    b.run(19000)  # two reports while offline, into the ring
    b.core.on_connected()
    assert len(b.buffer) == 0 and len(b.on("consumption")) == 2
    b.clock.restart()
    b.boot()
    assert (b.core.energy_total, b.core.balance) == (0.5, 9.5)


def test_power_cut_trace_keeps_the_wire_register_monotonic():
    """firmware/trace/power_cut_after_report.jsonl (also compared with the C++ core by
    test_contract.py): two power cuts, one right after a report, one after offline reports."""
    from pathlib import Path

    from devtools.sim.trace_runner import run_trace

    trace = Path(__file__).resolve().parents[2] / "firmware" / "trace" / "power_cut_after_report.jsonl"
    out = []
    with open(trace, encoding="utf-8") as f:
        run_trace(f, out.append)
    lines = [json.loads(line) for line in out]
    registers = [json.loads(m["payload"])["energyTotal"] for m in lines if m.get("topic", "").endswith("/consumption")]
    assert registers == [0.25, 0.35, 0.5, 0.625, 0.75]
    assert lines[-1]["energyTotal"] == 0.75


def test_status_on_connect_and_will():
    b = Bench(start_millis=2**32 - 1000)
    b.run(5000)
    will = b.core.will_message()
    assert will.retain and json.loads(will.payload)["status"] == "offline"
    b.core.on_connected()
    online, low = b.on("status")
    assert online["status"] == "online" and low["status"] == "low_balance"
    assert online["uptime"] == 5 and online["timestamp"] == 5000 and online["resetReason"] == "poweron"
    assert {"relay", "fw", "wifi_rssi", "balance", "message"} <= online.keys()
