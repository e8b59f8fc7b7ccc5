"""Checks shared by services and the API (no models imported here)."""

import re

from meters.errors import InvalidInput

METER_NO = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def validate_meter_no(meter_no) -> str:
    """PROTOCOL.md: 1–32 of A-Z a-z 0-9 _ - ; never `/`, `+`, `#` or spaces (MQTT topic safety)."""
    if not isinstance(meter_no, str) or not METER_NO.fullmatch(meter_no):
        raise InvalidInput(
            f"Invalid meter number {meter_no!r}: use 1-32 letters, digits, '_' or '-'",
            field="meter_no",
        )
    return meter_no
