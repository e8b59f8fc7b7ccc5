"""The exact payloads of ../shared/reference/daraja.md, as text (numbers stay as written there).

Helpers re-address a payload to a payment the test created (its CheckoutRequestID and amount)
without changing its shape or types.
"""

# ruff: noqa: E501  (the reference payloads are kept verbatim, line breaks included)

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

STK_SUCCESS = """{"Body": {"stkCallback": {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": "ws_CO_191220191020363925",
  "ResultCode": 0, "ResultDesc": "The service request is processed successfully.",
  "CallbackMetadata": {"Item": [
    {"Name": "Amount", "Value": 1.00}, {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
    {"Name": "Balance"},
    {"Name": "TransactionDate", "Value": 20191219102115}, {"Name": "PhoneNumber", "Value": 254708374149}]}}}}"""

STK_CANCELLED = """{"Body": {"stkCallback": {"MerchantRequestID": "f1e2-4b95-a71d-b30d3cdbb7a7942864",
  "CheckoutRequestID": "ws_CO_21072024125243250722943992", "ResultCode": 1032, "ResultDesc": "Request cancelled by user"}}}"""

STK_PUSH_ACCEPTED = {
    "MerchantRequestID": "2654-4b64-97ff-b827b542881d3130", "CheckoutRequestID": "ws_CO_1007202409152617172396192",
    "ResponseCode": "0", "ResponseDescription": "Success. Request accepted for processing",
    "CustomerMessage": "Success. Request accepted for processing",
}

STK_QUERY_PENDING = {"requestId": "ws_CO_…", "errorCode": "500.001.1001", "errorMessage": "The transaction is being processed"}

C2B_REQUEST = """{"TransactionType": "Pay Bill", "TransID": "RKL51ZDR4F", "TransTime": "20231121121325", "TransAmount": "5.00",
 "BusinessShortCode": "600966", "BillRefNumber": "METER001", "InvoiceNumber": "", "OrgAccountBalance": "25.00",
 "ThirdPartyTransID": "", "MSISDN": "2547 ***** 126", "FirstName": "NICHOLAS", "MiddleName": "", "LastName": ""}"""

PASSWORD_VECTOR = {
    "shortcode": "174379",
    "passkey": "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
    "timestamp": "20210628092408",
    "password": "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMjEwNjI4MDkyNDA4",
}


def stk_success_for(payment, *, receipt: str = "NLJ7RT61SV", amount: str | None = None, result_code: str = "0") -> str:
    """The reference success callback, addressed to `payment` (amount written as a JSON number, 2 places)."""
    text = STK_SUCCESS.replace("ws_CO_191220191020363925", payment.checkout_request_id)
    text = text.replace('"NLJ7RT61SV"', json.dumps(receipt))
    text = text.replace('"Value": 1.00', f'"Value": {amount or payment.amount_kes}')
    if result_code != "0":
        text = text.replace('"ResultCode": 0', f'"ResultCode": {result_code}')
    return text


def stk_failure_for(payment, *, code: int, desc: str) -> str:
    text = STK_CANCELLED.replace("ws_CO_21072024125243250722943992", payment.checkout_request_id)
    return text.replace('"ResultCode": 1032', f'"ResultCode": {code}').replace("Request cancelled by user", desc)


def c2b_request(*, trans_id: str = "RKL51ZDR4F", amount: str = "5.00", bill_ref: str = "METER001",
                trans_time: datetime | None = None) -> str:
    """The reference confirmation, re-addressed; TransTime is now (EAT) unless given."""
    text = C2B_REQUEST.replace("RKL51ZDR4F", trans_id).replace('"TransAmount": "5.00"', f'"TransAmount": {json.dumps(amount)}')
    when = (trans_time or datetime.now(UTC)).astimezone(ZoneInfo("Africa/Nairobi")).strftime("%Y%m%d%H%M%S")
    return text.replace('"METER001"', json.dumps(bill_ref)).replace('"20231121121325"', json.dumps(when))
