"""The fake Realtime Database (devtools.fake_firebase) as a real subprocess, and firebase-admin
pointed at it the way `make run` points it: FIREBASE_DATABASE_EMULATOR_HOST plus an https URL whose
first label is the namespace."""

import time
import uuid

import firebase_admin
import httpx
import pytest
from firebase_admin import db

from devtools.services import FakeServerProcess, module_server
from meters import firebase

NAMESPACE = "smartmeter-test"
DATABASE_URL = f"https://{NAMESPACE}.firebaseio.com"


class FakeRtdbProcess(FakeServerProcess):
    def requests(self, method: str | None = None) -> list[dict]:
        return [entry for entry in self.state()["requests"] if method is None or entry["method"] == method]

    def data(self, ns: str = NAMESPACE):
        return httpx.get(f"{self.url}/__fake__/data", params={"ns": ns}, timeout=10).json()["data"]

    def wait_held(self, count: int = 1, timeout: float = 60.0) -> None:
        """Wait (a condition, not a timing assertion) until `count` requests are held."""
        deadline = time.monotonic() + timeout
        while self.state()["held"] < count:
            if time.monotonic() > deadline:
                pytest.fail(f"the fake never held {count} request(s)")
            time.sleep(0.02)


@pytest.fixture(scope="session")
def fake_rtdb_server():
    with module_server("devtools.fake_firebase", "--namespace", "other-default", name="fake-firebase") as (port, process):
        yield FakeRtdbProcess(port, process)


@pytest.fixture
def fake_rtdb(fake_rtdb_server, settings, monkeypatch):
    """An empty fake with the mirror configured for it (and no pause left from another test)."""
    fake_rtdb_server.control("reset")
    monkeypatch.setenv("FIREBASE_DATABASE_EMULATOR_HOST", fake_rtdb_server.host)
    settings.FIREBASE_DATABASE_URL = DATABASE_URL
    settings.FIREBASE_CREDENTIALS = None
    firebase.mirror_close()
    yield fake_rtdb_server
    fake_rtdb_server.control("heal")
    firebase.mirror_close()


@pytest.fixture
def reader(fake_rtdb):
    """A firebase-admin app of the test's own, as the mobile app's backend would read the mirror."""
    app = firebase_admin.initialize_app(options={"databaseURL": DATABASE_URL}, name=f"test-reader-{uuid.uuid4().hex}")
    yield lambda path: db.reference(path, app=app)
    firebase_admin.delete_app(app)


@pytest.fixture(autouse=True)
def dispatched_commands(monkeypatch) -> list[int]:
    """Meter commands (ledger_adjust, a meter coming online) are recorded, not sent: these tests are
    about the mirror, and a Celery message on the shared Redis would reach some other run's worker."""
    from meters import outbox

    recorded: list[int] = []
    monkeypatch.setattr(outbox, "_command_dispatchers", [recorded.extend])
    return recorded
