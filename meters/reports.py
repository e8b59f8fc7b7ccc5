"""What meters report, decoded: the input of the consumption service (meters.consumption).

No Django here. The MQTT codec (mqtt_worker.codec) turns messages into these after validating
them per PROTOCOL.md; the simulator and the tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from core.rules import TRUSTED_TIME_MIN_MS


@dataclass(frozen=True, slots=True)
class ConsumptionReport:
    meter_no: str
    units_consumed_kwh: Decimal
    remaining_balance_kwh: Decimal
    total_consumed_kwh: Decimal
    timestamp_ms: int
    seq: int | None = None
    energy_total_kwh: Decimal | None = None
    # The register history (PROTOCOL.md `regId`) and the boot counter (`boot`, for meters that
    # send neither seq nor time): both make the identity survive reboots and resets.
    reg_id: str | None = None
    boot: int | None = None
    # The message as received (stored with the reading); not part of the report's value.
    raw_payload: str = field(default="", compare=False, repr=False)

    @property
    def time_trusted(self) -> bool:
        return self.timestamp_ms >= TRUSTED_TIME_MIN_MS

    @property
    def dedup_key(self) -> str:
        """The report's identity (PROTOCOL.md): its seq within its regId if sent, else
        (boot, timestamp, totalConsumed). A meter without seq, time or boot counter repeats
        identities across reboots (timestamp = ms since boot, totalConsumed since boot): that
        limit is documented in README.md."""
        scope = f"r:{self.reg_id}:" if self.reg_id is not None else ""
        if self.seq is not None:
            return f"{scope}s:{self.seq}"
        boot = f"b{self.boot}:" if self.boot is not None else ""
        return f"{scope}t:{boot}{self.timestamp_ms}:{self.total_consumed_kwh}"


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    meter_no: str
    status: str
    message: str = ""
    balance_kwh: Decimal | None = None
    wifi_rssi: int | None = None
    timestamp_ms: int | None = None
    relay: str = ""
    firmware: str = ""
    uptime_s: int | None = None
    reset_reason: str = ""
    reg_id: str | None = None
    # OTA (firmware/PROTOCOL-ext.md): the last update's state and version, its error, and the
    # cmdId a status about an update echoes ("" when the meter sends none).
    ota_state: str = ""
    ota_version: str = ""
    ota_error: str = ""
    cmd_id: str = ""
    raw_payload: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class BalanceReport:
    meter_no: str
    balance_kwh: Decimal
    timestamp_ms: int | None = None
    cmd_id: str = ""


Report = ConsumptionReport | StatusUpdate | BalanceReport
