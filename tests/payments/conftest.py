"""Fixtures for the payments tests: the project's fake Daraja server as a real subprocess."""

import subprocess
import sys

import httpx
import pytest
from django.core.cache import cache

from payments import daraja
from tests.support.services import ROOT, free_port, wait_for_port


class FakeDarajaProcess:
    def __init__(self, port: int, process: subprocess.Popen):
        self.port = port
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def control(self, action: str, **body) -> dict:
        response = httpx.post(f"{self.url}/__fake__/{action}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def state(self) -> dict:
        return httpx.get(f"{self.url}/__fake__/state", timeout=10).json()

    def next(self, outcome: str, delay: float = 0.0) -> None:
        self.control("next", outcome=outcome, delay=delay)


@pytest.fixture(scope="session")
def fake_daraja_server():
    port = free_port()
    log = open(ROOT / "var" / f"fake-daraja-{port}.log", "ab") if (ROOT / "var").is_dir() else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "payments.fake_daraja", "--port", str(port), "--delay", "0", "--outcome", "hold"],
        cwd=ROOT, stdout=log, stderr=log,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        yield FakeDarajaProcess(port, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def fake_daraja(fake_daraja_server, settings):
    """A fresh fake (no tokens, no transactions; STK pushes held until a test delivers them)
    with MPESA_BASE_URL pointing at it and no cached token."""
    fake_daraja_server.control("reset")
    fake_daraja_server.control("config", outcome="hold", delay=0, c2b_delivery="once")
    settings.MPESA_BASE_URL = fake_daraja_server.url
    cache.delete(daraja._token_key())
    yield fake_daraja_server
    cache.delete(daraja._token_key())


@pytest.fixture(autouse=True)
def dispatched_commands(monkeypatch) -> list[int]:
    """Command ids handed to the outbox dispatchers after commit, recorded instead of sent.

    These tests are about payments; sending Celery tasks from them would leave messages on the
    shared Redis broker for some other run's worker. The end-to-end test runs the web process
    and the Celery worker as subprocesses with a private broker, where the real dispatcher runs.
    """
    from meters import outbox

    recorded: list[int] = []
    monkeypatch.setattr(outbox, "_command_dispatchers", [recorded.extend])
    return recorded
