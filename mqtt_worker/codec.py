"""The meter ⇄ backend wire format (../shared/PROTOCOL.md): topics, payload validation, commands.

No Django here: the simulator and the benchmarks use this module alone.

Numbers are exact. orjson (much faster than `json`, which matters on the ingest hot path) hands
non-integers over as binary doubles; `Decimal(repr(x))` turns such a double back into the
shortest decimal text that parses to it, which for any JSON number of up to 15 significant
digits (DBL_DIG) is numerically the number the meter wrote. Values are then quantized to the
ledger's 6 places (kWh) with banker's rounding; nothing in accounting ever does arithmetic on a
binary double. Commands are written the other way: Decimal → JSON number text, never a double.
"""

from __future__ import annotations

import base64
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

import orjson

from core.rules import (
    FW_VERSION_HELP,
    KWH_QUANTUM,
    MAX_PAYLOAD_BYTES,
    MAX_TIMESTAMP_MS,
    MAX_WIRE_INT,
    MAX_WIRE_KWH,
    OTA_SIGNATURE_MAX_BYTES,
    OTA_STATES,
    OTA_URL_MAX_BYTES,
    REG_ID,
    SHA256_HEX,
    valid_fw_version,
    valid_meter_no,
)
from meters.reports import BalanceReport, ConsumptionReport, Report, StatusUpdate

TOPIC_PREFIX = "smartmeter"
REPORT_KINDS = ("consumption", "status", "balance")
COMMAND_KINDS = ("balance", "relay", "ota")  # ota: firmware/PROTOCOL-ext.md
STATUSES = ("online", "offline", "low_balance", "error")
RELAY_REPORTED = ("on", "off")
RELAY_COMMANDS = ("on", "off", "auto")


class CodecError(ValueError):
    """Why a message cannot be accepted; the text goes into the dead letter as its reason."""


# --- topics -----------------------------------------------------------------------------------


def report_topic(meter_no: str, kind: str) -> str:
    if kind not in REPORT_KINDS:
        raise CodecError(f"unknown report kind {kind!r}")
    return f"{TOPIC_PREFIX}/{_meter_no(meter_no)}/{kind}"


def command_topic(meter_no: str, kind: str) -> str:
    if kind not in COMMAND_KINDS:
        raise CodecError(f"unknown command kind {kind!r}")
    return f"{TOPIC_PREFIX}/{_meter_no(meter_no)}/command/{kind}"


def report_subscriptions(group: str) -> list[str]:
    """The worker's subscriptions. With a group: MQTT v5 shared (`$share/<group>/…`), so N
    workers split the load. Without one: plain wildcard subscriptions, for a single worker.

    Why both: Mosquitto 2.0.11 (Debian 12's) restores a shared subscription from its persistence
    file in a form that matches nothing, so reports published after a broker restart and before
    the worker re-subscribes are dropped (0 of 100 kept, against 100 of 100 for a plain
    subscription; tests/mqtt_worker/test_broker_facts.py). A single worker is safer without a group.
    """
    if group == "":
        return [f"{TOPIC_PREFIX}/+/{kind}" for kind in REPORT_KINDS]
    if any(char in group for char in "/+#$ "):
        raise CodecError(f"invalid shared-subscription group {group!r}")
    return [f"$share/{group}/{TOPIC_PREFIX}/+/{kind}" for kind in REPORT_KINDS]


def parse_topic(topic: str) -> tuple[str, str]:
    """`smartmeter/{meterNo}/{consumption|status|balance}` → (meterNo, kind)."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != TOPIC_PREFIX or parts[2] not in REPORT_KINDS:
        raise CodecError(f"not a report topic: {topic!r}")
    if not valid_meter_no(parts[1]):
        raise CodecError(f"invalid meterNo in topic: {parts[1]!r}")
    return parts[1], parts[2]


def parse_command_topic(topic: str) -> tuple[str, str]:
    """`smartmeter/{meterNo}/command/{balance|relay|ota}` → (meterNo, kind)."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_PREFIX or parts[2] != "command" or parts[3] not in COMMAND_KINDS:
        raise CodecError(f"not a command topic: {topic!r}")
    if not valid_meter_no(parts[1]):
        raise CodecError(f"invalid meterNo in topic: {parts[1]!r}")
    return parts[1], parts[3]


def _meter_no(meter_no: str) -> str:
    if not valid_meter_no(meter_no):
        raise CodecError(f"invalid meterNo {meter_no!r}")
    return meter_no


# --- reports ------------------------------------------------------------------------------------

_MISSING = object()


def _number(data: dict, name: str, *, required: bool = True, minimum: Decimal | None = None):
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise CodecError(f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{name} must be a number, got {type(value).__name__}")
    try:
        # repr of a double is its shortest round-tripping decimal text (see the module note).
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    except InvalidOperation:
        raise CodecError(f"{name} is not a number: {value!r}") from None
    if not number.is_finite():
        raise CodecError(f"{name} must be finite, got {value!r}")
    if abs(number) > MAX_WIRE_KWH:
        raise CodecError(f"{name} is out of range: {value!r}")
    if minimum is not None and number < minimum:
        raise CodecError(f"{name} must be ≥ {minimum}, got {value!r}")
    return number.quantize(KWH_QUANTUM, rounding=ROUND_HALF_EVEN)


def _integer(data: dict, name: str, *, required: bool, minimum: int | None = 0, maximum: int = MAX_WIRE_INT):
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise CodecError(f"{name} is required")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1698765432000.0 is the same instant; JavaScript meters may write it
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or abs(value) > maximum:
        raise CodecError(f"{name} is out of range: {value!r}")
    return value


def _string(data: dict, name: str, *, max_length: int, choices: tuple[str, ...] | None = None) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CodecError(f"{name} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise CodecError(f"{name} contains a NUL character")
    if choices is not None and value not in choices:
        raise CodecError(f"{name} must be one of {', '.join(choices)}, got {value[:40]!r}")
    return value[:max_length]


def _reg_id(data: dict) -> str | None:
    value = data.get("regId")
    if value is None:
        return None
    if not isinstance(value, str) or not REG_ID.fullmatch(value):
        raise CodecError(f"regId must be 1-16 of A-Z a-z 0-9 _ -, got {str(value)[:40]!r}")
    return value


def decode(topic: str, payload: bytes) -> Report:
    """Validate one message exactly per PROTOCOL.md; raise CodecError with the reason."""
    meter_no, kind = parse_topic(topic)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"payload is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
    try:
        data = orjson.loads(payload)  # also rejects invalid UTF-8, NaN and Infinity
    except orjson.JSONDecodeError as error:
        raise CodecError(f"invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CodecError(f"payload must be a JSON object, got {type(data).__name__}")
    sender = data.get("meterNo")
    if not isinstance(sender, str):
        raise CodecError("meterNo is required and must be a string")
    if sender != meter_no:
        raise CodecError(f"meterNo {sender[:40]!r} differs from the topic's {meter_no!r}")
    if kind == "consumption":
        return ConsumptionReport(
            meter_no=meter_no,
            units_consumed_kwh=_number(data, "unitsConsumed", minimum=Decimal(0)),
            remaining_balance_kwh=_number(data, "remainingBalance"),
            total_consumed_kwh=_number(data, "totalConsumed", minimum=Decimal(0)),
            timestamp_ms=_integer(data, "timestamp", required=True, maximum=MAX_TIMESTAMP_MS),
            seq=_integer(data, "seq", required=False),
            energy_total_kwh=_number(data, "energyTotal", required=False, minimum=Decimal(0)),
            reg_id=_reg_id(data),
            boot=_integer(data, "boot", required=False),
            raw_payload=payload.decode(),  # valid UTF-8: orjson refused anything else
        )
    if kind == "status":
        status = data.get("status")
        if status not in STATUSES:
            raise CodecError(f"status must be one of {', '.join(STATUSES)}, got {str(status)[:40]!r}")
        return StatusUpdate(
            meter_no=meter_no,
            status=status,
            message=_string(data, "message", max_length=255),
            balance_kwh=_number(data, "balance", required=False),
            wifi_rssi=_integer(data, "wifi_rssi", required=False, minimum=-1000),
            timestamp_ms=_integer(data, "timestamp", required=False, maximum=MAX_TIMESTAMP_MS),
            relay=_string(data, "relay", max_length=8, choices=RELAY_REPORTED),
            firmware=_string(data, "fw", max_length=32),
            uptime_s=_integer(data, "uptime", required=False),
            reset_reason=_string(data, "resetReason", max_length=32),
            reg_id=_reg_id(data),
            ota_state=_string(data, "otaState", max_length=16, choices=OTA_STATES),
            ota_version=_string(data, "otaVersion", max_length=32),
            ota_error=_string(data, "otaError", max_length=255),
            cmd_id=_string(data, "cmdId", max_length=64),
            raw_payload=payload.decode(),
        )
    return BalanceReport(
        meter_no=meter_no,
        balance_kwh=_number(data, "balance"),
        timestamp_ms=_integer(data, "timestamp", required=False, maximum=MAX_TIMESTAMP_MS),
        cmd_id=_string(data, "cmdId", max_length=40),
    )


# --- commands -----------------------------------------------------------------------------------


def decimal_text(value: Decimal) -> str:
    """A Decimal as JSON number text without exponent or trailing zeros: 10.500000 → 10.5."""
    if not isinstance(value, Decimal) or not value.is_finite():
        raise CodecError(f"not a finite Decimal: {value!r}")
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _json_str(value: str) -> str:
    return orjson.dumps(value).decode()


def encode_balance_command(
    *,
    balance_kwh: Decimal,
    timestamp_ms: int,
    energy_total_kwh: Decimal | None = None,
    reg_id: str | None = None,
    cmd_id: str | None = None,
    reason: str | None = None,
) -> bytes:
    """`{"balance": 10.5, "timestamp": 1698765432000}` (the seed's schema) plus the ext fields."""
    parts = [f'"balance":{decimal_text(balance_kwh)}', f'"timestamp":{int(timestamp_ms)}']
    if energy_total_kwh is not None:
        parts.append(f'"energyTotal":{decimal_text(energy_total_kwh)}')
        if reg_id:
            parts.append(f'"regId":{_json_str(reg_id)}')
    if cmd_id:
        parts.append(f'"cmdId":{_json_str(cmd_id)}')
    if reason:
        parts.append(f'"reason":{_json_str(reason)}')
    return ("{" + ",".join(parts) + "}").encode()


def encode_relay_command(*, state: str, timestamp_ms: int, cmd_id: str | None = None, reason: str | None = None) -> bytes:
    if state not in RELAY_COMMANDS:
        raise CodecError(f"relay state must be one of {', '.join(RELAY_COMMANDS)}, got {state!r}")
    parts = [f'"state":{_json_str(state)}']
    if reason:
        parts.append(f'"reason":{_json_str(reason)}')
    if cmd_id:
        parts.append(f'"cmdId":{_json_str(cmd_id)}')
    parts.append(f'"timestamp":{int(timestamp_ms)}')
    return ("{" + ",".join(parts) + "}").encode()


def encode_ota_command(*, url: str, version: str, sha256: str, signature: str, cmd_id: str | None = None) -> bytes:
    """`{"url", "version", "sha256", "signature", "cmdId"}` (firmware/PROTOCOL-ext.md): checked
    here against the rules the meter applies, so that a command the meter would reject as
    malformed is never published. `http://` passes here for simulators and tests only: a real
    meter refuses it (the backend sends it only with OTA_ALLOW_HTTP, meters.ota)."""
    if (
        not isinstance(url, str) or not url.startswith(("https://", "http://"))
        or len(url.encode()) > OTA_URL_MAX_BYTES or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url)
    ):
        raise CodecError(f"OTA url must be http(s), at most {OTA_URL_MAX_BYTES} bytes, no spaces: {str(url)[:60]!r}")
    if not valid_fw_version(version):
        raise CodecError(f"OTA version must be {FW_VERSION_HELP}, got {str(version)[:40]!r}")
    if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
        raise CodecError("OTA sha256 must be 64 lowercase hex digits")
    try:
        der = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except ValueError:
        der = b""
    if not (8 <= len(der) <= OTA_SIGNATURE_MAX_BYTES) or base64.b64encode(der).decode() != signature:
        raise CodecError("OTA signature must be standard padded base64 of a DER signature")
    parts = [f'"url":{_json_str(url)}', f'"version":{_json_str(version)}', f'"sha256":{_json_str(sha256)}',
             f'"signature":{_json_str(signature)}']
    if cmd_id:
        parts.append(f'"cmdId":{_json_str(cmd_id)}')
    return ("{" + ",".join(parts) + "}").encode()


def encode_consumption_report(report: ConsumptionReport) -> bytes:
    """For simulators, tests and benchmarks: a report as a meter sends it."""
    parts = [
        f'"meterNo":{_json_str(report.meter_no)}',
        f'"unitsConsumed":{decimal_text(report.units_consumed_kwh)}',
        f'"remainingBalance":{decimal_text(report.remaining_balance_kwh)}',
        f'"totalConsumed":{decimal_text(report.total_consumed_kwh)}',
        f'"timestamp":{int(report.timestamp_ms)}',
    ]
    if report.seq is not None:
        parts.append(f'"seq":{int(report.seq)}')
    if report.energy_total_kwh is not None:
        parts.append(f'"energyTotal":{decimal_text(report.energy_total_kwh)}')
    if report.reg_id is not None:
        parts.append(f'"regId":{_json_str(report.reg_id)}')
    if report.boot is not None:
        parts.append(f'"boot":{int(report.boot)}')
    return ("{" + ",".join(parts) + "}").encode()
