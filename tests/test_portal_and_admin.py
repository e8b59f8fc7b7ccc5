"""The customer portal and the staff admin, each tested for who must not see what."""

from decimal import Decimal

import pytest
from django.urls import reverse

from meters import services
from meters.models import LedgerEntry, MeterCommand
from meters.selectors import meter_balance_get
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def test_anonymous_is_sent_to_sign_in(client, alice_meter):
    for url in ("/", "/meters/METER-A1/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_alice_sees_her_meter_and_not_bobs(client, alice_meter, bob_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="7.25", idempotency_key="k", actor="mpesa")
    assert client.post("/accounts/login/", {"username": "alice", "password": PASSWORD}).status_code == 302  # through axes
    dashboard = client.get("/").content.decode()
    assert "METER-A1" in dashboard and "METER-B1" not in dashboard
    page = client.get("/meters/METER-A1/")
    assert page.status_code == 200 and "7.250000" in page.content.decode()
    assert client.get("/meters/METER-B1/").status_code == 404
    assert client.get("/meters/NO%2FSUCH/").status_code == 404


def test_sign_in_page_works(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get("/").status_code == 200


def test_staff_admin_pages_load(client, staff_user, alice_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="k", actor="mpesa")
    client.force_login(staff_user)
    for name in ("customer", "meter", "tariff", "ledgerentry", "reading", "statusevent", "metercommand"):
        assert client.get(reverse(f"admin:meters_{name}_changelist")).status_code == 200, name
    for name in ("payments_payment", "payments_callback", "mqtt_worker_deadletter"):
        assert client.get(reverse(f"admin:{name}_changelist")).status_code == 200, name
        assert client.get(reverse(f"admin:{name}_add")).status_code == 403, name
    assert client.get(reverse("admin:meters_meter_change", args=[alice_meter.pk])).status_code == 200


def test_ledger_is_read_only_in_the_admin(client, staff_user, alice_meter):
    entry = services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="k", actor="mpesa").entry
    client.force_login(staff_user)
    assert client.get(reverse("admin:meters_ledgerentry_add")).status_code == 403
    response = client.post(reverse("admin:meters_ledgerentry_change", args=[entry.pk]), {"units_kwh": "999"})
    assert response.status_code == 403
    assert LedgerEntry.objects.get().units_kwh == Decimal("1")


def test_admin_adjustment_action_needs_a_reason_and_records_the_staff_member(client, staff_user, alice_meter):
    client.force_login(staff_user)
    url = reverse("admin:meters_meter_changelist")
    base = {"action": "adjust_balance", "_selected_action": [alice_meter.pk]}
    # First step shows the form; nothing is written.
    assert client.post(url, base).status_code == 200
    # Without a reason: the form is shown again with an error; nothing is written.
    response = client.post(url, {**base, "apply": "1", "units_kwh": "2.5", "reason": ""})
    assert response.status_code == 200 and "This field is required" in response.content.decode()
    assert not LedgerEntry.objects.exists()
    client.post(url, {**base, "apply": "1", "units_kwh": "2.5", "reason": "Goodwill credit after outage"})
    entry = LedgerEntry.objects.get()
    assert (entry.kind, entry.units_kwh, entry.actor, entry.reason) == (
        "adjustment", Decimal("2.5"), "sam", "Goodwill credit after outage",
    )
    assert meter_balance_get(meter_no="METER-A1") == Decimal("2.5")
    assert MeterCommand.objects.filter(kind="balance", reason="adjustment").count() == 1


def test_non_staff_cannot_use_the_admin(client, alice):
    client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})  # through axes
    response = client.get("/admin/meters/meter/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_seed_demo_is_idempotent(db, capsys):
    from django.core.management import call_command

    call_command("seed_demo")
    call_command("seed_demo")
    out = capsys.readouterr().out
    assert "user: demo" in out and "user: staff" in out
    assert LedgerEntry.objects.count() == 3
    call_command("ledger_check")
