"""A fake Safaricom Daraja server for development and tests: `python -m devtools.fake_daraja --port 8099`.

It speaks the wire formats of ../shared/reference/daraja.md exactly (HTTP statuses, `errorCode`
shapes, numbers versus strings) and calls back the URLs it is given, so the whole payment flow
runs on one machine with `MPESA_BASE_URL=http://127.0.0.1:8099`. It imports no Django.

Each STK push gets an outcome and a delay, from the next entry of a queue that tests fill through
the control endpoint, else from the defaults (CLI flags, also changeable at run time):

  success       ResultCode 0 with CallbackMetadata (receipt, amount, phone, date)
  cancelled     1032 "Request cancelled by user"
  timeout       1037 "DS timeout user cannot be reached."
  insufficient  1 "The balance is insufficient for the transaction."
  twice         success, the callback delivered twice
  never         success, the callback never delivered (only STK query tells)
  processing    no callback, and the query answers "being processed" for ever
  hold          success, delivered only when a test asks (POST /__fake__/deliver)

A plan may also say how the push request's own answer fares (`answer`) and whether the same money
also arrives as a C2B confirmation (`c2b`), as daraja.md describes:
  answer: "ok" (default) | "drop" (the connection closes without an answer) | "slow" (the answer
          comes after `answer_delay` seconds, default 30: past the client's timeout) | "503" (the
          gateway's HTML error page). In every case the push WAS accepted: the customer is asked
          and the callback follows as the outcome says.
  c2b:    "before" | "after" the STK callback: a C2B confirmation with TransID = the receipt and
          BillRefNumber = the AccountReference goes to the registered confirmation URL too; or
          "held" (only when a test asks: POST /__fake__/deliver-c2b).
  deliver: false: the fake delivers no callback itself (the caller builds the bodies with
          stk_callback_body and c2b_confirmation_body and delivers them as it likes); the query
          still answers the outcome.

Until the delay has passed the STK query answers "The transaction is being processed" (HTTP 500,
500.001.1001), as Daraja does. Control endpoints (JSON, no auth; never expose this server):
  GET  /__fake__/state                 counters, registered C2B URLs, every callback delivered
  POST /__fake__/config                {"outcome": ..., "delay": ..., "c2b_delivery": "once"|"twice"}
  POST /__fake__/next                  {"outcome": ..., "delay": ...} for the next STK push
  POST /__fake__/fail                  {"endpoint": "oauth"|"stkpush"|"stkquery"|"registerurl"|"simulate",
                                        "status": 503, "body": "...", "count": 1} canned failures
  POST /__fake__/invalidate-token      the current token stops working (404.001.03 on next use)
  POST /__fake__/deliver               {"CheckoutRequestID": ...} deliver a held callback now
  POST /__fake__/deliver-c2b           {"CheckoutRequestID": ...} deliver the C2B confirmation of its money now
  POST /__fake__/reset                 forget everything
"""

import argparse
import base64
import itertools
import json
import logging
import os
import random
import re
import secrets
import string
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx

logger = logging.getLogger("fake_daraja")

EAT = timezone(timedelta(hours=3))  # Africa/Nairobi has no daylight saving time
PHONE = re.compile(r"^254(7|1)\d{8}$")
FORBIDDEN_URL_WORDS = ("mpesa", "safaricom", "query", "sql", "exe", "cmd")
OUTCOMES = {
    # outcome: (ResultCode, ResultDesc, callback deliveries)
    "success": (0, "The service request is processed successfully.", 1),
    "cancelled": (1032, "Request cancelled by user", 1),
    "timeout": (1037, "DS timeout user cannot be reached.", 1),
    "insufficient": (1, "The balance is insufficient for the transaction.", 1),
    "twice": (0, "The service request is processed successfully.", 2),
    "never": (0, "The service request is processed successfully.", 0),
    "processing": (None, "", 0),
    "hold": (0, "The service request is processed successfully.", 1),
}
ANSWERS = ("ok", "drop", "slow", "503")
BEING_PROCESSED = {"errorCode": "500.001.1001", "errorMessage": "The transaction is being processed"}


def eat_timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).astimezone(EAT).strftime("%Y%m%d%H%M%S")


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode()


def _seconds(value) -> int | float:
    """A delay in seconds from JSON (a number; timing, not money)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"delay must be a non-negative number of seconds, got {value!r}")
    return value


def _receipt() -> str:
    return "".join(random.choices(string.ascii_uppercase + string.digits, k=10))


class FakeDaraja:
    """All state, behind one lock. The HTTP handler below is a thin translation layer."""

    def __init__(self, *, consumer_key: str, consumer_secret: str, passkey: str, outcome: str, delay: float,
                 token_ttl: int = 3599, c2b_delivery: str = "once"):
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.passkey = passkey
        self.token_ttl = token_ttl
        self.lock = threading.Lock()
        self.http = httpx.Client(timeout=15)
        self.defaults = {"outcome": outcome, "delay": delay, "c2b_delivery": c2b_delivery}
        self.sequence = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.token: str | None = None
            self.token_expires = 0.0
            self.script: list[dict] = []
            self.failures: dict[str, list[dict]] = {}
            self.transactions: dict[str, dict] = {}
            self.c2b_urls: dict[str, dict] = {}
            self.deliveries: list[dict] = []
            self.counts = {"oauth": 0, "stkpush": 0, "stkquery": 0, "registerurl": 0, "simulate": 0}

    # ---- canned failures and auth -------------------------------------------------------------

    def canned_failure(self, endpoint: str) -> dict | None:
        with self.lock:
            queue = self.failures.get(endpoint) or []
            if not queue:
                return None
            failure = queue[0]
            failure["count"] -= 1
            if failure["count"] <= 0:
                queue.pop(0)
            return failure

    def oauth(self, authorization: str) -> tuple[int, dict]:
        expected = base64.b64encode(f"{self.consumer_key}:{self.consumer_secret}".encode()).decode()
        if authorization != f"Basic {expected}":
            return 400, {"requestId": "", "errorCode": "400.008.01", "errorMessage": "Invalid Authentication passed"}
        with self.lock:
            # Each request invalidates the previous token, as Daraja does.
            self.token = secrets.token_urlsafe(21)
            self.token_expires = time.monotonic() + self.token_ttl
            self.counts["oauth"] += 1
            # `expires_in` comes as a string from the real service often enough to matter.
            return 200, {"access_token": self.token, "expires_in": str(self.token_ttl)}

    def token_ok(self, authorization: str) -> bool:
        with self.lock:
            return (
                self.token is not None
                and authorization == f"Bearer {self.token}"
                and time.monotonic() < self.token_expires
            )

    # ---- STK push and query ------------------------------------------------------------------

    def _check_password(self, body: dict) -> str | None:
        shortcode, timestamp = str(body.get("BusinessShortCode", "")), str(body.get("Timestamp", ""))
        if not re.fullmatch(r"\d{14}", timestamp):
            return "Timestamp"
        if body.get("Password") != stk_password(shortcode, self.passkey, timestamp):
            return "Password"
        return None

    def stk_push(self, body: dict) -> tuple[int, dict]:
        invalid = self._check_password(body)
        if body.get("TransactionType") not in ("CustomerPayBillOnline", "CustomerBuyGoodsOnline"):
            invalid = invalid or "TransactionType"
        amount = body.get("Amount")
        if isinstance(amount, str) and amount.isdigit():
            amount = int(amount)
        if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= 250000:
            invalid = invalid or "Amount"
        for field in ("PartyA", "PhoneNumber"):
            if not PHONE.match(str(body.get(field, ""))):
                invalid = invalid or field
        callback_url = str(body.get("CallBackURL", ""))
        if not callback_url.startswith(("http://", "https://")):
            invalid = invalid or "CallBackURL"
        reference = str(body.get("AccountReference", ""))
        if not reference or len(reference) > 12:
            invalid = invalid or "AccountReference"
        if len(str(body.get("TransactionDesc", ""))) > 13:
            invalid = invalid or "TransactionDesc"
        if invalid:
            return 400, self._error("400.002.02", f"Bad Request - Invalid {invalid}")
        with self.lock:
            self.counts["stkpush"] += 1
            plan = self.script.pop(0) if self.script else {}
            outcome = plan.get("outcome", self.defaults["outcome"])
            delay = _seconds(plan.get("delay", self.defaults["delay"]))
            number = next(self.sequence)
            merchant_id = f"{random.randint(1000, 99999)}-{random.randint(10**7, 10**8 - 1)}-{number}"
            checkout_id = f"ws_CO_{datetime.now(EAT):%d%m%Y%H%M%S}{number:06d}{random.randint(100, 999)}"
            code, desc, _ = OUTCOMES[outcome]
            transaction = {
                "merchant": merchant_id, "checkout": checkout_id, "outcome": outcome, "result_code": code,
                "result_desc": desc, "amount": amount, "phone": str(body["PhoneNumber"]), "callback_url": callback_url,
                "ready_at": time.monotonic() + delay, "receipt": _receipt() if code == 0 else None, "delivered": 0,
                "account_reference": reference, "shortcode": str(body.get("BusinessShortCode", "")),
                "answer": plan.get("answer", "ok"), "answer_delay": _seconds(plan.get("answer_delay", 30)),
                "c2b": plan.get("c2b"),
            }
            self.transactions[checkout_id] = transaction
        if outcome != "hold" and plan.get("deliver", True):
            self._later(delay, self._deliver_stk, transaction)
        return 200, {
            "MerchantRequestID": merchant_id,
            "CheckoutRequestID": checkout_id,
            "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing",
            "CustomerMessage": "Success. Request accepted for processing",
        }

    def stk_callback_body(self, transaction: dict) -> str:
        callback = {
            "MerchantRequestID": transaction["merchant"],
            "CheckoutRequestID": transaction["checkout"],
            "ResultCode": transaction["result_code"],
            "ResultDesc": transaction["result_desc"],
        }
        if transaction["result_code"] == 0:
            callback["CallbackMetadata"] = {"Item": [
                {"Name": "Amount", "Value": "__AMOUNT__"},
                {"Name": "MpesaReceiptNumber", "Value": transaction["receipt"]},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": int(eat_timestamp())},
                {"Name": "PhoneNumber", "Value": int(transaction["phone"])},
            ]}
        # Daraja writes the amount as a JSON number with two decimals (1.00), never a string.
        return json.dumps({"Body": {"stkCallback": callback}}).replace('"__AMOUNT__"', f"{transaction['amount']}.00")

    def c2b_confirmation_body(self, transaction: dict) -> str:
        """The C2B confirmation of an STK push's money (same receipt, the push's account)."""
        return json.dumps({
            "TransactionType": "Pay Bill", "TransID": transaction["receipt"], "TransTime": eat_timestamp(),
            "TransAmount": f"{transaction['amount']}.00", "BusinessShortCode": transaction["shortcode"],
            "BillRefNumber": transaction["account_reference"], "InvoiceNumber": "", "OrgAccountBalance": "25.00",
            "ThirdPartyTransID": "", "MSISDN": f"{transaction['phone'][:4]} ***** {transaction['phone'][-3:]}",
            "FirstName": "NICHOLAS", "MiddleName": "", "LastName": "",
        })

    def deliver_c2b_of(self, checkout_id: str) -> tuple[int, dict]:
        with self.lock:
            transaction = self.transactions.get(checkout_id)
            urls = self.c2b_urls.get(transaction["shortcode"]) if transaction else None
        if transaction is None or transaction["receipt"] is None:
            return 404, {"error": f"no money was paid for CheckoutRequestID {checkout_id}"}
        if urls is None:
            return 409, {"error": f"no C2B URLs registered for shortcode {transaction['shortcode']}"}
        self._post("c2b_confirmation", urls["confirmation"], self.c2b_confirmation_body(transaction), transaction["receipt"])
        return 200, {"receipt": transaction["receipt"]}

    def _deliver_stk(self, transaction: dict) -> None:
        _, _, times = OUTCOMES[transaction["outcome"]]
        body = self.stk_callback_body(transaction)
        paid = transaction["receipt"] is not None and times
        if paid and transaction["c2b"] == "before":
            self.deliver_c2b_of(transaction["checkout"])
        for _ in range(times):
            self._post("stk", transaction["callback_url"], body, transaction["checkout"])
        with self.lock:
            transaction["delivered"] += times
        if paid and transaction["c2b"] == "after":
            self.deliver_c2b_of(transaction["checkout"])

    def deliver_now(self, checkout_id: str) -> tuple[int, dict]:
        with self.lock:
            transaction = self.transactions.get(checkout_id)
        if transaction is None:
            return 404, {"error": f"unknown CheckoutRequestID {checkout_id}"}
        transaction["ready_at"] = time.monotonic()
        self._deliver_stk(transaction)
        return 200, {"delivered": transaction["delivered"]}

    def stk_query(self, body: dict) -> tuple[int, dict]:
        invalid = self._check_password(body)
        with self.lock:
            self.counts["stkquery"] += 1
            transaction = self.transactions.get(str(body.get("CheckoutRequestID", "")))
        if invalid or transaction is None:
            return 400, self._error("400.002.02", f"Bad Request - Invalid {invalid or 'CheckoutRequestID'}")
        if transaction["result_code"] is None or time.monotonic() < transaction["ready_at"] or (
            transaction["outcome"] == "hold" and not transaction["delivered"]
        ):
            return 500, {"requestId": transaction["checkout"], **BEING_PROCESSED}
        return 200, {
            "ResponseCode": "0",
            "ResponseDescription": "The service request has been accepted successfully",
            "MerchantRequestID": transaction["merchant"],
            "CheckoutRequestID": transaction["checkout"],
            # Query results carry the code as a string, unlike the callback.
            "ResultCode": str(transaction["result_code"]),
            "ResultDesc": transaction["result_desc"],
        }

    # ---- C2B ------------------------------------------------------------------------------------

    def register_url(self, body: dict) -> tuple[int, dict]:
        for field in ("ConfirmationURL", "ValidationURL"):
            url = str(body.get(field, ""))
            if not url.startswith(("http://", "https://")) or any(w in url.lower() for w in FORBIDDEN_URL_WORDS):
                return 400, self._error("400.002.02", f"Bad Request - Invalid {field}")
        if body.get("ResponseType") not in ("Completed", "Cancelled"):
            return 400, self._error("400.002.02", "Bad Request - Invalid ResponseType")
        shortcode = str(body.get("ShortCode", ""))
        if not shortcode.isdigit():
            return 400, self._error("400.002.02", "Bad Request - Invalid ShortCode")
        with self.lock:
            self.counts["registerurl"] += 1
            self.c2b_urls[shortcode] = {
                "confirmation": body["ConfirmationURL"], "validation": body["ValidationURL"],
                "response_type": body["ResponseType"],
            }
        return 200, {"OriginatorCoversationID": self._conversation_id(), "ResponseCode": "0", "ResponseDescription": "Success"}

    def simulate(self, body: dict) -> tuple[int, dict]:
        shortcode = str(body.get("ShortCode", ""))
        with self.lock:
            urls = self.c2b_urls.get(shortcode)
            self.counts["simulate"] += 1
        if urls is None:
            return 400, self._error("400.002.02", "Bad Request - Invalid ShortCode")
        amount = str(body.get("Amount", ""))
        if not amount.isdigit() or int(amount) < 1:
            return 400, self._error("400.002.02", "Bad Request - Invalid Amount")
        trans_id = str(body.get("TransID") or _receipt())
        msisdn = str(body.get("Msisdn", "254708374149"))
        # All values are strings; the MSISDN is masked as the live service does.
        request = {
            "TransactionType": "Pay Bill", "TransID": trans_id, "TransTime": eat_timestamp(),
            "TransAmount": f"{int(amount)}.00", "BusinessShortCode": shortcode,
            "BillRefNumber": str(body.get("BillRefNumber", "")), "InvoiceNumber": "", "OrgAccountBalance": "25.00",
            "ThirdPartyTransID": "", "MSISDN": f"{msisdn[:4]} ***** {msisdn[-3:]}", "FirstName": "NICHOLAS",
            "MiddleName": "", "LastName": "",
        }
        self._later(_seconds(body.get("delay", 0)), self._deliver_c2b, urls, request)
        return 200, {
            "OriginatorCoversationID": self._conversation_id(), "ResponseCode": "0",
            "ResponseDescription": "Accept the service request successfully.",
        }

    def _deliver_c2b(self, urls: dict, request: dict) -> None:
        body = json.dumps(request)
        reply = self._post("c2b_validation", urls["validation"], body, request["TransID"])
        accepted = reply is not None and str(reply.get("ResultCode")) == "0"
        if reply is None and urls["response_type"] == "Completed":
            accepted = True  # Daraja completes the payment when validation does not answer
        if not accepted:
            return
        times = 2 if self.defaults["c2b_delivery"] == "twice" else 1
        for _ in range(times):
            self._post("c2b_confirmation", urls["confirmation"], body, request["TransID"])

    # ---- plumbing ---------------------------------------------------------------------------------

    def _post(self, kind: str, url: str, body: str, ref: str) -> dict | None:
        record = {"kind": kind, "url": url, "ref": ref, "body": body, "status": None, "reply": None}
        try:
            response = self.http.post(url, content=body, headers={"Content-Type": "application/json"})
            record["status"] = response.status_code
            try:
                record["reply"] = response.json()
            except ValueError:
                record["reply"] = response.text[:500]
        except httpx.HTTPError as error:
            record["error"] = str(error)
        with self.lock:
            self.deliveries.append(record)
        return record["reply"] if isinstance(record["reply"], dict) else None

    @staticmethod
    def _later(delay: float, function, *args) -> None:
        timer = threading.Timer(max(delay, 0.0), function, args)
        timer.daemon = True
        timer.start()

    @staticmethod
    def _error(code: str, message: str) -> dict:
        return {"requestId": f"{random.randint(1000, 99999)}-{random.randint(10**6, 10**7)}-1",
                "errorCode": code, "errorMessage": message}

    @staticmethod
    def _conversation_id() -> str:
        return f"{random.randint(1000, 99999)}-{random.randint(10**6, 10**7)}-1"

    def state(self) -> dict:
        with self.lock:
            return {
                "counts": dict(self.counts), "c2b_urls": dict(self.c2b_urls), "deliveries": list(self.deliveries),
                "defaults": dict(self.defaults), "token": self.token,
                "transactions": {k: {x: v[x] for x in ("outcome", "amount", "receipt", "delivered")}
                                 for k, v in self.transactions.items()},
            }

    def control(self, action: str, body: dict) -> tuple[int, dict]:
        if action == "config":
            unknown = set(body) - set(self.defaults)
            try:
                _seconds(body.get("delay", 0))
            except ValueError as error:
                return 400, {"error": str(error)}
            bad_value = body.get("outcome", "success") not in OUTCOMES or (
                body.get("c2b_delivery", "once") not in {"once", "twice"}
            )
            if unknown or bad_value:
                return 400, {"error": f"bad config {body}"}
            with self.lock:
                self.defaults.update(body)
            return 200, dict(self.defaults)
        if action == "next":
            if "delay" in body:
                try:
                    _seconds(body["delay"])
                except ValueError as error:
                    return 400, {"error": str(error)}
            if body.get("outcome", "success") not in OUTCOMES:
                return 400, {"error": f"unknown outcome {body.get('outcome')!r}; one of {sorted(OUTCOMES)}"}
            if body.get("answer", "ok") not in ANSWERS or body.get("c2b") not in (None, "before", "after", "held"):
                return 400, {"error": f"bad plan {body}: answer one of {ANSWERS}, c2b before/after/held"}
            with self.lock:
                self.script.append(body)
            return 200, {"queued": len(self.script)}
        if action == "fail":
            failure = {"status": int(body.get("status", 503)), "body": body.get("body"), "count": int(body.get("count", 1))}
            with self.lock:
                self.failures.setdefault(body["endpoint"], []).append(failure)
            return 200, failure
        if action == "invalidate-token":
            with self.lock:
                self.token = secrets.token_urlsafe(21)
            return 200, {}
        if action == "deliver":
            return self.deliver_now(str(body.get("CheckoutRequestID", "")))
        if action == "deliver-c2b":
            return self.deliver_c2b_of(str(body.get("CheckoutRequestID", "")))
        if action == "reset":
            self.reset()
            return 200, {}
        return 404, {"error": f"unknown control action {action}"}


ROUTES = {
    "/mpesa/stkpush/v1/processrequest": ("stkpush", "stk_push"),
    "/mpesa/stkpushquery/v1/query": ("stkquery", "stk_query"),
    "/mpesa/c2b/v1/registerurl": ("registerurl", "register_url"),
    "/mpesa/c2b/v2/registerurl": ("registerurl", "register_url"),
    "/mpesa/c2b/v1/simulate": ("simulate", "simulate"),
    "/mpesa/c2b/v2/simulate": ("simulate", "simulate"),
}


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeDaraja/1"
    protocol_version = "HTTP/1.1"
    fake: FakeDaraja  # set on the class by serve()

    def log_message(self, fmt, *args):
        logger.debug(fmt, *args)

    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_failure(self, failure: dict) -> None:
        body = failure["body"]
        if body is None and failure["status"] == 503:
            # The gateway's incident page: HTML, not JSON.
            self._send(503, "<html><body><h1>503 Service Unavailable</h1></body></html>", "text/html")
        elif isinstance(body, dict):
            self._send(failure["status"], body)
        else:
            self._send(failure["status"], body or "", "text/plain")

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = urlsplit(self.path)
        if parts.path == "/__fake__/state":
            return self._send(200, self.fake.state())
        if parts.path == "/oauth/v1/generate":
            failure = self.fake.canned_failure("oauth")
            if failure:
                return self._send_failure(failure)
            if parse_qs(parts.query).get("grant_type") != ["client_credentials"]:
                return self._send(400, FakeDaraja._error("400.008.02", "Invalid grant type passed"))
            return self._send(*self.fake.oauth(self.headers.get("Authorization", "")))
        return self._send(404, FakeDaraja._error("404.001.01", "Resource not found"))

    def do_POST(self):  # noqa: N802
        parts = urlsplit(self.path)
        body = self._body()
        if parts.path.startswith("/__fake__/"):
            return self._send(*self.fake.control(parts.path.removeprefix("/__fake__/"), body or {}))
        route = ROUTES.get(parts.path)
        if route is None:
            return self._send(404, FakeDaraja._error("404.001.01", "Resource not found"))
        endpoint, method = route
        failure = self.fake.canned_failure(endpoint)
        if failure:
            return self._send_failure(failure)
        if not self.fake.token_ok(self.headers.get("Authorization", "")):
            return self._send(404, FakeDaraja._error("404.001.03", "Invalid Access Token"))
        if body is None:
            return self._send(400, FakeDaraja._error("400.002.01", "Invalid JSON payload"))
        status, payload = getattr(self.fake, method)(body)
        answer = self.fake.transactions.get(payload.get("CheckoutRequestID", ""), {}).get("answer", "ok") \
            if endpoint == "stkpush" else "ok"
        if answer == "drop":
            # Accepted, but the answer never reaches the caller: the connection just closes.
            self.close_connection = True
            return None
        if answer == "slow":
            time.sleep(self.fake.transactions[payload["CheckoutRequestID"]]["answer_delay"])
        if answer == "503":
            return self._send_failure({"status": 503, "body": None})
        return self._send(status, payload)


def serve(fake: FakeDaraja, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"fake": fake})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--outcome", choices=sorted(OUTCOMES), default="success", help="default STK outcome")
    parser.add_argument("--delay", type=float, default=3.0, help="seconds before the STK callback (the customer's PIN)")
    parser.add_argument("--c2b-delivery", choices=["once", "twice"], default="once")
    parser.add_argument("--token-ttl", type=int, default=3599)
    parser.add_argument("--consumer-key", default=os.environ.get("MPESA_CONSUMER_KEY", "dev-consumer-key"))
    parser.add_argument("--consumer-secret", default=os.environ.get("MPESA_CONSUMER_SECRET", "dev-consumer-secret"))
    parser.add_argument(
        "--passkey",
        default=os.environ.get("MPESA_PASSKEY", "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake_daraja %(levelname)s %(message)s")
    fake = FakeDaraja(
        consumer_key=args.consumer_key, consumer_secret=args.consumer_secret, passkey=args.passkey,
        outcome=args.outcome, delay=args.delay, token_ttl=args.token_ttl, c2b_delivery=args.c2b_delivery,
    )
    server = serve(fake, args.host, args.port)
    logger.info("Fake Daraja on http://%s:%s (outcome %s after %.1fs)", args.host, args.port, args.outcome, args.delay)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
