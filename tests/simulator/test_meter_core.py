"""Unit tests of the Python meter core (devtools/sim/meter_core.py)."""

import json
import struct
from pathlib import Path

import pytest

from devtools.sim.meter_core import (
    KEY_RELAY,
    KEY_SEQ,
    KEY_STATE,
    MSG_OVER_RATED,
    MSG_REG_ID_MISMATCH,
    MSG_REGISTER_AHEAD,
    MSG_STATE_FROM_LOG,
    MSG_STATE_UNREADABLE,
    BootGuard,
    BootGuardConfig,
    EspMqttOutbox,
    ManualClock,
    MemoryKvStore,
    MeterConfig,
    MeterCore,
    OtaConfig,
    OtaState,
    RelayOverride,
    Report,
    ReportBuffer,
    ReportMeta,
    RetainedMemory,
    SimDevice,
    StateRecord,
    XorShift32,
    base64_decode,
    decode_balance_command,
    decode_ota_command,
    decode_relay_command,
    decode_retained,
    decode_state,
    elapsed_ms,
    encode_state,
    round6,
    valid_reg_id,
)


class Bench:
    """One simulated meter with a recording transport."""

    def __init__(self, start_millis=0, seed=12345, **cfg):
        cfg.setdefault("status_interval_ms", 0)
        # The bench moves the register in big steps between samples; the cap has its own tests.
        cfg.setdefault("rated_max_kw", 1e6)
        self.config = MeterConfig(**cfg)
        self.clock = ManualClock(start_millis)
        self.kv = MemoryKvStore()
        self.buffer = ReportBuffer(8)
        self.rng = XorShift32(seed)
        self.sent = []
        self.relay = []
        self.register = None
        self.refuse = False
        self.boot()

    def boot(self, reason="poweron"):
        self.core = MeterCore(self.config, self.clock, self.kv, self.buffer, self._publish,
                              self.relay.append, lambda: self.register, reset_reason=reason, random32=self.rng)
        self.core.begin()

    def reboot(self, reason="software"):
        self.clock.restart()
        self.boot(reason)

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
                      "totalConsumed": 0.0048, "timestamp": 1698765432000, "seq": 0, "energyTotal": 0.0048,
                      "regId": b.core.reg_id}


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
    assert b.on("balance")[-1] == {"meterNo": "METER001", "balance": 10.25, "timestamp": 2000,
                                   "regId": b.core.reg_id, "cmdId": "c-1"}
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


def test_state_is_written_at_most_once_a_minute_and_payments_at_once():
    b = Bench(persist_interval_ms=60000)
    assert b.kv.writes(KEY_STATE) == 1  # the new register history, at once
    b.balance_cmd({"balance": 100, "timestamp": 1})
    assert b.kv.writes(KEY_STATE) == 2
    for s in range(1, 601):
        b.register = s * 0.001
        b.run(1000)
    # the first reading of a boot without a saved register, then one write a minute (not 20)
    assert b.kv.writes(KEY_STATE) == 3 + 9
    billed = b.core.energy_total
    b.clock.restart()
    b.boot()  # power cut: the ring's newest report and the saved sensor register cover the gap
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
    b.run(1000)  # 1200.5 against the register saved with the state: billed across the reboot
    b.register = 1200.6
    b.run(30000)
    assert [r["energyTotal"] for r in b.on("consumption")] == [0.25, 0.6]


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
    assert registers == sorted(registers) and len(registers) == 5
    assert lines[-1]["energyTotal"] == registers[-1] == 1.125  # every kWh the sensor counted


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


# ---- register histories (firmware test_register_history.cpp) ------------------------------------


def _reg_cmd(balance, energy_total, reg_id, **extra):
    return {"balance": balance, "timestamp": 1, "energyTotal": energy_total, "regId": reg_id, **extra}


def _three_reports(b, start):
    b.register = start
    b.run(1000)
    for i in range(1, 4):
        b.register = start + 0.5 * i
        b.run(30000)


def test_xorshift32_is_the_firmware_host_sequence():
    r = XorShift32(1)
    assert [r(), r(), r()] == [270369, 67634689, 2647435461]
    assert XorShift32(0)() == 270369


def test_first_boot_draws_a_reg_id_writes_it_at_once_and_keeps_it():
    b = Bench()
    reg_id = b.core.reg_id
    assert len(reg_id) == 8 and valid_reg_id(reg_id)
    assert b.kv.writes(KEY_STATE) == 1
    assert decode_state(b.kv.get(KEY_STATE)).reg_id == reg_id
    b.reboot()
    assert b.core.reg_id == reg_id
    b.core.on_connected()
    _three_reports(b, 10.0)
    assert {r["regId"] for r in b.on("consumption")} == {reg_id}
    assert b.on("status")[0]["regId"] == reg_id
    assert json.loads(b.core.will_message().payload)["regId"] == reg_id
    assert Bench(seed=99).core.reg_id != reg_id


def test_a_replaced_board_starts_a_new_history_and_refuses_the_old_register():
    b = Bench()
    b.core.on_connected()
    b.balance_cmd({"balance": 20, "timestamp": 1})
    _three_reports(b, 100.0)
    old_id, old_register = b.core.reg_id, b.core.energy_total
    assert old_register == 1.5
    b.kv, b.buffer, b.rng = MemoryKvStore(), ReportBuffer(8), XorShift32(4242)
    b.reboot()
    assert b.core.reg_id != old_id and b.core.energy_total == 0 and b.core.next_seq == 0
    b.core.on_connected()
    b.balance_cmd(_reg_cmd(18.5, old_register, old_id))
    assert b.core.balance == 18.5  # not 20: the old register is someone else's
    notice, back = b.on("status")[-2:]
    assert (notice["status"], notice["message"], notice["regId"]) == ("error", MSG_REG_ID_MISMATCH, b.core.reg_id)
    assert back["status"] == "online"
    b.balance_cmd({"balance": 18.5, "timestamp": 1, "energyTotal": 1.5})  # no regId: ahead of this register
    assert b.core.balance == 18.5 and b.on("status")[-2]["message"] == MSG_REGISTER_AHEAD
    b.register = 101.5
    b.run(1000)
    b.register = 101.75
    b.run(1000)
    b.balance_cmd(_reg_cmd(18.5, 0, b.core.reg_id))
    assert b.core.balance == 18.25


def test_nvs_erased_with_the_log_intact_continues_the_history():
    b = Bench()
    b.core.on_connected()
    b.balance_cmd({"balance": 20, "timestamp": 1})
    b.relay_cmd({"state": "on"})
    b.core.on_disconnected()
    _three_reports(b, 100.0)
    reg_id = b.core.reg_id
    b.kv.wipe()
    b.reboot()
    assert (b.core.reg_id, b.core.energy_total, b.core.balance) == (reg_id, 1.5, 18.5)
    assert b.core.relay_override is RelayOverride.ON
    assert b.core.next_seq == 3
    b.core.on_connected()
    assert MSG_STATE_FROM_LOG in [s["message"] for s in b.on("status")]


def test_seq_resumes_above_the_newest_logged_report():
    b = Bench(seq_block=4)
    b.core.on_disconnected()
    _three_reports(b, 0.0)
    b.kv.put(KEY_SEQ, bytes(8))
    b.reboot()
    assert b.core.next_seq == 3


def test_an_unreadable_state_starts_a_new_history_and_says_so():
    b = Bench()
    b.balance_cmd({"balance": 20, "timestamp": 1})
    reg_id = b.core.reg_id
    b.kv.corrupt(KEY_STATE)
    b.reboot()
    assert b.core.reg_id != reg_id and b.core.balance == 0
    b.core.on_connected()
    assert MSG_STATE_UNREADABLE in [s["message"] for s in b.on("status")]


def test_the_state_before_register_histories_is_migrated():
    b = Bench()
    b.kv = MemoryKvStore()
    b.kv.put(KEY_STATE, struct.pack("<dd", 321.5, 12.25))
    b.kv.put(KEY_RELAY, bytes([int(RelayOverride.OFF)]))
    b.boot()
    assert (b.core.energy_total, b.core.balance, b.core.relay_override) == (321.5, 12.25, RelayOverride.OFF)
    assert len(b.kv.get(KEY_STATE)) == 46 and valid_reg_id(b.core.reg_id)
    reg_id = b.core.reg_id
    b.reboot()
    assert (b.core.reg_id, b.core.energy_total) == (reg_id, 321.5)


def test_state_records_check_crc_and_plausibility():
    s = StateRecord(reg_id="AbCdEf12", energy_total=10, balance=-2, have_raw=True, raw_kwh=1234.5, unbilled_kwh=0.25)
    raw = encode_state(s)
    assert len(raw) == 46 and decode_state(raw) == s
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 1
        assert decode_state(bytes(bad)) is None
    s.energy_total = -1
    assert decode_state(encode_state(s)) is None


def test_energy_total_applies_only_for_this_history_or_within_the_tolerance():
    b = Bench()
    b.core.on_connected()
    b.register = 0.0
    b.run(1000)
    b.register = 5.0
    b.run(1000)
    b.balance_cmd(_reg_cmd(10, 4.75, b.core.reg_id))
    assert b.core.balance == 9.75
    b.balance_cmd(_reg_cmd(10, 4.75, "SomeoneElse"))
    assert b.core.balance == 10
    b.balance_cmd({"balance": 10, "timestamp": 1, "energyTotal": 5.005})
    assert b.core.balance == pytest.approx(10.005, abs=1e-12)
    b.balance_cmd({"balance": 10, "timestamp": 1, "energyTotal": 6})
    assert b.core.balance == 10
    assert [s["message"] for s in b.on("status") if s["status"] == "error"] == [MSG_REG_ID_MISMATCH, MSG_REGISTER_AHEAD]
    assert decode_balance_command('{"balance": 1, "regId": ""}') is None
    assert decode_balance_command('{"balance": 1, "regId": "a/b"}') is None
    assert decode_balance_command('{"balance": 1, "regId": "' + "r" * 17 + '"}') is None
    assert decode_balance_command('{"balance": 1, "regId": "Ab_9-"}').reg_id == "Ab_9-"


def test_a_delta_above_the_rated_power_is_capped_counted_and_reported():
    b = Bench(rated_max_kw=18.0)
    b.core.on_connected()
    b.balance_cmd({"balance": 100, "timestamp": 1})
    b.register = 10.0
    b.run(1000)
    b.register = 10.004
    b.run(1000)
    b.register = 30.004
    b.run(1000)
    assert b.core.energy_total == pytest.approx(0.010, abs=1e-12)
    assert b.core.unbilled_kwh == pytest.approx(19.994, abs=1e-12)
    b.run(1000)
    (notice,) = [s for s in b.on("status") if s["message"] == MSG_OVER_RATED]
    assert notice["status"] == "error" and notice["unbilledKwh"] == 19.994
    assert b.on("status")[-1]["status"] == "online"


def test_a_reboot_bills_the_gap_from_the_saved_register_capped_by_the_boot_gap():
    b = Bench(rated_max_kw=18.0, boot_gap_ms=119000)
    b.balance_cmd({"balance": 50, "timestamp": 1})
    b.register = 100.0
    b.run(1000)
    b.core.persist_now()
    b.register = 100.25
    b.reboot()
    b.run(1000)
    assert b.core.energy_total == 0.25 and b.core.unbilled_kwh == 0
    b.core.persist_now()
    b.register = 103.25  # beyond 18 kW over 2 minutes
    b.reboot()
    b.run(1000)
    assert b.core.energy_total == pytest.approx(0.25 + 0.601, abs=1e-12)
    b.core.persist_now()
    b.register = 1.0  # the sensor was reset while the meter was down
    b.reboot()
    b.run(1000)
    assert b.core.energy_total == pytest.approx(0.851, abs=1e-12)  # nothing billed for the gap
    b.register = 1.004
    b.run(1000)
    assert b.core.energy_total == pytest.approx(0.855, abs=1e-12)


def test_report_ring_records_are_consumed_in_any_order_and_overflow_drops_the_oldest_written():
    ring = ReportBuffer(3)
    reports = [Report(i, i, 0.0, 0.0, 0.0, float(i), "AbCdEf12") for i in range(5)]
    keys = [ring.append(r, ReportMeta()) for r in reports[:3]]
    assert ring.consume(keys[1]) and not ring.consume(keys[1])
    assert [ring.peek_at(i)[1].seq for i in range(len(ring))] == [0, 2]
    ring.append(reports[3])  # overwrites the slot of report 0 (pending: dropped)
    assert ring.dropped == 1 and [ring.peek_at(i)[1].seq for i in range(len(ring))] == [2, 3]
    assert ring.peek_newest()[0].seq == 3


# ---- the ring is the outbox (firmware test_outbox.cpp) -------------------------------------------


class Field:
    """A meter on a network that can drop, stall and lose power (EspMqttOutbox)."""

    def __init__(self, **cfg):
        cfg.setdefault("status_interval_ms", 0)
        cfg.setdefault("report_interval_ms", 10000)
        cfg.setdefault("seq_block", 4)
        self.config = MeterConfig(**cfg)
        self.clock = ManualClock()
        self.kv = MemoryKvStore()
        self.ring = ReportBuffer(64)
        self.rtc = RetainedMemory()
        self.mqtt = EspMqttOutbox(self.clock.monotonic)
        self.mqtt.disconnect()
        self.rng = XorShift32(5)
        self.sensor = 1000.0
        self.consuming = True
        self.appended = []
        append = self.ring.append
        self.ring.append = lambda r, meta=None: (self.appended.append(r), append(r, meta))[1]
        self.boot()

    def boot(self, reason="poweron"):
        self.core = MeterCore(self.config, self.clock, self.kv, self.ring, self.mqtt.publish, lambda closed: None,
                              lambda: self.sensor, reason, random32=self.rng, retained=self.rtc,
                              outbox_bytes=self.mqtt.outbox_bytes)
        self.core.begin()
        self.core.on_message(self.core.topic("command/balance"), '{"balance": 1000, "timestamp": 1}')

    def step(self, ms):
        for _ in range(0, ms, 1000):
            self.clock.advance(1000)
            if self.consuming:
                self.sensor += 0.0005
            self.mqtt.service_into(self.core)
            self.core.loop()

    def up(self):
        self.mqtt.connect()
        self.core.on_connected()

    def down(self):
        self.mqtt.disconnect()
        self.core.on_disconnected()

    def power_cut(self):
        self.mqtt.power_cut()
        self.rtc.clear()
        self.clock.restart()
        self.boot()

    def settle(self):
        self.consuming = False
        self.mqtt.acking, self.mqtt.blackhole = True, False
        if not self.mqtt.connected:
            self.up()
        self.step(120000)
        self.mqtt.service_into(self.core)

    def reports(self):
        return [json.loads(m.payload) for m in self.mqtt.messages if m.topic.endswith("/consumption")]

    def check_delivered(self):
        seen = {}
        for m in self.mqtt.messages:
            if m.topic.endswith("/consumption"):
                p = json.loads(m.payload)
                key = (p["regId"], p["seq"])
                assert seen.setdefault(key, m.payload) == m.payload, "a duplicate must be the same report"
        assert set(seen) == {(r.reg_id, r.seq) for r in self.appended}
        assert len(self.ring) == 0


def test_a_report_leaves_the_ring_only_on_its_puback():
    f = Field()
    f.up()
    f.step(10000)
    assert len(f.reports()) == 1 and len(f.ring) == 1 and f.core.inflight == 1
    f.step(1000)
    assert len(f.ring) == 0 and f.core.inflight == 0


def test_a_report_expired_in_the_client_outbox_is_sent_again():
    f = Field()
    f.up()
    f.mqtt.acking = False
    expired = []
    f.mqtt.on_expired = expired.append
    f.step(41000)
    assert len(expired) == 1 and len(f.reports()) == 4
    f.step(1000)
    assert len(f.reports()) == 5 and f.reports()[-1]["seq"] == 0
    f.settle()
    f.check_delivered()


def test_a_drop_and_a_reconnect_after_more_than_30_s_lose_nothing():
    f = Field()
    f.up()
    f.mqtt.acking = False
    f.step(30000)
    assert f.core.inflight == 3
    f.down()
    f.step(120000)
    f.mqtt.acking = True
    f.up()
    f.settle()
    f.check_delivered()
    assert len(f.appended) == 27


def test_an_id_two_messages_share_consumes_neither():
    ids = iter([7, 7] + list(range(8, 100)))
    f = Field()
    f.mqtt.id_source = lambda: next(ids)
    f.up()
    f.mqtt.acking = False
    f.step(20000)
    f.mqtt.acking = True
    f.step(1000)
    assert len(f.ring) == 2
    f.step(40000)
    f.settle()
    f.check_delivered()


@pytest.mark.parametrize("cut", range(-1, 24))
def test_no_report_is_lost_or_doubled_across_drop_reconnect_and_a_power_cut(cut):
    f = Field()
    for s in range(24):
        phase = s % 8
        if phase == 0:
            f.up()
        elif phase == 1:
            f.mqtt.acking = False
        elif phase == 2:
            f.mqtt.blackhole = True
        elif phase == 3:
            f.down()
        elif phase == 5:
            f.mqtt.acking, f.mqtt.blackhole = True, False
        elif phase == 6:
            f.up()
        f.step(45000 if phase == 4 else 7000)
        if s == cut:
            f.power_cut()
    f.settle()
    f.check_delivered()
    assert f.reports()[-1]["energyTotal"] == round6(f.core.energy_total)


def test_a_soft_reset_resumes_exactly_from_retained_memory():
    f = Field(persist_interval_ms=600000)
    f.up()
    f.step(35000)
    billed, writes = f.core.energy_total, f.kv.total_writes()
    f.sensor += 0.001  # used during the reset
    f.mqtt.power_cut()
    f.mqtt.connect()
    f.clock.restart()
    f.boot("task_wdt")  # the retained memory survives
    assert f.core.energy_total == billed
    f.core.on_connected()
    f.step(10000)
    first, second = f.reports()[-2], f.reports()[-1]
    assert second["unitsConsumed"] == round6(second["energyTotal"] - first["energyTotal"])
    assert f.kv.total_writes() <= writes + 3  # the restored state, the seq block, the balance command
    raw = bytearray(f.rtc.load())
    raw[10] ^= 0x40
    f.rtc.store(bytes(raw))
    assert decode_retained(f.rtc.load()) is None


# ---- OTA, boot-loop guard, safe mode, SimDevice (firmware test_ota.cpp) --------------------------

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "firmware" / "test" / "keys"
                      / "test_ota_vectors.json").read_text())
KEY = bytes.fromhex(VECTORS["publicKey"])
IMAGES = {f"https://fw.example/{n}.bin": VECTORS["images"][n]["text"].encode()
          for n in ("good", "crashes", "invalid", "silent")}


def _ota(name, url=None, cmd_id="ota-1"):
    v = VECTORS["images"][name]
    return json.dumps({"url": url or f"https://fw.example/{name}.bin", "version": v["version"],
                       "sha256": v["sha256"], "signature": v["signature"], "cmdId": cmd_id})


def _device(**kw):
    statuses = []
    d = SimDevice(
        MeterConfig(meter_no="KE-9", fw_version="1.0.0", status_interval_ms=0, sample_interval_ms=10000),
        random32=XorShift32(9), ota_public_key=KEY, ota_fetch=IMAGES.get,
        ota_crashes=lambda image: image == IMAGES["https://fw.example/crashes.bin"],
        ota_valid=lambda image: image != IMAGES["https://fw.example/invalid.bin"], **kw)
    d.outbox.on_transmit = lambda m: statuses.append(json.loads(m.payload)) if m.topic.endswith("/status") else None
    d.sensor_kwh = 100.0
    d.connect()
    d.message("smartmeter/KE-9/command/balance", '{"balance": 20, "timestamp": 1}')
    return d, statuses


def test_ota_downloads_verifies_restarts_and_is_confirmed_by_an_acknowledged_report():
    d, statuses = _device()
    d.message("smartmeter/KE-9/command/ota", _ota("good"))
    assert d.ota.state is OtaState.DOWNLOADING
    assert statuses[-1]["otaState"] == "downloading" and statuses[-1]["cmdId"] == "ota-1"
    d.advance(8000)
    assert d.fw == "1.1.0" and d.ota.state is OtaState.PENDING
    d.connect()
    d.advance(31000)
    assert d.ota.state is OtaState.VALID and d.platform.marked_valid == 1
    assert "OTA 1.1.0: confirmed" in [s["message"] for s in statuses]
    assert statuses[-1]["fw"] == "1.1.0"


def test_ota_refuses_a_forged_signature_and_bytes_that_do_not_match():
    d, statuses = _device()
    d.message("smartmeter/KE-9/command/ota", _ota("forged", "https://fw.example/good.bin"))
    assert d.ota.state is OtaState.FAILED and d.ota.error == "bad signature" and d.platform.fetches == 0
    v = VECTORS["images"]["good"]
    d.message("smartmeter/KE-9/command/ota", json.dumps({
        "url": "https://fw.example/silent.bin", "version": v["version"], "sha256": v["sha256"],
        "signature": v["signature"]}))
    d.advance(6000)
    assert d.ota.error == "sha256 mismatch" and d.fw == "1.0.0"
    d.message("smartmeter/KE-9/command/ota", _ota("invalid"))
    d.advance(6000)
    assert d.ota.error == "image rejected: not a valid app image"


def test_ota_an_image_that_crashes_rolls_back_and_is_not_tried_again():
    restarts = []
    d, statuses = _device(on_restart=lambda into, reason: restarts.append((into, reason)))
    d.message("smartmeter/KE-9/command/ota", _ota("crashes"))
    d.advance(8000)
    assert restarts == [("1.2.0", "software"), ("1.2.0", "panic"), ("1.0.0", "software")]
    assert d.fw == "1.0.0" and d.ota.state is OtaState.ROLLED_BACK
    d.connect()
    assert any(s.get("otaError") == "the new image crashed (panic)" and s["fw"] == "1.0.0" for s in statuses)
    d.message("smartmeter/KE-9/command/ota", _ota("crashes", cmd_id="ota-2"))
    assert statuses[-1]["message"] == "OTA 1.2.0 refused: this image rolled back before"


def test_ota_an_image_without_an_acknowledged_report_rolls_back_after_the_confirmation_time():
    d, _ = _device(ota_config=OtaConfig(confirm_timeout_ms=60000))
    d.message("smartmeter/KE-9/command/ota", _ota("silent"))
    d.advance(8000)
    assert d.fw == "1.4.0"
    d.advance(62000)  # never connects
    assert d.fw == "1.0.0" and d.ota.state is OtaState.ROLLED_BACK
    assert d.ota.error == "no acknowledged report within the confirmation time"


def test_ota_a_power_cut_mid_download_fails_and_one_after_activation_boots_the_new_image():
    d, _ = _device()
    d.message("smartmeter/KE-9/command/ota", _ota("good"))
    d.advance(2000)
    d.power_cut()
    assert d.ota.state is OtaState.FAILED and d.ota.error == "interrupted by a reboot"
    d.message("smartmeter/KE-9/command/ota", _ota("good", cmd_id="ota-2"))
    d.advance(5000)  # downloaded and activated, not yet restarted
    d.power_cut()
    assert d.fw == "1.1.0" and d.ota.state is OtaState.PENDING


def test_commands_to_ota_decode_strictly():
    cmd, why, _ = decode_ota_command(_ota("good"))
    assert cmd is not None and cmd.version == "1.1.0"
    assert decode_ota_command(_ota("good").replace("https://", "http://"))[1] == "bad url"
    assert decode_ota_command(_ota("good").replace("https://", "http://"), require_https=False)[0] is not None
    assert decode_ota_command('{"url": "https://x", "version": "a/b", "cmdId": "c"}')[1:] == ("bad version", "c")
    assert base64_decode("TWE=") == b"Ma" and base64_decode("TWF=") is None and base64_decode("TW=E") is None


def test_the_boot_loop_guard_counts_fast_reboots_and_safe_mode_holds_the_relay_open():
    rtc = RetainedMemory()
    cfg = BootGuardConfig(max_fast_boots=2, stable_after_ms=60000, safe_mode_ms=300000)
    assert [BootGuard(rtc, cfg).begin() for _ in range(3)] == [False, False, True]
    rtc.clear()  # a power cut: the count is gone
    g = BootGuard(rtc, cfg)
    assert not g.begin() and g.fast_boots == 1
    g.loop(60000)
    assert BootGuard(rtc, cfg).begin() is False

    relays = []
    d, statuses = _device(boot_guard=BootGuardConfig(max_fast_boots=2, stable_after_ms=60000, safe_mode_ms=120000),
                          on_relay=relays.append)
    for _ in range(3):
        d.reboot("panic")
    assert d.safe is not None and relays[-1] is False
    d.connect()
    assert statuses[-1]["safeMode"] is True and "balance" not in statuses[-1] and statuses[-1]["fastBoots"] == 4
    d.message("smartmeter/KE-9/command/balance", '{"balance": 99, "timestamp": 1}')
    assert not d.relay_closed
    d.advance(121000)  # safe mode is over
    assert d.safe is None and d.core.balance == 20


def test_sim_device_storage_faults_keep_or_restart_the_register_history():
    d, _ = _device()
    reg_id = d.core.reg_id
    d.reboot("task_wdt")
    assert d.core.reg_id == reg_id
    d.advance(31000)  # one report in the ring
    d.wipe_nvs()
    assert d.core.reg_id == reg_id  # resumed from the report ring
    d.swap_board()
    assert d.core.reg_id != reg_id and d.core.energy_total == 0
    d.reset_sensor(0.0)
    d.advance(11000)
    assert d.core.energy_total == 0


def test_commands_the_transport_could_not_queue_are_reported():
    b = Bench()
    b.core.on_connected()
    b.core.commands_lost(3)
    assert b.on("status")[-1]["status"] == "error"
    assert b.on("status")[-1]["message"] == "Commands lost before the meter could read them: 3"


def test_sim_device_can_start_from_a_known_register_history():
    d = SimDevice(MeterConfig(meter_no="KE-10", status_interval_ms=0), random32=XorShift32(3))
    d.load_state(reg_id="Known_01", energy_total=12.5, balance=7.25, next_seq=100, raw_kwh=3000.0)
    assert (d.core.reg_id, d.core.energy_total, d.core.balance, d.core.next_seq) == ("Known_01", 12.5, 7.25, 100)
    d.sensor_kwh = 3000.25  # used while it was down: billed from the saved register
    d.advance(1000)
    assert d.core.energy_total == 12.75
    with pytest.raises(ValueError):
        d.load_state(reg_id="bad/id", energy_total=0, balance=0, next_seq=0)
