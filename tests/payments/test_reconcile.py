"""Reconciliation: pushes whose callback never came are resolved by STK query against the fake
Daraja, with back-off; "being processed" stays pending; unresolved ones go to staff review; a
query never downgrades a success. Plus the staff resolutions and their audit trail."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from core.errors import Conflict, InvalidInput, NotFound
from meters.models import LedgerEntry, MeterCommand
from meters.selectors import meter_balance_get
from payments import daraja, services
from payments.models import Payment, PaymentAudit, PaymentStatus
from payments.tasks import reconcile_pending_payments
from tests.payments.fixtures import stk_success_for

STK_CALLBACK = "/payments/callbacks/stk/test-callback-secret-0123456789abcdef/"

pytestmark = pytest.mark.django_db


@pytest.fixture
def push(fake_daraja, alice_meter, monkeypatch):
    """Start a push whose fake outcome is `outcome`, already due for its first query."""
    monkeypatch.setattr(services, "QUERY_FIRST_AFTER_S", 0)

    def start(outcome: str, amount="100"):
        fake_daraja.next(outcome, delay=0)
        return services.stk_push_start(user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes=amount)

    return start


def test_a_missing_success_callback_is_resolved_by_query(push, fake_daraja):
    payment = push("never")
    counts = reconcile_pending_payments()
    assert counts == {"queried": 1, "settled": 1, "to_review": 0}
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and payment.units_kwh == Decimal("4") and payment.query_attempts == 1
    assert LedgerEntry.objects.get().idempotency_key == f"mpesa:checkout:{payment.checkout_request_id}"
    assert payment.paid_via == "query"
    assert payment.command == MeterCommand.objects.get() and payment.mpesa_receipt is None
    # The callback that finally arrives records the receipt and credits nothing more.
    Client().post(STK_CALLBACK, data=stk_success_for(payment),
                  content_type="application/json")
    payment.refresh_from_db()
    assert payment.mpesa_receipt == "NLJ7RT61SV" and LedgerEntry.objects.count() == 1
    assert meter_balance_get(meter_no="METER-A1") == Decimal("4")


@pytest.mark.parametrize("outcome, status", [("cancelled", "cancelled"), ("timeout", "timed_out"), ("insufficient", "failed")])
def test_failed_pushes_are_closed_by_query_and_credit_nothing(push, outcome, status):
    payment = push(outcome)
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == status and LedgerEntry.objects.count() == 0 and payment.resolved_at is not None


def test_being_processed_stays_pending_with_back_off_then_goes_to_review(push, monkeypatch):
    monkeypatch.setattr(services, "QUERY_MAX_ATTEMPTS", 3)
    payment = push("processing")
    gaps = []
    for _ in range(2):
        assert services.payments_reconcile()["queried"] == 1
        payment.refresh_from_db()
        assert payment.status == PaymentStatus.PENDING
        gaps.append(payment.next_query_at - timezone.now())
        # Not due yet: a second run right away leaves it alone.
        assert services.payments_reconcile()["queried"] == 0
        Payment.objects.filter(pk=payment.pk).update(next_query_at=timezone.now())
    assert gaps[1] > gaps[0] > timedelta(0)  # back-off grows
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.NEEDS_REVIEW and payment.query_attempts == 3 and payment.next_query_at is None
    audit = PaymentAudit.objects.get()
    assert audit.actor_name == "reconciliation" and audit.to_status == PaymentStatus.NEEDS_REVIEW
    assert LedgerEntry.objects.count() == 0
    # The meter is free for another push once the first is out of "pending".
    assert services.stk_push_start(user=payment.initiated_by, meter_no="METER-A1", phone="0712345678", amount_kes=5)


def test_daraja_errors_count_as_attempts_and_keep_the_payment_pending(push, fake_daraja):
    payment = push("never")
    fake_daraja.control("fail", endpoint="stkquery", status=503)
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.PENDING and payment.query_attempts == 1 and "non-JSON" in payment.last_query_error


def test_a_query_never_downgrades_a_success_confirmed_by_callback(push, monkeypatch):
    """The callback lands while the query is in flight: the query's "cancelled" is ignored."""
    payment = push("cancelled")
    real_query = daraja.stk_query

    def query_racing_a_callback(**kwargs):
        answer = real_query(**kwargs)
        Client().post(STK_CALLBACK, data=stk_success_for(payment),
                      content_type="application/json")
        return answer

    monkeypatch.setattr(daraja, "stk_query", query_racing_a_callback)
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and LedgerEntry.objects.count() == 1


def test_settled_payments_are_not_queried(push, fake_daraja):
    payment = push("hold")
    Client().post(STK_CALLBACK, data=stk_success_for(payment), content_type="application/json")
    assert services.payment_query(payment_id=payment.pk).status == PaymentStatus.SUCCEEDED
    assert services.payments_reconcile()["queried"] == 0 and fake_daraja.state()["counts"]["stkquery"] == 0


def test_a_push_that_never_got_a_checkout_id_goes_to_review(push, fake_daraja):
    payment = push("hold")
    Payment.objects.filter(pk=payment.pk).update(
        checkout_request_id=None, created_at=timezone.now() - timedelta(seconds=services.CHECKING_REVIEW_AFTER_S + 60)
    )
    assert services.payments_reconcile()["to_review"] == 1
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.NEEDS_REVIEW and "never answered the push request" in payment.staff_note


def test_a_late_success_callback_credits_a_payment_in_review(push, monkeypatch):
    monkeypatch.setattr(services, "QUERY_MAX_ATTEMPTS", 1)
    payment = push("processing")
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.NEEDS_REVIEW
    Client().post(STK_CALLBACK, data=stk_success_for(payment), content_type="application/json")
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED and meter_balance_get(meter_no="METER-A1") == Decimal("4")


# ---- staff ---------------------------------------------------------------------------------


@pytest.fixture
def in_review(push, monkeypatch):
    monkeypatch.setattr(services, "QUERY_MAX_ATTEMPTS", 1)
    payment = push("processing")
    services.payments_reconcile()
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.NEEDS_REVIEW
    return payment


def test_staff_query_now_is_audited(in_review, staff_user):
    services.payment_query(payment_id=in_review.pk, actor=staff_user)
    audit = PaymentAudit.objects.filter(action="query").get()
    assert audit.actor == staff_user and audit.note == "still being processed"


def test_staff_credit_resolves_once_with_an_audit_row(in_review, staff_user):
    payment = services.payment_resolve_credit(payment_id=in_review.pk, actor=staff_user, note="Seen in M-Pesa portal",
                                              receipt="QWE123RTY9")
    assert payment.status == PaymentStatus.SUCCEEDED and payment.mpesa_receipt == "QWE123RTY9"
    assert LedgerEntry.objects.get().idempotency_key == "mpesa:QWE123RTY9" and LedgerEntry.objects.get().actor == "sam"
    assert MeterCommand.objects.count() == 1 and meter_balance_get(meter_no="METER-A1") == Decimal("4")
    audit = PaymentAudit.objects.get(action="credit")
    assert audit.actor == staff_user and audit.from_status == "needs_review" and audit.to_status == "succeeded"
    with pytest.raises(Conflict):
        services.payment_resolve_credit(payment_id=in_review.pk, actor=staff_user, note="again")
    assert LedgerEntry.objects.count() == 1


def test_staff_close_credits_nothing(in_review, staff_user):
    payment = services.payment_resolve_close(payment_id=in_review.pk, actor=staff_user, note="Customer never paid")
    assert payment.status == PaymentStatus.FAILED and "Customer never paid" in payment.staff_note
    assert PaymentAudit.objects.get(action="close").note == "Customer never paid" and LedgerEntry.objects.count() == 0


def test_resolution_needs_staff_a_note_and_a_payment_in_review(in_review, staff_user, alice):
    with pytest.raises(NotFound):
        services.payment_resolve_credit(payment_id=in_review.pk, actor=alice.user, note="please")
    with pytest.raises(InvalidInput):
        services.payment_resolve_close(payment_id=in_review.pk, actor=staff_user, note="  ")
    with pytest.raises(InvalidInput):
        services.payment_resolve_credit(payment_id=in_review.pk, actor=staff_user, note="x", receipt="bad receipt!")
    with pytest.raises(NotFound):
        services.payment_resolve_close(payment_id=999999, actor=staff_user, note="x")
    assert Payment.objects.get().status == PaymentStatus.NEEDS_REVIEW and LedgerEntry.objects.count() == 0
