"""Paybill (C2B): validation rejects unknown meters and bad amounts; confirmation credits the
meter named by BillRefNumber once per TransID. Reference payloads, re-addressed."""

import threading
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.test import Client

from meters.models import LedgerEntry, MeterCommand
from meters.selectors import meter_balance_get
from payments import daraja
from payments.models import Callback, CallbackStatus, Payment, PaymentStatus
from tests.payments.fixtures import C2B_REQUEST, c2b_request
from tests.payments.helpers import wait_until

VALIDATION = "/payments/callbacks/c2b/validation/test-callback-secret-0123456789abcdef/"
CONFIRMATION = "/payments/callbacks/c2b/confirmation/test-callback-secret-0123456789abcdef/"


def post(client, url: str, body: str):
    return client.post(url, data=body, content_type="application/json")


@pytest.mark.django_db
def test_validation_rejects_an_unknown_account_number(client, alice_meter):
    response = post(client, VALIDATION, C2B_REQUEST)  # BillRefNumber METER001 is nobody's meter
    assert response.status_code == 200 and response.json() == {"ResultCode": "C2B00012", "ResultDesc": "Rejected"}
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.REFUSED and "unknown account number 'METER001'" in callback.error
    assert callback.reply == '{"ResultCode": "C2B00012", "ResultDesc": "Rejected"}' and Payment.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("amount", ["0.00", "-5.00", "abc", "5.005", "250001.00", "NaN", ""])
def test_validation_rejects_a_bad_amount(client, alice_meter, amount):
    response = post(client, VALIDATION, c2b_request(amount=amount, bill_ref="METER-A1"))
    assert response.json() == {"ResultCode": "C2B00013", "ResultDesc": "Rejected"}


@pytest.mark.django_db
@pytest.mark.parametrize("bill_ref", ["METER-A1", "meter-a1", " METER-A1 "])
def test_validation_accepts_a_known_meter(client, alice_meter, bill_ref):
    response = post(client, VALIDATION, c2b_request(bill_ref=bill_ref))
    assert response.json() == {"ResultCode": "0", "ResultDesc": "Accepted"}
    assert Callback.objects.get().status == CallbackStatus.PROCESSED
    assert Payment.objects.count() == 0  # money moves only on confirmation


@pytest.mark.django_db
def test_validation_of_garbage_is_rejected_as_other(client, alice_meter):
    assert post(client, VALIDATION, "{").json() == {"ResultCode": "C2B00016", "ResultDesc": "Rejected"}


@pytest.mark.django_db
def test_confirmation_credits_once_even_if_it_arrives_twice(client, alice_meter):
    body = c2b_request(bill_ref="METER-A1", amount="50.00")
    for _ in range(2):
        response = post(client, CONFIRMATION, body)
        assert response.json() == {"ResultCode": 0, "ResultDesc": "Success"}
    payment = Payment.objects.get()
    assert payment.channel == "c2b" and payment.status == PaymentStatus.SUCCEEDED and payment.initiated_by is None
    assert payment.c2b_trans_id == "RKL51ZDR4F" and payment.mpesa_receipt == "RKL51ZDR4F" and payment.phone == ""
    assert payment.units_kwh == Decimal("2") and payment.command == MeterCommand.objects.get()
    assert LedgerEntry.objects.get().idempotency_key == "mpesa:RKL51ZDR4F"
    assert meter_balance_get(meter_no="METER-A1") == Decimal("2")
    outcomes = list(Callback.objects.order_by("id").values_list("outcome", flat=True))
    assert outcomes == ["credited 2.000000 kWh to METER-A1", f"duplicate: receipt already recorded (payment {payment.pk})"]


@pytest.mark.django_db(transaction=True)
def test_concurrent_confirmations_credit_once(postgres, alice_meter):
    body = c2b_request(bill_ref="METER-A1", amount="50.00")
    barrier = threading.Barrier(4)

    def deliver():
        try:
            barrier.wait(timeout=30)
            post(Client(), CONFIRMATION, body)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert Payment.objects.count() == 1 and LedgerEntry.objects.count() == 1
    assert meter_balance_get(meter_no="METER-A1") == Decimal("2")
    assert Callback.objects.filter(status=CallbackStatus.PROCESSED).count() == 4


@pytest.mark.django_db
def test_a_confirmation_for_an_unknown_meter_is_kept_for_staff_and_credits_nothing(client, alice_meter):
    response = post(client, CONFIRMATION, C2B_REQUEST)
    assert response.json() == {"ResultCode": 0, "ResultDesc": "Success"}  # Daraja must not resend
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.PROCESSED and callback.outcome == "kept for staff review"
    kept = callback.payment
    assert (kept.status, kept.meter, kept.c2b_trans_id, kept.amount_kes) == (
        PaymentStatus.NEEDS_REVIEW, None, "RKL51ZDR4F", Decimal("5.00"))
    assert "unknown account number 'METER001'" in kept.review_reason and LedgerEntry.objects.count() == 0


@pytest.mark.django_db
def test_a_paybill_phone_that_is_not_masked_is_kept(client, alice_meter):
    post(client, CONFIRMATION, c2b_request(bill_ref="METER-A1").replace("2547 ***** 126", "254708374149"))
    assert Payment.objects.get().phone == "254708374149"


@pytest.mark.django_db
def test_a_wrong_secret_on_c2b_is_refused(client, alice_meter):
    wrong = CONFIRMATION.replace("test-callback-secret-0123456789abcdef", "guess")
    response = post(client, wrong, c2b_request(bill_ref="METER-A1"))
    assert response.status_code == 404 and Callback.objects.count() == 0 and Payment.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_paybill_through_the_fake_daraja(fake_daraja, live_server, alice_meter, settings, monkeypatch):
    """Register the URLs with the fake, simulate two payments: the one to an unknown account is
    rejected at validation; the known one is confirmed twice and credited once."""
    # The live server answers each request in a new thread; persistent connections would outlive
    # those threads and keep the test database busy at teardown.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    settings.MPESA_CALLBACK_BASE_URL = live_server.url
    fake_daraja.control("config", c2b_delivery="twice")
    call_command("mpesa_register_c2b")
    registered = fake_daraja.state()["c2b_urls"][settings.MPESA_SHORTCODE]
    assert registered["validation"] == f"{live_server.url}{VALIDATION}"

    for bill_ref, trans_id in (("NO-SUCH-METER", "RKL51ZDR4A"), ("METER-A1", "RKL51ZDR4B")):
        daraja._request("/mpesa/c2b/v1/simulate", {
            "ShortCode": settings.MPESA_SHORTCODE, "CommandID": "CustomerPayBillOnline", "Amount": "75",
            "Msisdn": "254708374149", "BillRefNumber": bill_ref, "TransID": trans_id,
        })
    wait_until(lambda: sum(d["kind"] == "c2b_confirmation" for d in fake_daraja.state()["deliveries"]) == 2)
    deliveries = fake_daraja.state()["deliveries"]
    rejected = [d for d in deliveries if d["ref"] == "RKL51ZDR4A"]
    assert [(d["kind"], d["reply"]["ResultCode"]) for d in rejected] == [("c2b_validation", "C2B00012")]
    credited = Payment.objects.get(status=PaymentStatus.SUCCEEDED)
    assert credited.c2b_trans_id == "RKL51ZDR4B" and meter_balance_get(meter_no="METER-A1") == Decimal("3")
    # The payment to the unknown account was refused at validation: no money moved, nothing kept.
    assert Payment.objects.count() == 1
