"""Pure-Python port of the ESP32 meter core (firmware/core/src/meter_core.cpp).

The simulator must behave like the device, so this is a line-by-line port of the same state
machine: billing on register deltas, local balance with energyTotal reconciliation, relay
policy, reports with seq/energyTotal, the offline buffer, persistence (at every report) and status.
Floats are used on purpose: the device computes in IEEE double, and the same operations in the
same order give bit-identical results, which firmware/trace/ and tests/simulator/test_contract.py
check. This module is a device model, not accounting: the backend's ledger uses Decimal.

Standard library only (no Django, no MQTT client): the networked simulator wires `publish`,
`set_relay` and `read_energy` to whatever transport and sensor model it uses.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MAX_PAYLOAD_BYTES = 1024  # PROTOCOL.md: one JSON object of at most 1024 bytes
MAX_CMD_ID_BYTES = 64
MAX_ABS_BALANCE = 1e9
MAX_ENERGY_TOTAL = 1e12
MAX_JSON_DEPTH = 64  # containers; firmware strict_json.cpp kMaxDepth
MAX_NUMBER_CHARS = 63  # firmware strict_json.cpp kMaxNumberChars
U32 = 0xFFFFFFFF

KEY_SEQ = "seq"  # u64 LE: first seq the next boot may use
KEY_STATE = "state"  # f64 LE energyTotal, f64 LE balance
KEY_RELAY = "relay"  # u8 RelayOverride

MSG_ONLINE = "Device operating normally"


def elapsed_ms(now: int, since: int) -> int:
    """Milliseconds between two 32-bit millis() values, right across the wrap."""
    return (now - since) & U32


def round6(x: float) -> float:
    """Payload rounding, identical to firmware numeric.h: floor(x * 1e6 + 0.5) / 1e6."""
    return math.floor(x * 1e6 + 0.5) / 1e6


class RelayOverride(enum.IntEnum):
    AUTO = 0
    ON = 1
    OFF = 2


_OVERRIDE_NAMES = {RelayOverride.AUTO: "auto", RelayOverride.ON: "on", RelayOverride.OFF: "off"}


def relay_override_name(o: RelayOverride) -> str:
    return _OVERRIDE_NAMES[o]


@dataclass(frozen=True)
class MeterConfig:
    meter_no: str = "METER001"
    fw_version: str = "1.0.0"
    report_interval_ms: int = 30000
    sample_interval_ms: int = 1000
    sensor_fail_timeout_ms: int = 60000
    persist_interval_ms: int = 60000
    status_interval_ms: int = 300000  # 0 = no periodic status
    seq_block: int = 64
    replay_batch: int = 20
    low_balance_threshold: float = 1.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    qos: int
    retain: bool


@dataclass(frozen=True)
class Report:
    seq: int
    timestamp: int
    units_consumed: float
    remaining_balance: float
    total_consumed: float
    energy_total: float


@dataclass(frozen=True)
class BalanceCommand:
    balance: float
    energy_total: float | None
    cmd_id: str  # "" when absent or unusable


@dataclass(frozen=True)
class RelayCommand:
    state: RelayOverride
    cmd_id: str


class Clock(Protocol):
    def millis(self) -> int: ...  # 32-bit, wraps

    def unix_millis(self) -> int | None: ...  # None until SNTP sync


class ManualClock:
    """A clock the caller moves; millis() wraps at 2**32 like the device's."""

    def __init__(self, start_millis: int = 0) -> None:
        self._start = start_millis
        self._elapsed = 0
        self._unix_at_sync: int | None = None
        self._elapsed_at_sync = 0

    def millis(self) -> int:
        return (self._start + self._elapsed) & U32

    def unix_millis(self) -> int | None:
        if self._unix_at_sync is None:
            return None
        return self._unix_at_sync + (self._elapsed - self._elapsed_at_sync)

    def advance(self, ms: int) -> None:
        self._elapsed += ms

    def sync(self, unix_ms: int) -> None:
        self._unix_at_sync = unix_ms
        self._elapsed_at_sync = self._elapsed

    def restart(self, start_millis: int = 0) -> None:
        """A reboot: millis() restarts and the wall clock is unknown until the next sync."""
        self._start = start_millis
        self._elapsed = 0
        self._unix_at_sync = None


class MemoryKvStore:
    """The meter's NVS: survives reboots of a MeterCore built on the same instance."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._writes: dict[str, int] = {}

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = bytes(value)
        self._writes[key] = self._writes.get(key, 0) + 1

    def writes(self, key: str) -> int:
        return self._writes.get(key, 0)


class ReportBuffer:
    """The offline report ring: FIFO, and when full the oldest report is dropped (the newest
    carries the whole energy register, so it matters most). Same capacity rule as the
    firmware's FlashRing with one slot per sector."""

    def __init__(self, capacity: int = 64) -> None:
        self._items: deque[Report] = deque(maxlen=max(capacity, 1))
        self._newest: Report | None = None

    def append(self, report: Report) -> None:
        self._items.append(report)
        self._newest = report

    def peek_newest(self) -> Report | None:
        """The newest report ever appended, replayed or not (FlashRing::peekNewest: consumed
        records stay in flash until their sector is reused, and the newest one is reused last)."""
        return self._newest

    def peek_oldest(self) -> Report | None:
        return self._items[0] if self._items else None

    def pop_oldest(self) -> None:
        self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


# ---- payloads ---------------------------------------------------------------------------------


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_report(meter_no: str, r: Report) -> str:
    return _dumps(
        {
            "meterNo": meter_no,
            "unitsConsumed": round6(r.units_consumed),
            "remainingBalance": round6(r.remaining_balance),
            "totalConsumed": round6(r.total_consumed),
            "timestamp": r.timestamp,
            "seq": r.seq,
            "energyTotal": round6(r.energy_total),
        }
    )


def encode_status(
    meter_no: str,
    *,
    status: str,
    message: str,
    balance: float,
    wifi_rssi: int,
    timestamp: int,
    relay_on: bool,
    fw: str,
    uptime_s: int,
    reset_reason: str,
    cmd_id: str = "",
) -> str:
    out = {
        "meterNo": meter_no,
        "status": status,
        "message": message,
        "balance": round6(balance),
        "wifi_rssi": wifi_rssi,
        "timestamp": timestamp,
        "relay": "on" if relay_on else "off",
        "fw": fw,
        "uptime": uptime_s,
        "resetReason": reset_reason,
    }
    if cmd_id:
        out["cmdId"] = cmd_id
    return _dumps(out)


def encode_balance_report(meter_no: str, balance: float, timestamp: int, cmd_id: str) -> str:
    out = {"meterNo": meter_no, "balance": round6(balance), "timestamp": timestamp}
    if cmd_id:
        out["cmdId"] = cmd_id
    return _dumps(out)


class _Rejected(ValueError):
    pass


def _c_str(s: str) -> str:
    # The firmware reads strings through cJSON as C strings: an escaped NUL ends them there.
    return s.split("\x00", 1)[0]


def _first_wins(pairs):
    # cJSON_GetObjectItemCaseSensitive returns the first of duplicate keys; json keeps the last.
    out = {}
    for k, v in pairs:
        out.setdefault(_c_str(k), v)
    return out


def _parse_number(text: str) -> float:
    # The firmware parses every number with strtod (ints included: 1e400 -> inf, "-0" -> -0.0)
    # and refuses number tokens longer than 63 characters.
    if len(text) > MAX_NUMBER_CHARS:
        raise _Rejected("number too long")
    return float(text)


def _reject_constant(name: str):
    raise _Rejected(name)  # NaN / Infinity are not JSON


def _check_tree(obj, depth: int = 0) -> None:
    """Rejects what the firmware's strict parser rejects beyond json's own rules: deep nesting
    and lone UTF-16 surrogates (json accepts "\\ud800"; valid pairs are already combined)."""
    if isinstance(obj, str):
        if any("\ud800" <= ch <= "\udfff" for ch in obj):
            raise _Rejected("lone surrogate")
    elif isinstance(obj, (dict, list)):
        if depth + 1 > MAX_JSON_DEPTH:
            raise _Rejected("too deep")
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(k, str):
                _check_tree(k, depth + 1)
            _check_tree(v, depth + 1)


def _parse_command(payload) -> dict | None:
    try:
        raw = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if len(raw) > MAX_PAYLOAD_BYTES:
            return None
        text = raw.decode("utf-8")
        obj = json.loads(
            text,
            object_pairs_hook=_first_wins,
            parse_float=_parse_number,
            parse_int=_parse_number,
            parse_constant=_reject_constant,
        )
        _check_tree(obj)
    except (ValueError, RecursionError):  # _Rejected, JSONDecodeError, Unicode{En,De}codeError
        return None
    return obj if isinstance(obj, dict) else None


def _cmd_id(obj: dict) -> str:
    value = obj.get("cmdId")
    if not isinstance(value, str):
        return ""
    value = _c_str(value)
    if not value or len(value.encode("utf-8")) > MAX_CMD_ID_BYTES:
        return ""
    return value


def _is_number(v) -> bool:
    return isinstance(v, float)  # every JSON number arrives as float (_parse_number)


def decode_balance_command(payload) -> BalanceCommand | None:
    obj = _parse_command(payload)
    if obj is None:
        return None
    bal = obj.get("balance")
    if not _is_number(bal) or not math.isfinite(bal) or abs(bal) > MAX_ABS_BALANCE:
        return None
    energy_total = None
    if "energyTotal" in obj:
        # Present but unusable rejects the command: falling back to the seed rule would forgive
        # consumption that is in flight.
        et = obj["energyTotal"]
        if not _is_number(et) or not math.isfinite(et) or et < 0 or et > MAX_ENERGY_TOTAL:
            return None
        energy_total = et
    return BalanceCommand(balance=bal, energy_total=energy_total, cmd_id=_cmd_id(obj))


def decode_relay_command(payload) -> RelayCommand | None:
    obj = _parse_command(payload)
    if obj is None:
        return None
    state = obj.get("state")
    if not isinstance(state, str):
        return None
    states = {"on": RelayOverride.ON, "off": RelayOverride.OFF, "auto": RelayOverride.AUTO}
    chosen = states.get(_c_str(state))
    if chosen is None:
        return None
    return RelayCommand(state=chosen, cmd_id=_cmd_id(obj))


# ---- the state machine ------------------------------------------------------------------------


def _condition_message(condition: str) -> str:
    if condition == "error":
        return "Energy sensor not responding; relay open"
    if condition == "low_balance":
        return "Balance low"
    return MSG_ONLINE


class MeterCore:
    """One meter. Call begin() once, then loop() at least every sample_interval_ms, and
    on_connected() / on_disconnected() / on_message() as the transport reports them.

    publish(topic, payload, qos, retain) -> bool: True when the transport took the message.
    set_relay(closed): called when the relay must change (and once at begin()).
    read_energy() -> float | None: the sensor's energy register in kWh, None when it fails.
    """

    def __init__(
        self,
        config: MeterConfig,
        clock: Clock,
        kv: MemoryKvStore,
        buffer: ReportBuffer,
        publish: Callable[[str, str, int, bool], bool],
        set_relay: Callable[[bool], None],
        read_energy: Callable[[], float | None],
        reset_reason: str = "poweron",
    ) -> None:
        self.config = config
        self._clock = clock
        self._kv = kv
        self._buffer = buffer
        self._publish = publish
        self._set_relay = set_relay
        self._read_energy = read_energy
        self.reset_reason = reset_reason
        # Zero would stall seq reservation or replay forever.
        self._seq_block = max(config.seq_block, 1)
        self._replay_batch = max(config.replay_batch, 1)

        self._last_millis = clock.millis()
        self._uptime_ms = 0
        self._now_ms = self._last_millis

        self.balance = 0.0
        self.energy_total = 0.0
        self.session_total = 0.0
        self._interval_units = 0.0

        self._have_baseline = False
        self._baseline = 0.0
        self._sampled_once = False
        self._last_sample_ms = 0
        self._sensor_failing = False
        self._sensor_fail_since_ms = 0
        self.sensor_fault = False

        self.relay_override = RelayOverride.AUTO
        self._relay_known = False
        self.relay_closed = False

        self.next_seq = 0
        self._seq_ceiling = 0
        self._last_report_ms = 0
        self._last_persist_ms = 0
        self._state_dirty = False

        self.connected = False
        self._published_condition = "online"
        self._last_status_ms = 0
        self.wifi_rssi = 0

    # -- time --

    def _now(self) -> int:
        now = self._clock.millis()
        self._uptime_ms += elapsed_ms(now, self._last_millis)
        self._last_millis = now
        self._now_ms = now
        return now

    def _timestamp(self) -> int:
        unix = self._clock.unix_millis()
        return unix if unix is not None else self._uptime_ms  # below 1e12: "time unknown"

    @property
    def uptime_ms(self) -> int:
        return self._uptime_ms

    # -- lifecycle --

    def begin(self) -> None:
        t = self._now()
        raw = self._kv.get(KEY_SEQ)
        if raw is not None and len(raw) == 8:
            self.next_seq = struct.unpack("<Q", raw)[0]
        # Reserve a block so that a reboot resumes above every seq this boot can send.
        self._seq_ceiling = self.next_seq + self._seq_block
        self._kv.put(KEY_SEQ, struct.pack("<Q", self._seq_ceiling))
        raw = self._kv.get(KEY_STATE)
        if raw is not None and len(raw) == 16:
            self.energy_total, self.balance = struct.unpack("<dd", raw)
        # The register on the wire must never step backwards (the backend bills increases only):
        # the state is written before every report leaves, and the newest logged report is a
        # second witness for when that write failed.
        newest = self._buffer.peek_newest()
        if newest is not None and newest.energy_total > self.energy_total:
            self.energy_total = newest.energy_total
            self.balance = newest.remaining_balance
        raw = self._kv.get(KEY_RELAY)
        if raw is not None and len(raw) == 1 and raw[0] <= 2:
            self.relay_override = RelayOverride(raw[0])
        self._last_report_ms = t
        self._last_persist_ms = t
        self._last_status_ms = t
        self._apply_relay()

    def loop(self) -> None:
        t = self._now()
        cfg = self.config
        if not self._sampled_once or elapsed_ms(t, self._last_sample_ms) >= cfg.sample_interval_ms:
            self._sample(t)
        self._apply_relay()
        self._publish_condition_if_changed()
        if elapsed_ms(t, self._last_report_ms) >= cfg.report_interval_ms:
            self._last_report_ms = t  # one report covers a stall, no burst of empty ones
            self._emit_report()
        self._drain_buffer()
        if self._state_dirty and elapsed_ms(t, self._last_persist_ms) >= cfg.persist_interval_ms:
            self._persist_state()
        if (
            self.connected
            and cfg.status_interval_ms > 0
            and elapsed_ms(t, self._last_status_ms) >= cfg.status_interval_ms
        ):
            c = self.condition
            self._publish_status(c, _condition_message(c), "")

    def on_connected(self) -> None:
        self._now()
        self.connected = True
        self._drain_buffer()  # buffered reports before "online" (the backend then pushes balance)
        self._publish_status("online", MSG_ONLINE, "")
        self._publish_condition_if_changed()

    def on_disconnected(self) -> None:
        self._now()
        self.connected = False

    def on_message(self, topic: str, payload) -> None:
        self._now()
        if topic == self.topic("command/balance"):
            cmd = decode_balance_command(payload)
            if cmd is not None:
                self._apply_balance_command(cmd)
        elif topic == self.topic("command/relay"):
            rcmd = decode_relay_command(payload)
            if rcmd is not None:
                self._apply_relay_command(rcmd)

    def set_wifi_rssi(self, rssi: int) -> None:
        self.wifi_rssi = rssi

    def persist_now(self) -> None:
        self._now()
        self._persist_state()

    def will_message(self) -> Message:
        self._now()
        return Message(self.topic("status"), self._status_payload("offline", "Connection lost", ""), 0, True)

    def topic(self, suffix: str) -> str:
        return f"smartmeter/{self.config.meter_no}/{suffix}"

    @property
    def condition(self) -> str:
        if self.sensor_fault:
            return "error"
        if self.balance <= self.config.low_balance_threshold:
            return "low_balance"
        return "online"

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- internals (same order of operations as meter_core.cpp) --

    def _sample(self, t: int) -> None:
        self._sampled_once = True
        self._last_sample_ms = t
        raw = self._read_energy()
        kwh = None if raw is None else float(raw)  # the device reads a double
        ok = kwh is not None and math.isfinite(kwh) and 0 <= kwh <= MAX_ENERGY_TOTAL
        if not ok:
            if not self._sensor_failing:
                self._sensor_failing = True
                self._sensor_fail_since_ms = t
            if elapsed_ms(t, self._sensor_fail_since_ms) >= self.config.sensor_fail_timeout_ms:
                self.sensor_fault = True  # fail-safe: no unmetered energy
            return
        self._sensor_failing = False
        self.sensor_fault = False
        if not self._have_baseline:
            self._have_baseline = True  # first reading after boot: baseline only
            self._baseline = kwh
            return
        delta = kwh - self._baseline
        self._baseline = kwh  # follows the register; a backwards register was reset
        if delta > 0:
            self.energy_total += delta
            self.session_total += delta
            self._interval_units += delta
            self.balance -= delta
            self._state_dirty = True

    def _apply_relay(self) -> None:
        o = self.relay_override
        on = (not self.sensor_fault) and o != RelayOverride.OFF and (o == RelayOverride.ON or self.balance > 0)
        if not self._relay_known or on != self.relay_closed:
            self._set_relay(on)
            self.relay_closed = on
            self._relay_known = True

    def _status_payload(self, status: str, message: str, cmd_id: str) -> str:
        return encode_status(
            self.config.meter_no,
            status=status,
            message=message,
            balance=self.balance,
            wifi_rssi=self.wifi_rssi,
            timestamp=self._timestamp(),
            relay_on=self.relay_closed,
            fw=self.config.fw_version,
            uptime_s=self._uptime_ms // 1000,
            reset_reason=self.reset_reason,
            cmd_id=cmd_id,
        )

    def _publish_status(self, status: str, message: str, cmd_id: str) -> None:
        if not self.connected:
            return
        self._publish(self.topic("status"), self._status_payload(status, message, cmd_id), 0, True)
        self._published_condition = status
        self._last_status_ms = self._now_ms

    def _publish_condition_if_changed(self) -> None:
        c = self.condition
        if self.connected and c != self._published_condition:
            self._publish_status(c, _condition_message(c), "")

    def _take_seq(self) -> int:
        if self.next_seq >= self._seq_ceiling:
            self._seq_ceiling = self.next_seq + self._seq_block
            self._kv.put(KEY_SEQ, struct.pack("<Q", self._seq_ceiling))
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _emit_report(self) -> None:
        r = Report(
            seq=self._take_seq(),
            timestamp=self._timestamp(),
            units_consumed=self._interval_units,
            remaining_balance=self.balance,
            total_consumed=self.session_total,
            energy_total=self.energy_total,
        )
        self._interval_units = 0.0
        # "Never lose a kWh": this report's register is persisted before the report can leave.
        self._persist_state()
        if (
            self.connected
            and len(self._buffer) == 0
            and self._publish(self.topic("consumption"), encode_report(self.config.meter_no, r), 1, False)
        ):
            return
        self._buffer.append(r)

    def _drain_buffer(self) -> None:
        if not self.connected:
            return
        n = 0
        while n < self._replay_batch and len(self._buffer) > 0:
            r = self._buffer.peek_oldest()
            if not self._publish(self.topic("consumption"), encode_report(self.config.meter_no, r), 1, False):
                break
            self._buffer.pop_oldest()
            n += 1

    def _persist_state(self) -> None:
        self._kv.put(KEY_STATE, struct.pack("<dd", self.energy_total, self.balance))
        self._last_persist_ms = self._now_ms
        self._state_dirty = False

    def _apply_balance_command(self, cmd: BalanceCommand) -> None:
        if cmd.energy_total is not None:
            self.balance = cmd.balance - (self.energy_total - cmd.energy_total)
        else:
            self.balance = cmd.balance  # seed-only backend
        self._persist_state()  # a payment is written at once, not throttled
        self._apply_relay()
        if self.connected:
            self._publish(
                self.topic("balance"),
                encode_balance_report(self.config.meter_no, self.balance, self._timestamp(), cmd.cmd_id),
                0,
                False,
            )
        self._publish_condition_if_changed()

    def _apply_relay_command(self, cmd: RelayCommand) -> None:
        self.relay_override = cmd.state
        self._kv.put(KEY_RELAY, bytes([int(cmd.state)]))  # a maintenance "off" survives reboots
        self._apply_relay()
        self._publish_status(self.condition, "Relay override: " + relay_override_name(cmd.state), cmd.cmd_id)
