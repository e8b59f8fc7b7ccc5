"""Staff roles (portal migration 0002_staff_roles): what each may and may not do in the API and
the admin. Personas: Sue (support), Carl (cashier), Erin (engineer), Vic and Val (supervisors),
and Nell, staff with no role at all: she may sign in to the admin and do nothing in it."""

from decimal import Decimal

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from rest_framework.test import APIClient

from meters.models import AdjustmentRequest, AdjustmentStatus, LedgerEntry, LedgerKind, Meter, MeterCommand
from meters.selectors import meter_balance_get
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

ROLES = {"sue": "support", "carl": "cashier", "erin": "engineer", "vic": "supervisor", "val": "supervisor", "nell": None}


@pytest.fixture
def staff(db, django_user_model):
    users = {}
    for username, role in ROLES.items():
        user = django_user_model.objects.create_user(username, f"{username}@example.com", PASSWORD, is_staff=True)
        if role:
            user.groups.add(Group.objects.get(name=role))
        users[username] = user
    return users


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def admin(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# (method, path, body, who may); everyone else on the staff gets 403.
OPERATIONS = [
    ("post", "/api/v1/meters/METER-A1/adjustments/", {"units": "1.5", "reason": "meter swap"}, {"vic", "val"}),
    ("post", "/api/v1/meters/METER-A1/resync/", None, {"sue", "erin"}),
    ("post", "/api/v1/meters/METER-A1/relay/", {"state": "off", "reason": "maintenance"}, {"erin"}),
    ("post", "/api/v1/meters/METER-A1/credentials/", None, {"erin"}),
    ("delete", "/api/v1/meters/METER-A1/credentials/", None, {"erin"}),
    ("patch", "/api/v1/meters/METER-A1/", {"owner": None}, {"erin"}),
    ("post", "/api/v1/meters/", {"meterNo": "METER-NEW", "owner": None}, {"erin"}),
    ("post", "/api/v1/customers/", {"username": "carol", "password": PASSWORD, "name": "Carol", "phone": "0722000111"},
     {"sue"}),
    ("get", "/api/v1/dead-letters/", None, set(ROLES) - {"nell"}),
    ("get", "/api/v1/adjustment-requests/", None, set(ROLES) - {"nell"}),
]


@pytest.mark.parametrize("username", list(ROLES))
@pytest.mark.parametrize(("method", "path", "body", "allowed"), OPERATIONS, ids=[f"{o[0]} {o[1]}" for o in OPERATIONS])
def test_each_role_in_the_api(method, path, body, allowed, username, staff, alice_meter):
    response = getattr(api(staff[username]), method)(path, body, format="json")
    if username in allowed:
        assert response.status_code in (200, 201, 202, 204), (username, response.content)
    else:
        assert response.status_code == 403, (username, response.content)
        assert response.json()["error"]["code"] == "permission_denied"


def test_forbidden_operations_change_nothing(staff, alice_meter):
    commands, entries = MeterCommand.objects.count(), LedgerEntry.objects.count()
    for username in ("nell", "sue", "carl", "erin"):
        client = api(staff[username])
        client.post("/api/v1/meters/METER-A1/adjustments/", {"units": "500", "reason": "free kWh"}, format="json")
    for username in ("nell", "carl", "vic"):
        api(staff[username]).post("/api/v1/meters/METER-A1/relay/", {"state": "on", "reason": "x"}, format="json")
    assert (MeterCommand.objects.count(), LedgerEntry.objects.count()) == (commands, entries)
    assert Meter.objects.get(meter_no="METER-A1").relay_override == "auto"


def test_a_large_adjustment_waits_for_a_second_approver_and_then_posts_once(staff, alice_meter, settings):
    settings.ADJUSTMENT_APPROVAL_KWH = Decimal("50")
    small = api(staff["vic"]).post("/api/v1/meters/METER-A1/adjustments/", {"units": "50", "reason": "fix"}, format="json")
    assert small.status_code == 201
    asked = api(staff["vic"]).post("/api/v1/meters/METER-A1/adjustments/", {"units": "-500.5", "reason": "tamper"},
                                   format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert asked.status_code == 202 and asked.json()["status"] == "pending"
    request_id = asked.json()["id"]
    again = api(staff["vic"]).post("/api/v1/meters/METER-A1/adjustments/", {"units": "-500.5", "reason": "tamper"},
                                   format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert again.json()["id"] == request_id, "a retry finds the same request"
    assert meter_balance_get(meter_no="METER-A1") == Decimal("50")

    # Not by the one who asked, not by a role without the permission.
    assert api(staff["vic"]).post(f"/api/v1/adjustment-requests/{request_id}/approve/", {}, format="json").status_code == 409
    assert api(staff["erin"]).post(f"/api/v1/adjustment-requests/{request_id}/approve/", {}, format="json").status_code == 403
    assert meter_balance_get(meter_no="METER-A1") == Decimal("50")

    approved = api(staff["val"]).post(f"/api/v1/adjustment-requests/{request_id}/approve/", {"note": "seen"}, format="json")
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    twice = api(staff["val"]).post(f"/api/v1/adjustment-requests/{request_id}/approve/", {}, format="json")
    assert twice.status_code == 200
    entry = LedgerEntry.objects.get(kind=LedgerKind.ADJUSTMENT, units_kwh=Decimal("-500.5"))
    assert (entry.actor, entry.approved_by) == ("vic", "val")
    assert meter_balance_get(meter_no="METER-A1") == Decimal("-450.5")
    assert LedgerEntry.objects.filter(kind=LedgerKind.ADJUSTMENT).count() == 2
    statement = api(staff["vic"]).get("/api/v1/meters/METER-A1/statement/").json()["results"]
    assert statement[0]["approvedBy"] == "val" and statement[0]["actor"] == "vic"


def test_a_rejected_adjustment_never_posts(staff, alice_meter, settings):
    settings.ADJUSTMENT_APPROVAL_KWH = Decimal("10")
    request_id = api(staff["vic"]).post("/api/v1/meters/METER-A1/adjustments/", {"units": "99", "reason": "x"},
                                        format="json").json()["id"]
    assert api(staff["val"]).post(f"/api/v1/adjustment-requests/{request_id}/reject/", {}, format="json").status_code == 400
    assert api(staff["val"]).post(f"/api/v1/adjustment-requests/{request_id}/reject/", {"note": "no evidence"},
                                  format="json").json()["status"] == "rejected"
    assert api(staff["val"]).post(f"/api/v1/adjustment-requests/{request_id}/approve/", {}, format="json").status_code == 409
    assert not LedgerEntry.objects.filter(kind=LedgerKind.ADJUSTMENT).exists()


# --- the admin ------------------------------------------------------------------------------

METER_ACTIONS = {
    "adjust_balance": {"vic", "val"}, "push_balance": {"sue", "erin"}, "release_held_energy": {"erin"},
    "dismiss_held_energy": {"erin"}, "issue_credentials": {"erin"}, "revoke_credentials": {"erin"},
}
PAYMENT_ACTIONS = {"query_now": {"carl"}, "resolve_credit": {"carl"}, "resolve_same_money": {"carl"}, "resolve_close": {"carl"}}


def offered(changelist) -> set[str]:
    form = changelist.context["action_form"]  # None when no action is allowed
    return set() if form is None else {name for name, _ in form.fields["action"].choices if name}


@pytest.mark.parametrize("username", list(ROLES))
def test_each_role_sees_only_its_admin_actions(username, staff, alice_meter):
    client = admin(staff[username])
    meters = client.get("/admin/meters/meter/")
    if username == "nell":
        assert meters.status_code == 403, "no role: no view permission"
        return
    assert meters.status_code == 200
    assert offered(meters) == {name for name, who in METER_ACTIONS.items() if username in who}
    assert offered(client.get("/admin/payments/payment/")) == {name for name, who in PAYMENT_ACTIONS.items() if username in who}
    requests = client.get("/admin/meters/adjustmentrequest/")
    assert offered(requests) == ({"approve", "reject"} if username in {"vic", "val"} else set())


@pytest.mark.parametrize("username", ["sue", "carl", "erin", "nell"])
def test_an_adjustment_posted_to_the_admin_by_another_role_is_refused(username, staff, alice_meter):
    response = admin(staff[username]).post("/admin/meters/meter/", {
        "action": "adjust_balance", "_selected_action": [alice_meter.pk], "apply": "1", "units_kwh": "500", "reason": "x",
    })
    assert response.status_code in (200, 302, 403)
    assert not LedgerEntry.objects.filter(kind=LedgerKind.ADJUSTMENT).exists()


def test_the_admin_adjustment_of_a_supervisor_waits_for_another_and_posts_once(staff, alice_meter, settings):
    settings.ADJUSTMENT_APPROVAL_KWH = Decimal("50")
    admin(staff["vic"]).post("/admin/meters/meter/", {
        "action": "adjust_balance", "_selected_action": [alice_meter.pk], "apply": "1", "units_kwh": "120", "reason": "x",
    })
    request = AdjustmentRequest.objects.get()
    assert request.status == AdjustmentStatus.PENDING and not LedgerEntry.objects.filter(kind=LedgerKind.ADJUSTMENT).exists()
    approve = {"action": "approve", "_selected_action": [request.pk], "apply": "1"}
    admin(staff["vic"]).post("/admin/meters/adjustmentrequest/", approve)
    assert AdjustmentRequest.objects.get().status == AdjustmentStatus.PENDING, "not by the one who asked"
    admin(staff["val"]).post("/admin/meters/adjustmentrequest/", approve)
    admin(staff["val"]).post("/admin/meters/adjustmentrequest/", approve)
    entry = LedgerEntry.objects.get(kind=LedgerKind.ADJUSTMENT)
    assert (entry.units_kwh, entry.actor, entry.approved_by) == (Decimal("120"), "vic", "val")


def test_the_engineer_gets_a_new_meter_password_once_in_the_admin(staff, alice_meter):
    page = admin(staff["erin"]).post("/admin/meters/meter/", {
        "action": "issue_credentials", "_selected_action": [alice_meter.pk],
    })
    assert page.status_code == 200
    (meter_no, password), = page.context["issued"]
    assert meter_no == "METER-A1" and password in page.content.decode()
    assert password not in admin(staff["erin"]).get(f"/admin/meters/meter/{alice_meter.pk}/change/").content.decode()
