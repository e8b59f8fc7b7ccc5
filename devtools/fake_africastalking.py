"""A stand-in for Africa's Talking's SMS API for development and tests:
`python -m devtools.fake_africastalking --port 8098`. It imports no Django.

It speaks the wire format the official `africastalking` SDK uses: `POST /version1/messaging`,
form-encoded (`username`, `to` comma-separated +2547…, `message`, optional `from`,
`bulkSMSMode`), header `apiKey`, `Accept: application/json`; answer 201 with
`{"SMSMessageData": {"Message": "Sent to 1/1 Total Cost: KES 0.8000", "Recipients": [{"statusCode":
101, "number": "+254…", "status": "Success", "cost": "KES 0.8000", "messageId": "ATXid_…"}]}}`.
A wrong apiKey gets 401 "The supplied authentication is invalid" (text/plain), as the gateway does.
The SDK parses JSON only when Content-Type is exactly `application/json`.

Control endpoints (JSON, no auth; never expose this server):
  GET  /__fake__/state    every message received, and counts
  POST /__fake__/fail     {"count": N, "status": 500, "body": "..."}: the next N sends fail with that
                          HTTP answer; or {"count": N, "statusCode": 403} (a per-recipient failure)
  POST /__fake__/reset    forget everything
"""

import argparse
import itertools
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger("fake_africastalking")

PHONE = re.compile(r"^\+\d{1,3}\d{3,}$")
STATUS_NAMES = {100: "Processed", 101: "Success", 102: "Queued", 401: "RiskHold", 402: "InvalidSenderId",
                403: "InvalidPhoneNumber", 404: "UnsupportedNumberType", 405: "InsufficientBalance",
                406: "UserInBlacklist", 407: "CouldNotRoute", 409: "DoNotDisturbRejection", 500: "InternalServerError",
                501: "GatewayError", 502: "RejectedByGateway"}
COST = "KES 0.8000"


class FakeSms:
    def __init__(self, *, username: str, api_key: str):
        self.username, self.api_key = username, api_key
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.messages: list[dict] = []
            self.failures: list[dict] = []
            self.refused = 0

    def send(self, api_key: str, form: dict) -> tuple[int, object]:
        if api_key != self.api_key:
            return 401, "The supplied authentication is invalid"
        if form.get("username") != self.username:
            return 401, "The supplied authentication is invalid"
        message, to = form.get("message", ""), [n for n in form.get("to", "").split(",") if n]
        if not message or not to:
            return 400, "Request is missing required form field 'to' or 'message'"
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
            if failure and "status" in failure:
                self.refused += 1
                return failure["status"], failure.get("body", "Internal Server Error")
            recipients = []
            for number in to:
                code = failure["statusCode"] if failure else (101 if PHONE.match(number) else 403)
                sent = code == 101
                recipient = {"statusCode": code, "number": number, "status": STATUS_NAMES.get(code, "Failed"),
                             "cost": COST if sent else "0", "messageId": f"ATXid_{next(self.ids):08d}" if sent else "None"}
                recipients.append(recipient)
                self.messages.append({"to": number, "message": message, "from": form.get("from"), "statusCode": code,
                                      "messageId": recipient["messageId"]})
            sent = sum(r["statusCode"] == 101 for r in recipients)
        return 201, {"SMSMessageData": {"Message": f"Sent to {sent}/{len(recipients)} Total Cost: KES {0.8 * sent:.4f}",
                                        "Recipients": recipients}}

    def state(self) -> dict:
        with self.lock:
            return {"messages": list(self.messages), "refused": self.refused, "failures_queued": len(self.failures)}

    def control(self, action: str, body: dict) -> tuple[int, dict]:
        if action == "reset":
            self.reset()
            return 200, {"ok": True}
        if action == "fail":
            count = int(body.get("count", 1))
            failure = {"statusCode": int(body["statusCode"])} if "statusCode" in body else {
                "status": int(body.get("status", 500)), "body": str(body.get("body", "Internal Server Error"))}
            with self.lock:
                self.failures.extend([dict(failure) for _ in range(count)])
            return 200, {"ok": True}
        return 404, {"error": f"unknown control {action}"}


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeAfricasTalking/1"
    protocol_version = "HTTP/1.1"
    fake: FakeSms

    def log_message(self, fmt, *args):
        logger.debug(fmt, *args)

    def _send(self, status: int, payload) -> None:
        is_json = not isinstance(payload, str)
        data = json.dumps(payload).encode() if is_json else payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if is_json else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _raw(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path == "/__fake__/state":
            return self._send(200, self.fake.state())
        return self._send(404, "Not Found")

    def do_POST(self):  # noqa: N802
        path = urlsplit(self.path).path
        raw = self._raw()
        if path.startswith("/__fake__/"):
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                return self._send(400, {"error": "JSON expected"})
            return self._send(*self.fake.control(path.removeprefix("/__fake__/"), body))
        if path != "/version1/messaging":
            return self._send(404, "Not Found")
        form = {key: values[0] for key, values in parse_qs(raw.decode(), keep_blank_values=True).items()}
        logger.info("SMS to %s: %s", form.get("to"), form.get("message"))
        return self._send(*self.fake.send(self.headers.get("apiKey", ""), form))


def serve(fake: FakeSms, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), type("BoundHandler", (Handler,), {"fake": fake}))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--username", default=os.environ.get("AFRICASTALKING_USERNAME", "sandbox"))
    parser.add_argument("--api-key", default=os.environ.get("AFRICASTALKING_API_KEY") or "dev-at-api-key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fake_africastalking %(levelname)s %(message)s")
    server = serve(FakeSms(username=args.username, api_key=args.api_key), args.host, args.port)
    logger.info("Fake Africa's Talking SMS on http://%s:%s", args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
