"""One receipt, one credit, whichever route brings the money first; unknown is a state; nothing
stays `received` (issue 10, findings 1, 2 and 5). Reference payloads of daraja.md, re-addressed.

Routes: the STK callback (MpesaReceiptNumber), the STK push query (no receipt), the C2B
confirmation (TransID = the receipt, BillRefNumber = the meter).
"""

import json
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.test import Client
from django.utils import timezone

from meters.models import LedgerEntry
from meters.selectors import meter_balance_get
from payments import services
from payments.models import Callback, CallbackStatus, Payment, PaymentStatus
from tests.conftest import PASSWORD
from tests.payments.fixtures import STK_SUCCESS, c2b_request, stk_success_for

STK = "/payments/callbacks/stk/test-callback-secret-0123456789abcdef/"
CONFIRMATION = "/payments/callbacks/c2b/confirmation/test-callback-secret-0123456789abcdef/"
RECEIPT = "NLJ7RT61SV"

pytestmark = pytest.mark.django_db


def stk(body: str, client=None):
    return (client or Client()).post(STK, data=body, content_type="application/json")


def confirm(*, receipt=RECEIPT, amount="100.00", bill_ref="METER-A1", client=None):
    return (client or Client()).post(CONFIRMATION, data=c2b_request(trans_id=receipt, amount=amount, bill_ref=bill_ref),
                                     content_type="application/json")


def credited() -> Decimal:
    return meter_balance_get(meter_no="METER-A1")


@pytest.fixture
def push(fake_daraja, alice_meter, monkeypatch):
    monkeypatch.setattr(services, "QUERY_FIRST_AFTER_S", 0)

    def start(outcome="hold", amount="100", **plan):
        fake_daraja.control("next", outcome=outcome, delay=0, **plan)
        return services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678",
                                       amount_kes=amount)

    return start


# ---- finding 1: one payment, several routes ---------------------------------------------------


def test_confirmation_first_then_the_stk_callback_credits_once(push):
    payment = push()
    confirm()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.paid_via == "c2b" and payment.mpesa_receipt == RECEIPT
    stk(stk_success_for(payment))
    assert credited() == Decimal("4") and LedgerEntry.objects.count() == 1
    assert Payment.objects.count() == 1
    assert "duplicate" in Callback.objects.order_by("-id").first().outcome


def test_stk_callback_first_then_the_confirmation_credits_once(push):
    payment = push()
    stk(stk_success_for(payment))
    confirm()
    assert credited() == Decimal("4") and LedgerEntry.objects.count() == 1 and Payment.objects.count() == 1


def test_a_query_credit_is_completed_by_the_confirmation_never_repeated(push):
    """The finding as reproduced: query first (no receipt), then the C2B confirmation: 8 kWh."""
    payment = push(outcome="never")
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.paid_via == "query" and payment.mpesa_receipt is None
    confirm()
    payment.refresh_from_db()
    assert payment.mpesa_receipt == RECEIPT and payment.c2b_trans_id == RECEIPT
    stk(stk_success_for(payment))  # and the callback, hours late
    assert credited() == Decimal("4") and LedgerEntry.objects.count() == 1 and Payment.objects.count() == 1


def test_confirmation_then_query_credits_once(push):
    payment = push(outcome="never")
    confirm()
    assert services.payments_reconcile()["queried"] == 0  # settled: no query
    services.payment_query(payment_id=payment.pk)
    assert credited() == Decimal("4") and LedgerEntry.objects.count() == 1


def test_a_confirmation_hours_later_still_finds_its_push(push):
    payment = push(outcome="never")
    services.payments_reconcile()
    Payment.objects.filter(pk=payment.pk).update(created_at=timezone.now() - timedelta(hours=5))
    confirm()
    assert Payment.objects.get(pk=payment.pk).mpesa_receipt == RECEIPT and LedgerEntry.objects.count() == 1


def test_a_confirmation_that_could_be_one_of_two_pushes_goes_to_staff(push, fake_daraja, alice_meter):
    first = push(outcome="never")
    services.payments_reconcile()  # credited by query, no receipt
    Payment.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    second = push(outcome="never")
    services.payments_reconcile()
    confirm()
    assert credited() == Decimal("8") and LedgerEntry.objects.count() == 2  # the two queries, nothing more
    kept = Payment.objects.get(c2b_trans_id=RECEIPT)
    assert kept.status == PaymentStatus.NEEDS_REVIEW and str(first.pk) in kept.review_reason
    assert str(second.pk) in kept.review_reason
    # One action: staff say which push it is; the receipt moves there, nothing is credited again.
    staff = alice_meter.owner.user.__class__.objects.create_user("cashier", password=PASSWORD, is_staff=True)
    services.payment_resolve_same_money(payment_id=kept.pk, actor=staff, note="Seen in the portal", same_as_id=second.pk)
    kept.refresh_from_db()
    assert kept.status == PaymentStatus.SUCCEEDED and kept.same_money_as_id == second.pk
    assert Payment.objects.get(pk=second.pk).mpesa_receipt == RECEIPT and LedgerEntry.objects.count() == 2


def test_a_plain_paybill_payment_is_credited_and_a_push_for_another_amount_is_not_touched(push):
    payment = push()
    confirm(receipt="RKL51ZDR4F", amount="50.00")
    assert credited() == Decimal("2") and Payment.objects.get(pk=payment.pk).status == PaymentStatus.PENDING


@pytest.mark.django_db(transaction=True)
def test_callback_query_and_confirmation_at_once_credit_once(postgres, push, monkeypatch):
    payment = push(outcome="never")
    barrier = threading.Barrier(3)

    def route(which):
        try:
            barrier.wait(timeout=30)
            if which == "stk":
                stk(stk_success_for(payment))
            elif which == "c2b":
                confirm()
            else:
                services.payment_query(payment_id=payment.pk)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=route, args=(which,)) for which in ("stk", "c2b", "query")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert credited() == Decimal("4") and LedgerEntry.objects.count() == 1
    assert Payment.objects.get(pk=payment.pk).mpesa_receipt == RECEIPT


# ---- finding 2: unknown is a state ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_push_whose_answer_was_lost_is_settled_by_its_callback_matched_by_phone_amount_time(
    push, fake_daraja, live_server, settings, monkeypatch
):
    # The fake calls back the live server; its request threads must not keep connections open.
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    settings.MPESA_CALLBACK_BASE_URL = live_server.url
    payment = push(answer="drop")
    assert payment.status == PaymentStatus.CHECKING and payment.checkout_request_id is None
    checkout = next(iter(fake_daraja.state()["transactions"]))
    fake_daraja.control("deliver", CheckoutRequestID=checkout)
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.checkout_request_id == checkout
    assert payment.paid_via == "callback" and credited() == Decimal("4")


def test_a_checking_push_is_settled_by_the_confirmation_of_its_money(push):
    payment = push(answer="503")
    confirm()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.paid_via == "c2b" and credited() == Decimal("4")


def test_a_checking_push_nobody_settles_reaches_staff_and_stays_matchable(push):
    payment = push(answer="drop")
    Payment.objects.filter(pk=payment.pk).update(
        created_at=timezone.now() - timedelta(seconds=services.CHECKING_REVIEW_AFTER_S + 1))
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.NEEDS_REVIEW and "may have paid" in payment.review_reason
    confirm()  # the money shows up after all
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and credited() == Decimal("4")


def test_an_unmatched_success_is_kept_and_staff_credit_it_in_one_action(push, alice_meter, django_user_model):
    stk(STK_SUCCESS)  # names a CheckoutRequestID we never issued
    kept = Payment.objects.get(mpesa_receipt=RECEIPT)
    assert kept.status == PaymentStatus.NEEDS_REVIEW and kept.meter is None
    staff = django_user_model.objects.create_user("cashier", password=PASSWORD, is_staff=True)
    services.payment_resolve_credit(payment_id=kept.pk, actor=staff, note="Customer called", meter_no="METER-A1")
    kept.refresh_from_db()
    assert kept.status == PaymentStatus.SUCCEEDED and kept.paid_via == "staff" and credited() == Decimal("0.04")
    assert LedgerEntry.objects.get().idempotency_key == f"mpesa:{RECEIPT}"
    # The same money later by another route finds the receipt: no second credit.
    confirm(amount="1.00")
    assert LedgerEntry.objects.count() == 1


# ---- finding 5: nothing stays `received` --------------------------------------------------------


def test_a_confirmation_left_received_is_processed_by_the_sweeper(alice_meter, monkeypatch):
    callback = services.callback_record(kind="c2b_confirmation", body=c2b_request(bill_ref="METER-A1").encode(),
                                        remote_addr="127.0.0.1")  # the process died here
    assert services.callbacks_sweep() == 0  # too young: the request may still be being processed
    Callback.objects.filter(pk=callback.pk).update(received_at=timezone.now() - timedelta(minutes=5))
    assert services.callbacks_sweep() == 1
    assert Callback.objects.get(pk=callback.pk).status == CallbackStatus.PROCESSED and credited() == Decimal("0.2")
    assert services.callbacks_sweep() == 0


def test_a_database_error_leaves_the_callback_for_the_sweeper_and_daraja_gets_its_answer(push, monkeypatch):
    payment = push()
    real = services._credit_locked

    def broken(*args, **kwargs):
        from django.db import OperationalError

        raise OperationalError("the database went away")

    monkeypatch.setattr(services, "_credit_locked", broken)
    response = stk(stk_success_for(payment))
    assert response.status_code == 200 and response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.RECEIVED and callback.attempts == 1 and credited() == 0
    monkeypatch.setattr(services, "_credit_locked", real)
    Callback.objects.filter(pk=callback.pk).update(received_at=timezone.now() - timedelta(minutes=5))
    services.callbacks_sweep()
    assert Callback.objects.get().status == CallbackStatus.PROCESSED and credited() == Decimal("4")


def test_a_body_nested_thirty_thousand_levels_is_refused_cleanly(client, push):
    body = "[" * 30000 + "]" * 30000
    response = stk(body, client)
    assert response.status_code == 200
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.FAILED and "levels deep" in callback.error


def test_a_poison_callback_is_marked_failed_after_its_attempts(push, monkeypatch):
    payment = push()
    monkeypatch.setattr(services, "_apply_stk_result_locked", lambda *a: (_ for _ in ()).throw(RuntimeError("bug")))
    stk(stk_success_for(payment))
    for _ in range(services.CALLBACK_MAX_ATTEMPTS):
        Callback.objects.update(received_at=timezone.now() - timedelta(minutes=5))
        services.callbacks_sweep()
    callback = Callback.objects.get()
    assert callback.status == CallbackStatus.FAILED and "RuntimeError: bug" in callback.error
    assert callback.attempts == services.CALLBACK_MAX_ATTEMPTS and json.loads(callback.reply)["ResultCode"] == 0
