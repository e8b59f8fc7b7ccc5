"""The read-only Firebase mirror page of the admin: staff see where each meter stands, nobody edits it."""

import pytest

from meters import services
from meters.models import FirebaseMirror

pytestmark = pytest.mark.django_db


def test_staff_see_pending_meters_and_cannot_edit(client, staff_user, alice_meter, bob_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="pay", actor="mpesa")
    services.firebase_mirror_mark(meter_ids=[bob_meter.pk])
    FirebaseMirror.objects.filter(meter=bob_meter).update(synced_version=1)
    client.force_login(staff_user)

    pending = client.get("/admin/meters/firebasemirror/?pending=yes")
    assert pending.status_code == 200
    assert "METER-A1" in pending.content.decode() and "METER-B1" not in pending.content.decode()
    synced = client.get("/admin/meters/firebasemirror/?pending=no").content.decode()
    assert "METER-B1" in synced and "METER-A1" not in synced
    assert client.get("/admin/meters/firebasemirror/add/").status_code == 403
    row = client.get(f"/admin/meters/firebasemirror/{alice_meter.pk}/change/")
    assert row.status_code == 200 and b'name="version"' not in row.content
    assert client.post(f"/admin/meters/firebasemirror/{alice_meter.pk}/delete/", {"post": "yes"}).status_code == 403


def test_customers_do_not_reach_the_page(client, alice, alice_meter):
    client.force_login(alice.user)
    response = client.get("/admin/meters/firebasemirror/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
