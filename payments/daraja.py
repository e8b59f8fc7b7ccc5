"""Daraja (Safaricom M-Pesa API) client: OAuth, STK push, STK push query, C2B register URL.

Wire formats: ../shared/reference/daraja.md. Every call has a timeout. Responses are parsed
defensively: the gateway can answer 503 with an HTML page, and numbers come as strings or
numbers depending on the endpoint. JSON numbers are parsed as Decimal, never float.

The OAuth token is shared by every process through the cache (Redis): each token request
invalidates the previous token at Safaricom, so processes must not fetch tokens independently.
A cache `add` (atomic SET NX with a timeout) is the cross-process lock; a token is refreshed a
minute before it expires; a call answered `404.001.03` refreshes once and retries once.
"""

import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from hashlib import sha256
from zoneinfo import ZoneInfo

import httpx
from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)

NAIROBI = ZoneInfo("Africa/Nairobi")
INVALID_TOKEN = "404.001.03"
BEING_PROCESSED = "500.001.1001"
TOKEN_REFRESH_MARGIN_S = 60
TOKEN_LOCK_TTL_S = 30
FORBIDDEN_C2B_URL_WORDS = ("mpesa", "safaricom", "query", "sql", "exe", "cmd")


class DarajaError(Exception):
    """Daraja refused the request or could not be reached.

    `transient` says whether trying again later may succeed (timeouts, 5xx, rate limits) as
    opposed to a request Daraja will always refuse (400 Invalid <field>, wrong credentials).
    `outcome_unknown` says the request may have been carried out although no answer says so: it
    was sent, and then the answer timed out, the connection dropped, or a 5xx came back
    (daraja.md: "The push request itself can fail after Safaricom accepted it"). Only an explicit
    error answer, or a request that never left (no connection), means nothing was started.
    """

    def __init__(self, message: str, *, http_status: int | None = None, error_code: str = "", transient: bool = True,
                 outcome_unknown: bool = False):
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.error_code = error_code
        self.transient = transient
        self.outcome_unknown = outcome_unknown


@dataclass(frozen=True)
class StkPushAccepted:
    merchant_request_id: str
    checkout_request_id: str
    response_description: str
    customer_message: str


@dataclass(frozen=True)
class StkQueryResult:
    """`processing` True: Daraja is still waiting for the customer (not a failure)."""

    processing: bool
    result_code: str = ""
    result_desc: str = ""


def nairobi_timestamp(moment: datetime | None = None) -> str:
    """`YYYYMMDDHHmmss` in Africa/Nairobi time, whatever the server's time zone."""
    return (moment or datetime.now(tz=NAIROBI)).astimezone(NAIROBI).strftime("%Y%m%d%H%M%S")


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode()


_client_lock = threading.Lock()
_client: httpx.Client | None = None


def _http() -> httpx.Client:
    # One pooled client per process (created lazily, so after a Celery worker forks).
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(timeout=httpx.Timeout(settings.MPESA_HTTP_TIMEOUT_S))
        return _client


def _parse(response: httpx.Response) -> dict:
    try:
        body = json.loads(response.content, parse_float=Decimal)
    except ValueError:
        snippet = response.text[:80].replace("\n", " ")
        raise DarajaError(
            f"M-Pesa answered HTTP {response.status_code} with a non-JSON body ({snippet!r})",
            http_status=response.status_code,
            transient=response.status_code >= 500,
        ) from None
    if not isinstance(body, dict):
        raise DarajaError(f"M-Pesa answered HTTP {response.status_code} with unexpected JSON", http_status=response.status_code)
    return body


def _error_from(response: httpx.Response, body: dict) -> DarajaError:
    code = str(body.get("errorCode") or body.get("ResponseCode") or "")
    message = str(body.get("errorMessage") or body.get("ResponseDescription") or "no message")
    # 400 "Invalid <field>" will not get better by retrying; 5xx (busy, quota, locked subscriber) might.
    transient = response.status_code >= 500
    return DarajaError(
        f"M-Pesa refused the request: {code} {message}".strip(),
        http_status=response.status_code,
        error_code=code,
        transient=transient,
    )


def _token_key() -> str:
    # Tokens belong to one consumer key at one base URL (sandbox vs production vs fake).
    scope = sha256(f"{settings.MPESA_BASE_URL}|{settings.MPESA_CONSUMER_KEY}".encode()).hexdigest()[:16]
    return f"mpesa:oauth:{scope}"


def _fetch_token() -> tuple[str, int]:
    credentials = base64.b64encode(f"{settings.MPESA_CONSUMER_KEY}:{settings.MPESA_CONSUMER_SECRET}".encode()).decode()
    try:
        response = _http().get(
            f"{settings.MPESA_BASE_URL}/oauth/v1/generate",
            params={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {credentials}"},
        )
    except httpx.HTTPError as error:
        raise DarajaError(f"M-Pesa OAuth unreachable: {error.__class__.__name__}") from None
    body = _parse(response)
    if response.status_code != 200 or not body.get("access_token"):
        raise _error_from(response, body)
    try:
        expires_in = int(str(body.get("expires_in", "3599")))  # a number or a string, depending on the day
    except ValueError:
        expires_in = 3599
    return str(body["access_token"]), expires_in


def access_token(*, stale: str | None = None) -> str:
    """The shared token; `stale` names a token Daraja just refused, so it is not handed out again."""
    key, lock_key = _token_key(), _token_key() + ":lock"
    token = cache.get(key)
    if token and token != stale:
        return token
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + TOKEN_LOCK_TTL_S
    while not cache.add(lock_key, owner, timeout=TOKEN_LOCK_TTL_S):
        # Another process is fetching: use its token as soon as it lands.
        time.sleep(0.05)
        token = cache.get(key)
        if token and token != stale:
            return token
        if time.monotonic() > deadline:
            raise DarajaError("Timed out waiting for another process to fetch the M-Pesa token")
    try:
        token = cache.get(key)
        if token and token != stale:
            return token
        token, expires_in = _fetch_token()
        cache.set(key, token, timeout=max(expires_in - TOKEN_REFRESH_MARGIN_S, 1))
        return token
    finally:
        if cache.get(lock_key) == owner:
            cache.delete(lock_key)


def _request(path: str, payload: dict) -> tuple[httpx.Response, dict]:
    """POST to Daraja with the shared token (refreshed once on 404.001.03). Transport failures
    after the request may have reached Daraja are `outcome_unknown`."""
    token = access_token()
    for attempt in (1, 2):
        try:
            response = _http().post(
                f"{settings.MPESA_BASE_URL}{path}", json=payload, headers={"Authorization": f"Bearer {token}"}
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            # The connection was never made: the request did not leave.
            raise DarajaError(f"M-Pesa unreachable: {error.__class__.__name__}") from None
        except httpx.TimeoutException:
            raise DarajaError("M-Pesa did not answer in time", outcome_unknown=True) from None
        except httpx.HTTPError as error:
            raise DarajaError(f"M-Pesa connection failed: {error.__class__.__name__}", outcome_unknown=True) from None
        try:
            body = _parse(response)
        except DarajaError as error:
            error.outcome_unknown = response.status_code >= 500
            raise
        if attempt == 1 and response.status_code in (401, 404) and str(body.get("errorCode")) == INVALID_TOKEN:
            logger.info("M-Pesa refused the access token; refreshing once and retrying")
            token = access_token(stale=token)
            continue
        return response, body
    raise AssertionError("unreachable")  # the loop always returns on its second pass


def _password_fields() -> dict:
    timestamp = nairobi_timestamp()
    return {
        "BusinessShortCode": settings.MPESA_SHORTCODE,
        "Password": stk_password(settings.MPESA_SHORTCODE, settings.MPESA_PASSKEY, timestamp),
        "Timestamp": timestamp,
    }


def stk_push(*, phone: str, amount_kes: int, account_reference: str, description: str, callback_url: str) -> StkPushAccepted:
    till = settings.MPESA_TRANSACTION_TYPE == "till"
    payload = {
        **_password_fields(),
        "TransactionType": "CustomerBuyGoodsOnline" if till else "CustomerPayBillOnline",
        "Amount": int(amount_kes),
        "PartyA": phone,
        "PartyB": settings.MPESA_TILL_NUMBER if till else settings.MPESA_SHORTCODE,
        "PhoneNumber": phone,
        "CallBackURL": callback_url,
        "AccountReference": account_reference[:12],
        "TransactionDesc": description[:13],
    }
    response, body = _request("/mpesa/stkpush/v1/processrequest", payload)
    if response.status_code != 200 or str(body.get("ResponseCode")) != "0" or not body.get("CheckoutRequestID"):
        error = _error_from(response, body)
        # A 5xx, even with an errorCode, is no proof that the push was not carried out.
        error.outcome_unknown = response.status_code >= 500
        raise error
    return StkPushAccepted(
        merchant_request_id=str(body.get("MerchantRequestID", "")),
        checkout_request_id=str(body["CheckoutRequestID"]),
        response_description=str(body.get("ResponseDescription", "")),
        customer_message=str(body.get("CustomerMessage", "")),
    )


def stk_query(*, checkout_request_id: str) -> StkQueryResult:
    payload = {**_password_fields(), "CheckoutRequestID": checkout_request_id}
    response, body = _request("/mpesa/stkpushquery/v1/query", payload)
    if str(body.get("errorCode")) == BEING_PROCESSED and "being processed" in str(body.get("errorMessage", "")).lower():
        return StkQueryResult(processing=True)
    if response.status_code != 200 or str(body.get("ResponseCode")) != "0" or "ResultCode" not in body:
        raise _error_from(response, body)
    # ResultCode is a string here ("0", "1032") but has been seen as a number: normalise.
    return StkQueryResult(processing=False, result_code=str(body["ResultCode"]), result_desc=str(body.get("ResultDesc", "")))


def c2b_register_urls(*, confirmation_url: str, validation_url: str, response_type: str = "Completed") -> dict:
    for url in (confirmation_url, validation_url):
        bad = [word for word in FORBIDDEN_C2B_URL_WORDS if word in url.lower()]
        if bad:
            raise DarajaError(f"Daraja refuses C2B URLs containing {bad[0]!r}: {url}", transient=False)
    payload = {
        "ShortCode": settings.MPESA_SHORTCODE,
        "ResponseType": response_type,
        "ConfirmationURL": confirmation_url,
        "ValidationURL": validation_url,
    }
    response, body = _request(f"/mpesa/c2b/{settings.MPESA_C2B_VERSION}/registerurl", payload)
    if response.status_code != 200 or str(body.get("ResponseCode")) != "0":
        raise _error_from(response, body)
    return body
