"""`manage.py firebase_resync [--meter M]` rewrites the mirror from the database; the mirror's
outbox depth is a metric that moves with it."""

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from meters import firebase, services
from tests.production.test_metrics import scrape, value

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("postgres")]


def test_resync_rewrites_a_wiped_mirror_from_the_database(fake_rtdb, reader, alice_meter, bob_meter, staff_user):
    services.ledger_credit(meter_no="METER-A1", units_kwh="7.25", idempotency_key="k1", actor="test")
    firebase.firebase_mirror_sync()
    staff = Client()
    staff.force_login(staff_user)
    assert value(scrape(staff), "smartmeter_firebase_outbox_depth") == 0
    fake_rtdb.control("reset")  # the mirror lost everything
    assert reader("meters/METER-A1").get() is None

    call_command("firebase_resync", "--meter", "METER-A1")
    assert reader("meters/METER-A1").get()["balance"] == 7.25
    assert reader("meters/METER-B1").get() is None, "--meter rewrites that meter only"

    fake_rtdb.control("fail", mode="status", status=400, error="refused", count=None, methods=["PATCH"])
    with pytest.raises(CommandError, match="could not be written"):
        call_command("firebase_resync")
    assert value(scrape(staff), "smartmeter_firebase_outbox_depth") == 2, "both meters wait in the outbox"
    fake_rtdb.control("heal")
    call_command("firebase_resync")
    assert reader("meters/METER-B1").get()["meterNo"] == "METER-B1"
    assert value(scrape(staff), "smartmeter_firebase_outbox_depth") == 0


def test_resync_of_an_unknown_meter_says_so(fake_rtdb):
    with pytest.raises(CommandError, match="Unknown meter"):
        call_command("firebase_resync", "--meter", "NOPE")
