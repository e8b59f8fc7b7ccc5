"""Fixtures of the simulator tests: the real MQTT worker as a subprocess on the test database."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.services import subprocess_database_url

ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition, what: str, *, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll until `condition()` holds. The timeout only turns a hang into a failure; nothing
    here asserts how fast anything is (the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            log = process.log_path.read_text(errors="replace")[-3000:] if hasattr(process, "log_path") else ""
            raise AssertionError(f"the worker exited ({process.returncode}) while waiting for {what}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def worker(postgres, private_mosquitto, tmp_path):
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=subprocess_database_url(),
        MQTT_URL=private_mosquitto.url,
        CELERY_TASK_ALWAYS_EAGER="True",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "mqtt_worker", "--client-id", "ingest-e2e", "--batch-wait-ms", "10"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    process.log_path = log_path
    wait_until(lambda: "Subscribed to:" in log_path.read_text(errors="replace"), "the worker to subscribe",
               process=process)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(30)
