"""The mirror as `make run` runs it: a real Celery worker with its embedded beat (the project's
CELERY_BEAT_SCHEDULE, firebase-mirror-sync every 2 s) on a private Redis, configured only through
the environment, writing to the fake Realtime Database."""

import os
import subprocess
import sys
import time

import pytest

from devtools.services import ROOT, PrivateRedis, subprocess_database_url
from meters import services
from tests.firebase.conftest import DATABASE_URL

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def celery_with_beat(postgres, fake_rtdb, tmp_path):
    redis = PrivateRedis().start()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": subprocess_database_url(),
        "REDIS_URL": redis.url,
        "FIREBASE_DATABASE_URL": DATABASE_URL,
        "FIREBASE_DATABASE_EMULATOR_HOST": fake_rtdb.host,
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "celery.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [f"{BIN}/celery", "-A", "portal", "worker", "--beat", "--pool=solo", "--without-gossip", "--without-mingle",
             "--loglevel=INFO", f"--schedule={tmp_path / 'beat-schedule'}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        redis.close()


def wait_for_mirror(fake, meter_no: str, balance_kwh: str, log_path, timeout: float = 90.0) -> dict:
    """Wait for a condition (the document in the fake), not for a time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        document = ((fake.data() or {}).get("meters") or {}).get(meter_no)
        if document and document["balanceKwh"] == balance_kwh:
            return document
        time.sleep(0.2)
    pytest.fail(f"{meter_no} never reached {balance_kwh} in the mirror; worker log:\n{log_path.read_text()[-4000:]}")


@pytest.mark.django_db(transaction=True)
def test_beat_runs_the_sync_and_payments_reach_the_mirror(celery_with_beat, fake_rtdb, alice_meter, bob_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="3.5", idempotency_key="a", actor="mpesa", amount_kes="87.50")
    services.ledger_credit(meter_no="METER-B1", units_kwh="1", idempotency_key="b", actor="mpesa")
    document = wait_for_mirror(fake_rtdb, "METER-A1", "3.500000", celery_with_beat)
    assert (document["balance"], document["balanceKes"]) == (3.5, "87.50")
    wait_for_mirror(fake_rtdb, "METER-B1", "1.000000", celery_with_beat)

    services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="a2", actor="mpesa")
    wait_for_mirror(fake_rtdb, "METER-A1", "4.500000", celery_with_beat)
    # Every write was one multi-path update, and no meter was written without a change.
    patches = fake_rtdb.requests("PATCH")
    assert all(entry["path"] == "/.json" and entry["status"] == 204 for entry in patches)
    assert sum(len(entry["keys"]) for entry in patches) <= 3
