"""SMS through Africa's Talking's official SDK (`africastalking`), the usual SMS gateway in Kenya.

`make run` and the tests point the SDK at the local stand-in (devtools/fake_africastalking.py,
which speaks the same REST format) with AFRICASTALKING_BASE_URL; the SDK has no setting for its
host, so the service's base URL attribute is replaced. Empty: the SDK's own endpoints.
"""

from dataclasses import dataclass

import africastalking
import requests
from africastalking.Service import AfricasTalkingException
from django.conf import settings

# Africa's Talking per-recipient statusCode: 100 Processed, 101 Sent, 102 Queued are accepted;
# a bad number (403 InvalidPhoneNumber, 404 UnsupportedNumberType, 406 UserInBlacklist,
# 409 DoNotDisturbRejection) will never go through; anything else may on a later try.
ACCEPTED = {100, 101, 102}
PERMANENT = {403, 404, 406, 409}
TIMEOUT_S = (3.05, 10)


@dataclass
class SmsError(Exception):
    message: str
    retryable: bool

    def __str__(self) -> str:
        return self.message


def sms_enabled() -> bool:
    return bool(settings.AFRICASTALKING_API_KEY)


def sms_send(*, phone: str, message: str) -> str:
    """Send one SMS to `phone` (2547XXXXXXXX); returns the gateway's message id, or raises SmsError."""
    service = africastalking.SMSService(settings.AFRICASTALKING_USERNAME, settings.AFRICASTALKING_API_KEY)
    if settings.AFRICASTALKING_BASE_URL:
        service._baseUrl = f"{settings.AFRICASTALKING_BASE_URL}/version1"
    try:
        answer = service.send(message, [f"+{phone}"], sender_id=settings.AFRICASTALKING_SENDER_ID or None, timeout=TIMEOUT_S)
    except ValueError as error:  # the SDK refuses a malformed number before sending
        raise SmsError(str(error), retryable=False) from None
    except AfricasTalkingException as error:  # an HTTP error: the body is the gateway's text
        raise SmsError(f"gateway refused: {str(error)[:300]}", retryable=True) from None
    except requests.RequestException as error:
        raise SmsError(f"gateway unreachable: {type(error).__name__}", retryable=True) from None
    data = answer.get("SMSMessageData") if isinstance(answer, dict) else None
    if not isinstance(data, dict):
        raise SmsError(f"unexpected answer: {str(answer)[:200]}", retryable=True)
    recipients = data.get("Recipients") or []
    if not recipients:
        raise SmsError(f"not sent: {data.get('Message', '')}"[:300], retryable=True)
    recipient = recipients[0]
    code = recipient.get("statusCode")
    if code in ACCEPTED:
        return str(recipient.get("messageId", ""))
    raise SmsError(f"{recipient.get('status', 'failed')} (statusCode {code})", retryable=code not in PERMANENT)
