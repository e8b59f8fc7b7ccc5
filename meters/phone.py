"""Kenyan mobile numbers in the form M-Pesa wants: 2547XXXXXXXX or 2541XXXXXXXX."""

import re

from core.errors import InvalidInput
from core.rules import PHONE_REGEX

_PHONE = re.compile(PHONE_REGEX)


def normalize_phone(raw: str) -> str:
    """Accept 07…, 01…, 7…, 1…, +254…, 254… with spaces or dashes; return 2547/2541XXXXXXXX."""
    if not isinstance(raw, str):
        raise InvalidInput("Phone number must be text", field="phone")
    digits = re.sub(r"[\s\-()]", "", raw)
    if digits.startswith("+"):
        digits = digits[1:]
    if digits.startswith("0") and len(digits) == 10:
        digits = "254" + digits[1:]
    elif len(digits) == 9 and digits[0] in "17":
        digits = "254" + digits
    if not _PHONE.match(digits):
        raise InvalidInput(
            f"{raw!r} is not a Kenyan mobile number (07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX)",
            field="phone",
        )
    return digits
