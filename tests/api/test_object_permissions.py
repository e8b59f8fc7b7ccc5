"""Every endpoint that takes an object id, as the person who must not see the object.

Bob (another customer) gets 404 for Alice's meter, payment and token, exactly as for an object
that does not exist, so ids cannot be probed; an anonymous caller gets 401 with a
WWW-Authenticate header. Staff-only operations on a meter Alice can see give her 403. Each case
also checks that the object's rightful user does get through, so the 404 is not an accident.
"""

from decimal import Decimal

import pytest

from payments.models import Payment
from portal.models import ApiToken

READ = "read"  # the owner and staff
STAFF = "staff"  # staff only; the owner gets 403

# (method, path, JSON body, who may, status for a caller who may)
ENDPOINTS = [
    ("get", "/api/v1/meters/{meter}/", None, READ, 200),
    ("patch", "/api/v1/meters/{meter}/", {}, STAFF, 200),
    ("get", "/api/v1/meters/{meter}/readings/", None, READ, 200),
    ("get", "/api/v1/meters/{meter}/statement/", None, READ, 200),
    ("post", "/api/v1/meters/{meter}/adjustments/", {"units": "1.5", "reason": "meter swap"}, STAFF, 201),
    ("post", "/api/v1/meters/{meter}/resync/", None, STAFF, 202),
    ("post", "/api/v1/meters/{meter}/relay/", {"state": "off", "reason": "maintenance"}, STAFF, 202),
    ("get", "/api/v1/payments/{payment}/", None, READ, 200),
]
IDS = [f"{method.upper()} {path}" for method, path, *_ in ENDPOINTS]


@pytest.fixture
def alice_payment(alice_meter, alice):
    return Payment.objects.create(
        meter=alice_meter, initiated_by=alice.user, channel="stk", amount_kes=Decimal("50"), phone="254712345678"
    )


def _url(path, meter, payment):
    return path.format(meter=meter.meter_no, payment=payment.pk)


@pytest.mark.parametrize(("method", "path", "body", "who", "ok"), ENDPOINTS, ids=IDS)
def test_another_customer_gets_404(method, path, body, who, ok, bob_api, alice_meter, alice_payment):
    response = getattr(bob_api, method)(_url(path, alice_meter, alice_payment), body, format="json")
    assert response.status_code == 404, response.content
    assert response.json()["error"]["code"] == "not_found"
    # The same answer as for an object that does not exist at all.
    missing = getattr(bob_api, method)(path.format(meter="NO-SUCH-METER", payment=10**9), body, format="json")
    assert missing.status_code == 404


@pytest.mark.parametrize(("method", "path", "body", "who", "ok"), ENDPOINTS, ids=IDS)
def test_anonymous_gets_401(method, path, body, who, ok, anon, alice_meter, alice_payment):
    response = getattr(anon, method)(_url(path, alice_meter, alice_payment), body, format="json")
    assert response.status_code == 401, response.content
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.parametrize(("method", "path", "body", "who", "ok"), ENDPOINTS, ids=IDS)
def test_a_revoked_token_gets_401(method, path, body, who, ok, alice_api, alice_meter, alice_payment):
    ApiToken.objects.filter(user=alice_meter.owner.user).delete()
    response = getattr(alice_api, method)(_url(path, alice_meter, alice_payment), body, format="json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"


@pytest.mark.parametrize(("method", "path", "body", "who", "ok"), ENDPOINTS, ids=IDS)
def test_the_owner_reads_and_only_staff_write(method, path, body, who, ok, alice_api, staff_api, alice_meter, alice_payment):
    url = _url(path, alice_meter, alice_payment)
    as_owner = getattr(alice_api, method)(url, body, format="json")
    if who == READ:
        assert as_owner.status_code == ok, as_owner.content
    else:
        assert as_owner.status_code == 403, as_owner.content
        assert as_owner.json()["error"]["code"] == "permission_denied"
    as_staff = getattr(staff_api, method)(url, body, format="json")
    assert as_staff.status_code == ok, as_staff.content


def test_another_users_token_cannot_be_listed_or_revoked(alice_api, bob_api, alice, bob, anon):
    alice_tokens = alice_api.get("/api/v1/auth/tokens/").json()
    assert len(alice_tokens) == 1
    token_id = alice_tokens[0]["id"]
    assert all(token["id"] != token_id for token in bob_api.get("/api/v1/auth/tokens/").json())
    response = bob_api.delete(f"/api/v1/auth/tokens/{token_id}/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert anon.delete(f"/api/v1/auth/tokens/{token_id}/").status_code == 401
    assert ApiToken.objects.filter(pk=token_id).exists()
    assert alice_api.get("/api/v1/me/").status_code == 200


def test_lists_show_only_the_callers_objects(alice_api, bob_api, staff_api, alice_meter, bob_meter, alice_payment):
    assert [m["meterNo"] for m in alice_api.get("/api/v1/meters/").json()["results"]] == ["METER-A1"]
    assert [m["meterNo"] for m in bob_api.get("/api/v1/meters/").json()["results"]] == ["METER-B1"]
    assert [m["meterNo"] for m in staff_api.get("/api/v1/meters/").json()["results"]] == ["METER-A1", "METER-B1"]
    assert [p["id"] for p in alice_api.get("/api/v1/payments/").json()["results"]] == [alice_payment.pk]
    assert bob_api.get("/api/v1/payments/").json()["results"] == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/api/v1/meters/", {"meterNo": "METER-X", "owner": None}),
        (
            "post",
            "/api/v1/customers/",
            {"username": "carol", "password": "pw-carol-2024", "name": "Carol", "phone": "0711000000"},
        ),
        ("get", "/api/v1/dead-letters/", None),
    ],
)
def test_staff_collections_refuse_customers_and_anonymous(method, path, body, alice_api, anon, staff_api, tariff):
    assert getattr(alice_api, method)(path, body, format="json").status_code == 403
    assert getattr(anon, method)(path, body, format="json").status_code == 401
    assert getattr(staff_api, method)(path, body, format="json").status_code in (200, 201)
