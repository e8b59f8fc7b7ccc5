"""The rules that the wire, the apps and the tools share, written once. No Django here.

The MQTT codec, the meter simulator, the models, the serializers, the URL converters and the
settings all import these; PROTOCOL.md and daraja.md are where they come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import unquote, urlsplit

# --- identifiers ------------------------------------------------------------------------------

# PROTOCOL.md: a meterNo is 1-32 of A-Z a-z 0-9 _ - (never `/`, `+`, `#` or a space: it is an
# MQTT topic level and an M-Pesa account reference).
METER_NO_PATTERN = r"[A-Za-z0-9_-]{1,32}"
METER_NO_REGEX = rf"^{METER_NO_PATTERN}$"
METER_NO = re.compile(METER_NO_REGEX)
METER_NO_HELP = "1-32 of A-Z a-z 0-9 _ -"

# A client's Idempotency-Key (API header, portal form): a retry with the same key returns the
# first result instead of doing the work twice.
IDEMPOTENCY_KEY_PATTERN = r"[A-Za-z0-9_.:-]{1,64}"
IDEMPOTENCY_KEY = re.compile(rf"^{IDEMPOTENCY_KEY_PATTERN}$")
IDEMPOTENCY_KEY_HELP = "1-64 of A-Z a-z 0-9 _ . : -"

# M-Pesa receipts (MpesaReceiptNumber, C2B TransID) and CheckoutRequestIDs as we accept them.
MPESA_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

# Kenyan mobile numbers as M-Pesa wants them.
PHONE_REGEX = r"^254(7|1)\d{8}$"

# PROTOCOL.md `regId`: a meter's register history, 1-16 of A-Z a-z 0-9 _ -.
REG_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")


def valid_meter_no(value: object) -> bool:
    return isinstance(value, str) and METER_NO.fullmatch(value) is not None


def valid_idempotency_key(value: object) -> bool:
    return isinstance(value, str) and IDEMPOTENCY_KEY.fullmatch(value) is not None


# --- numbers --------------------------------------------------------------------------------------

KWH_PLACES = 6
KES_PLACES = 2
KWH_QUANTUM = Decimal("0.000001")
KES_QUANTUM = Decimal("0.01")
# The largest energy or balance a message may carry: far above any real register or balance,
# well inside the database columns (12 integer digits).
MAX_WIRE_KWH = Decimal("1000000000")
# The largest magnitude one ledger posting may move: far above any real purchase, so an absurd
# number is refused rather than stored.
MAX_POSTING_KWH = Decimal("1000000")
# Integers on the wire (seq, uptime) fit a signed 64-bit column.
MAX_WIRE_INT = 2**63 - 1
# PROTOCOL.md: a timestamp below 1e12 ms is "milliseconds since boot": the time is unknown.
TRUSTED_TIME_MIN_MS = 10**12
# The last millisecond of year 9999: a later "timestamp" is not a time at all.
MAX_TIMESTAMP_MS = 253402300799999
MAX_PAYLOAD_BYTES = 1024


# --- MQTT URLs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_mqtt_url(url: str) -> MqttUrl:
    """`mqtt://user:pass@host:port` or `mqtts://…` (TLS; default port 8883). Raises ValueError
    naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"the MQTT URL must start with mqtt:// or mqtts://, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the MQTT URL has an invalid port: {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"the MQTT URL names no host: {url!r}")
    tls = parts.scheme == "mqtts"
    return MqttUrl(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


# --- firmware updates (OTA, firmware/PROTOCOL-ext.md "OTA ext") ----------------------------------

# A firmware version as the meter reports it in `fw` and the OTA command names it.
FW_VERSION_PATTERN = r"[A-Za-z0-9._+-]{1,31}"
FW_VERSION = re.compile(rf"^{FW_VERSION_PATTERN}$")
FW_VERSION_HELP = "1-31 of A-Z a-z 0-9 . _ + -"
# What a meter's status says about its last update (`otaState`).
OTA_STATES = ("idle", "downloading", "verifying", "rebooting", "pending", "valid", "failed", "rolledback")
# The command's `url`: https (the meter refuses anything else), at most this many bytes, no
# spaces or control characters. Its `signature`: base64 of a DER ECDSA P-256 signature.
OTA_URL_MAX_BYTES = 256
OTA_SIGNATURE_MAX_BYTES = 72
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def valid_fw_version(value: object) -> bool:
    return isinstance(value, str) and FW_VERSION.fullmatch(value) is not None


def ota_manifest(version: str, sha256_hex: str) -> bytes:
    """The bytes a release signature covers (PROTOCOL-ext.md): the same text the firmware and
    firmware/tools/sign_firmware.py build."""
    if not valid_fw_version(version):
        raise ValueError(f"version must be {FW_VERSION_HELP}")
    if not isinstance(sha256_hex, str) or not SHA256_HEX.fullmatch(sha256_hex):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return f"smartmeter-fw\n{version}\n{sha256_hex}\n".encode("ascii")
