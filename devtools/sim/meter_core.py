"""Pure-Python port of the ESP32 meter core (firmware/core/src/meter_core.cpp).

The simulator must behave like the device, so this is a line-by-line port of the same state
machine: billing on register deltas (capped at the rated power, and across reboots from the
sensor register saved with the state), local balance with energyTotal reconciliation within a
register history (regId), relay policy, reports with seq/energyTotal/regId, the report ring,
persistence and status.
Floats are used on purpose: the device computes in IEEE double, and the same operations in the
same order give bit-identical results, which firmware/trace/ and tests/simulator/test_contract.py
check. This module is a device model, not accounting: the backend's ledger uses Decimal.

Standard library only (no Django, no MQTT client): the networked simulator wires `publish`,
`set_relay` and `read_energy` to whatever transport and sensor model it uses.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import secrets
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

MAX_PAYLOAD_BYTES = 1024  # PROTOCOL.md: one JSON object of at most 1024 bytes
MAX_CMD_ID_BYTES = 64
MAX_ABS_BALANCE = 1e9
MAX_ENERGY_TOTAL = 1e12
MAX_JSON_DEPTH = 64  # containers; firmware strict_json.cpp kMaxDepth
MAX_NUMBER_CHARS = 63  # firmware strict_json.cpp kMaxNumberChars
U32 = 0xFFFFFFFF

KEY_SEQ = "seq"  # u64 LE: first seq the next boot may use
KEY_STATE = "state"  # encode_state() (46 bytes); 16 bytes (f64 energyTotal, f64 balance) before regId
KEY_RELAY = "relay"  # u8 RelayOverride

MAX_REG_ID_BYTES = 16  # PROTOCOL.md: 1-16 of [A-Za-z0-9_-]
OWN_REG_ID_CHARS = 8  # what the firmware draws: 48 random bits
REG_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
MAX_PACKED_SEQ = (1 << 40) - 1  # the report ring's record stores seq in 40 bits
MAX_PACKED_TIMESTAMP = (1 << 48) - 1  # and the timestamp in 48
STATE_RECORD_BYTES = 46
REGISTER_STEP_KWH = 0.001  # one PZEM register step, allowed on top of the rated-power cap

MSG_ONLINE = "Device operating normally"
# Status messages of events (firmware meter_core.h, PROTOCOL-ext.md).
MSG_REG_ID_MISMATCH = "Balance command for another register history: energyTotal not applied"
MSG_REGISTER_AHEAD = "Balance command energyTotal is ahead of this meter's register: not applied"
MSG_OVER_RATED = "Energy register advanced faster than the rated power: excess not billed"
MSG_STATE_UNREADABLE = "Stored state unreadable: new register history"
MSG_STATE_FROM_LOG = "Stored state missing or unreadable: resumed from the report log"
MSG_COMMANDS_LOST = "Commands lost before the meter could read them: "


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
    replay_batch: int = 20  # reports handed to the transport per loop() at most
    max_inflight: int = 8  # reports awaiting their PUBACK at most (the ring is the outbox)
    max_outbox_bytes: int = 4096  # and the transport's outbox below this
    outbox_expiry_ms: int = 30000  # esp_mqtt drops unacknowledged messages after this
    low_balance_threshold: float = 1.0
    rated_max_kw: float = 18.4  # 80 A x 230 V: a sample's delta above this x its span is not billed
    boot_gap_ms: int = 120000  # what the first reading after a boot may cover beyond the uptime
    register_tolerance_kwh: float = 0.01  # a command without regId: energyTotal at most this far ahead


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
    reg_id: str = ""  # "" only for a record of firmware before register histories


@dataclass(frozen=True)
class ReportMeta:
    """What a logged report carries besides its payload (firmware payloads.h ReportMeta)."""

    relay_override: int = 0
    raw_chained: bool = False  # the sensor register was followed without a break since the state write


@dataclass(frozen=True)
class BalanceCommand:
    balance: float
    energy_total: float | None
    cmd_id: str  # "" when absent or unusable
    reg_id: str = ""  # "" when absent


@dataclass
class StateRecord:
    """The persisted state (firmware meter_core.h StateRecord)."""

    reg_id: str = ""
    energy_total: float = 0.0
    balance: float = 0.0
    have_raw: bool = False
    raw_kwh: float = 0.0
    unbilled_kwh: float = 0.0


def valid_reg_id(reg_id: str) -> bool:
    return 0 < len(reg_id) <= MAX_REG_ID_BYTES and all(c in REG_ID_ALPHABET for c in reg_id)


def _plausible_state(s: StateRecord) -> bool:
    finite = all(math.isfinite(x) for x in (s.energy_total, s.balance, s.raw_kwh, s.unbilled_kwh))
    return (
        finite
        and 0 <= s.energy_total <= MAX_ENERGY_TOTAL
        and abs(s.balance) <= MAX_ABS_BALANCE + MAX_ENERGY_TOTAL
        and 0 <= s.raw_kwh <= MAX_ENERGY_TOTAL
        and 0 <= s.unbilled_kwh <= MAX_ENERGY_TOTAL
    )


def encode_state(s: StateRecord) -> bytes:
    """Version 2 of the state record: the layout of firmware encodeState()."""
    body = (
        bytes([2, 1 if s.have_raw else 0])
        + s.reg_id.encode("ascii")[:OWN_REG_ID_CHARS].ljust(OWN_REG_ID_CHARS, b"\x00")
        + struct.pack("<dddd", s.energy_total, s.balance, s.raw_kwh, s.unbilled_kwh)
    )
    return body + struct.pack("<I", zlib.crc32(body))


def decode_state(raw: bytes | None) -> StateRecord | None:
    if raw is None or len(raw) != STATE_RECORD_BYTES or raw[0] != 2 or raw[1] > 1:
        return None
    if zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
        return None
    reg_id = raw[2:10].decode("latin-1")
    energy_total, balance, raw_kwh, unbilled = struct.unpack("<dddd", raw[10:42])
    s = StateRecord(reg_id, energy_total, balance, raw[1] == 1, raw_kwh, unbilled)
    if not valid_reg_id(reg_id) or not _plausible_state(s):
        return None
    return s


RETAINED_RECORD_BYTES = 61


@dataclass
class RetainedRecord:
    """The copy of the state in RTC memory (firmware meter_core.h RetainedRecord)."""

    state: StateRecord = field(default_factory=StateRecord)
    relay_override: int = 0
    interval_units: float = 0.0


def encode_retained(r: RetainedRecord) -> bytes:
    body = b"R\x01" + encode_state(r.state) + bytes([r.relay_override]) + struct.pack("<d", r.interval_units)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_retained(raw: bytes | None) -> RetainedRecord | None:
    if raw is None or len(raw) != RETAINED_RECORD_BYTES or raw[0] != ord("R") or raw[1] != 1:
        return None
    if zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
        return None
    state = decode_state(raw[2:48])
    if state is None or raw[48] > 2:
        return None
    (units,) = struct.unpack("<d", raw[49:57])
    if not (math.isfinite(units) and 0 <= units <= MAX_ENERGY_TOTAL):
        return None
    return RetainedRecord(state, raw[48], units)


class RetainedMemory:
    """RTC memory: survives a soft reset (keep the object), lost at a power cut (clear())."""

    def __init__(self) -> None:
        self._data: bytes | None = None
        self.stores = 0

    def load(self) -> bytes | None:
        return self._data

    def store(self, data: bytes) -> None:
        self._data = bytes(data)
        self.stores += 1

    def clear(self) -> None:
        self._data = None


SOFT_RESET_REASONS = frozenset({"software", "task_wdt", "int_wdt", "wdt", "panic", "deepsleep"})


class XorShift32:
    """xorshift32, the same sequence as the firmware's host fake XorShiftRandom: a regId drawn
    in a trace is the same on both sides. Call the instance for the next 32-bit number."""

    def __init__(self, seed: int = 1) -> None:
        self._x = (seed & U32) or 1

    def __call__(self) -> int:
        x = self._x
        x ^= (x << 13) & U32
        x ^= x >> 17
        x ^= (x << 5) & U32
        self._x = x
        return x


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

    def monotonic(self) -> int:
        """ms since the last restart; never wraps."""
        return self._elapsed

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

    def total_writes(self) -> int:
        return sum(self._writes.values())

    def wipe(self) -> None:
        """The whole partition erased (Arduino's initArduino erases NVS on NO_FREE_PAGES)."""
        self._data.clear()

    def corrupt(self, key: str) -> None:
        """A stored value damaged in place (the firmware host fake MemKv::corrupt)."""
        value = self._data.get(key)
        if value:
            b = bytearray(value)
            b[len(b) // 2] ^= 0x5A
            self._data[key] = bytes(b)


@dataclass
class _Slot:
    key: int
    report: Report
    meta: ReportMeta
    consumed: bool = False


class ReportBuffer:
    """The report ring (firmware FlashRing with one slot per sector): `capacity` slots written
    round-robin, a record pending until consumed (in any order); appending into a slot whose
    record is still pending drops that record (the newest reports matter most: each carries the
    whole register). Keys are the records' counters, as in the firmware."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = max(capacity, 1)
        self._slots: list[_Slot | None] = [None] * self.capacity
        self._write = 0
        self._next_key = 1
        self._newest: _Slot | None = None
        self.dropped = 0

    def append(self, report: Report, meta: ReportMeta | None = None) -> int:
        old = self._slots[self._write]
        if old is not None and not old.consumed:
            self.dropped += 1
        slot = _Slot(self._next_key, report, meta or ReportMeta())
        self._slots[self._write] = slot
        self._write = (self._write + 1) % self.capacity
        self._next_key += 1
        self._newest = slot
        return slot.key

    def _pending(self) -> list[_Slot]:
        return sorted((s for s in self._slots if s is not None and not s.consumed), key=lambda s: s.key)

    def peek_at(self, index: int) -> tuple[int, Report, ReportMeta] | None:
        pending = self._pending()
        if index >= len(pending):
            return None
        s = pending[index]
        return s.key, s.report, s.meta

    def consume(self, key: int) -> bool:
        for s in self._slots:
            if s is not None and s.key == key and not s.consumed:
                s.consumed = True
                return True
        return False

    def peek_newest(self) -> tuple[Report, ReportMeta] | None:
        """The newest record, consumed or not (FlashRing::peekNewest: consumed records stay in
        flash until their sector is reused, and the newest one is reused last)."""
        return None if self._newest is None else (self._newest.report, self._newest.meta)

    def peek_oldest(self) -> Report | None:
        first = self.peek_at(0)
        return None if first is None else first[1]

    def pop_oldest(self) -> None:
        first = self.peek_at(0)
        if first is not None:
            self.consume(first[0])

    def wipe(self) -> None:
        """The partition erased (a new board, or esptool erase_flash)."""
        self.__init__(self.capacity)

    def __len__(self) -> int:
        return len(self._pending())


@dataclass
class OutboxItem:
    id: int
    topic: str
    payload: str
    qos: int
    retain: bool
    queued_at: int
    transmitted: bool = False
    pass_no: int = 0
    resend: bool = False
    lost_in_transit: bool = False


@dataclass(frozen=True)
class Delivery:
    topic: str
    payload: str
    qos: int
    retain: bool
    id: int
    dup: bool


class EspMqttOutbox:
    """esp_mqtt's outbox as the meter sees it, the same model as the firmware's host fake
    FakeEspMqtt (see host_fakes.h for the esp-mqtt behaviour it follows): publish() is
    esp_mqtt_client_enqueue(), service() one pass of the client's task (PUBACKs, the 30 s
    expiry, sending), power_cut() loses everything. `now_ms()` is a monotonic clock.

    acking = False: the broker got the message but its PUBACK is lost; blackhole = True: what is
    sent is lost (a half-open link). on_transmit(Delivery) is what the broker receives."""

    def __init__(self, now_ms: Callable[[], int], expiry_ms: int = 30000) -> None:
        self._now = now_ms
        self._expiry_ms = expiry_ms
        self._items: list[OutboxItem] = []
        self._connected = True
        self._pass = 0
        self._last_id = 0
        self.refuse = False
        self.acking = True
        self.blackhole = False
        self.report_deleted = False
        self.id_source: Callable[[], int] | None = None  # random ids like esp_mqtt's; None: 1, 2, 3
        self.on_transmit: Callable[[Delivery], None] | None = None
        self.on_expired: Callable[[int], None] | None = None
        self.messages: list[Delivery] = []

    def publish(self, topic: str, payload: str, qos: int, retain: bool) -> int:
        if self.refuse:
            return -1
        msg_id = 0
        if qos > 0:
            if self.id_source is not None:
                msg_id = self.id_source() % 65535
            else:
                msg_id = (self._last_id % 65535) + 1
                self._last_id = msg_id
            if msg_id == 0:
                return -1
        item = OutboxItem(msg_id, topic, payload, qos, retain, self._now(), pass_no=self._pass)
        if self._connected:
            self._transmit(item, False)
            if qos == 0:
                return 0
        self._items.append(item)
        return msg_id

    def outbox_bytes(self) -> int:
        total = 0
        for it in self._items:
            rem = 2 + len(it.topic.encode()) + (2 if it.qos > 0 else 0) + len(it.payload.encode())
            total += 1 + (1 if rem < 128 else 2 if rem < 16384 else 3) + rem
        return total

    def connect(self) -> None:
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False
        for it in self._items:
            if it.transmitted:
                it.resend = True

    def power_cut(self) -> None:
        self._items.clear()
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def service(self) -> tuple[list[int], list[int]]:
        """One pass: (acknowledged ids, deleted ids reported with MQTT_EVENT_DELETED)."""
        acked: list[int] = []
        deleted: list[int] = []
        if not self._connected:
            return acked, deleted
        self._pass += 1
        keep = []
        for it in self._items:
            if (self.acking and not it.lost_in_transit and it.qos > 0 and it.transmitted and not it.resend
                    and it.pass_no < self._pass):
                acked.append(it.id)
            else:
                keep.append(it)
        self._items = keep
        now = self._now()
        keep = []
        for it in self._items:
            if now - it.queued_at > self._expiry_ms:
                if self.on_expired is not None:
                    self.on_expired(it.id)
                if self.report_deleted:
                    deleted.append(it.id)
            else:
                keep.append(it)
        self._items = keep
        keep = []
        for it in self._items:
            if not it.transmitted or it.resend:
                self._transmit(it, it.transmitted)
                if it.qos == 0:
                    continue
            keep.append(it)
        self._items = keep
        return acked, deleted

    def service_into(self, core: MeterCore) -> None:
        """A pass, its events handed to the core, as the firmware's glue does in loop()."""
        acked, deleted = self.service()
        for msg_id in acked:
            core.on_published(msg_id)
        for msg_id in deleted:
            core.on_publish_dropped(msg_id)

    def __len__(self) -> int:
        return len(self._items)

    def _transmit(self, it: OutboxItem, dup: bool) -> None:
        it.transmitted = True
        it.resend = False
        it.pass_no = self._pass
        it.lost_in_transit = self.blackhole
        if self.blackhole:
            return
        d = Delivery(it.topic, it.payload, it.qos, it.retain, it.id, dup)
        self.messages.append(d)
        if self.on_transmit is not None:
            self.on_transmit(d)


# ---- payloads ---------------------------------------------------------------------------------


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_report(meter_no: str, r: Report) -> str:
    out = {
        "meterNo": meter_no,
        "unitsConsumed": round6(r.units_consumed),
        "remainingBalance": round6(r.remaining_balance),
        "totalConsumed": round6(r.total_consumed),
        "timestamp": r.timestamp,
        "seq": r.seq,
        "energyTotal": round6(r.energy_total),
    }
    if r.reg_id:
        out["regId"] = r.reg_id
    return _dumps(out)


def packable(r: Report) -> bool:
    """Whether the firmware's ring record format can hold the report (payloads.cpp packReport)."""
    return (
        r.seq <= MAX_PACKED_SEQ
        and r.timestamp <= MAX_PACKED_TIMESTAMP
        and len(r.reg_id) == OWN_REG_ID_CHARS
        and valid_reg_id(r.reg_id)
    )


def encode_status(
    meter_no: str,
    *,
    status: str,
    message: str,
    balance: float | None,
    wifi_rssi: int,
    timestamp: int,
    relay_on: bool,
    fw: str,
    uptime_s: int,
    reset_reason: str,
    reg_id: str = "",
    unbilled_kwh: float = 0.0,
    ota_state: str = "",
    ota_version: str = "",
    ota_error: str = "",
    safe_mode: bool = False,
    fast_boots: int = 0,
    cmd_id: str = "",
) -> str:
    """balance None: safe mode, where the stored state is not read (no balance, no unbilledKwh)."""
    out: dict = {"meterNo": meter_no, "status": status, "message": message}
    if balance is not None:
        out["balance"] = round6(balance)
    out.update({
        "wifi_rssi": wifi_rssi,
        "timestamp": timestamp,
        "relay": "on" if relay_on else "off",
        "fw": fw,
        "uptime": uptime_s,
        "resetReason": reset_reason,
    })
    if reg_id:
        out["regId"] = reg_id
    if balance is not None:
        out["unbilledKwh"] = round6(unbilled_kwh)
    if ota_state:
        out["otaState"] = ota_state
    if ota_version:
        out["otaVersion"] = ota_version
    if ota_error:
        out["otaError"] = ota_error
    if safe_mode:
        out["safeMode"] = True
        out["fastBoots"] = fast_boots
    if cmd_id:
        out["cmdId"] = cmd_id
    return _dumps(out)


def encode_balance_report(meter_no: str, balance: float, timestamp: int, reg_id: str, cmd_id: str) -> str:
    out = {"meterNo": meter_no, "balance": round6(balance), "timestamp": timestamp, "regId": reg_id}
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
    reg_id = ""
    if "regId" in obj:
        # Like energyTotal: present but unusable rejects the command (whose register is it?).
        rid = obj["regId"]
        if not isinstance(rid, str) or not valid_reg_id(_c_str(rid)):
            return None
        reg_id = _c_str(rid)
    return BalanceCommand(balance=bal, energy_total=energy_total, cmd_id=_cmd_id(obj), reg_id=reg_id)


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


# ---- OTA: command, signature, state machine (firmware ota.h / ota.cpp) -------------------------

MAX_OTA_URL_BYTES = 256
MAX_FW_VERSION_BYTES = 31
MAX_SIGNATURE_BYTES = 72
KEY_OTA = "ota"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_FW_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")


def ota_manifest(version: str, sha256_hex: str) -> bytes:
    """The bytes a release signature covers."""
    return f"smartmeter-fw\n{version}\n{sha256_hex}\n".encode()


def valid_fw_version(v: str) -> bool:
    return 0 < len(v) <= MAX_FW_VERSION_BYTES and all(c in _FW_CHARS for c in v)


def base64_decode(text: str) -> bytes | None:
    """Strict standard base64 (padded, '=' only at the end, zero spare bits), as the firmware."""
    if not text or len(text) % 4:
        return None
    pad = (text[-1] == "=") + (text[-2] == "=")
    acc = bits = 0
    out = bytearray()
    for ch in text[: len(text) - pad]:
        index = _B64.find(ch)
        if index < 0:
            return None
        acc = (acc << 6) | index
        bits += 6
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if acc & ((1 << bits) - 1):
        return None
    return bytes(out)


@dataclass(frozen=True)
class OtaCommand:
    url: str
    version: str
    sha256: str  # 64 lowercase hex digits
    signature: bytes  # DER
    cmd_id: str


def decode_ota_command(payload, require_https: bool = True) -> tuple[OtaCommand | None, str, str]:
    """(command, error, cmd_id): command None with the reason when unusable; cmd_id even then."""
    obj = _parse_command(payload)
    if obj is None:
        return None, "not a JSON object", ""
    cmd_id = _cmd_id(obj)

    def text(key: str) -> str | None:
        v = obj.get(key)
        return _c_str(v) if isinstance(v, str) else None

    url = text("url")
    ok = url is not None and 0 < len(url.encode()) <= MAX_OTA_URL_BYTES
    ok = ok and (not require_https or url.startswith("https://"))
    ok = ok and all(0x20 < b != 0x7F for b in url.encode())
    if not ok:
        return None, "bad url", cmd_id
    version = text("version")
    if version is None or not valid_fw_version(version):
        return None, "bad version", cmd_id
    sha = text("sha256")
    if sha is None or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
        return None, "bad sha256", cmd_id
    sig_text = text("signature")
    der = base64_decode(sig_text) if sig_text is not None else None
    if der is None or not (8 <= len(der) <= MAX_SIGNATURE_BYTES):
        return None, "bad signature encoding", cmd_id
    return OtaCommand(url, version, sha.lower(), der, cmd_id), "", cmd_id


# ECDSA P-256 (secp256r1) verification, standard library only: the simulator checks the same
# signatures as the firmware's mbedtls (mbedtls_ecdsa_read_signature's DER rules included).
_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_A = _P - 3
_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
      0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)


def _jac_double(p):
    x, y, z = p
    if y == 0 or z == 0:
        return (0, 1, 0)
    yy = y * y % _P
    s = 4 * x * yy % _P
    zz = z * z % _P
    m = 3 * (x - zz) * (x + zz) % _P  # a = -3
    x3 = (m * m - 2 * s) % _P
    y3 = (m * (s - x3) - 8 * yy * yy) % _P
    return (x3, y3, 2 * y * z % _P)


def _jac_add(p, q):
    if p[2] == 0:
        return q
    if q[2] == 0:
        return p
    z1z1 = p[2] * p[2] % _P
    z2z2 = q[2] * q[2] % _P
    u1 = p[0] * z2z2 % _P
    u2 = q[0] * z1z1 % _P
    s1 = p[1] * q[2] * z2z2 % _P
    s2 = q[1] * p[2] * z1z1 % _P
    if u1 == u2:
        return _jac_double(p) if s1 == s2 else (0, 1, 0)
    h = (u2 - u1) % _P
    r = (s2 - s1) % _P
    hh = h * h % _P
    hhh = h * hh % _P
    v = u1 * hh % _P
    x3 = (r * r - hhh - 2 * v) % _P
    y3 = (r * (v - x3) - s1 * hhh) % _P
    return (x3, y3, h * p[2] * q[2] % _P)


def _mul(k: int, point) -> tuple:
    acc = (0, 1, 0)
    addend = (point[0], point[1], 1)
    while k:
        if k & 1:
            acc = _jac_add(acc, addend)
        addend = _jac_double(addend)
        k >>= 1
    return acc


def _asn1_len(data: bytes, i: int) -> tuple[int, int] | None:
    if i >= len(data):
        return None
    first = data[i]
    if first < 0x80:
        return first, i + 1
    n = first & 0x7F
    if n == 0 or n > 4 or i + 1 + n > len(data):
        return None
    return int.from_bytes(data[i + 1:i + 1 + n], "big"), i + 1 + n


def ecdsa_p256_verify(public_point: bytes, message: bytes, der: bytes) -> bool:
    """ECDSA over SHA-256(message); public_point is 04 || X || Y."""
    if len(public_point) != 65 or public_point[0] != 4:
        return False
    qx = int.from_bytes(public_point[1:33], "big")
    qy = int.from_bytes(public_point[33:], "big")
    if qx >= _P or qy >= _P or (qy * qy - (qx * qx * qx + _A * qx + _B)) % _P:
        return False
    if not der or der[0] != 0x30:
        return False
    seq = _asn1_len(der, 1)
    if seq is None or seq[1] + seq[0] != len(der):
        return False
    i, end, ints = seq[1], len(der), []
    for _ in range(2):
        if i >= end or der[i] != 0x02:
            return False
        item = _asn1_len(der, i + 1)
        if item is None or item[1] + item[0] > end:
            return False
        ints.append(int.from_bytes(der[item[1]:item[1] + item[0]], "big"))
        i = item[1] + item[0]
    r, s = ints
    if not (0 < r < _N and 0 < s < _N):
        return False
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    w = pow(s, -1, _N)
    x, _y, z = _jac_add(_mul(e * w % _N, _G), _mul(r * w % _N, (qx, qy)))
    if z == 0:
        return False
    if (x * pow(z * z % _P, -1, _P)) % _P % _N != r:
        return False
    return i == end  # a valid signature followed by more bytes is refused, as mbedtls does


class OtaState(enum.IntEnum):
    IDLE = 0
    DOWNLOADING = 1
    VERIFYING = 2
    REBOOTING = 3
    PENDING = 4
    VALID = 5
    FAILED = 6
    ROLLED_BACK = 7


_OTA_STATE_NAMES = {
    OtaState.IDLE: "idle", OtaState.DOWNLOADING: "downloading", OtaState.VERIFYING: "verifying",
    OtaState.REBOOTING: "rebooting", OtaState.PENDING: "pending", OtaState.VALID: "valid",
    OtaState.FAILED: "failed", OtaState.ROLLED_BACK: "rolledback",
}


def ota_state_name(s: OtaState) -> str:
    return _OTA_STATE_NAMES[s]


_CRASH_RESETS = frozenset({"panic", "task_wdt", "int_wdt", "wdt"})


@dataclass(frozen=True)
class OtaConfig:
    require_https: bool = True
    download_timeout_ms: int = 600000
    confirm_timeout_ms: int = 900000  # a new image without an acknowledged report this long rolls back
    restart_delay_ms: int = 2000


@dataclass(frozen=True)
class OtaEvent:
    error: bool
    message: str
    cmd_id: str


class SimOtaPlatform:
    """The device's OTA primitives, the firmware host fake FakeOtaPlatform's model: a fetch of
    `url` takes fetch_ms and gets its bytes from the injected fetch(url) (None: HTTP 404);
    valid(image) says whether esp_https_ota_finish would accept it; restart() and rollback() raise
    flags that SimDevice turns into reboots (crashes(image): the new image panics at boot)."""

    def __init__(self, now_ms: Callable[[], int], fetch: Callable[[str], bytes | None], *, fetch_ms: int = 5000,
                 valid: Callable[[bytes], bool] | None = None, crashes: Callable[[bytes], bool] | None = None) -> None:
        self._now = now_ms
        self._fetch = fetch
        self.fetch_ms = fetch_ms
        self._valid = valid or (lambda image: True)
        self.crashes = crashes or (lambda image: False)
        self._fetching = False
        self._url = ""
        self._started_at = 0
        self._fetched: bytes | None = None
        self.next_image: bytes | None = None  # what the next restart boots, after activate()
        self.restart_requested = False
        self.rollback_requested = False
        self.marked_valid = 0
        self.fetches = 0

    def begin_fetch(self, url: str) -> bool:
        self.fetches += 1
        self._fetching, self._fetched, self._url, self._started_at = True, None, url, self._now()
        return True

    def poll_fetch(self) -> tuple[str, str]:
        """("in_progress" | "done" | "failed", error)."""
        if not self._fetching:
            return "failed", "no download running"
        if self._now() - self._started_at < self.fetch_ms:
            return "in_progress", ""
        self._fetching = False
        data = self._fetch(self._url)
        if data is None:
            return "failed", "HTTP 404"
        self._fetched = bytes(data)
        return "done", ""

    def fetched_sha256(self) -> bytes | None:
        return None if self._fetched is None else hashlib.sha256(self._fetched).digest()

    def abort_fetch(self) -> None:
        self._fetching, self._fetched = False, None

    def activate(self) -> str:
        """"" when the image is now the boot image, else the error."""
        if self._fetched is None:
            return "nothing downloaded"
        if not self._valid(self._fetched):
            return "not a valid app image"
        self.next_image = self._fetched
        return ""

    def restart(self) -> None:
        self.restart_requested = True

    def mark_valid(self) -> bool:
        self.marked_valid += 1
        return True

    def rollback(self) -> None:
        self.rollback_requested = True

    def reset(self) -> None:
        """A reset: a download in progress is gone (the boot image choice is in flash)."""
        self._fetching, self._fetched = False, None
        self.restart_requested = self.rollback_requested = False


def _put_str(b: bytearray, text: str) -> None:
    raw = text.encode()
    b.append(len(raw))
    b += raw


class OtaManager:
    """The OTA state machine, line by line as firmware OtaManager (ota.cpp); the record in the
    KvStore under KEY_OTA has the firmware's layout."""

    def __init__(self, config: OtaConfig, kv: MemoryKvStore, platform: SimOtaPlatform, public_key: bytes) -> None:
        self.config = config
        self._kv = kv
        self._platform = platform
        self._key = public_key
        self._running = ""
        self.state = OtaState.IDLE
        self.target_version = ""
        self._cmd_id = ""
        self._previous = ""
        self.error = ""
        self._sha = bytes(32)
        self._failed_sha = bytes(32)
        self._since = 0
        self._restart_at = 0
        self._rollback_due = False
        self._events: list[OtaEvent] = []

    def _save(self) -> None:
        b = bytearray([1, int(self.state)])
        for text in (self.target_version, self._cmd_id, self._previous, self.error[:120]):
            _put_str(b, text)
        b += self._sha + self._failed_sha
        self._kv.put(KEY_OTA, bytes(b) + struct.pack("<I", zlib.crc32(bytes(b))))

    def _load(self) -> bool:
        b = self._kv.get(KEY_OTA)
        if b is None or len(b) < 2 + 4 + 64 + 4:
            return False
        if zlib.crc32(b[:-4]) != struct.unpack("<I", b[-4:])[0] or b[0] != 1 or b[1] > int(OtaState.ROLLED_BACK):
            return False
        at, texts = 2, []
        for _ in range(4):
            if at >= len(b) or at + 1 + b[at] > len(b):
                return False
            texts.append(b[at + 1:at + 1 + b[at]].decode("utf-8", "replace"))
            at += 1 + b[at]
        if at + 64 + 4 != len(b):
            return False
        self.state = OtaState(b[1])
        self.target_version, self._cmd_id, self._previous, self.error = texts
        self._sha, self._failed_sha = b[at:at + 32], b[at + 32:at + 64]
        return True

    def _event(self, error: bool, message: str) -> None:
        self._events.append(OtaEvent(error, message, self._cmd_id))

    def take_event(self) -> OtaEvent | None:
        return self._events.pop(0) if self._events else None

    def _fail(self, to: OtaState, error: str) -> None:
        self.state = to
        self.error = error
        if to == OtaState.ROLLED_BACK:
            self._failed_sha = self._sha
        self._save()
        verb = " rolled back: " if to == OtaState.ROLLED_BACK else " failed: "
        self._event(True, "OTA " + self.target_version + verb + error)

    @property
    def busy(self) -> bool:
        return self.state in (OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.REBOOTING)

    def begin(self, running_fw: str, reset_reason: str, now_ms: int) -> None:
        self._running = running_fw
        if not self._load():
            self.state = OtaState.IDLE
            return
        if self.state in (OtaState.DOWNLOADING, OtaState.VERIFYING):
            self._fail(OtaState.FAILED, "interrupted by a reboot")
        elif self.state == OtaState.REBOOTING:
            if self._running == self.target_version:
                self.state = OtaState.PENDING
                self._since = now_ms
                self._save()
                self._event(False, "OTA " + self.target_version + ": running, waiting for an acknowledged report")
            else:
                self._fail(OtaState.ROLLED_BACK, "the new image did not boot")
        elif self.state == OtaState.PENDING:
            if self._running != self.target_version:
                self._fail(OtaState.ROLLED_BACK, self.error or "the new image did not boot")
            elif reset_reason in _CRASH_RESETS:
                self.error = "the new image crashed (" + reset_reason + ")"
                self._save()
                self._rollback_due = True
            else:
                self._since = now_ms

    def on_command(self, payload, now_ms: int) -> None:
        cmd, why, cmd_id = decode_ota_command(payload, self.config.require_https)
        if cmd is None:
            if why != "not a JSON object":
                self._events.append(OtaEvent(True, "OTA command rejected: " + why, cmd_id))
            return
        sha = bytes.fromhex(cmd.sha256)
        if self.busy:
            if sha != self._sha:
                self._events.append(OtaEvent(True, f"OTA {cmd.version} refused: busy with {self.target_version}",
                                             cmd.cmd_id))
            return
        if cmd.version == self._running:
            self._events.append(OtaEvent(False, f"OTA {cmd.version}: already running", cmd.cmd_id))
            return
        if self._failed_sha != bytes(32) and sha == self._failed_sha:
            self._events.append(OtaEvent(True, f"OTA {cmd.version} refused: this image rolled back before",
                                         cmd.cmd_id))
            return
        self.target_version, self._cmd_id, self._previous, self.error, self._sha = (
            cmd.version, cmd.cmd_id, self._running, "", sha)
        if not ecdsa_p256_verify(self._key, ota_manifest(cmd.version, cmd.sha256), cmd.signature):
            self._fail(OtaState.FAILED, "bad signature")
            return
        if not self._platform.begin_fetch(cmd.url):
            self._fail(OtaState.FAILED, "the download could not start")
            return
        self.state = OtaState.DOWNLOADING
        self._since = now_ms
        self._save()
        self._event(False, "OTA " + self.target_version + ": downloading")

    def loop(self, now_ms: int) -> str:
        """"", "restart" or "rollback" (the caller saves its state, then restart_now / rollback_now)."""
        if self._rollback_due:
            return "rollback"
        if self.state == OtaState.DOWNLOADING:
            status, err = self._platform.poll_fetch()
            if status == "in_progress":
                if now_ms - self._since > self.config.download_timeout_ms:
                    self._platform.abort_fetch()
                    self._fail(OtaState.FAILED, "download timed out")
                return ""
            if status == "failed":
                self._fail(OtaState.FAILED, "download failed: " + err)
                return ""
            self.state = OtaState.VERIFYING
            if self._platform.fetched_sha256() != self._sha:
                self._platform.abort_fetch()
                self._fail(OtaState.FAILED, "sha256 mismatch")
                return ""
            err = self._platform.activate()
            if err:
                self._fail(OtaState.FAILED, "image rejected: " + err)
                return ""
            self.state = OtaState.REBOOTING
            self._restart_at = now_ms + self.config.restart_delay_ms
            self._save()
            self._event(False, "OTA " + self.target_version + ": verified, restarting")
        elif self.state == OtaState.REBOOTING:
            if now_ms >= self._restart_at:
                return "restart"
        elif self.state == OtaState.PENDING:
            if now_ms - self._since > self.config.confirm_timeout_ms:
                self.error = "no acknowledged report within the confirmation time"
                self._save()
                return "rollback"
        return ""

    def restart_now(self) -> None:
        self._platform.restart()

    def rollback_now(self) -> None:
        self._rollback_due = False
        self._platform.rollback()

    def on_report_acked(self, now_ms: int) -> None:
        if self.state != OtaState.PENDING or self._rollback_due:
            return
        if not self._platform.mark_valid():
            return
        self.state = OtaState.VALID
        self._save()
        self._event(False, "OTA " + self.target_version + ": confirmed")

    def status_fields(self) -> dict:
        fields = {"ota_state": ota_state_name(self.state)}
        if self.state != OtaState.IDLE:
            fields["ota_version"] = self.target_version
        if self.state in (OtaState.FAILED, OtaState.ROLLED_BACK):
            fields["ota_error"] = self.error
        return fields


# ---- boot-loop guard and safe mode (firmware boot_guard.h) ---------------------------------------


@dataclass(frozen=True)
class BootGuardConfig:
    max_fast_boots: int = 5
    stable_after_ms: int = 120000
    safe_mode_ms: int = 600000


class BootGuard:
    """Counts boots that did not stay up stable_after_ms in RTC memory; the boot after
    max_fast_boots of them runs in safe mode (SafeModeCore) for safe_mode_ms."""

    def __init__(self, rtc: RetainedMemory, config: BootGuardConfig) -> None:
        self._rtc = rtc
        self.config = config
        self.fast_boots = 0
        self.safe_mode = False
        self._settled = False

    def _store(self) -> None:
        body = b"G\x01" + struct.pack("<I", self.fast_boots)
        self._rtc.store(body + struct.pack("<I", zlib.crc32(body)))

    def begin(self) -> bool:
        raw = self._rtc.load()
        self.fast_boots = 0
        if raw is not None and len(raw) == 10 and raw[:2] == b"G\x01" and zlib.crc32(raw[:6]) == struct.unpack("<I", raw[6:])[0]:
            self.fast_boots = struct.unpack("<I", raw[2:6])[0]
        if self.fast_boots < 0xFFFFFFF0:
            self.fast_boots += 1
        self._store()
        self.safe_mode = self.fast_boots > self.config.max_fast_boots
        return self.safe_mode

    def loop(self, uptime_ms: int) -> None:
        if self._settled or self.safe_mode or uptime_ms < self.config.stable_after_ms:
            return
        self._settled = True
        self.fast_boots = 0
        self._store()

    def clear(self) -> None:
        self.fast_boots = 0
        self._store()

    def safe_mode_over(self, uptime_ms: int) -> bool:
        if not self.safe_mode or uptime_ms < self.config.safe_mode_ms:
            return False
        self.fast_boots = 0
        self._store()
        return True


SAFE_MODE_MESSAGE = "Safe mode after repeated fast reboots: relay open, only OTA accepted"


class SafeModeCore:
    """The meter in safe mode: no stored state read, relay open, status and OTA commands only."""

    def __init__(self, config: MeterConfig, clock: Clock, set_relay: Callable[[bool], None],
                 publish: Callable[[str, str, int, bool], int | bool], reset_reason: str, fast_boots: int,
                 ota: OtaManager | None = None) -> None:
        self.config = config
        self._clock = clock
        self._set_relay = set_relay
        self._publish = publish
        self.reset_reason = reset_reason
        self.fast_boots = fast_boots
        self.ota = ota
        self._last_millis = clock.millis()
        self._uptime_ms = 0
        self.connected = False
        self.wifi_rssi = 0

    def _now(self) -> None:
        now = self._clock.millis()
        self._uptime_ms += elapsed_ms(now, self._last_millis)
        self._last_millis = now

    @property
    def uptime_ms(self) -> int:
        return self._uptime_ms

    def topic(self, suffix: str) -> str:
        return f"smartmeter/{self.config.meter_no}/{suffix}"

    def begin(self) -> None:
        self._now()
        self._set_relay(False)
        if self.ota is not None:
            self.ota.begin(self.config.fw_version, self.reset_reason, self._uptime_ms)

    def _payload(self, status: str, message: str, cmd_id: str) -> str:
        unix = self._clock.unix_millis()
        ota = self.ota.status_fields() if self.ota is not None else {}
        return encode_status(
            self.config.meter_no, status=status, message=message, balance=None, wifi_rssi=self.wifi_rssi,
            timestamp=unix if unix is not None else self._uptime_ms, relay_on=False, fw=self.config.fw_version,
            uptime_s=self._uptime_ms // 1000, reset_reason=self.reset_reason, safe_mode=True,
            fast_boots=self.fast_boots, cmd_id=cmd_id, **ota,
        )

    def _publish_status(self, status: str, message: str, cmd_id: str) -> None:
        if self.connected:
            self._publish(self.topic("status"), self._payload(status, message, cmd_id), 0, True)

    def on_connected(self) -> None:
        self._now()
        self.connected = True
        self._publish_status("error", SAFE_MODE_MESSAGE, "")

    def on_disconnected(self) -> None:
        self.connected = False

    def on_message(self, topic: str, payload) -> None:
        self._now()
        if self.ota is not None and topic == self.topic("command/ota"):
            self.ota.on_command(payload, self._uptime_ms)

    def on_published(self, msg_id: int) -> None:
        pass  # nothing is reported in safe mode

    def on_publish_dropped(self, msg_id: int) -> None:
        pass

    def set_wifi_rssi(self, rssi: int) -> None:
        self.wifi_rssi = rssi

    def loop(self) -> str:
        self._now()
        if self.ota is None:
            return ""
        action = self.ota.loop(self._uptime_ms)
        while (e := self.ota.take_event()) is not None:
            self._publish_status("error", e.message, e.cmd_id)
        return action

    def will_message(self) -> Message:
        self._now()
        return Message(self.topic("status"), self._payload("offline", "Connection lost", ""), 0, True)


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

    publish(topic, payload, qos, retain): the transport. It returns a message id (int > 0) for a
    QoS 1 message it took, 0 for a QoS 0 message it took, -1 (or False) when it refused; True
    means "taken, and I report no PUBACKs" (a report then leaves the ring at once, as with
    transports written before message ids, e.g. devtools/sim/fleet.py over paho's own outbox).
    set_relay(closed): called when the relay must change (and once at begin()).
    read_energy() -> float | None: the sensor's energy register in kWh, None when it fails.
    random32() -> int: uniform 32-bit numbers, for drawing regIds (default: the OS's generator;
    pass XorShift32(seed) or random.Random(seed).getrandbits-like callables for repeatable runs).
    retained: RetainedMemory (RTC RAM) that outlives soft resets, or None.
    ota: an OtaManager (command/ota, OTA status fields, confirmation of a new image), or None.
    outbox_bytes() -> int: bytes waiting in the transport's outbox (flow control), or None.
    The transport reports PUBACKs with on_published(msg_id) (and on_publish_dropped(msg_id) for
    esp_mqtt's MQTT_EVENT_DELETED); a report leaves the ring only then.
    """

    def __init__(
        self,
        config: MeterConfig,
        clock: Clock,
        kv: MemoryKvStore,
        buffer: ReportBuffer,
        publish: Callable[[str, str, int, bool], int | bool],
        set_relay: Callable[[bool], None],
        read_energy: Callable[[], float | None],
        reset_reason: str = "poweron",
        *,
        random32: Callable[[], int] | None = None,
        retained: RetainedMemory | None = None,
        outbox_bytes: Callable[[], int] | None = None,
        ota: OtaManager | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._kv = kv
        self._buffer = buffer
        self._publish_raw = publish
        self._set_relay = set_relay
        self._read_energy = read_energy
        self._random32 = random32 if random32 is not None else (lambda: secrets.randbits(32))
        self._retained = retained
        self._outbox_bytes = outbox_bytes if outbox_bytes is not None else (lambda: 0)
        self.ota = ota
        self.reset_reason = reset_reason
        # Zero would stall seq reservation or replay forever.
        self._seq_block = max(config.seq_block, 1)
        self._replay_batch = max(config.replay_batch, 1)
        # A non-positive or non-finite rating would bill nothing at all.
        rated = config.rated_max_kw
        self._rated_max_kw = rated if (rated > 0 and rated <= 1e6) else MeterConfig().rated_max_kw
        tol = config.register_tolerance_kwh
        self._tolerance = tol if (tol >= 0 and tol <= 1) else MeterConfig().register_tolerance_kwh

        self._last_millis = clock.millis()
        self._uptime_ms = 0
        self._now_ms = self._last_millis

        self.balance = 0.0
        self.energy_total = 0.0
        self.session_total = 0.0
        self._interval_units = 0.0
        self.reg_id = ""
        self.unbilled_kwh = 0.0

        self._have_baseline = False
        self._baseline = 0.0
        self._baseline_at_ms = 0
        self._baseline_gap_ms = 0
        self._raw_chained = False
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
        self._retained_dirty = False
        # Reports handed to the transport, awaiting their PUBACK: [key, msg_id, sent_at, ambiguous].
        self._inflight: list[list] = []

        self._pending_notice = ""
        self._over_rated_pending = False

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

    def _publish(self, topic: str, payload: str, qos: int, retain: bool) -> int:
        """The transport's answer as the firmware's Publisher::publish: id, 0, or -1. True is a
        transport without message ids (0: taken counts as delivered), False a refusal."""
        r = self._publish_raw(topic, payload, qos, retain)
        if isinstance(r, bool):
            return 0 if r else -1
        return int(r)

    # -- lifecycle --

    def _draw_reg_id(self) -> str:
        return "".join(REG_ID_ALPHABET[self._random32() % 64] for _ in range(OWN_REG_ID_CHARS))

    def _restore_state(self) -> None:
        raw = self._kv.get(KEY_STATE)
        st = StateRecord()
        source = "nothing"
        unreadable = False
        kept = decode_retained(self._retained.load()) if self._retained is not None else None
        if kept is not None:
            st = kept.state  # a soft reset: the state of a moment ago
            source = "retained"
        elif raw is not None:
            decoded = decode_state(raw)
            if decoded is not None:
                st = decoded
                source = "nvs"
            elif len(raw) == 16:
                st.energy_total, st.balance = struct.unpack("<dd", raw)
                if _plausible_state(st):
                    source = "legacy"
                else:
                    unreadable = True
            else:
                unreadable = True
        newest_entry = self._buffer.peek_newest()
        newest: Report | None = None
        meta = ReportMeta()
        if newest_entry is not None:
            cand, cand_meta = newest_entry
            if (
                math.isfinite(cand.energy_total)
                and 0 <= cand.energy_total <= MAX_ENERGY_TOTAL
                and math.isfinite(cand.remaining_balance)
            ):
                newest, meta = cand, cand_meta
        persist = False
        from_log = False
        if source == "retained":
            if newest is not None and newest.reg_id == st.reg_id and newest.energy_total > st.energy_total:
                st.energy_total = newest.energy_total
                st.balance = newest.remaining_balance
                st.have_raw = False
            else:
                self._interval_units = kept.interval_units
            self.relay_override = RelayOverride(kept.relay_override)
            persist = True  # bring NVS level with the state
        elif source == "nvs":
            # Never step the register on the wire backwards; the raw register at the newer report
            # is the stored one plus what was billed in between, when nothing broke the chain.
            if newest is not None and newest.reg_id == st.reg_id and newest.energy_total > st.energy_total:
                if st.have_raw and meta.raw_chained:
                    st.raw_kwh = st.raw_kwh + (newest.energy_total - st.energy_total)
                else:
                    st.have_raw = False
                st.energy_total = newest.energy_total
                st.balance = newest.remaining_balance
                persist = True
        elif source == "legacy":
            if newest is not None and newest.reg_id == "" and newest.energy_total > st.energy_total:
                st.energy_total = newest.energy_total
                st.balance = newest.remaining_balance
            st.reg_id = self._draw_reg_id()
            persist = True
        elif newest is not None:
            st.reg_id = newest.reg_id if newest.reg_id else self._draw_reg_id()
            st.energy_total = newest.energy_total
            st.balance = newest.remaining_balance
            self.relay_override = RelayOverride(meta.relay_override)
            from_log = True
            persist = True
            self._pending_notice = MSG_STATE_FROM_LOG
        else:
            st = StateRecord()
            st.reg_id = self._draw_reg_id()
            persist = True
            if unreadable:
                self._pending_notice = MSG_STATE_UNREADABLE

        self.reg_id = st.reg_id
        self.energy_total = st.energy_total
        self.balance = st.balance
        self.unbilled_kwh = st.unbilled_kwh
        if st.have_raw:
            self._have_baseline = True
            self._baseline = st.raw_kwh
            self._baseline_at_ms = self._uptime_ms
            self._baseline_gap_ms = self.config.boot_gap_ms
            self._raw_chained = not persist

        raw = self._kv.get(KEY_SEQ)
        stored = struct.unpack("<Q", raw)[0] if raw is not None and len(raw) == 8 else 0
        self.next_seq = stored
        if newest is not None and newest.seq + 1 > self.next_seq:
            self.next_seq = newest.seq + 1
        if self.next_seq + self._seq_block > MAX_PACKED_SEQ:
            # Corrupt (beyond 2^40 reports): a new register history may restart seq from 0.
            self.next_seq = 0
            self.reg_id = self._draw_reg_id()
            self.energy_total = 0.0
            self.balance = 0.0
            self.unbilled_kwh = 0.0
            self._have_baseline = False
            persist = True
            self._pending_notice = MSG_STATE_UNREADABLE

        raw = self._kv.get(KEY_RELAY)
        if source == "retained":
            pass  # already set from the retained record
        elif raw is not None and len(raw) == 1 and raw[0] <= 2:
            self.relay_override = RelayOverride(raw[0])
        elif not from_log:
            self.relay_override = RelayOverride.AUTO
        if persist:
            self._persist_state()
        else:
            self._save_retained()

    def begin(self) -> None:
        t = self._now()
        if self.ota is not None:
            self.ota.begin(self.config.fw_version, self.reset_reason, self._uptime_ms)
        self._restore_state()
        # Reserve a block so that a reboot resumes above every seq this boot can send.
        self._seq_ceiling = self.next_seq + self._seq_block
        self._kv.put(KEY_SEQ, struct.pack("<Q", self._seq_ceiling))
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
        if self._over_rated_pending and self.connected:
            self._over_rated_pending = False
            self._publish_notice(MSG_OVER_RATED)
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
        if self.ota is not None:
            action = self.ota.loop(self._uptime_ms)
            self._publish_ota_events()
            # The state goes to flash before the restart into the new image (or back).
            if action == "restart":
                self._persist_state()
                self.ota.restart_now()
            elif action == "rollback":
                self._persist_state()
                self.ota.rollback_now()
        if self._retained_dirty:
            self._save_retained()

    def _publish_ota_events(self) -> None:
        if self.ota is None or not self.connected:
            return  # kept until the next connect
        while (e := self.ota.take_event()) is not None:
            self._publish_status("error" if e.error else self.condition, e.message, e.cmd_id)

    def on_connected(self) -> None:
        self._now()
        self.connected = True
        self._drain_buffer()  # buffered reports before "online" (the backend then pushes balance)
        self._publish_status("online", MSG_ONLINE, "")
        if self._pending_notice:
            self._publish_notice(self._pending_notice)
            self._pending_notice = ""
        self._publish_ota_events()
        self._publish_condition_if_changed()

    def on_disconnected(self) -> None:
        self._now()
        self.connected = False

    def on_published(self, msg_id: int) -> None:
        """MQTT_EVENT_PUBLISHED: the broker acknowledged msg_id; its report leaves the ring."""
        self._now()
        entries = [f for f in self._inflight if f[1] == msg_id]
        if not entries or any(f[3] for f in entries):
            return  # a status (no PUBACK), or an id two messages share (sent again after the expiry)
        key = entries[-1][0]
        self._buffer.consume(key)
        self._inflight = [f for f in self._inflight if f[0] != key]
        if self.ota is not None:
            self.ota.on_report_acked(self._uptime_ms)  # a new image has proved it can report
            self._publish_ota_events()
        self._drain_buffer()

    def on_publish_dropped(self, msg_id: int) -> None:
        """MQTT_EVENT_DELETED: the transport dropped msg_id unacknowledged; it is sent again."""
        self._now()
        self._inflight = [f for f in self._inflight if f[1] != msg_id]

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
        elif topic == self.topic("command/ota") and self.ota is not None:
            self.ota.on_command(payload, self._uptime_ms)
            self._publish_ota_events()

    def set_wifi_rssi(self, rssi: int) -> None:
        self.wifi_rssi = rssi

    def commands_lost(self, total: int) -> None:
        """The transport could not queue `total` acknowledged commands so far: an error status."""
        self._now()
        self._publish_notice(MSG_COMMANDS_LOST + str(total))

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

    @property
    def inflight(self) -> int:
        return len(self._inflight)

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
        at = self._uptime_ms
        if not self._have_baseline:
            # No register saved with the state: this reading is the baseline, written at once.
            self._have_baseline = True
            self._baseline = kwh
            self._baseline_at_ms = at
            self._baseline_gap_ms = 0
            self._persist_state()
            return
        delta = kwh - self._baseline
        span_ms = (at - self._baseline_at_ms) + self._baseline_gap_ms
        self._baseline = kwh  # follows the register; a backwards register was reset
        self._baseline_at_ms = at
        self._baseline_gap_ms = 0
        if delta > 0:
            cap = self._rated_max_kw * float(span_ms) / 3600000.0 + REGISTER_STEP_KWH
            if delta > cap:
                self.unbilled_kwh += delta - cap
                delta = cap
                self._raw_chained = False
                self._over_rated_pending = True
            self.energy_total += delta
            self.session_total += delta
            self._interval_units += delta
            self.balance -= delta
            self._state_dirty = True
            self._retained_dirty = True
        elif delta < 0:
            self._raw_chained = False
            self._state_dirty = True
            self._retained_dirty = True

    def _apply_relay(self) -> None:
        o = self.relay_override
        on = (not self.sensor_fault) and o != RelayOverride.OFF and (o == RelayOverride.ON or self.balance > 0)
        if not self._relay_known or on != self.relay_closed:
            change = self._relay_known
            self._set_relay(on)
            self.relay_closed = on
            self._relay_known = True
            if change and self._state_dirty:
                self._persist_state()  # a relay opened for lack of credit stays open after a power cut

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
            reg_id=self.reg_id,
            unbilled_kwh=self.unbilled_kwh,
            cmd_id=cmd_id,
            **(self.ota.status_fields() if self.ota is not None else {}),
        )

    def _publish_status(self, status: str, message: str, cmd_id: str) -> None:
        if not self.connected:
            return
        self._publish(self.topic("status"), self._status_payload(status, message, cmd_id), 0, True)
        self._published_condition = status
        self._last_status_ms = self._now_ms

    def _publish_notice(self, message: str) -> None:
        """An event, not a condition: status "error", then the actual condition again."""
        self._publish_status("error", message, "")

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
            reg_id=self.reg_id,
        )
        self._interval_units = 0.0
        self._retained_dirty = True
        # The ring is the outbox: in flash before it can leave, out of it only on its PUBACK.
        if packable(r):
            self._buffer.append(r, ReportMeta(int(self.relay_override), self._raw_chained))
            return
        self._persist_state()
        if self.connected:
            self._publish(self.topic("consumption"), encode_report(self.config.meter_no, r), 1, False)

    def _expire_inflight(self) -> None:
        limit = self.config.outbox_expiry_ms + 1000
        now = self._uptime_ms
        self._inflight = [f for f in self._inflight if not (now - f[2] > limit)]

    def _drain_buffer(self) -> None:
        if not self.connected:
            return
        self._expire_inflight()
        cfg = self.config
        handed = 0
        index = 0
        while (
            handed < self._replay_batch
            and len(self._inflight) < cfg.max_inflight
            and self._outbox_bytes() < cfg.max_outbox_bytes
        ):
            entry = self._buffer.peek_at(index)
            if entry is None:
                break
            key, r, _meta = entry
            if any(f[0] == key for f in self._inflight):
                index += 1
                continue
            msg_id = self._publish(self.topic("consumption"), encode_report(cfg.meter_no, r), 1, False)
            if msg_id < 0:
                break
            handed += 1
            if msg_id == 0:
                self._buffer.consume(key)  # a transport without message ids: taken = delivered
                continue
            f = [key, msg_id, self._uptime_ms, False]
            for other in self._inflight:
                if other[1] == msg_id:
                    other[3] = True  # two messages, one id: neither leaves the ring on its PUBACK
                    f[3] = True
            self._inflight.append(f)
            index += 1

    def _persist_state(self) -> None:
        st = StateRecord(
            reg_id=self.reg_id,
            energy_total=self.energy_total,
            balance=self.balance,
            have_raw=self._have_baseline,
            raw_kwh=self._baseline if self._have_baseline else 0.0,
            unbilled_kwh=self.unbilled_kwh,
        )
        self._kv.put(KEY_STATE, encode_state(st))
        self._last_persist_ms = self._now_ms
        self._state_dirty = False
        self._raw_chained = self._have_baseline
        self._save_retained()

    def _save_retained(self) -> None:
        self._retained_dirty = False
        if self._retained is None:
            return
        st = StateRecord(
            reg_id=self.reg_id,
            energy_total=self.energy_total,
            balance=self.balance,
            have_raw=self._have_baseline,
            raw_kwh=self._baseline if self._have_baseline else 0.0,
            unbilled_kwh=self.unbilled_kwh,
        )
        self._retained.store(encode_retained(RetainedRecord(st, int(self.relay_override), self._interval_units)))

    def _apply_balance_command(self, cmd: BalanceCommand) -> None:
        # The ledger's balance accounts consumption up to cmd.energy_total of history cmd.reg_id;
        # a command about another history sets the balance as it is (never credit the difference
        # between someone else's register and this one).
        not_applied = ""
        if cmd.energy_total is None:
            self.balance = cmd.balance  # seed-only backend
        elif (
            cmd.reg_id == self.reg_id
            if cmd.reg_id
            else cmd.energy_total <= self.energy_total + self._tolerance
        ):
            self.balance = cmd.balance - (self.energy_total - cmd.energy_total)
        else:
            self.balance = cmd.balance
            not_applied = MSG_REGISTER_AHEAD if not cmd.reg_id else MSG_REG_ID_MISMATCH
        self._persist_state()  # a payment is written at once, not throttled
        self._apply_relay()
        if self.connected:
            self._publish(
                self.topic("balance"),
                encode_balance_report(self.config.meter_no, self.balance, self._timestamp(), self.reg_id, cmd.cmd_id),
                0,
                False,
            )
        if not_applied:
            self._publish_notice(not_applied)
        self._publish_condition_if_changed()

    def _apply_relay_command(self, cmd: RelayCommand) -> None:
        self.relay_override = cmd.state
        self._kv.put(KEY_RELAY, bytes([int(cmd.state)]))  # a maintenance "off" survives reboots
        self._save_retained()
        self._apply_relay()
        self._publish_status(self.condition, "Relay override: " + relay_override_name(cmd.state), cmd.cmd_id)


# ---- a whole meter: hardware, firmware and what a reset does --------------------------------------


class SimDevice:
    """One meter as a simulation drives it: the firmware (MeterCore, or SafeModeCore after a boot
    loop) on its hardware models, with the firmware's reset semantics. The same behaviour as the
    firmware's host trace runner (trace_runner.cpp), so anything a trace shows, this does:

    - NVS (`kv`), the report ring (`ring`), RTC memory (`rtc`, `guard_rtc`), the sensor register
      (`sensor_kwh`, None = not answering), esp_mqtt's outbox (`outbox`, an EspMqttOutbox: what
      the broker receives is `outbox.messages` / `outbox.on_transmit`; PUBACKs come at the next
      step unless `outbox.acking` is False);
    - reboot(reason): RAM and the outbox are lost; RTC memory survives soft resets only
      (SOFT_RESET_REASONS); power_cut(), wipe_nvs(), corrupt_state(), wipe_ring(), swap_board()
      are resets with storage faults; reset_sensor() restarts the PZEM register;
    - OTA (with `ota_public_key`): images come from `ota_fetch(url) -> bytes | None`; a restart
      into a new image runs the version the command named; `ota_crashes(image)` makes it panic at
      boot (the firmware then rolls back); a deliberate restart does not count as a fast reboot.
    """

    def __init__(
        self,
        config: MeterConfig,
        *,
        random32: Callable[[], int] | None = None,
        start_millis: int = 0,
        buffer_capacity: int = 64,
        outbox_expiry_ms: int = 30000,
        boot_guard: BootGuardConfig | None = None,
        ota_public_key: bytes | None = None,
        ota_config: OtaConfig | None = None,
        ota_fetch: Callable[[str], bytes | None] | None = None,
        ota_fetch_ms: int = 5000,
        ota_valid: Callable[[bytes], bool] | None = None,
        ota_crashes: Callable[[bytes], bool] | None = None,
        on_relay: Callable[[bool], None] | None = None,
        on_restart: Callable[[str, str], None] | None = None,
        reset_reason: str = "poweron",
        wifi_rssi: int = -65,
    ) -> None:
        self.config = config
        self.random32 = random32
        self.clock = ManualClock(start_millis)
        self.kv = MemoryKvStore()
        self.buffer_capacity = buffer_capacity
        self.ring = ReportBuffer(buffer_capacity)
        self.rtc = RetainedMemory()
        self.guard_rtc = RetainedMemory()
        self.outbox = EspMqttOutbox(self.clock.monotonic, outbox_expiry_ms)
        self.outbox.disconnect()  # the first connect is the caller's
        self.guard_config = boot_guard or BootGuardConfig()
        self.ota_public_key = ota_public_key
        self.ota_config = ota_config or OtaConfig()
        self.platform: SimOtaPlatform | None = None
        if ota_public_key is not None:
            self.platform = SimOtaPlatform(self.clock.monotonic, ota_fetch or (lambda url: None),
                                           fetch_ms=ota_fetch_ms, valid=ota_valid, crashes=ota_crashes)
        self.sensor_kwh: float | None = None
        self.relay_closed = False
        self._on_relay = on_relay
        self._on_restart = on_restart
        self.wifi_rssi = wifi_rssi
        self.fw = config.fw_version
        self.previous_fw = config.fw_version
        self.core: MeterCore | None = None
        self.safe: SafeModeCore | None = None
        self.ota: OtaManager | None = None
        self.guard: BootGuard | None = None
        self.boot(reset_reason)

    # -- the firmware --

    @property
    def meter(self) -> MeterCore | SafeModeCore:
        return self.safe if self.safe is not None else self.core

    def _relay(self, closed: bool) -> None:
        self.relay_closed = closed
        if self._on_relay is not None:
            self._on_relay(closed)

    def boot(self, reason: str) -> None:
        self.guard = BootGuard(self.guard_rtc, self.guard_config)
        safe_mode = self.guard.begin()
        running = dataclasses.replace(self.config, fw_version=self.fw)
        self.ota = None
        if self.platform is not None:
            self.ota = OtaManager(self.ota_config, self.kv, self.platform, self.ota_public_key)
        self.core = self.safe = None
        if safe_mode:
            self.safe = SafeModeCore(running, self.clock, self._relay, self.outbox.publish, reason,
                                     self.guard.fast_boots, self.ota)
            self.safe.set_wifi_rssi(self.wifi_rssi)
            self.safe.begin()
            return
        self.core = MeterCore(
            running, self.clock, self.kv, self.ring, self.outbox.publish, self._relay, lambda: self.sensor_kwh,
            reset_reason=reason, random32=self.random32, retained=self.rtc, outbox_bytes=self.outbox.outbox_bytes,
            ota=self.ota,
        )
        self.core.set_wifi_rssi(self.wifi_rssi)
        self.core.begin()

    def _reset(self, reason: str, start_millis: int = 0) -> None:
        """Any reset: once an image is activated (the boot partition points at it), the next boot
        of any kind runs it; one that panics at boot is reset once more (reason panic)."""
        image = None
        p = self.platform
        if p is not None and p.next_image is not None and self.ota is not None:
            image, p.next_image = p.next_image, None
            self.previous_fw, self.fw = self.fw, self.ota.target_version
        if reason not in SOFT_RESET_REASONS:
            self.rtc.clear()
            self.guard_rtc.clear()
        self.outbox.power_cut()
        if p is not None:
            p.reset()
        self.clock.restart(start_millis)
        self.boot(reason)
        if image is not None and p.crashes(image):
            self._restarted(self.fw, "panic")  # the new image panics right after boot
            self._reset("panic")

    def _follow_platform(self) -> None:
        p = self.platform
        if p is None:
            return
        if p.restart_requested:
            into = self.ota.target_version if (p.next_image is not None and self.ota is not None) else self.fw
            self._restarted(into, "software")
            self.guard.clear()
            self._reset("software")
        elif p.rollback_requested:
            p.next_image = None
            self.fw = self.previous_fw
            self._restarted(self.fw, "software")
            self.guard.clear()
            self._reset("software")

    def _restarted(self, into: str, reason: str) -> None:
        if self._on_restart is not None:
            self._on_restart(into, reason)

    # -- time and the network --

    def advance(self, ms: int, step_ms: int = 1000) -> None:
        """Moves the clock in steps of step_ms: each step one pass of the MQTT client, then loop()."""
        remaining = ms
        while remaining > 0:
            d = min(remaining, step_ms)
            self.clock.advance(d)
            remaining -= d
            if self.safe is not None:
                self.outbox.service_into(self.safe)
                action = self.safe.loop()
                if action == "restart":
                    self.ota.restart_now()
                elif action == "rollback":
                    self.ota.rollback_now()
                if (self.platform is None or not (self.platform.restart_requested or self.platform.rollback_requested)) \
                        and self.guard.safe_mode_over(self.safe.uptime_ms):
                    self._restarted(self.fw, "software")  # safe mode is over: try a normal boot
                    self._reset("software")
            else:
                self.outbox.service_into(self.core)
                self.core.loop()
                self.guard.loop(self.core.uptime_ms)
            self._follow_platform()

    def will_message(self) -> Message:
        return self.meter.will_message()

    def connect(self) -> None:
        self.outbox.connect()
        self.meter.on_connected()

    def disconnect(self) -> None:
        self.outbox.disconnect()
        self.meter.on_disconnected()

    def message(self, topic: str, payload) -> None:
        """A message on one of the meter's subscribed topics (smartmeter/{meterNo}/command/...)."""
        self.meter.on_message(topic, payload)
        self._follow_platform()

    def set_wifi_rssi(self, rssi: int) -> None:
        self.wifi_rssi = rssi
        self.meter.set_wifi_rssi(rssi)

    # -- resets and storage faults --

    def reboot(self, reason: str = "software", start_millis: int = 0) -> None:
        self._reset(reason, start_millis)

    def power_cut(self, start_millis: int = 0) -> None:
        self._reset("poweron", start_millis)

    def wipe_nvs(self, reason: str = "poweron", start_millis: int = 0) -> None:
        """NVS erased while the meter was down (Arduino's initArduino on NO_FREE_PAGES)."""
        self.kv.wipe()
        self._reset(reason, start_millis)

    def corrupt_state(self, key: str = KEY_STATE, reason: str = "poweron", start_millis: int = 0) -> None:
        self.kv.corrupt(key)
        self._reset(reason, start_millis)

    def wipe_ring(self, reason: str = "poweron", start_millis: int = 0) -> None:
        self.ring = ReportBuffer(self.buffer_capacity)
        self._reset(reason, start_millis)

    def swap_board(self, reason: str = "poweron", start_millis: int = 0) -> None:
        """A new board under the same meterNo (or a full flash erase): same sensor."""
        self.kv = MemoryKvStore()
        self.ring = ReportBuffer(self.buffer_capacity)
        self.rtc.clear()
        self.guard_rtc.clear()
        self._reset(reason, start_millis)

    def reset_sensor(self, kwh: float = 0.0) -> None:
        """The PZEM's own register restarts (reset or replaced)."""
        self.sensor_kwh = kwh

    def load_state(self, *, reg_id: str, energy_total: float, balance: float, next_seq: int,
                   raw_kwh: float | None = None, reason: str = "poweron") -> None:
        """Puts a known register history into NVS (as if the meter had run it) and boots from it.
        raw_kwh: the sensor register saved with it (None: the first reading is a baseline)."""
        if len(reg_id) != OWN_REG_ID_CHARS or not valid_reg_id(reg_id):
            raise ValueError(f"a meter's own regId is {OWN_REG_ID_CHARS} of {REG_ID_ALPHABET}")
        state = StateRecord(reg_id=reg_id, energy_total=energy_total, balance=balance,
                            have_raw=raw_kwh is not None, raw_kwh=raw_kwh or 0.0)
        self.kv.put(KEY_STATE, encode_state(state))
        self.kv.put(KEY_SEQ, struct.pack("<Q", next_seq))
        self.rtc.clear()  # else a soft reset would resume the state held in RTC memory
        self._reset(reason)
