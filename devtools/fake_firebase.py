"""A fake Firebase Realtime Database for development and tests: `python -m devtools.fake_firebase --port 9000`.

It speaks the REST protocol that the firebase-admin SDK uses against the Realtime Database emulator
(`FIREBASE_DATABASE_EMULATOR_HOST=127.0.0.1:9000`): GET/PUT/PATCH/POST/DELETE on `/<path>.json`,
one tree per namespace (`?ns=<name>`, as the emulator does; the SDK takes it from the first label of
`https://<name>.firebaseio.com`), JSON bodies, multi-path PATCH, `print=silent` (204), `shallow=true`,
ETags (`X-Firebase-ETag: true`, `if-match` → 412 with the current value), server values
(`{".sv": "timestamp"}`, `{".sv": {"increment": n}}`), and errors as the service sends them:
`{"error": "<text>"}` with 400 (bad JSON, bad keys or paths, overlapping multi-path updates),
401 (no or bad token), 412, 5xx. The data semantics are the database's: null deletes, empty objects
vanish, arrays are stored as objects and read back as arrays when their keys are dense integers,
numbers are JSON numbers (doubles). It imports no Django and keeps everything in memory.

Auth: the SDK in emulator mode sends `Authorization: Bearer owner` (the emulator's admin token);
that, or a token given with --admin-token, is admin. Anything else is refused like locked rules
would refuse it, except reads when --public-read is given (a mobile app in development).

Not implemented (400 naming the feature, never a silent wrong answer): queries (orderBy,
limitToFirst, …), `.priority`/`.value`, streaming (`Accept: text/event-stream`).

Control endpoints (JSON, no auth; never expose this server):
  GET  /__fake__/state            request log (method, path, ns, status, PATCH keys), counts, faults, held
  GET  /__fake__/data?ns=<name>   a namespace's whole tree
  POST /__fake__/fail             {"mode": "status"|"drop"|"hold", "status": 503, "error": "...",
                                   "count": 1 (null: until healed), "methods": ["PATCH"]} canned failures:
                                   an HTTP error, a dropped connection, or a request held until released
  POST /__fake__/release          let held requests proceed
  POST /__fake__/heal             clear failures and release held requests
  POST /__fake__/reset            forget data, log and failures
"""

import argparse
import base64
import hashlib
import json
import logging
import random
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger("fake_firebase")

DEFAULT_NAMESPACE = "smartmeter-dev"
ADMIN_TOKEN = "owner"  # what firebase-admin sends to the emulator (firebase_admin._utils.EmulatorAdminCredentials)
INVALID_KEY_CHARS = frozenset(".$#[]/")
MAX_KEY_BYTES = 768
MAX_DEPTH = 32
MAX_BODY_BYTES = 16 * 1024 * 1024
PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
QUERY_PARAMS = ("orderBy", "limitToFirst", "limitToLast", "startAt", "endAt", "equalTo", "startAfter", "endBefore")
HOLD_TIMEOUT_S = 120  # a held request proceeds on its own after this, so a broken test cannot hang the fake
LOG_SIZE = 2000

BAD_JSON = "Invalid data; couldn't parse JSON object, array, or value."
PERMISSION_DENIED = "Permission denied"
UNAUTHORIZED = "Unauthorized request."


class RtdbError(Exception):
    def __init__(self, status: int, message: str, body=None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body  # a 412 answers with the current value instead of {"error": ...}
        self.headers = headers or {}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes):
    if not raw.strip():
        raise RtdbError(400, BAD_JSON)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise RtdbError(400, BAD_JSON) from None


def check_key(key: str) -> str:
    if not isinstance(key, str) or key == "":
        raise RtdbError(400, "Invalid data; keys must be non-empty strings.")
    if key.startswith("."):
        raise RtdbError(400, f"Invalid data; key {key!r}: .priority/.value/.sv here are not supported by fake_firebase.")
    if any(char in INVALID_KEY_CHARS or ord(char) < 32 or ord(char) == 127 for char in key):
        raise RtdbError(400, f"Invalid key: {key!r}. Keys must not contain '/', '.', '#', '$', '[', or ']'")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise RtdbError(400, f"Invalid key: longer than {MAX_KEY_BYTES} bytes")
    return key


def split_path(path: str) -> list[str]:
    """'/meters/M1' → ['meters', 'M1'], every segment checked like a key."""
    segments = [segment for segment in path.split("/") if segment]
    for segment in segments:
        try:
            check_key(segment)
        except RtdbError:
            raise RtdbError(400, "Invalid path: Invalid token in path") from None
    if len(segments) > MAX_DEPTH:
        raise RtdbError(400, "Invalid path: Path exceeds maximum depth")
    return segments


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def normalize(value, *, current, now_ms: int, depth: int = 0):
    """The value as the database stores it: nulls and empty objects gone, arrays as objects,
    server values resolved. None means "nothing here" (a delete)."""
    if depth > MAX_DEPTH:
        raise RtdbError(400, "Invalid data; data is nested too deeply.")
    if value is None or isinstance(value, bool | str) or _is_number(value):
        return value
    if isinstance(value, list):
        value = {str(index): item for index, item in enumerate(value)}
    if not isinstance(value, dict):
        raise RtdbError(400, BAD_JSON)
    if ".sv" in value:
        if len(value) != 1:
            raise RtdbError(400, "Invalid data; a server value object must have only the .sv key.")
        return _server_value(value, current)
    stored = {}
    for key, child in value.items():
        check_key(key)
        child_current = current.get(key) if isinstance(current, dict) else None
        normalized = normalize(child, current=child_current, now_ms=now_ms, depth=depth + 1)
        if normalized is not None:
            stored[key] = normalized
    return stored or None


def _server_value(value: dict, current):
    spec = value[".sv"]
    if spec == "timestamp":
        return int(time.time() * 1000)
    if isinstance(spec, dict) and set(spec) == {"increment"} and _is_number(spec["increment"]):
        return (current if _is_number(current) else 0) + spec["increment"]
    raise RtdbError(400, f"Invalid data; unsupported server value {spec!r}.")


def to_wire(value):
    """Objects whose keys are dense non-negative integers read back as arrays (the database's rule:
    all keys integers and more than half of the slots 0..max filled)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # the database keeps doubles and writes integral ones without a fraction
    if not isinstance(value, dict):
        return value
    children = {key: to_wire(child) for key, child in value.items()}
    if children and all(key.isdigit() and (key == "0" or not key.startswith("0")) for key in children):
        top = max(int(key) for key in children)
        if top < 2 * len(children):
            return [children.get(str(index)) for index in range(top + 1)]
    return children


def shallow(value):
    if isinstance(value, dict):
        return {key: True for key in value}
    return value


def etag_of(value) -> str:
    text = json.dumps(to_wire(value), sort_keys=True, separators=(",", ":"))
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


def push_id(now_ms: int, rng: random.Random) -> str:
    """A Firebase push id: 8 characters of time then 12 random, so ids sort by creation time."""
    stamp = []
    for _ in range(8):
        stamp.append(PUSH_CHARS[now_ms % 64])
        now_ms //= 64
    return "".join(reversed(stamp)) + "".join(rng.choice(PUSH_CHARS) for _ in range(12))


class Database:
    """Every namespace's tree, behind one lock: each request is applied atomically."""

    def __init__(self):
        self.lock = threading.Lock()
        self.trees: dict[str, object] = {}
        self.rng = random.Random()

    def reset(self) -> None:
        with self.lock:
            self.trees.clear()

    def get(self, ns: str, segments: list[str]):
        node = self.trees.get(ns)
        for segment in segments:
            if not isinstance(node, dict):
                return None
            node = node.get(segment)
        return node

    def _store(self, ns: str, segments: list[str], value) -> None:
        """Put a normalized value (None: delete) at the path; prune objects left empty."""
        if not segments:
            self.trees[ns] = value
            return
        if not isinstance(self.trees.get(ns), dict):
            if value is None:
                return
            self.trees[ns] = {}
        node = self.trees[ns]
        parents = []
        for segment in segments[:-1]:
            child = node.get(segment)
            if not isinstance(child, dict):
                if value is None:
                    return
                child = node[segment] = {}  # writing below a leaf replaces the leaf
            parents.append((node, segment))
            node = child
        if value is None:
            node.pop(segments[-1], None)
        else:
            node[segments[-1]] = value
        for parent, segment in reversed(parents):
            if parent[segment]:
                break
            del parent[segment]
        if self.trees[ns] == {}:
            self.trees[ns] = None

    def put(self, ns: str, segments: list[str], body, if_match: str | None = None):
        now_ms = int(time.time() * 1000)
        with self.lock:
            current = self.get(ns, segments)
            if if_match is not None and if_match != etag_of(current):
                raise RtdbError(412, "ETag mismatch", body=to_wire(current), headers={"ETag": etag_of(current)})
            value = normalize(body, current=current, now_ms=now_ms)
            self._store(ns, segments, value)
            return to_wire(value), etag_of(value)

    def patch(self, ns: str, segments: list[str], body):
        if not isinstance(body, dict) or not body:
            raise RtdbError(400, "Invalid data; a PATCH body must be a non-empty JSON object.")
        now_ms = int(time.time() * 1000)
        with self.lock:
            # Check and normalize every path before changing anything: a bad update changes nothing.
            writes = []
            for key, value in body.items():
                relative = [segment for segment in key.split("/") if segment]
                if not relative:
                    raise RtdbError(400, f"Invalid data; update path {key!r} is empty.")
                for segment in relative:
                    check_key(segment)
                path = segments + relative
                writes.append((path, normalize(value, current=self.get(ns, path), now_ms=now_ms)))
            ordered = sorted(writes, key=lambda write: write[0])
            for (first, _), (second, _) in zip(ordered, ordered[1:], strict=False):
                if second[: len(first)] == first:
                    raise RtdbError(
                        400, f"Invalid data; path /{'/'.join(first)} is an ancestor of /{'/'.join(second)} in one update."
                    )
            for path, value in writes:
                self._store(ns, path, value)
            return {key: to_wire(value) for key, (_, value) in zip(body, writes, strict=True)}

    def post(self, ns: str, segments: list[str], body):
        now_ms = int(time.time() * 1000)
        with self.lock:
            name = push_id(now_ms, self.rng)
            value = normalize(body, current=None, now_ms=now_ms)
            self._store(ns, [*segments, name], value)
            return {"name": name}

    def delete(self, ns: str, segments: list[str], if_match: str | None = None):
        with self.lock:
            current = self.get(ns, segments)
            if if_match is not None and if_match != etag_of(current):
                raise RtdbError(412, "ETag mismatch", body=to_wire(current), headers={"ETag": etag_of(current)})
            self._store(ns, segments, None)
            return None

    def dump(self, ns: str):
        with self.lock:
            return to_wire(self.trees.get(ns))


class Faults:
    """Canned failures, first match wins; each matching request uses one (count None: until healed)."""

    MODES = ("status", "drop", "hold")

    def __init__(self):
        self.lock = threading.Lock()
        self.faults: list[dict] = []
        self.release_event = threading.Event()
        self.held = 0

    @classmethod
    def parse(cls, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        mode = body.get("mode", "status")
        if mode not in cls.MODES:
            raise ValueError(f"mode must be one of {', '.join(cls.MODES)}")
        status = body.get("status", 503)
        if mode == "status" and (isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599):
            raise ValueError("status must be an integer from 400 to 599")
        count = body.get("count", 1)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError("count must be a positive integer or null (until healed)")
        methods = body.get("methods")
        if methods is not None and (
            not isinstance(methods, list) or not all(m in ("GET", "PUT", "PATCH", "POST", "DELETE") for m in methods)
        ):
            raise ValueError("methods must be a list of GET, PUT, PATCH, POST, DELETE")
        error = body.get("error", "Service Unavailable" if status == 503 else "Internal error")
        if not isinstance(error, str):
            raise ValueError("error must be a string")
        return {"mode": mode, "status": status, "count": count, "methods": methods, "error": error}

    def add(self, fault: dict) -> None:
        with self.lock:
            if fault["mode"] == "hold":
                self.release_event.clear()
            self.faults.append(fault)

    def take(self, method: str) -> dict | None:
        with self.lock:
            for fault in self.faults:
                if fault["methods"] is None or method in fault["methods"]:
                    if fault["count"] is not None:
                        fault["count"] -= 1
                        if fault["count"] == 0:
                            self.faults.remove(fault)
                    return dict(fault)
        return None

    def hold(self) -> None:
        with self.lock:
            self.held += 1
        try:
            self.release_event.wait(HOLD_TIMEOUT_S)
        finally:
            with self.lock:
                self.held -= 1

    def release(self) -> None:
        self.release_event.set()

    def heal(self) -> None:
        with self.lock:
            self.faults.clear()
        self.release()

    def state(self) -> dict:
        with self.lock:
            return {"faults": [dict(fault) for fault in self.faults], "held": self.held}


class FakeRtdb:
    def __init__(self, *, default_namespace: str = DEFAULT_NAMESPACE, admin_tokens=(ADMIN_TOKEN,), public_read=False):
        self.database = Database()
        self.faults = Faults()
        self.default_namespace = default_namespace
        self.admin_tokens = frozenset(admin_tokens)
        self.public_read = public_read
        self.log_lock = threading.Lock()
        self.log: deque[dict] = deque(maxlen=LOG_SIZE)
        self.counts: Counter = Counter()

    def reset(self) -> None:
        self.database.reset()
        self.faults.heal()
        with self.log_lock:
            self.log.clear()
            self.counts.clear()

    def record(self, entry: dict) -> None:
        with self.log_lock:
            self.log.append(entry)
            self.counts[entry["method"]] += 1

    def state(self) -> dict:
        with self.log_lock:
            return {"requests": list(self.log), "counts": dict(self.counts), **self.faults.state()}

    def namespace(self, query: dict, host: str) -> str:
        if query.get("ns"):
            return query["ns"]
        name = host.split(":")[0]
        if name.endswith(".firebaseio.com") and name.count(".") == 2:
            return name.split(".")[0]
        return self.default_namespace

    def authorize(self, method: str, headers, query: dict) -> None:
        token = None
        authorization = headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            token = authorization[len("Bearer "):].strip()
        token = token or query.get("access_token") or query.get("auth")
        if token is None:
            if method == "GET" and self.public_read:
                return
            raise RtdbError(401, PERMISSION_DENIED)
        if token not in self.admin_tokens:
            raise RtdbError(401, UNAUTHORIZED)

    def handle(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, object, dict]:
        """One REST request → (status, JSON body or None for no body, extra headers)."""
        if not path.endswith(".json"):
            raise RtdbError(404, "Not Found: Realtime Database paths end with .json")
        if headers.get("Accept", "") == "text/event-stream":
            raise RtdbError(400, "Streaming (text/event-stream) is not supported by fake_firebase.")
        unsupported = [name for name in QUERY_PARAMS if name in query]
        if unsupported:
            raise RtdbError(400, f"Queries ({', '.join(unsupported)}) are not supported by fake_firebase.")
        segments = split_path(unquote(path[: -len(".json")]))
        self.authorize(method, headers, query)
        ns = self.namespace(query, headers.get("Host", ""))
        if_match = headers.get("if-match")
        extra: dict = {}
        if method == "GET":
            with self.database.lock:
                value = self.database.get(ns, segments)
                result = shallow(value) if query.get("shallow") == "true" else to_wire(value)
                if headers.get("X-Firebase-ETag", "").lower() == "true":
                    extra["ETag"] = etag_of(value)
        elif method == "PUT":
            result, etag = self.database.put(ns, segments, parse_json(body), if_match=if_match)
            extra["ETag"] = etag
        elif method == "PATCH":
            result = self.database.patch(ns, segments, parse_json(body))
        elif method == "POST":
            result = self.database.post(ns, segments, parse_json(body))
        elif method == "DELETE":
            result = self.database.delete(ns, segments, if_match=if_match)
        else:
            raise RtdbError(405, f"Method {method} not allowed")
        if query.get("print") == "silent":
            return 204, None, extra
        return 200, result, extra


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, as the SDK's requests session expects; every answer sets Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "fake_firebase"
    fake: FakeRtdb  # set on the class by serve()

    def log_message(self, fmt, *args):
        logger.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, payload, headers: dict | None = None, pretty: bool = False) -> None:
        data = b""
        if status != 204:
            data = json.dumps(payload, indent=2 if pretty else None, separators=None if pretty else (",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RtdbError(400, "Data to write exceeds the maximum size that can be modified with a single request.")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
        if parts.path.startswith("/__fake__/"):
            self._control(method, parts.path[len("/__fake__/"):], query)
            return
        if method == "POST" and self.headers.get("X-HTTP-Method-Override"):
            method = self.headers["X-HTTP-Method-Override"].upper()
        entry = {"method": method, "path": unquote(parts.path), "ns": query.get("ns"), "status": None, "keys": None}
        try:
            body = self._read_body()
            if method == "PATCH":
                try:
                    parsed = json.loads(body or b"null")
                    entry["keys"] = sorted(parsed) if isinstance(parsed, dict) else None
                except ValueError:
                    pass
            fault = self.fake.faults.take(method)
            if fault and fault["mode"] == "drop":
                entry["status"] = "dropped"
                self.fake.record(entry)
                self.close_connection = True  # no answer at all: the client sees a connection reset
                return
            if fault and fault["mode"] == "status":
                raise RtdbError(fault["status"], fault["error"])
            if fault and fault["mode"] == "hold":
                self.fake.faults.hold()
            status, payload, headers = self.fake.handle(method, parts.path, query, self.headers, body)
            entry["status"] = status
            self._send(status, payload, headers, pretty=query.get("print") == "pretty")
        except RtdbError as error:
            entry["status"] = error.status
            payload = error.body if error.status == 412 else {"error": error.message}
            self._send(error.status, payload, error.headers)
        self.fake.record(entry)

    def _control(self, method: str, action: str, query: dict) -> None:
        fake = self.fake
        if method == "GET" and action == "state":
            self._send(200, fake.state())
            return
        if method == "GET" and action == "data":
            self._send(200, {"ns": query.get("ns") or fake.default_namespace,
                             "data": fake.database.dump(query.get("ns") or fake.default_namespace)})
            return
        if method != "POST":
            self._send(404, {"error": f"unknown control endpoint {method} {action}"})
            return
        try:
            raw = self._read_body()
            body = json.loads(raw) if raw.strip() else {}
            if action == "fail":
                fake.faults.add(Faults.parse(body))
            elif action == "release":
                fake.faults.release()
            elif action == "heal":
                fake.faults.heal()
            elif action == "reset":
                fake.reset()
            else:
                self._send(404, {"error": f"unknown control endpoint {action}"})
                return
        except (ValueError, RtdbError) as error:
            self._send(400, {"error": str(error)})
            return
        self._send(200, fake.state())

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")


def serve(fake: FakeRtdb, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"fake": fake})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Firebase Realtime Database (REST) for development and tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="used when a request names none (?ns=)")
    parser.add_argument("--admin-token", action="append", default=[ADMIN_TOKEN], help="tokens with admin rights")
    parser.add_argument("--public-read", action="store_true", help="allow reads without a token")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s fake_firebase %(levelname)s %(message)s")
    fake = FakeRtdb(default_namespace=args.namespace, admin_tokens=args.admin_token, public_read=args.public_read)
    server = serve(fake, args.host, args.port)
    logger.info("Fake Realtime Database on http://%s:%d (FIREBASE_DATABASE_EMULATOR_HOST=%s:%d)",
                args.host, args.port, args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
