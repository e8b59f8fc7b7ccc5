"""Reading Daraja's callback bodies (../shared/reference/daraja.md), bounded and defensive.

Bodies are untrusted text: their size is capped before they are stored (MAX_CALLBACK_BYTES),
their nesting depth before they are parsed (a body nested thousands of levels deep would make
the JSON parser recurse until Python gives up), and every field is looked up by name, never by
position. A body that cannot be read raises UnreadableBody with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo

from core.rules import KES_QUANTUM, MPESA_ID

MAX_CALLBACK_BYTES = 64 * 1024
# Daraja's bodies are 5 levels deep at most; anything far deeper is not one of them.
MAX_DEPTH = 32
NAIROBI = ZoneInfo("Africa/Nairobi")


class UnreadableBody(ValueError):
    """Why a callback body cannot be read."""


def json_bounded(text: str):
    """json.loads, refusing over-deep nesting before the parser sees it (Decimal for floats)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise UnreadableBody(f"nested more than {MAX_DEPTH} levels deep")
        elif char in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_float=Decimal)
    except (ValueError, RecursionError) as error:
        raise UnreadableBody(f"not JSON: {error}") from None


def eat_datetime(value) -> datetime | None:
    """Daraja's `YYYYMMDDHHmmss` (East Africa Time), a number or a string, as an aware datetime."""
    text = str(value).strip() if isinstance(value, int | str) and not isinstance(value, bool) else ""
    try:
        return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI) if len(text) == 14 else None
    except ValueError:
        return None


def _amount(value) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return amount.quantize(KES_QUANTUM) if amount.is_finite() and amount > 0 else None


@dataclass(frozen=True)
class StkResult:
    checkout_request_id: str
    result_code: str
    result_desc: str
    amount_kes: Decimal | None = None
    receipt: str | None = None
    phone: str = ""
    paid_at: datetime | None = None


def parse_stk_callback(body: str) -> StkResult:
    """An STK callback; items by Name (never position); an item may lack Value."""
    data = json_bounded(body)
    try:
        callback = data["Body"]["stkCallback"]
        checkout = callback["CheckoutRequestID"]
        code = callback["ResultCode"]  # a number or a string, depending on the day
    except (KeyError, TypeError):
        raise UnreadableBody("not an STK callback (Body.stkCallback with CheckoutRequestID and ResultCode)") from None
    if not isinstance(checkout, str) or not MPESA_ID.match(checkout[:32]) or len(checkout) > 64:
        raise UnreadableBody("CheckoutRequestID missing or malformed")
    if isinstance(code, bool) or not isinstance(code, int | str | Decimal):
        raise UnreadableBody("ResultCode is not a number")
    metadata = callback.get("CallbackMetadata") if isinstance(callback, dict) else None
    items = metadata.get("Item") if isinstance(metadata, dict) else None
    values = {item["Name"]: item.get("Value") for item in items or [] if isinstance(item, dict) and "Name" in item}
    receipt = values.get("MpesaReceiptNumber")
    phone = values.get("PhoneNumber")
    return StkResult(
        checkout_request_id=checkout,
        result_code=str(code).strip(),
        result_desc=str(callback.get("ResultDesc", ""))[:255],
        amount_kes=_amount(values.get("Amount")),
        receipt=receipt if isinstance(receipt, str) and MPESA_ID.match(receipt) else None,
        phone=str(phone) if isinstance(phone, int | str) and not isinstance(phone, bool) else "",
        paid_at=eat_datetime(values.get("TransactionDate")),
    )


@dataclass(frozen=True)
class C2bRequest:
    trans_id: str
    amount_text: str
    bill_ref: str
    msisdn: str
    paid_at: datetime | None


def parse_c2b(body: str) -> C2bRequest:
    """A C2B validation or confirmation request (all values strings; MSISDN may be masked)."""
    data = json_bounded(body)
    if not isinstance(data, dict):
        raise UnreadableBody("not a C2B request (a JSON object)")
    fields = {key: str(data.get(key, "") or "") for key in ("TransID", "TransAmount", "BillRefNumber", "MSISDN")}
    return C2bRequest(fields["TransID"], fields["TransAmount"], fields["BillRefNumber"], fields["MSISDN"],
                      eat_datetime(data.get("TransTime")))
