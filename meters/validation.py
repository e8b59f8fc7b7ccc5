"""Checks shared by services and the API (no models imported here)."""

from core.errors import InvalidInput
from core.rules import METER_NO_HELP, valid_meter_no


def validate_meter_no(meter_no) -> str:
    """PROTOCOL.md: 1–32 of A-Z a-z 0-9 _ - ; never `/`, `+`, `#` or spaces (MQTT topic safety)."""
    if not valid_meter_no(meter_no):
        raise InvalidInput(
            f"Invalid meter number {meter_no!r}: use {METER_NO_HELP}",
            field="meter_no",
        )
    return meter_no
