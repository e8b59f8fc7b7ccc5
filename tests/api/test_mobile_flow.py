"""The mobile app's flow end to end, over real HTTP against a live server, with M-Pesa played by
the fake Daraja (a separate process that calls our STK callback URL, as Safaricom does):
sign in → list meters → buy units → poll the payment → see the new balance.
"""

import time
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from tests.conftest import PASSWORD

# Generous: the machine is shared and slow. This bounds a wait, it is not a timing assertion.
WAIT_S = 60


def _poll(client: httpx.Client, url: str, done) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        body = client.get(url).json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


@pytest.fixture
def _no_persistent_connections(monkeypatch):
    # The live server answers each request in a new thread; persistent connections would outlive
    # those threads and keep the test database busy at teardown.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_no_persistent_connections")
def test_sign_in_buy_units_poll_and_see_the_new_balance(live_server, fake_daraja, alice_meter, settings):
    settings.MPESA_CALLBACK_BASE_URL = live_server.url
    fake_daraja.next("success", delay=0.5)
    api = f"{live_server.url}/api/v1"
    with httpx.Client(timeout=30) as anonymous:
        signed_in = anonymous.post(f"{api}/auth/token/", json={"username": "alice", "password": PASSWORD, "device": "Tecno"})
    assert signed_in.status_code == 201
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {signed_in.json()['token']}"}) as app:
        meters = app.get(f"{api}/meters/").json()["results"]
        assert [(m["meterNo"], m["balance"]) for m in meters] == [("METER-A1", "0.000000")]

        purchase = {"meterNo": "METER-A1", "phone": "0712345678", "amount": "100"}
        started = app.post(f"{api}/payments/", json=purchase, headers={"Idempotency-Key": "tecno-buy-1"})
        assert started.status_code == 201, started.text
        payment = started.json()
        assert payment["status"] == "pending" and payment["checkoutRequestId"] and payment["amount"] == "100.00"
        assert payment["phone"] == "254712345678" and payment["units"] is None

        # The app retries (say the response was lost): the same key gives back the first payment,
        # and M-Pesa is not asked again (no second PIN prompt on the phone).
        retried = app.post(f"{api}/payments/", json=purchase, headers={"Idempotency-Key": "tecno-buy-1"})
        assert retried.status_code == 200 and retried.json()["id"] == payment["id"]
        assert retried.json()["checkoutRequestId"] == payment["checkoutRequestId"]

        final = _poll(app, f"{api}/payments/{payment['id']}/", lambda body: body["status"] != "pending")
        assert final["status"] == "succeeded", final
        assert final["units"] == "4.000000" and final["receipt"]  # KES 100 at KES 25/kWh
        assert isinstance(final["deliveredToMeter"], bool)

        meter = app.get(f"{api}/meters/METER-A1/").json()
        assert Decimal(meter["balance"]) == Decimal("4") and meter["balanceKes"] == "100.00"
        statement = app.get(f"{api}/meters/METER-A1/statement/").json()
        assert [(e["kind"], e["units"], e["balanceAfter"]) for e in statement["results"]] == [
            ("payment_credit", "4.000000", "4.000000")
        ]
    assert fake_daraja.state()["counts"]["stkpush"] == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_no_persistent_connections")
def test_a_key_reused_for_a_different_purchase_is_refused(live_server, fake_daraja, alice_meter, bob_meter, settings):
    settings.MPESA_CALLBACK_BASE_URL = live_server.url
    api = f"{live_server.url}/api/v1"
    token = httpx.post(f"{api}/auth/token/", json={"username": "alice", "password": PASSWORD}, timeout=30).json()["token"]
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k-1"}) as app:
        assert (
            app.post(f"{api}/payments/", json={"meterNo": "METER-A1", "phone": "0712345678", "amount": "100"}).status_code == 201
        )
        other = app.post(f"{api}/payments/", json={"meterNo": "METER-A1", "phone": "0712345678", "amount": "250"})
        assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
        # Bob's meter is not Alice's to pay for through the app: not found, nothing pushed.
        bobs = app.post(
            f"{api}/payments/",
            json={"meterNo": "METER-B1", "phone": "0712345678", "amount": "100"},
            headers={"Idempotency-Key": "k-2"},
        )
        assert bobs.status_code == 404 and bobs.json()["error"]["field"] == "meterNo"
    assert fake_daraja.state()["counts"]["stkpush"] == 1
