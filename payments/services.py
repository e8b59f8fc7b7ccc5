"""Every change to a payment goes through here: STK push, callbacks, Paybill, reconciliation, staff.

Exactly once. A payment changes state only under its row lock (`SELECT … FOR UPDATE`) and only
from `pending` (or `needs_review`, which staff or late evidence resolve) to a terminal state; the
credit, the balance command and the new state are written in one transaction. Duplicate,
concurrent or replayed callbacks therefore find the payment already settled and credit nothing.
Behind that, the ledger's unique idempotency key (`mpesa:<receipt>`) and the unique receipt,
CheckoutRequestID and TransID columns make a double credit impossible to persist.

Lock order is payment row, then meter row (the ledger locks the meter), everywhere.
Daraja is called outside any transaction: a slow gateway never holds a row lock.
"""

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from django.conf import settings
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from core.errors import Conflict, DomainError, InvalidInput, NotFound
from core.rules import IDEMPOTENCY_KEY_HELP, KES_QUANTUM, MPESA_ID, valid_idempotency_key
from meters.models import Meter
from meters.phone import normalize_phone
from meters.selectors import meter_for_account_reference, meter_get_for_user, tariff_rate_in_effect
from meters.services import ledger_credit_purchase, meter_lock, units_for_amount
from payments import daraja
from payments.errors import MpesaRefused, MpesaUnavailable
from payments.models import (
    Callback,
    CallbackKind,
    CallbackStatus,
    Payment,
    PaymentAudit,
    PaymentChannel,
    PaymentStatus,
)

logger = logging.getLogger(__name__)

# Reconciliation (tunable through settings of the same name). A push is first queried after
# ~90 s (the customer has had time to enter the PIN), then with growing gaps; after the last
# attempt an unresolved payment goes to staff review.
QUERY_FIRST_AFTER_S = getattr(settings, "MPESA_QUERY_FIRST_AFTER_S", 90)
QUERY_BACKOFF_S = tuple(getattr(settings, "MPESA_QUERY_BACKOFF_S", (30, 60, 120, 300, 600)))
QUERY_MAX_ATTEMPTS = getattr(settings, "MPESA_QUERY_MAX_ATTEMPTS", 6)
# While one process queries a payment, others leave it alone for this long.
QUERY_LEASE_S = 60
# A push that never got a CheckoutRequestID (the process died while Daraja was answering).
UNACKNOWLEDGED_PUSH_REVIEW_AFTER_S = 300
MAX_CALLBACK_BYTES = 64 * 1024

TERMINAL = {PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CANCELLED, PaymentStatus.TIMED_OUT}
# States evidence may still settle: pending, and needs_review (a late callback or staff query).
OPEN = {PaymentStatus.PENDING, PaymentStatus.NEEDS_REVIEW}


def status_for_result_code(result_code: str) -> str:
    """Daraja ResultCode → our terminal status (1032 cancelled; 1037/1019 timed out; else failed)."""
    if result_code == "0":
        return PaymentStatus.SUCCEEDED
    if result_code == "1032":
        return PaymentStatus.CANCELLED
    if result_code in ("1037", "1019"):
        return PaymentStatus.TIMED_OUT
    return PaymentStatus.FAILED


# ---- amounts ---------------------------------------------------------------------------------


def _whole_shillings(value) -> Decimal:
    if isinstance(value, bool | float):
        raise InvalidInput("Amount must be a whole number of shillings (an integer or a string)", field="amount_kes")
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        raise InvalidInput(f"Amount is not a number: {value!r}", field="amount_kes") from None
    if not amount.is_finite() or amount != amount.to_integral_value():
        raise InvalidInput("Amount must be a whole number of shillings: M-Pesa takes no cents", field="amount_kes")
    low, high = settings.MPESA_MIN_AMOUNT_KES, settings.MPESA_MAX_AMOUNT_KES
    if not low <= amount <= high:
        raise InvalidInput(f"Amount must be between KES {low} and KES {high}", field="amount_kes")
    return amount.quantize(KES_QUANTUM)


def _c2b_amount(value) -> Decimal | None:
    """A Paybill amount ("5.00"), or None when it is not one we accept."""
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    if not amount.is_finite() or amount != amount.quantize(KES_QUANTUM, rounding=ROUND_DOWN):
        return None
    if not settings.MPESA_MIN_AMOUNT_KES <= amount <= settings.MPESA_MAX_AMOUNT_KES:
        return None
    return amount.quantize(KES_QUANTUM)


# ---- crediting (inside a transaction, payment row locked) ------------------------------------


def _credit_locked(payment: Payment, *, idempotency_key: str, reference: str, actor: str) -> str:
    """Credit the payment's meter (priced, posted and sent to the meter by one meters service
    call under the meter's lock). The caller holds the payment lock."""
    purchase = ledger_credit_purchase(
        meter_no=payment.meter.meter_no, amount_kes=payment.amount_kes, idempotency_key=idempotency_key,
        actor=actor, reference=f"M-Pesa {reference}",
    )
    now = timezone.now()
    payment.status = PaymentStatus.SUCCEEDED
    payment.units_kwh = purchase.units_kwh
    payment.kes_per_kwh = purchase.kes_per_kwh
    payment.remainder_kes = purchase.remainder_kes
    payment.ledger_entry = purchase.posting.entry
    payment.command = purchase.posting.command
    payment.resolved_at = now
    payment.updated_at = now
    payment.next_query_at = None
    payment.save()
    return f"credited {purchase.units_kwh} kWh to {payment.meter.meter_no}"


def _settle_failure_locked(payment: Payment, *, result_code: str, result_desc: str) -> str:
    now = timezone.now()
    payment.status = status_for_result_code(result_code)
    payment.result_code = result_code[:16]
    payment.result_desc = result_desc[:255]
    payment.resolved_at = now
    payment.updated_at = now
    payment.next_query_at = None
    payment.save()
    return f"{payment.status} ({result_code})"


def _to_review_locked(payment: Payment, *, actor_name: str, note: str, actor=None) -> None:
    old = payment.status
    payment.status = PaymentStatus.NEEDS_REVIEW
    payment.next_query_at = None
    payment.updated_at = timezone.now()
    payment.staff_note = (payment.staff_note + "\n" if payment.staff_note else "") + note
    payment.save()
    PaymentAudit.objects.create(
        payment=payment, actor=actor, actor_name=actor_name, action="to_review", from_status=old,
        to_status=PaymentStatus.NEEDS_REVIEW, note=note,
    )
    logger.warning("Payment %s needs review: %s", payment.pk, note)


# ---- STK push ---------------------------------------------------------------------------------


def stk_callback_url() -> str:
    path = reverse("payments:stk-callback", kwargs={"secret": settings.MPESA_CALLBACK_SECRET})
    return f"{settings.MPESA_CALLBACK_BASE_URL}{path}"


def _same_request(payment: Payment, *, meter: Meter, amount: Decimal) -> Payment:
    if payment.meter_id != meter.pk or payment.amount_kes != amount:
        raise Conflict("This idempotency key was already used for a different payment", field="idempotency_key")
    return payment


def stk_push_start(*, user, meter_no: str, phone: str, amount_kes, idempotency_key: str | None = None) -> Payment:
    """Ask M-Pesa to prompt `phone` to pay `amount_kes` for `meter_no`. Returns the pending payment.

    The same user retrying with the same idempotency key gets the first payment back; a second
    push for a meter while one is pending is a Conflict. Daraja is called outside any
    transaction; if it fails, the payment is marked failed and MpesaUnavailable/MpesaRefused is raised.
    """
    meter = meter_get_for_user(user=user, meter_no=meter_no)
    phone_number = normalize_phone(phone)
    amount = _whole_shillings(amount_kes)
    units, _ = units_for_amount(amount_kes=amount, kes_per_kwh=tariff_rate_in_effect(tariff=meter.tariff))
    if units <= 0:
        raise InvalidInput(f"KES {amount} buys no units at this meter's tariff", field="amount_kes")
    if idempotency_key is not None and not valid_idempotency_key(idempotency_key):
        raise InvalidInput(f"Idempotency key: {IDEMPOTENCY_KEY_HELP}", field="idempotency_key")
    if idempotency_key:
        existing = Payment.objects.filter(initiated_by=user, client_idempotency_key=idempotency_key).first()
        if existing is not None:
            return _same_request(existing, meter=meter, amount=amount)
    try:
        with transaction.atomic():
            payment = Payment.objects.create(
                meter=meter,
                initiated_by=user,
                channel=PaymentChannel.STK,
                amount_kes=amount,
                phone=phone_number,
                client_idempotency_key=idempotency_key or None,
            )
    except IntegrityError:
        # Either a concurrent retry with the same key won the race, or a push is pending.
        if idempotency_key:
            existing = Payment.objects.filter(initiated_by=user, client_idempotency_key=idempotency_key).first()
            if existing is not None:
                return _same_request(existing, meter=meter, amount=amount)
        raise Conflict(
            f"A payment for {meter.meter_no} is already waiting for the customer's M-Pesa PIN; try again when it completes",
            field="meter_no",
            code="payment_pending",
        ) from None

    try:
        accepted = daraja.stk_push(
            phone=phone_number,
            amount_kes=int(amount),
            account_reference=meter.meter_no,
            description="Electricity",
            callback_url=stk_callback_url(),
        )
    except daraja.DarajaError as error:
        now = timezone.now()
        Payment.objects.filter(pk=payment.pk, status=PaymentStatus.PENDING).update(
            status=PaymentStatus.FAILED, result_code=error.error_code[:16], result_desc=error.message[:255],
            resolved_at=now, updated_at=now,
        )
        logger.warning("STK push for payment %s failed: %s", payment.pk, error.message)
        if error.transient:
            raise MpesaUnavailable(f"M-Pesa is not available right now ({error.message}); nothing was charged") from None
        raise MpesaRefused(f"M-Pesa refused the payment request: {error.message}") from None

    now = timezone.now()
    Payment.objects.filter(pk=payment.pk).update(
        checkout_request_id=accepted.checkout_request_id,
        merchant_request_id=accepted.merchant_request_id[:64],
        result_desc=accepted.customer_message[:255],
        next_query_at=now + timedelta(seconds=QUERY_FIRST_AFTER_S),
        updated_at=now,
    )
    payment.refresh_from_db()
    return payment


# ---- callbacks: stored raw first, then processed --------------------------------------------


def callback_record(*, kind: str, body: bytes, remote_addr: str | None) -> Callback:
    """Store a callback exactly as received, committed before any processing."""
    if kind not in CallbackKind.values:
        raise InvalidInput(f"Unknown callback kind {kind!r}", field="kind")
    text = body[:MAX_CALLBACK_BYTES].decode("utf-8", errors="replace")
    return Callback.objects.create(kind=kind, body=text, remote_addr=remote_addr)


def _callback_done(callback: Callback, status: str, *, outcome: str = "", error: str = "", reply: dict | None = None,
            payment: Payment | None = None) -> None:
    if status == CallbackStatus.REFUSED:
        logger.warning("%s callback %s refused: %s", callback.kind, callback.pk, error)
    Callback.objects.filter(pk=callback.pk).update(
        status=status, outcome=outcome[:255], error=error[:500], processed_at=timezone.now(),
        reply=json.dumps(reply)[:255] if reply is not None else "", payment=payment,
    )


@dataclass(frozen=True)
class StkResult:
    checkout_request_id: str
    result_code: str
    result_desc: str
    amount_kes: Decimal | None = None
    receipt: str | None = None


def parse_stk_callback(body: str) -> StkResult:
    """Read an STK callback; items by Name (never position); an item may lack Value."""
    data = json.loads(body, parse_float=Decimal)
    callback = data["Body"]["stkCallback"]
    checkout = callback["CheckoutRequestID"]
    if not isinstance(checkout, str) or not checkout:
        raise ValueError("CheckoutRequestID missing")
    code = callback["ResultCode"]  # a number or a string, depending on the day
    if isinstance(code, bool) or not isinstance(code, int | str | Decimal):
        raise ValueError("ResultCode is not a number")
    items = (callback.get("CallbackMetadata") or {}).get("Item") or []
    values = {item["Name"]: item.get("Value") for item in items if isinstance(item, dict) and "Name" in item}
    amount = values.get("Amount")
    receipt = values.get("MpesaReceiptNumber")
    return StkResult(
        checkout_request_id=checkout,
        result_code=str(code).strip(),
        result_desc=str(callback.get("ResultDesc", "")),
        amount_kes=Decimal(str(amount)) if isinstance(amount, int | Decimal) and not isinstance(amount, bool) else None,
        receipt=str(receipt) if isinstance(receipt, str) and MPESA_ID.match(receipt) else None,
    )


class _Refused(Exception):
    pass


def _apply_stk_result_locked(payment: Payment, result: StkResult) -> str:
    """Settle a locked payment from a callback. Returns what happened; raises _Refused."""
    if result.result_code != "0":
        if payment.status in OPEN:
            return _settle_failure_locked(payment, result_code=result.result_code, result_desc=result.result_desc)
        if payment.status == PaymentStatus.SUCCEEDED:
            raise _Refused(f"failure {result.result_code} after a confirmed success: a success is never downgraded")
        return f"duplicate: already {payment.status}"

    if result.amount_kes is None or result.receipt is None:
        raise _Refused("success callback without Amount or MpesaReceiptNumber")
    if result.amount_kes != payment.amount_kes:
        raise _Refused(f"amount {result.amount_kes} differs from the KES {payment.amount_kes} requested")
    if Payment.objects.filter(mpesa_receipt=result.receipt).exclude(pk=payment.pk).exists():
        raise _Refused(f"receipt {result.receipt} already belongs to another payment")
    if payment.status == PaymentStatus.SUCCEEDED:
        if payment.mpesa_receipt == result.receipt:
            return "duplicate: already credited"
        if payment.mpesa_receipt is None:  # credited earlier on a query result, which has no receipt
            payment.mpesa_receipt = result.receipt
            payment.save(update_fields=["mpesa_receipt"])
            return "receipt recorded (credited earlier from an STK query)"
        raise _Refused(f"receipt {result.receipt} differs from {payment.mpesa_receipt} already credited")
    payment.mpesa_receipt = result.receipt
    payment.result_code = "0"
    payment.result_desc = result.result_desc[:255]
    if payment.status in OPEN:
        return _credit_locked(payment, idempotency_key=f"mpesa:{result.receipt}", reference=result.receipt, actor="mpesa")
    # Money was taken after we had closed the payment (a query said otherwise): staff decide.
    _to_review_locked(
        payment, actor_name="mpesa",
        note=f"Success callback (receipt {result.receipt}) after the payment was {payment.status}; not credited",
    )
    return "success after a failure: sent to staff review"


def stk_callback_process(*, callback_id: int) -> None:
    """Process a stored STK callback. Never raises for bad input: the callback row says why."""
    callback = Callback.objects.get(pk=callback_id)
    try:
        result = parse_stk_callback(callback.body)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        _callback_done(callback, CallbackStatus.REFUSED, error=f"not an STK callback: {error.__class__.__name__} {error}")
        return
    try:
        with transaction.atomic():
            payment = Payment.objects.select_for_update().filter(checkout_request_id=result.checkout_request_id).first()
            if payment is None or payment.channel != PaymentChannel.STK:
                _callback_done(callback, CallbackStatus.REFUSED, error=f"unknown CheckoutRequestID {result.checkout_request_id}")
                return
            try:
                outcome = _apply_stk_result_locked(payment, result)
            except _Refused as refusal:
                _callback_done(callback, CallbackStatus.REFUSED, error=str(refusal), payment=payment)
                return
            _callback_done(callback, CallbackStatus.PROCESSED, outcome=outcome, payment=payment)
    except (DomainError, IntegrityError) as error:
        _callback_done(callback, CallbackStatus.FAILED, error=f"{error.__class__.__name__}: {error}")
        logger.exception("STK callback %s failed", callback.pk)


# ---- Paybill (C2B) ---------------------------------------------------------------------------

C2B_ACCEPT = {"ResultCode": "0", "ResultDesc": "Accepted"}
C2B_INVALID_ACCOUNT = {"ResultCode": "C2B00012", "ResultDesc": "Rejected"}
C2B_INVALID_AMOUNT = {"ResultCode": "C2B00013", "ResultDesc": "Rejected"}
C2B_OTHER = {"ResultCode": "C2B00016", "ResultDesc": "Rejected"}
C2B_CONFIRMED = {"ResultCode": 0, "ResultDesc": "Success"}


def _c2b_fields(body: str) -> dict:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    return {key: str(data.get(key, "") or "") for key in ("TransID", "TransAmount", "BillRefNumber", "MSISDN")}


def c2b_validate(*, callback_id: int) -> dict:
    """Decide a Paybill validation request (Daraja waits ~8 s). Returns the reply for Daraja."""
    callback = Callback.objects.get(pk=callback_id)
    try:
        fields = _c2b_fields(callback.body)
    except ValueError as error:
        _callback_done(callback, CallbackStatus.REFUSED, error=f"not a C2B request: {error}", reply=C2B_OTHER)
        return C2B_OTHER
    meter = meter_for_account_reference(reference=fields["BillRefNumber"])
    if meter is None:
        reply, error = C2B_INVALID_ACCOUNT, f"unknown account number {fields['BillRefNumber']!r}"
    elif _c2b_amount(fields["TransAmount"]) is None:
        reply, error = C2B_INVALID_AMOUNT, f"amount {fields['TransAmount']!r} not accepted"
    else:
        _callback_done(callback, CallbackStatus.PROCESSED, outcome=f"accepted for {meter.meter_no}", reply=C2B_ACCEPT)
        return C2B_ACCEPT
    _callback_done(callback, CallbackStatus.REFUSED, error=error, reply=reply)
    return reply


def c2b_confirm(*, callback_id: int) -> dict:
    """Credit a confirmed Paybill payment to the meter named by BillRefNumber, once per TransID."""
    callback = Callback.objects.get(pk=callback_id)
    try:
        fields = _c2b_fields(callback.body)
    except ValueError as error:
        _callback_done(callback, CallbackStatus.REFUSED, error=f"not a C2B request: {error}", reply=C2B_CONFIRMED)
        return C2B_CONFIRMED
    trans_id, amount = fields["TransID"], _c2b_amount(fields["TransAmount"])
    meter = meter_for_account_reference(reference=fields["BillRefNumber"])
    # Money has arrived even when these fail (validation may be switched off at Safaricom):
    # the refused callback is kept for staff, and Daraja is told it was received.
    if not MPESA_ID.match(trans_id):
        error = f"TransID {trans_id!r} is not an M-Pesa transaction id"
    elif meter is None:
        error = f"unknown account number {fields['BillRefNumber']!r} for TransID {trans_id}: refund or assign by hand"
    elif amount is None:
        error = f"amount {fields['TransAmount']!r} not accepted for TransID {trans_id}"
    else:
        error = ""
    if error:
        logger.error("C2B confirmation %s not credited: %s", callback.pk, error)
        _callback_done(callback, CallbackStatus.REFUSED, error=error, reply=C2B_CONFIRMED)
        return C2B_CONFIRMED
    try:
        phone = normalize_phone(fields["MSISDN"])
    except InvalidInput:
        phone = ""  # masked or hashed: M-Pesa no longer tells us the payer's number
    try:
        with transaction.atomic():
            # The meter lock serialises concurrent copies of one confirmation; the re-check
            # under it sees a copy that committed while we waited.
            meter_lock(meter_no=meter.meter_no)
            existing = Payment.objects.select_for_update().filter(c2b_trans_id=trans_id).first()
            if existing is not None:
                _callback_done(callback, CallbackStatus.PROCESSED, outcome="duplicate: already credited", reply=C2B_CONFIRMED,
                        payment=existing)
                return C2B_CONFIRMED
            payment = Payment.objects.create(
                meter=meter, channel=PaymentChannel.C2B, amount_kes=amount, phone=phone, c2b_trans_id=trans_id,
                mpesa_receipt=trans_id, bill_ref=fields["BillRefNumber"][:64], result_code="0", result_desc="Paybill",
            )
            outcome = _credit_locked(payment, idempotency_key=f"mpesa:{trans_id}", reference=trans_id, actor="mpesa")
            _callback_done(callback, CallbackStatus.PROCESSED, outcome=outcome, reply=C2B_CONFIRMED, payment=payment)
    except (DomainError, IntegrityError) as error:
        _callback_done(callback, CallbackStatus.FAILED, error=f"{error.__class__.__name__}: {error}", reply=C2B_CONFIRMED)
        logger.exception("C2B confirmation %s failed", callback.pk)
    return C2B_CONFIRMED


def c2b_register_urls() -> dict:
    """Tell Daraja where to send Paybill validation and confirmation requests."""
    secret = settings.MPESA_CALLBACK_SECRET
    base = settings.MPESA_CALLBACK_BASE_URL
    try:
        return daraja.c2b_register_urls(
            confirmation_url=base + reverse("payments:c2b-confirmation", kwargs={"secret": secret}),
            validation_url=base + reverse("payments:c2b-validation", kwargs={"secret": secret}),
        )
    except daraja.DarajaError as error:
        if error.transient:
            raise MpesaUnavailable(f"M-Pesa is not available: {error.message}") from None
        raise MpesaRefused(error.message) from None


# ---- reconciliation ------------------------------------------------------------------------


def _next_query_delay(attempts: int) -> timedelta:
    return timedelta(seconds=QUERY_BACKOFF_S[min(attempts - 1, len(QUERY_BACKOFF_S) - 1)])


def payment_query(*, payment_id: int, actor=None) -> Payment:
    """Ask Daraja how an STK push ended and settle the payment from the answer.

    "Being processed" leaves it pending (with back-off); errors count as an attempt; after the
    last attempt it goes to review. A payment already settled (by a callback) is never touched.
    `actor`: the staff member who asked ("query M-Pesa now"), recorded in the audit trail.
    """
    payment = Payment.objects.filter(pk=payment_id).first()
    if payment is None:
        raise NotFound(f"Unknown payment {payment_id}", field="payment_id")
    if payment.channel != PaymentChannel.STK or not payment.checkout_request_id:
        raise InvalidInput("Only STK pushes that M-Pesa accepted (with a CheckoutRequestID) can be queried")
    if payment.status not in OPEN:
        return payment
    result, error = None, ""
    try:
        result = daraja.stk_query(checkout_request_id=payment.checkout_request_id)
    except daraja.DarajaError as failure:
        error = failure.message
    with transaction.atomic():
        payment = Payment.objects.select_for_update().get(pk=payment_id)
        if payment.status not in OPEN:
            return payment  # a callback settled it while we asked: never downgrade
        before = payment.status
        payment.query_attempts += 1
        payment.last_query_error = error[:255]
        payment.updated_at = timezone.now()
        if result is not None and not result.processing:
            if result.result_code == "0":
                payment.result_code, payment.result_desc = "0", result.result_desc[:255]
                outcome = _credit_locked(
                    payment, idempotency_key=f"mpesa:{payment.checkout_request_id}",
                    reference=payment.checkout_request_id, actor="mpesa-query",
                )
            else:
                outcome = _settle_failure_locked(payment, result_code=result.result_code, result_desc=result.result_desc)
        else:
            outcome = error or "still being processed"
            if before == PaymentStatus.PENDING and payment.query_attempts >= QUERY_MAX_ATTEMPTS:
                _to_review_locked(
                    payment, actor_name="reconciliation",
                    note=f"Unresolved after {payment.query_attempts} M-Pesa queries (last: {outcome})",
                )
            else:
                payment.next_query_at = (
                    timezone.now() + _next_query_delay(payment.query_attempts) if before == PaymentStatus.PENDING else None
                )
                payment.save()
        if actor is not None:
            PaymentAudit.objects.create(
                payment=payment, actor=actor, actor_name=actor.get_username(), action="query",
                from_status=before, to_status=payment.status, note=outcome,
            )
    return payment


def payments_reconcile(*, limit: int = 100) -> dict:
    """Query due pending STK pushes; safe to run in several processes at once (rows are claimed)."""
    now = timezone.now()
    counts = {"queried": 0, "settled": 0, "to_review": 0}
    due = Payment.objects.filter(
        channel=PaymentChannel.STK, status=PaymentStatus.PENDING, next_query_at__lte=now
    ).order_by("next_query_at").values_list("pk", "next_query_at")[:limit]
    for pk, when in list(due):
        # Claim: whoever moves next_query_at from the value it read owns this attempt.
        claimed = Payment.objects.filter(pk=pk, status=PaymentStatus.PENDING, next_query_at=when).update(
            next_query_at=now + timedelta(seconds=QUERY_LEASE_S)
        )
        if not claimed:
            continue
        try:
            payment = payment_query(payment_id=pk)
        except DomainError:
            logger.exception("Reconciling payment %s failed", pk)
            continue
        counts["queried"] += 1
        counts["settled"] += payment.status in TERMINAL
        counts["to_review"] += payment.status == PaymentStatus.NEEDS_REVIEW
    stale = Payment.objects.filter(
        channel=PaymentChannel.STK, status=PaymentStatus.PENDING, checkout_request_id__isnull=True,
        created_at__lt=now - timedelta(seconds=UNACKNOWLEDGED_PUSH_REVIEW_AFTER_S),
    ).values_list("pk", flat=True)[:limit]
    for pk in list(stale):
        with transaction.atomic():
            payment = Payment.objects.select_for_update().get(pk=pk)
            if payment.status == PaymentStatus.PENDING and payment.checkout_request_id is None:
                _to_review_locked(
                    payment, actor_name="reconciliation",
                    note="M-Pesa never acknowledged the push (no CheckoutRequestID): the customer may not have been asked",
                )
                counts["to_review"] += 1
    return counts


# ---- staff resolution ------------------------------------------------------------------------


def _staff_payment_locked(*, payment_id: int, actor) -> Payment:
    if actor is None or not getattr(actor, "is_staff", False):
        raise NotFound(f"Unknown payment {payment_id}", field="payment_id")
    payment = Payment.objects.select_for_update().filter(pk=payment_id).first()
    if payment is None:
        raise NotFound(f"Unknown payment {payment_id}", field="payment_id")
    if payment.status != PaymentStatus.NEEDS_REVIEW:
        raise Conflict(f"Payment {payment_id} is {payment.status}; only payments needing review can be resolved")
    return payment


def _note_required(note) -> str:
    if not isinstance(note, str) or not note.strip():
        raise InvalidInput("A resolution needs a note saying why", field="note")
    return note.strip()


def payment_resolve_credit(*, payment_id: int, actor, note: str, receipt: str | None = None) -> Payment:
    """Staff: the money was received (e.g. seen in the M-Pesa portal); credit the meter once."""
    note = _note_required(note)
    if receipt is not None and receipt != "" and not MPESA_ID.match(receipt):
        raise InvalidInput("Receipt: 1-32 letters or digits", field="receipt")
    with transaction.atomic():
        payment = _staff_payment_locked(payment_id=payment_id, actor=actor)
        if receipt:
            if Payment.objects.filter(mpesa_receipt=receipt).exclude(pk=payment.pk).exists():
                raise Conflict(f"Receipt {receipt} already belongs to another payment", field="receipt")
            payment.mpesa_receipt = receipt
        receipt = payment.mpesa_receipt
        key = f"mpesa:{receipt}" if receipt else f"mpesa:review:{payment.pk}"
        outcome = _credit_locked(payment, idempotency_key=key, reference=receipt or f"payment {payment.pk}",
                                 actor=actor.get_username())
        payment.staff_note = (payment.staff_note + "\n" if payment.staff_note else "") + note
        payment.save(update_fields=["staff_note"])
        PaymentAudit.objects.create(
            payment=payment, actor=actor, actor_name=actor.get_username(), action="credit",
            from_status=PaymentStatus.NEEDS_REVIEW, to_status=payment.status, note=f"{note} ({outcome})",
        )
    return payment


def payment_resolve_close(*, payment_id: int, actor, note: str) -> Payment:
    """Staff: no money was received; close the payment as failed, with a note."""
    note = _note_required(note)
    with transaction.atomic():
        payment = _staff_payment_locked(payment_id=payment_id, actor=actor)
        now = timezone.now()
        payment.status = PaymentStatus.FAILED
        payment.resolved_at = now
        payment.updated_at = now
        payment.staff_note = (payment.staff_note + "\n" if payment.staff_note else "") + note
        payment.save()
        PaymentAudit.objects.create(
            payment=payment, actor=actor, actor_name=actor.get_username(), action="close",
            from_status=PaymentStatus.NEEDS_REVIEW, to_status=PaymentStatus.FAILED, note=note,
        )
    return payment
