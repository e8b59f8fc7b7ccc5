"""The Firebase mirror against real PostgreSQL, the real firebase-admin SDK and the fake Realtime
Database as a subprocess: what the app reads, one write per meter per batch, changes made during a
sync, failures and catching up, the mirror disabled, and the ledger staying the only truth."""

import logging
import re
import threading
from decimal import Decimal

import orjson
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction

from meters import firebase, services
from meters.models import FirebaseMirror
from meters.selectors import ledger_mismatches, meter_balance_get
from meters.tasks import firebase_mirror_sync as firebase_mirror_sync_task
from mqtt_worker.ingest import Message, ingest_batch

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres")]

ISO_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


def credit(meter_no: str, units: str, key: str) -> None:
    services.ledger_credit(meter_no=meter_no, units_kwh=units, idempotency_key=key, actor="mpesa", amount_kes="1")


def pending(meter) -> bool:
    row = FirebaseMirror.objects.get(meter=meter)
    return row.version > row.synced_version


def sync_in_thread(result: dict) -> threading.Thread:
    def run():
        try:
            result["written"] = firebase.firebase_mirror_sync()
        except Exception as error:  # reported to the test, which asserts on it
            result["error"] = error
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_credit_shows_up_in_the_mirror_with_the_ledger_balance(fake_rtdb, reader, alice_meter):
    services.ledger_credit(
        meter_no="METER-A1", units_kwh="10.5", idempotency_key="pay-1", actor="mpesa", amount_kes="262.50"
    )
    assert pending(alice_meter)

    assert firebase.firebase_mirror_sync() == 1

    document = reader("meters/METER-A1").get()
    updated_at = document.pop("updatedAt")
    assert document == {
        "meterNo": "METER-A1",
        "balance": 10.5,
        "balanceKwh": "10.500000",
        "balanceKes": "262.50",
        "online": False,
        "relay": "unknown",
    }
    assert isinstance(document["balance"], float)
    assert re.match(ISO_UTC, updated_at)
    assert not pending(alice_meter)
    patch = fake_rtdb.requests("PATCH")[-1]
    assert (patch["path"], patch["ns"], patch["keys"]) == ("/.json", "smartmeter-test", ["meters/METER-A1"])


def test_many_changes_coalesce_into_one_write_per_meter(fake_rtdb, reader, alice_meter, bob_meter, staff_user):
    for number in range(5):
        credit("METER-A1", "1.25", f"a-{number}")
    for number in range(3):
        credit("METER-B1", "2", f"b-{number}")
    services.ledger_adjust(meter_no="METER-B1", units_kwh="-0.5", reason="meter swap", actor=staff_user)
    assert FirebaseMirror.objects.get(meter=bob_meter).version == 4

    assert firebase.firebase_mirror_sync() == 2

    patches = fake_rtdb.requests("PATCH")
    assert len(patches) == 1 and patches[0]["keys"] == ["meters/METER-A1", "meters/METER-B1"]
    mirrored = reader("meters").get()
    assert (mirrored["METER-A1"]["balanceKwh"], mirrored["METER-B1"]["balanceKwh"]) == ("6.250000", "5.500000")
    assert (mirrored["METER-A1"]["balanceKes"], mirrored["METER-B1"]["balanceKes"]) == ("156.25", "137.50")
    assert not pending(alice_meter) and not pending(bob_meter)

    # Nothing pending: no request at all.
    before = len(fake_rtdb.requests())
    assert firebase.firebase_mirror_sync() == 0
    assert len(fake_rtdb.requests()) == before


def test_batches_are_limited_and_each_is_one_update(fake_rtdb, reader, tariff):
    for number in range(7):
        services.meter_provision(meter_no=f"M{number}", owner=None, tariff=tariff)
        credit(f"M{number}", "1", f"m-{number}")

    assert firebase.firebase_mirror_sync(limit=3) == 7

    assert [len(entry["keys"]) for entry in fake_rtdb.requests("PATCH")] == [3, 3, 1]
    assert sorted(reader("meters").get(shallow=True)) == [f"M{number}" for number in range(7)]
    assert not FirebaseMirror.objects.filter(synced_version__lt=1).exists()


def test_a_change_during_a_sync_is_pushed_again(fake_rtdb, reader, alice_meter):
    credit("METER-A1", "5", "first")
    fake_rtdb.control("fail", mode="hold", methods=["PATCH"], count=1)
    result: dict = {}
    thread = sync_in_thread(result)
    fake_rtdb.wait_held()
    # The sync has read version 1 and its write is in flight: a payment commits now.
    credit("METER-A1", "2", "second")
    fake_rtdb.control("release")
    thread.join(60)
    assert result == {"written": 1}

    # It wrote the state it read, and the row stays pending for the change it did not see.
    assert reader("meters/METER-A1/balanceKwh").get() == "5.000000"
    row = FirebaseMirror.objects.get(meter=alice_meter)
    assert (row.version, row.synced_version) == (2, 0)

    assert firebase.firebase_mirror_sync() == 1
    assert reader("meters/METER-A1/balanceKwh").get() == "7.000000"
    row.refresh_from_db()
    assert (row.version, row.synced_version) == (2, 2)


def test_overlapping_syncs_never_write_the_same_meter(fake_rtdb, reader, alice_meter, bob_meter):
    credit("METER-A1", "5", "a")
    fake_rtdb.control("fail", mode="hold", methods=["PATCH"], count=1)
    result: dict = {}
    thread = sync_in_thread(result)
    fake_rtdb.wait_held()
    try:
        credit("METER-B1", "3", "b")
        # Alice's meter is claimed by the held sync; this one takes only Bob's.
        assert firebase.firebase_mirror_sync() == 1
        assert fake_rtdb.requests("PATCH")[-1]["keys"] == ["meters/METER-B1"]
        assert pending(alice_meter)
    finally:
        fake_rtdb.control("release")
        thread.join(60)
    assert result == {"written": 1}
    assert [entry["keys"] for entry in fake_rtdb.requests("PATCH")] == [["meters/METER-B1"], ["meters/METER-A1"]]
    assert not pending(alice_meter) and not pending(bob_meter)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"mode": "status", "status": 502, "error": "Bad Gateway"}, id="http-502"),
        pytest.param({"mode": "status", "status": 401, "error": "Unauthorized request."}, id="http-401"),
        pytest.param({"mode": "drop"}, id="connection-dropped"),
    ],
)
def test_a_failing_database_leaves_rows_pending_and_a_later_sync_catches_up(
    fake_rtdb, reader, alice_meter, monkeypatch, caplog, fault
):
    clock = [1000.0]
    monkeypatch.setattr(firebase, "_clock", lambda: clock[0])
    credit("METER-A1", "4", "pay")
    fake_rtdb.control("fail", count=None, **fault)

    with caplog.at_level(logging.WARNING, logger="meters.firebase"):
        assert firebase.firebase_mirror_sync() == 0
    assert pending(alice_meter)
    assert "stay pending" in caplog.text
    assert fake_rtdb.data() is None

    # Within the pause a run does not even try (an outage must not occupy the Celery workers).
    tried = len(fake_rtdb.requests())
    clock[0] += 1
    assert firebase.firebase_mirror_sync() == 0
    assert len(fake_rtdb.requests()) == tried

    fake_rtdb.control("heal")
    credit("METER-A1", "1", "pay-2")
    clock[0] += 2
    assert firebase.firebase_mirror_sync() == 1
    assert reader("meters/METER-A1/balanceKwh").get() == "5.000000"
    assert not pending(alice_meter)


def test_transient_503s_are_absorbed_by_the_sdk_retries(fake_rtdb, reader, alice_meter):
    credit("METER-A1", "4", "pay")
    fake_rtdb.control("fail", mode="status", status=503, count=2, methods=["PATCH"])

    assert firebase.firebase_mirror_sync() == 1

    assert [entry["status"] for entry in fake_rtdb.requests("PATCH")] == [503, 503, 204]
    assert reader("meters/METER-A1/balanceKwh").get() == "4.000000"
    assert not pending(alice_meter)


def test_mirror_disabled_is_a_no_op_and_keeps_meters_marked(fake_rtdb, reader, settings, alice_meter, caplog):
    settings.FIREBASE_DATABASE_URL = None
    credit("METER-A1", "3", "pay")
    with caplog.at_level(logging.INFO, logger="meters.firebase"):
        assert firebase.firebase_mirror_sync() == 0
        assert firebase_mirror_sync_task.apply().get() == 0
    assert [record.getMessage() for record in caplog.records if "disabled" in record.getMessage()] == [
        "Firebase mirror disabled (FIREBASE_DATABASE_URL is empty); meters stay marked for later"
    ]
    assert fake_rtdb.requests() == [] and pending(alice_meter)

    # Enabled later, it catches up with what changed meanwhile.
    settings.FIREBASE_DATABASE_URL = "https://smartmeter-test.firebaseio.com"
    assert firebase_mirror_sync_task.apply().get() == 1
    assert reader("meters/METER-A1/balanceKwh").get() == "3.000000"


def test_the_mirror_is_never_the_source_of_truth(fake_rtdb, reader, alice_meter, capsys):
    credit("METER-A1", "10", "pay")
    assert firebase.firebase_mirror_sync() == 1
    # Someone (an app bug, a console edit) writes the mirror.
    reader("meters/METER-A1").update({"balance": 999, "balanceKwh": "999.000000"})

    call_command("ledger_check")
    assert "all balances equal their ledger" in capsys.readouterr().out
    assert ledger_mismatches() == [] and meter_balance_get(meter_no="METER-A1") == Decimal("10")
    assert firebase.firebase_mirror_sync() == 0
    assert [entry["method"] for entry in fake_rtdb.requests() if entry["path"].startswith("/meters")] == ["PATCH"]

    # The next change overwrites the mirror with the ledger's balance, not the edited one plus 1.
    credit("METER-A1", "1", "pay-2")
    assert firebase.firebase_mirror_sync() == 1
    document = reader("meters/METER-A1").get()
    assert (document["balance"], document["balanceKwh"]) == (11, "11.000000")


def test_meter_reports_reach_the_mirror(fake_rtdb, reader, alice_meter):
    credit("METER-A1", "10.5", "pay")
    status = {"meterNo": "METER-A1", "status": "online", "message": "ok", "balance": 10.5, "wifi_rssi": -60,
              "relay": "on", "timestamp": 1698765432000}
    report = {"meterNo": "METER-A1", "unitsConsumed": 0.25, "remainingBalance": 10.25, "totalConsumed": 0.25,
              "timestamp": 1698765462000}
    result = ingest_batch([
        Message("smartmeter/METER-A1/status", orjson.dumps(status)),
        Message("smartmeter/METER-A1/consumption", orjson.dumps(report)),
    ])
    assert (result.statuses, result.consumption, result.dead_letters) == (1, 1, 0)

    assert firebase.firebase_mirror_sync() == 1

    document = reader("meters/METER-A1").get()
    assert (document["balanceKwh"], document["balance"], document["online"], document["relay"]) == (
        "10.250000", 10.25, True, "on")
    alice_meter.refresh_from_db()
    assert document["lastSeen"] == alice_meter.last_seen_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_bad_configuration_is_a_clear_error_and_changes_nothing(fake_rtdb, settings, alice_meter, tmp_path):
    credit("METER-A1", "1", "pay")
    settings.FIREBASE_CREDENTIALS = str(tmp_path / "missing.json")
    with pytest.raises(ImproperlyConfigured, match="FIREBASE_CREDENTIALS=.*missing.json"):
        firebase.firebase_mirror_sync()
    (tmp_path / "garbage.json").write_text("{not json")
    settings.FIREBASE_CREDENTIALS = str(tmp_path / "garbage.json")
    with pytest.raises(ImproperlyConfigured, match="service-account JSON"):
        firebase.firebase_mirror_sync()

    settings.FIREBASE_CREDENTIALS = None
    settings.FIREBASE_DATABASE_URL = "http://127.0.0.1:1/"  # an emulator URL without ?ns=
    with pytest.raises(ImproperlyConfigured, match="FIREBASE_DATABASE_URL"):
        firebase.firebase_mirror_sync()
    with pytest.raises(ValueError, match="limit"):
        firebase.firebase_mirror_sync(limit=0)
    assert fake_rtdb.requests() == [] and pending(alice_meter)


def test_the_sync_refuses_to_run_inside_a_transaction(fake_rtdb, alice_meter):
    credit("METER-A1", "1", "pay")
    with transaction.atomic(), pytest.raises(RuntimeError, match="outside any transaction"):
        firebase.firebase_mirror_sync()
    assert fake_rtdb.requests() == [] and pending(alice_meter)
