"""STK callbacks: stored raw first, credited exactly once, refused when they do not match.

Payments are started through the service against the fake Daraja (which holds its callbacks);
the callbacks posted here are the reference payloads re-addressed to those payments.
"""

import json
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone

from meters.models import LedgerEntry, MeterCommand
from meters.selectors import meter_balance_get
from payments import services
from payments.models import Callback, CallbackStatus, Payment, PaymentStatus
from tests.payments.fixtures import STK_SUCCESS, stk_failure_for, stk_success_for

URL = "/payments/callbacks/stk/test-callback-secret-0123456789abcdef/"


def post(client, body: str, url: str = URL, **extra):
    return client.post(url, data=body, content_type="application/json", **extra)


@pytest.fixture
def pending(fake_daraja, alice_meter):
    return services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes="100")


@pytest.mark.django_db
def test_success_credits_the_meter_and_queues_a_balance_command(client, pending):
    response = post(client, stk_success_for(pending))
    assert response.status_code == 200 and response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    payment = Payment.objects.get(pk=pending.pk)
    assert payment.status == PaymentStatus.SUCCEEDED and payment.mpesa_receipt == "NLJ7RT61SV"
    assert payment.units_kwh == Decimal("4") and payment.kes_per_kwh == Decimal("25") and payment.remainder_kes == 0
    assert meter_balance_get(meter_no="METER-A1") == Decimal("4")
    entry = LedgerEntry.objects.get()
    assert entry.idempotency_key == "mpesa:NLJ7RT61SV" and entry.amount_kes == Decimal("100.00") and entry.actor == "mpesa"
    assert payment.ledger_entry == entry
    command = MeterCommand.objects.get()
    assert payment.command == command and command.reason == "payment" and command.balance_kwh == Decimal("4")
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.PROCESSED and callback.payment == payment
    assert callback.body == stk_success_for(pending)
    assert callback.outcome == "credited 4.000000 kWh to METER-A1" and callback.remote_addr == "127.0.0.1"


@pytest.mark.django_db
def test_a_remainder_is_written_into_the_ledger_reason(client, fake_daraja, alice_meter):
    from meters.services import meter_update, tariff_create

    meter_update(meter_no="METER-A1", tariff=tariff_create(name="Odd", kes_per_kwh="3"))
    payment = services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes=10)
    post(client, stk_success_for(payment))
    payment.refresh_from_db()
    assert payment.units_kwh == Decimal("3.333333") and payment.remainder_kes == Decimal("0.000001")
    assert "remainder KES 0.000001 not credited" in LedgerEntry.objects.get().reason


@pytest.mark.django_db
def test_result_code_as_a_string_is_understood(client, pending):
    post(client, stk_success_for(pending).replace('"ResultCode": 0', '"ResultCode": "0"'))
    assert Payment.objects.get().status == PaymentStatus.SUCCEEDED


@pytest.mark.django_db
def test_the_same_callback_again_an_hour_later_credits_nothing_more(client, pending):
    post(client, stk_success_for(pending))
    Payment.objects.filter(pk=pending.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    Callback.objects.update(received_at=timezone.now() - timedelta(hours=1))
    response = post(client, stk_success_for(pending))
    assert response.status_code == 200
    assert LedgerEntry.objects.count() == 1 and MeterCommand.objects.count() == 1
    assert meter_balance_get(meter_no="METER-A1") == Decimal("4")
    replay = Callback.objects.order_by("-id").first()
    assert replay.status == CallbackStatus.PROCESSED and replay.outcome == "duplicate: already credited"


@pytest.mark.django_db(transaction=True)
def test_five_concurrent_copies_credit_once(postgres, fake_daraja, alice_meter, dispatched_commands):
    payment = services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes="100")
    body = stk_success_for(payment)
    barrier = threading.Barrier(5)
    statuses = []

    def deliver():
        try:
            barrier.wait(timeout=30)
            statuses.append(post(Client(), body).status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=deliver) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 5
    assert LedgerEntry.objects.count() == 1 and MeterCommand.objects.count() == 1
    assert meter_balance_get(meter_no="METER-A1") == Decimal("4")
    outcomes = sorted(Callback.objects.values_list("outcome", flat=True))
    assert outcomes == ["credited 4.000000 kWh to METER-A1"] + ["duplicate: already credited"] * 4
    # One balance command, handed to the publisher once, after its transaction committed.
    assert dispatched_commands == [MeterCommand.objects.get().pk]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "code, desc, status",
    [
        (1032, "Request cancelled by user", PaymentStatus.CANCELLED),
        (1037, "DS timeout user cannot be reached.", PaymentStatus.TIMED_OUT),
        (1, "The balance is insufficient for the transaction.", PaymentStatus.FAILED),
        (2001, "The initiator information is invalid.", PaymentStatus.FAILED),
    ],
)
def test_failures_credit_nothing(client, pending, code, desc, status):
    post(client, stk_failure_for(pending, code=code, desc=desc))
    payment = Payment.objects.get()
    assert payment.status == status and payment.result_code == str(code) and payment.result_desc == desc
    assert payment.resolved_at is not None and payment.units_kwh is None
    assert LedgerEntry.objects.count() == 0 and MeterCommand.objects.count() == 0
    # A success arriving after the failure carries a receipt: the money was taken, so it is
    # credited (once), and the audit trail says it came late.
    post(client, stk_success_for(pending, receipt="LATE000001"))
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.paid_via == "callback"
    assert LedgerEntry.objects.get().idempotency_key == "mpesa:LATE000001"
    assert payment.mpesa_receipt == "LATE000001" and "after the payment was" in payment.staff_note
    assert payment.audit.get().action == "late_success"


@pytest.mark.django_db
def test_the_reference_cancel_payload_settles_the_payment(client, pending):
    post(client, stk_failure_for(pending, code=1032, desc="Request cancelled by user"))
    assert Payment.objects.get().status == PaymentStatus.CANCELLED
    # The pending slot is free again.
    assert services.stk_push_start(user=pending.initiated_by, meter_no="METER-A1", phone="0712345678", amount_kes=5)


@pytest.mark.django_db
def test_a_failure_after_a_success_never_downgrades_it(client, pending):
    post(client, stk_success_for(pending))
    post(client, stk_failure_for(pending, code=1032, desc="Request cancelled by user"))
    assert Payment.objects.get().status == PaymentStatus.SUCCEEDED
    refused = Callback.objects.order_by("-id").first()
    assert refused.status == CallbackStatus.REFUSED and "never downgraded" in refused.error


@pytest.mark.django_db
@pytest.mark.parametrize("secret", ["wrong", "test-callback-secre", "test-callback-secret-0123456789abcdef-"])
def test_a_wrong_secret_is_refused_and_nothing_is_stored(client, pending, secret):
    response = post(client, stk_success_for(pending), url=f"/payments/callbacks/stk/{secret}/")
    assert response.status_code == 404
    assert Callback.objects.count() == 0 and LedgerEntry.objects.count() == 0
    assert Payment.objects.get().status == PaymentStatus.PENDING


@pytest.mark.django_db
def test_a_success_for_an_unknown_checkout_request_id_is_money_kept_for_staff(client, pending):
    response = post(client, STK_SUCCESS)  # the reference payload names ws_CO_191220191020363925
    assert response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.PROCESSED and "kept for staff review" in callback.outcome
    kept = callback.payment
    assert (kept.status, kept.meter, kept.mpesa_receipt, kept.amount_kes) == (
        PaymentStatus.NEEDS_REVIEW, None, "NLJ7RT61SV", Decimal("1.00"))
    assert "unknown CheckoutRequestID" in kept.review_reason and kept.phone == "254708374149"
    assert LedgerEntry.objects.count() == 0 and Payment.objects.get(pk=pending.pk).status == PaymentStatus.PENDING
    # The same callback again is the same money: recorded once.
    post(client, STK_SUCCESS)
    assert Payment.objects.count() == 2 and "duplicate" in Callback.objects.order_by("-id").first().outcome


@pytest.mark.django_db
@pytest.mark.parametrize("amount", ["1.00", "99.00", "100.01", "1000.00"])
def test_a_different_amount_is_not_credited_but_kept_for_staff(client, pending, amount):
    post(client, stk_success_for(pending, amount=amount))
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.PROCESSED and "differs from the KES 100.00 requested" in callback.outcome
    assert LedgerEntry.objects.count() == 0 and Payment.objects.get(pk=pending.pk).status == PaymentStatus.PENDING
    kept = Payment.objects.exclude(pk=pending.pk).get()
    assert kept.status == PaymentStatus.NEEDS_REVIEW and kept.amount_kes == Decimal(amount) and kept.meter == pending.meter


@pytest.mark.django_db
def test_a_receipt_already_used_by_another_payment_is_refused(client, fake_daraja, alice_meter, bob_meter):
    first = services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes=100)
    second = services.stk_push_start(user=bob_meter.owner.user, meter_no="METER-B1", phone="0712345678", amount_kes=100)
    post(client, stk_success_for(first))
    post(client, stk_success_for(second))  # a replayed receipt, re-addressed
    assert Payment.objects.get(pk=second.pk).status == PaymentStatus.PENDING
    assert "already belongs to another payment" in Callback.objects.order_by("-id").first().error
    assert meter_balance_get(meter_no="METER-B1") == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"Body": {}}',
        '{"Body": {"stkCallback": {"CheckoutRequestID": 5, "ResultCode": 0}}}',
        '{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_x", "ResultCode": null}}}',
    ],
)
def test_garbage_is_stored_raw_and_marked_failed_with_its_error(client, pending, body):
    assert post(client, body).status_code == 200
    callback = Callback.objects.get()
    assert callback.body == body and callback.status == CallbackStatus.FAILED
    assert callback.error.startswith("unreadable body")
    assert LedgerEntry.objects.count() == 0


@pytest.mark.django_db
def test_a_success_without_a_receipt_is_refused(client, pending):
    body = json.loads(stk_success_for(pending))
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"] = [{"Name": "Amount", "Value": 100}]
    post(client, json.dumps(body))
    assert Callback.objects.get().status == CallbackStatus.REFUSED and LedgerEntry.objects.count() == 0


@pytest.mark.django_db
def test_get_is_not_allowed(client, pending):
    assert client.get(URL).status_code == 405 and Callback.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "forwarded, allowed",
    [
        ("196.201.214.200", True),
        ("10.9.8.7, 196.201.214.200", True),       # the proxy appended Safaricom's address
        ("196.201.214.200, 10.9.8.7", False),      # a spoofed leftmost entry is ignored
        ("", False),
        ("not-an-ip", False),
    ],
)
def test_the_ip_allowlist_reads_the_trusted_proxy_hop_only(client, pending, settings, forwarded, allowed):
    settings.MPESA_CALLBACK_ALLOWED_IPS = ["196.201.214.200", "196.201.213.114"]
    settings.TRUSTED_PROXY_HOPS = 1
    response = post(client, stk_success_for(pending), HTTP_X_FORWARDED_FOR=forwarded)
    assert response.status_code == (200 if allowed else 403)
    assert LedgerEntry.objects.count() == (1 if allowed else 0)
    if allowed:
        assert Callback.objects.get().remote_addr == "196.201.214.200"


@pytest.mark.django_db
def test_without_proxies_the_socket_address_is_checked(client, pending, settings):
    settings.MPESA_CALLBACK_ALLOWED_IPS = ["196.201.214.200"]
    response = post(client, stk_success_for(pending), HTTP_X_FORWARDED_FOR="196.201.214.200")
    assert response.status_code == 403 and Callback.objects.count() == 0
