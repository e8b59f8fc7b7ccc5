"""Buying units from the customer portal: the form starts one STK push, for the owner only."""

import pytest

from payments.models import Payment
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def test_owner_buys_units_once_even_if_the_form_is_sent_twice(client, alice_meter, fake_daraja):
    client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})  # through axes
    page = client.get("/meters/METER-A1/")
    key = page.context["form"].initial["idempotency_key"]
    form = {"phone": "0712345678", "amount": "100", "idempotency_key": key}
    first = client.post("/meters/METER-A1/buy/", form)
    second = client.post("/meters/METER-A1/buy/", form)
    assert first.status_code == 302 and second.status_code == 302
    payment = Payment.objects.get()
    assert (payment.status, payment.amount_kes, payment.phone) == ("pending", 100, "254712345678")
    assert payment.checkout_request_id
    shown = client.get("/meters/METER-A1/").content.decode()
    assert "enter your M-Pesa PIN" in shown and "Pending" in shown


def test_bad_phone_is_shown_on_the_form_and_nothing_starts(client, alice_meter, fake_daraja):
    client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})  # through axes
    response = client.post("/meters/METER-A1/buy/", {"phone": "0999", "amount": "100", "idempotency_key": "k1"})
    assert response.status_code == 400
    assert "is not a Kenyan mobile number" in response.content.decode()
    assert not Payment.objects.exists()


def test_another_customer_cannot_buy_for_alices_meter(client, alice_meter, bob, fake_daraja):
    client.post("/accounts/login/", {"username": "bob", "password": PASSWORD})  # through axes
    response = client.post("/meters/METER-A1/buy/", {"phone": "0712345678", "amount": "100", "idempotency_key": "k2"})
    assert response.status_code == 404
    assert not Payment.objects.exists()
