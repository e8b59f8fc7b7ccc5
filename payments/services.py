"""Every change to a payment goes through here: STK push, callbacks, Paybill, reconciliation, staff.

One receipt, one credit. The same money can reach us by three routes (daraja.md, "The same money
can be reported more than once"): the STK callback (with its MpesaReceiptNumber), the STK push
query (no receipt) and the C2B confirmation (TransID, the same receipt). Whichever comes first
credits the meter, once; the others find it and complete it:
- a receipt credits under the ledger key `mpesa:<receipt>`; a query, which has no receipt,
  under `mpesa:checkout:<CheckoutRequestID>`, and the receipt is recorded when it arrives;
- a C2B confirmation is matched to an STK push for the same meter (BillRefNumber), amount and
  time that is still open or was credited without a receipt: exactly one such push → it is that
  money; none → a plain Paybill payment; more than one → staff review, not a credit;
- money that matches nothing with certainty (an unknown CheckoutRequestID, a second receipt for
  one push, an unknown account number) is kept as a payment needing review, creditable by staff
  in one audited action, and Daraja is always answered so that nothing is lost.
Unknown is a state: a push request whose answer was lost is `checking`, not failed; a callback
matched by phone, amount and time, a C2B confirmation or staff settle it.

Exactly once under concurrency. Work on one receipt is serialised by a transaction-level lock on
the receipt (PostgreSQL advisory lock; SQLite serialises writers anyway); then payment rows are
locked (`SELECT … FOR UPDATE`), then the meter row (the ledger locks it). Every path takes them
in that order: receipt, payments (by id), meter. A payment changes state only from an open state
(`pending`, `checking`, `needs_review`). Behind that, the ledger's unique idempotency key and the
unique receipt, CheckoutRequestID and TransID columns make a double credit impossible to persist.

Daraja is called outside any transaction: a slow gateway never holds a row lock. Callbacks are
stored raw before they are processed; one whose processing was interrupted is processed again
by the sweeper (`callbacks_sweep`).
"""

import json
import logging
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from zlib import crc32

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils import timezone

from core.errors import Conflict, DomainError, InvalidInput, NotFound
from core.rules import IDEMPOTENCY_KEY_HELP, KES_QUANTUM, MPESA_ID, valid_idempotency_key
from meters.models import Meter
from meters.phone import normalize_phone
from meters.selectors import meter_for_account_reference, meter_get, meter_get_for_user, tariff_rate_in_effect
from meters.services import ledger_credit_purchase, units_for_amount
from payments import daraja
from payments.errors import MpesaRefused, MpesaUnavailable
from payments.models import (
    Callback,
    CallbackKind,
    CallbackStatus,
    PaidVia,
    Payment,
    PaymentAudit,
    PaymentChannel,
    PaymentStatus,
)
from payments.parsing import MAX_CALLBACK_BYTES, StkResult, UnreadableBody, parse_c2b, parse_stk_callback

logger = logging.getLogger(__name__)

# Reconciliation (tunable through settings of the same name). A push is first queried after
# MPESA_QUERY_FIRST_AFTER_S (the customer has had time to enter the PIN), then with growing gaps;
# after the last attempt an unresolved payment goes to staff review.
QUERY_FIRST_AFTER_S = getattr(settings, "MPESA_QUERY_FIRST_AFTER_S", 90)
QUERY_BACKOFF_S = tuple(getattr(settings, "MPESA_QUERY_BACKOFF_S", (30, 60, 120, 300, 600)))
QUERY_MAX_ATTEMPTS = getattr(settings, "MPESA_QUERY_MAX_ATTEMPTS", 6)
# While one process queries a payment, others leave it alone for this long.
QUERY_LEASE_S = 60
# A push still `checking` this long after it was sent is shown to staff (it stays matchable).
CHECKING_REVIEW_AFTER_S = getattr(settings, "MPESA_CHECKING_REVIEW_AFTER_S", 1800)
# How far apart a push and the confirmation of its money may be (daraja.md: "hours apart").
MATCH_WINDOW = timedelta(seconds=getattr(settings, "MPESA_MATCH_WINDOW_S", 24 * 3600))
# A confirmation's TransTime may run slightly ahead of our clock.
MATCH_CLOCK_SLACK = timedelta(minutes=10)
# Callbacks left `received` this long are processed again; after this many tries they fail.
CALLBACK_SWEEP_AFTER_S = getattr(settings, "MPESA_CALLBACK_SWEEP_AFTER_S", 60)
CALLBACK_MAX_ATTEMPTS = 5

TERMINAL = {PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CANCELLED, PaymentStatus.TIMED_OUT}
# States evidence may still settle.
OPEN = {PaymentStatus.PENDING, PaymentStatus.CHECKING, PaymentStatus.NEEDS_REVIEW}
# Namespace of the receipt advisory locks (pg_advisory_xact_lock(int, int)): "MPRC".
RECEIPT_LOCK_CLASS = 0x4D505243


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


# ---- locks and state changes (inside a transaction) --------------------------------------------


def _receipt_lock(receipt: str) -> None:
    """Serialise all work on one M-Pesa receipt until the transaction ends (taken first)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [RECEIPT_LOCK_CLASS, crc32(receipt.encode()) - 2**31])


def _note(payment: Payment, note: str) -> None:
    payment.staff_note = (payment.staff_note + "\n" if payment.staff_note else "") + note


def _audit(payment: Payment, *, action: str, before: str, note: str, actor=None, actor_name: str = "") -> None:
    PaymentAudit.objects.create(
        payment=payment, actor=actor, actor_name=actor_name or (actor.get_username() if actor else "mpesa"),
        action=action, from_status=before, to_status=payment.status, note=note,
    )


def _credit_locked(payment: Payment, *, idempotency_key: str, reference: str, actor: str, paid_via: str) -> str:
    """Credit the payment's meter (priced, posted and sent to the meter by one meters service
    call under the meter's lock). The caller holds the payment's lock."""
    purchase = ledger_credit_purchase(
        meter_no=payment.meter.meter_no, amount_kes=payment.amount_kes, idempotency_key=idempotency_key,
        actor=actor, reference=f"M-Pesa {reference}",
    )
    now = timezone.now()
    payment.status = PaymentStatus.SUCCEEDED
    payment.paid_via = paid_via
    payment.units_kwh = purchase.units_kwh
    payment.kes_per_kwh = purchase.kes_per_kwh
    payment.remainder_kes = purchase.remainder_kes
    payment.ledger_entry = purchase.posting.entry
    payment.command = purchase.posting.command
    payment.resolved_at = now
    payment.updated_at = now
    payment.next_query_at = None
    payment.review_reason = ""
    payment.save()
    return f"credited {purchase.units_kwh} kWh to {payment.meter.meter_no}"


def _receipt_key(receipt: str) -> str:
    return f"mpesa:{receipt}"


def _same_money_locked(payment: Payment, *, primary: Payment, via: str) -> None:
    """`payment` is another record of `primary`'s money: it credits nothing and shares the entry."""
    now = timezone.now()
    payment.status = PaymentStatus.SUCCEEDED
    payment.paid_via = via
    payment.same_money_as = primary
    if payment.meter_id is None:  # money kept for staff that named no meter: it is the primary's
        payment.meter_id = primary.meter_id
    payment.ledger_entry = primary.ledger_entry
    payment.units_kwh = primary.units_kwh
    payment.kes_per_kwh = primary.kes_per_kwh
    payment.remainder_kes = primary.remainder_kes
    payment.command = primary.command
    payment.resolved_at = payment.resolved_at or now
    payment.updated_at = now
    payment.next_query_at = None
    payment.review_reason = ""
    payment.save()


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
    before = payment.status
    payment.status = PaymentStatus.NEEDS_REVIEW
    payment.next_query_at = None
    payment.updated_at = timezone.now()
    payment.review_reason = note[:255]
    _note(payment, note)
    payment.save()
    _audit(payment, action="to_review", before=before, note=note, actor=actor, actor_name=actor_name)
    logger.warning("Payment %s needs review: %s", payment.pk, note)


def _money_for_review(*, channel: str, meter: Meter | None, amount: Decimal, receipt: str, phone: str = "",
                      checkout_request_id: str | None = None, bill_ref: str = "", why: str) -> Payment:
    """Money received that cannot be credited with certainty: kept for staff, never lost."""
    payment = Payment.objects.create(
        meter=meter, channel=channel, status=PaymentStatus.NEEDS_REVIEW, amount_kes=amount, phone=phone,
        mpesa_receipt=receipt, c2b_trans_id=receipt if channel == PaymentChannel.C2B else None,
        checkout_request_id=checkout_request_id, bill_ref=bill_ref[:64], result_code="0",
        result_desc="Money received; not credited", review_reason=why[:255], staff_note=why,
    )
    _audit(payment, action="to_review", before="", note=why, actor_name="mpesa")
    logger.warning("Payment %s (money received, receipt %s) needs review: %s", payment.pk, receipt, why)
    return payment


# ---- STK push ---------------------------------------------------------------------------------


def stk_callback_url() -> str:
    path = reverse("payments:stk-callback", kwargs={"secret": settings.MPESA_CALLBACK_SECRET})
    return f"{settings.MPESA_CALLBACK_BASE_URL}{path}"


def _same_request(payment: Payment, *, meter: Meter, amount: Decimal) -> Payment:
    if payment.meter_id != meter.pk or payment.amount_kes != amount:
        raise Conflict("This idempotency key was already used for a different payment", field="idempotency_key")
    return payment


def stk_push_start(*, user, meter_no: str, phone: str, amount_kes, idempotency_key: str | None = None) -> Payment:
    """Ask M-Pesa to prompt `phone` to pay `amount_kes` for `meter_no`. Returns the payment:
    `pending` (the prompt is on its way), or `checking` when Daraja's answer was lost (the
    customer may still be prompted and pay: the callback, a C2B confirmation or staff settle it).

    The same user retrying with the same idempotency key gets the first payment back; a second
    push for a meter while one is pending is a Conflict. Daraja is called outside any
    transaction. If Daraja refused the request or could not be reached at all, the payment is
    failed (nothing was started) and MpesaRefused/MpesaUnavailable is raised.
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
        if error.outcome_unknown:
            # Safaricom may have accepted it: the customer may be prompted and pay. Not failed.
            Payment.objects.filter(pk=payment.pk, status=PaymentStatus.PENDING).update(
                status=PaymentStatus.CHECKING, result_code=error.error_code[:16],
                result_desc=f"No answer from M-Pesa ({error.message}); checking"[:255], updated_at=now,
            )
            logger.warning("STK push for payment %s: outcome unknown (%s); checking", payment.pk, error.message)
            payment.refresh_from_db()
            return payment
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
    if status in (CallbackStatus.REFUSED, CallbackStatus.FAILED):
        logger.warning("%s callback %s %s: %s", callback.kind, callback.pk, status, error)
    Callback.objects.filter(pk=callback.pk).update(
        status=status, outcome=outcome[:255], error=error[:500], processed_at=timezone.now(),
        reply=json.dumps(reply)[:255] if reply is not None else "", payment=payment,
    )


def callback_process(*, callback_id: int) -> dict:
    """Process a stored callback and return the reply for Daraja. Never raises: a body that
    cannot be read is marked failed with its error (shown to staff); an unexpected error leaves
    the callback `received` for the sweeper, with the attempt counted, and after
    CALLBACK_MAX_ATTEMPTS it is marked failed."""
    callback = Callback.objects.get(pk=callback_id)
    Callback.objects.filter(pk=callback_id).update(attempts=callback.attempts + 1)
    process = {
        CallbackKind.STK: _stk_callback, CallbackKind.C2B_VALIDATION: _c2b_validate,
        CallbackKind.C2B_CONFIRMATION: _c2b_confirm,
    }[callback.kind]
    try:
        return process(callback)
    except UnreadableBody as error:
        reply = C2B_OTHER if callback.kind == CallbackKind.C2B_VALIDATION else _DEFAULT_REPLY[callback.kind]
        _callback_done(callback, CallbackStatus.FAILED, error=f"unreadable body: {error}", reply=reply)
        return reply
    except DomainError as error:  # a rule refused it (e.g. an amount that buys no units): for staff
        _callback_done(callback, CallbackStatus.FAILED, error=f"{error.__class__.__name__}: {error.message}",
                       reply=_DEFAULT_REPLY[callback.kind])
    except Exception as error:
        logger.exception("%s callback %s: processing failed (attempt %d)", callback.kind, callback.pk, callback.attempts + 1)
        if callback.attempts + 1 >= CALLBACK_MAX_ATTEMPTS:
            _callback_done(callback, CallbackStatus.FAILED, error=f"{error.__class__.__name__}: {error}",
                           reply=_DEFAULT_REPLY[callback.kind])
    return _DEFAULT_REPLY[callback.kind]


def callbacks_sweep(*, limit: int = 100) -> int:
    """Process again the callbacks left `received` (a crash or a database error after the raw
    body was stored). Safe to run in several processes: each callback is claimed by one."""
    cutoff = timezone.now() - timedelta(seconds=CALLBACK_SWEEP_AFTER_S)
    done = 0
    for pk in list(Callback.objects.filter(status=CallbackStatus.RECEIVED, received_at__lt=cutoff)
                   .order_by("id").values_list("pk", flat=True)[:limit]):
        with transaction.atomic():
            claimed = Callback.objects.select_for_update(skip_locked=True).filter(pk=pk, status=CallbackStatus.RECEIVED)
            if not claimed.exists():
                continue
            callback_process(callback_id=pk)
        done += 1
    return done


STK_ACCEPTED = {"ResultCode": 0, "ResultDesc": "Accepted"}


class _Refused(Exception):
    pass


def _stk_callback(callback: Callback) -> dict:
    result = parse_stk_callback(callback.body)
    try:
        with transaction.atomic():
            if result.result_code == "0" and result.receipt and result.amount_kes is not None:
                _receipt_lock(result.receipt)
            payment = Payment.objects.select_for_update().filter(checkout_request_id=result.checkout_request_id).first()
            if payment is None and result.result_code == "0":
                payment = _checking_payment_for(result)
            if payment is None or payment.channel != PaymentChannel.STK:
                outcome, payment = _unknown_checkout(result)
            else:
                outcome = _apply_stk_result_locked(payment, result)
            _callback_done(callback, CallbackStatus.PROCESSED, outcome=outcome, reply=STK_ACCEPTED, payment=payment)
    except _Refused as refusal:
        _callback_done(callback, CallbackStatus.REFUSED, error=str(refusal), reply=STK_ACCEPTED)
    return STK_ACCEPTED


def _checking_payment_for(result: StkResult) -> Payment | None:
    """The `checking` push this callback is about, when its CheckoutRequestID was never learned
    (the push request's answer was lost): the one push to the callback's phone, for its amount,
    started before it was paid and within the match window. None unless exactly one."""
    try:
        phone = normalize_phone(result.phone)
    except InvalidInput:
        return None
    paid_at = result.paid_at or timezone.now()
    candidates = list(
        Payment.objects.select_for_update().filter(
            channel=PaymentChannel.STK, status__in=OPEN, checkout_request_id__isnull=True, phone=phone,
            amount_kes=result.amount_kes, created_at__gte=paid_at - MATCH_WINDOW, created_at__lte=paid_at + MATCH_CLOCK_SLACK,
        ).order_by("id")[:2]
    )
    if len(candidates) != 1:
        return None
    payment = candidates[0]
    payment.checkout_request_id = result.checkout_request_id
    payment.save(update_fields=["checkout_request_id"])
    return payment


def _unknown_checkout(result: StkResult) -> tuple[str, Payment | None]:
    """A callback for a push we cannot find. A success is money received: kept for staff."""
    if result.result_code != "0":
        return f"result {result.result_code} for unknown CheckoutRequestID {result.checkout_request_id}: nothing to do", None
    if result.receipt is None or result.amount_kes is None:
        raise _Refused("success callback without Amount or MpesaReceiptNumber for an unknown CheckoutRequestID")
    existing = Payment.objects.filter(mpesa_receipt=result.receipt).first()
    if existing is not None:
        return f"duplicate: receipt {result.receipt} already recorded (payment {existing.pk})", existing
    payment = _money_for_review(
        channel=PaymentChannel.STK, meter=None, amount=result.amount_kes, receipt=result.receipt, phone=_phone(result.phone),
        checkout_request_id=(result.checkout_request_id
                             if not Payment.objects.filter(checkout_request_id=result.checkout_request_id).exists() else None),
        why=f"Success callback for an unknown CheckoutRequestID {result.checkout_request_id} (receipt {result.receipt}): "
            "money received, matched to no payment",
    )
    return "money received for no known payment: kept for staff review", payment


def _phone(raw: str) -> str:
    try:
        return normalize_phone(raw)
    except InvalidInput:
        return ""


def _apply_stk_result_locked(payment: Payment, result: StkResult) -> str:
    """Settle a locked STK payment from its callback. Returns what happened; raises _Refused."""
    if result.result_code != "0":
        if payment.status in OPEN:
            return _settle_failure_locked(payment, result_code=result.result_code, result_desc=result.result_desc)
        if payment.status == PaymentStatus.SUCCEEDED:
            raise _Refused(f"failure {result.result_code} after a confirmed success: a success is never downgraded")
        return f"duplicate: already {payment.status}"
    if result.amount_kes is None or result.receipt is None:
        raise _Refused("success callback without Amount or MpesaReceiptNumber")
    if result.amount_kes != payment.amount_kes:
        _money_for_review(
            channel=PaymentChannel.STK, meter=payment.meter, amount=result.amount_kes, receipt=result.receipt,
            phone=_phone(result.phone),
            why=f"Success callback for payment {payment.pk} paid KES {result.amount_kes}, not the KES {payment.amount_kes} "
                f"requested (receipt {result.receipt})",
        )
        return f"amount {result.amount_kes} differs from the KES {payment.amount_kes} requested: kept for staff review"
    receipt = result.receipt
    holder = Payment.objects.select_for_update().filter(mpesa_receipt=receipt).exclude(pk=payment.pk).first()
    if payment.mpesa_receipt == receipt:
        return "duplicate: already credited" if payment.status == PaymentStatus.SUCCEEDED else (
            f"duplicate: receipt already recorded ({payment.status})")
    if holder is not None:
        return _receipt_held_elsewhere(payment, holder, receipt)
    if payment.mpesa_receipt is not None:
        # This push was already completed by other money (matched by amount and time): the
        # receipt in this callback is a second payment by the customer.
        _money_for_review(
            channel=PaymentChannel.STK, meter=payment.meter, amount=result.amount_kes, receipt=receipt,
            phone=_phone(result.phone),
            why=f"Payment {payment.pk} was completed by receipt {payment.mpesa_receipt}; its callback brings another "
                f"receipt {receipt}: a second payment?",
        )
        return f"a second receipt {receipt} for an already completed push: kept for staff review"
    payment.mpesa_receipt = receipt
    payment.result_code = "0"
    payment.result_desc = result.result_desc[:255]
    if payment.status == PaymentStatus.SUCCEEDED:  # credited earlier from an STK query, which has no receipt
        payment.save(update_fields=["mpesa_receipt", "result_code", "result_desc"])
        return f"receipt {receipt} recorded (credited earlier from an STK query)"
    before = payment.status
    outcome = _credit_locked(payment, idempotency_key=_receipt_key(receipt), reference=receipt, actor="mpesa",
                             paid_via=PaidVia.CALLBACK)
    if before not in OPEN:
        # Closed as failed (a query, or staff) before the money came: the receipt proves it did.
        _note(payment, f"Success callback (receipt {receipt}) after the payment was {before}: credited")
        payment.save(update_fields=["staff_note"])
        _audit(payment, action="late_success", before=before, note=f"receipt {receipt}: {outcome}")
    return outcome


def _receipt_held_elsewhere(payment: Payment, holder: Payment, receipt: str) -> str:
    """This push's receipt already belongs to another record (a C2B confirmation that came
    first and matched nothing). The same money: one credit, whichever record holds it. A receipt
    of another meter or amount is not this push's money (a replayed or forged callback)."""
    if holder.meter_id not in (None, payment.meter_id) or holder.amount_kes != payment.amount_kes:
        raise _Refused(f"receipt {receipt} already belongs to another payment ({holder.pk}, another meter or amount)")
    if holder.status == PaymentStatus.SUCCEEDED:
        before = payment.status
        _same_money_locked(payment, primary=holder, via=PaidVia.C2B)
        _audit(payment, action="same_money", before=before, note=f"receipt {receipt} was credited as payment {holder.pk}")
        return f"receipt {receipt} was already credited as payment {holder.pk}: recorded as the same money"
    if holder.status == PaymentStatus.NEEDS_REVIEW and holder.same_money_as_id is None and payment.status in OPEN:
        # Money kept for staff, now matched with certainty by its receipt: credit it here, once.
        before = payment.status
        holder.mpesa_receipt = None
        holder.save(update_fields=["mpesa_receipt"])
        payment.mpesa_receipt = receipt
        outcome = _credit_locked(payment, idempotency_key=_receipt_key(receipt), reference=receipt, actor="mpesa",
                                 paid_via=PaidVia.CALLBACK)
        holder_before = holder.status
        _same_money_locked(holder, primary=payment, via=PaidVia.CALLBACK)
        _audit(holder, action="same_money", before=holder_before, note=f"matched by receipt to payment {payment.pk}")
        _audit(payment, action="credit", before=before, note=f"receipt {receipt}: {outcome}")
        return outcome
    raise _Refused(f"receipt {receipt} already belongs to another payment ({holder.pk}, {holder.status})")


# ---- Paybill (C2B) ---------------------------------------------------------------------------

C2B_ACCEPT = {"ResultCode": "0", "ResultDesc": "Accepted"}
C2B_INVALID_ACCOUNT = {"ResultCode": "C2B00012", "ResultDesc": "Rejected"}
C2B_INVALID_AMOUNT = {"ResultCode": "C2B00013", "ResultDesc": "Rejected"}
C2B_OTHER = {"ResultCode": "C2B00016", "ResultDesc": "Rejected"}
C2B_CONFIRMED = {"ResultCode": 0, "ResultDesc": "Success"}
# What Daraja is told when processing could not decide: a confirmation is always acknowledged
# (the money has moved), a validation accepted (the confirmation is then kept for staff).
_DEFAULT_REPLY = {CallbackKind.STK: STK_ACCEPTED, CallbackKind.C2B_VALIDATION: C2B_ACCEPT,
                  CallbackKind.C2B_CONFIRMATION: C2B_CONFIRMED}


def _c2b_validate(callback: Callback) -> dict:
    """Decide a Paybill validation request (Daraja waits a few seconds). Returns the reply."""
    request = parse_c2b(callback.body)
    meter = meter_for_account_reference(reference=request.bill_ref)
    if meter is None:
        reply, error = C2B_INVALID_ACCOUNT, f"unknown account number {request.bill_ref!r}"
    elif _c2b_amount(request.amount_text) is None:
        reply, error = C2B_INVALID_AMOUNT, f"amount {request.amount_text!r} not accepted"
    else:
        _callback_done(callback, CallbackStatus.PROCESSED, outcome=f"accepted for {meter.meter_no}", reply=C2B_ACCEPT)
        return C2B_ACCEPT
    _callback_done(callback, CallbackStatus.REFUSED, error=error, reply=reply)
    return reply


def _c2b_confirm(callback: Callback) -> dict:
    """Money confirmed by Paybill: credited once per TransID, to the push it completes if it is
    certainly one (see the module note), else as a Paybill payment, else kept for staff."""
    request = parse_c2b(callback.body)
    trans_id, amount = request.trans_id, _c2b_amount(request.amount_text)
    if not MPESA_ID.match(trans_id):
        # Without a usable transaction id the money cannot even be kept under its receipt.
        _callback_done(callback, CallbackStatus.REFUSED, reply=C2B_CONFIRMED,
                       error=f"TransID {trans_id!r} is not an M-Pesa transaction id; see the raw body")
        return C2B_CONFIRMED
    meter = meter_for_account_reference(reference=request.bill_ref)
    with transaction.atomic():
        _receipt_lock(trans_id)
        existing = Payment.objects.filter(c2b_trans_id=trans_id).first() or Payment.objects.filter(
            mpesa_receipt=trans_id).first()
        if existing is not None:
            _callback_done(callback, CallbackStatus.PROCESSED, outcome=f"duplicate: receipt already recorded (payment "
                           f"{existing.pk})", reply=C2B_CONFIRMED, payment=existing)
            return C2B_CONFIRMED
        if meter is None or amount is None:
            problem = (f"unknown account number {request.bill_ref!r}" if meter is None
                       else f"amount {request.amount_text!r} not accepted")
            payment = _money_for_review(
                channel=PaymentChannel.C2B, meter=meter, amount=_c2b_any_amount(request.amount_text), receipt=trans_id,
                bill_ref=request.bill_ref, why=f"Paybill confirmation {trans_id}: {problem}; money received, not credited",
            )
            _callback_done(callback, CallbackStatus.PROCESSED, outcome="kept for staff review", reply=C2B_CONFIRMED,
                           payment=payment)
            return C2B_CONFIRMED
        paid_at = request.paid_at or timezone.now()
        candidates = _pushes_for_the_same_money(meter=meter, amount=amount, paid_at=paid_at)
        if len(candidates) == 1:
            outcome, payment = _c2b_completes_push(candidates[0], trans_id=trans_id)
        elif candidates:
            payment = _money_for_review(
                channel=PaymentChannel.C2B, meter=meter, amount=amount, receipt=trans_id, bill_ref=request.bill_ref,
                why=f"Paybill confirmation {trans_id} of KES {amount} for {meter.meter_no} could be the money of "
                    f"payments {', '.join(str(p.pk) for p in candidates)}: match it to one, or credit it",
            )
            outcome = "could be one of several pushes: kept for staff review"
        else:
            payment = Payment.objects.create(
                meter=meter, channel=PaymentChannel.C2B, amount_kes=amount, phone=_phone(request.msisdn),
                c2b_trans_id=trans_id, mpesa_receipt=trans_id, bill_ref=request.bill_ref[:64], result_code="0",
                result_desc="Paybill",
            )
            outcome = _credit_locked(payment, idempotency_key=_receipt_key(trans_id), reference=trans_id, actor="mpesa",
                                     paid_via=PaidVia.C2B)
        _callback_done(callback, CallbackStatus.PROCESSED, outcome=outcome, reply=C2B_CONFIRMED, payment=payment)
    return C2B_CONFIRMED


def _c2b_any_amount(text: str) -> Decimal:
    """The confirmed amount as far as it can be read, for the record staff review."""
    try:
        amount = Decimal(str(text).strip())
    except (InvalidOperation, ValueError):
        return Decimal("0.01")
    return amount.quantize(KES_QUANTUM) if amount.is_finite() and amount > 0 else Decimal("0.01")


def _pushes_for_the_same_money(*, meter: Meter, amount: Decimal, paid_at: datetime) -> list[Payment]:
    """STK pushes that this confirmation's money may be: same meter and amount, started within
    the match window before it was paid, and either still open or credited without a receipt
    (by a query). Locked, in id order."""
    return list(
        Payment.objects.select_for_update().filter(
            channel=PaymentChannel.STK, meter=meter, amount_kes=amount, mpesa_receipt__isnull=True,
            same_money_as__isnull=True, created_at__gte=paid_at - MATCH_WINDOW,
            created_at__lte=paid_at + MATCH_CLOCK_SLACK,
        ).filter(
            status__in=[*OPEN, PaymentStatus.SUCCEEDED]
        ).exclude(status=PaymentStatus.SUCCEEDED, paid_via__in=[PaidVia.CALLBACK, PaidVia.C2B]).order_by("id")
    )


def _c2b_completes_push(push: Payment, *, trans_id: str) -> tuple[str, Payment]:
    before = push.status
    push.mpesa_receipt = trans_id
    push.c2b_trans_id = trans_id
    if push.status == PaymentStatus.SUCCEEDED:
        push.save(update_fields=["mpesa_receipt", "c2b_trans_id"])
        _audit(push, action="receipt", before=before, note=f"C2B confirmation {trans_id} brought the receipt")
        return f"receipt {trans_id} completes payment {push.pk} (credited earlier from an STK query)", push
    outcome = _credit_locked(push, idempotency_key=_receipt_key(trans_id), reference=trans_id, actor="mpesa",
                             paid_via=PaidVia.C2B)
    _audit(push, action="credit", before=before, note=f"C2B confirmation {trans_id}: {outcome}")
    return f"payment {push.pk} paid by C2B confirmation: {outcome}", push


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
    A success credits under the push's CheckoutRequestID (a query has no receipt); the receipt
    is recorded when a callback or confirmation brings it, and never credits again.
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
        if payment.status not in OPEN or payment.meter_id is None:
            return payment  # a callback or a confirmation settled it while we asked: never downgrade
        before = payment.status
        payment.query_attempts += 1
        payment.last_query_error = error[:255]
        payment.updated_at = timezone.now()
        if result is not None and not result.processing:
            if result.result_code == "0":
                payment.result_code, payment.result_desc = "0", result.result_desc[:255]
                outcome = _credit_locked(
                    payment, idempotency_key=f"mpesa:checkout:{payment.checkout_request_id}",
                    reference=payment.checkout_request_id, actor="mpesa-query", paid_via=PaidVia.QUERY,
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
            _audit(payment, action="query", before=before, note=outcome, actor=actor)
    return payment


def payments_reconcile(*, limit: int = 100) -> dict:
    """Query due pending STK pushes and show staff pushes still `checking` after a while. Safe
    to run in several processes at once (rows are claimed)."""
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
    unanswered = Payment.objects.filter(
        channel=PaymentChannel.STK, status__in=[PaymentStatus.PENDING, PaymentStatus.CHECKING],
        checkout_request_id__isnull=True, created_at__lt=now - timedelta(seconds=CHECKING_REVIEW_AFTER_S),
    ).values_list("pk", flat=True)[:limit]
    for pk in list(unanswered):
        with transaction.atomic():
            payment = Payment.objects.select_for_update().get(pk=pk)
            if payment.status in (PaymentStatus.PENDING, PaymentStatus.CHECKING) and payment.checkout_request_id is None:
                _to_review_locked(
                    payment, actor_name="reconciliation",
                    note="M-Pesa never answered the push request: the customer may have been asked and may have paid "
                         "(a callback or C2B confirmation still settles it)",
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


def payment_resolve_credit(*, payment_id: int, actor, note: str, receipt: str | None = None,
                           meter_no: str | None = None) -> Payment:
    """Staff: the money was received (e.g. seen in the M-Pesa portal); credit it once, to the
    payment's meter or, for money that named no meter, to `meter_no`."""
    note = _note_required(note)
    if receipt is not None and receipt != "" and not MPESA_ID.match(receipt):
        raise InvalidInput("Receipt: 1-32 letters or digits", field="receipt")
    with transaction.atomic():
        known = Payment.objects.filter(pk=payment_id).values_list("mpesa_receipt", flat=True).first()
        if receipt or known:
            _receipt_lock(receipt or known)
        payment = _staff_payment_locked(payment_id=payment_id, actor=actor)
        if payment.meter_id is None or meter_no:
            if not meter_no:
                raise InvalidInput("This money named no meter: say which meter to credit", field="meter_no")
            payment.meter = meter_get(meter_no=meter_no)
        if receipt:
            holder = Payment.objects.filter(mpesa_receipt=receipt).exclude(pk=payment.pk).first()
            if holder is not None:
                raise Conflict(f"Receipt {receipt} already belongs to payment {holder.pk}", field="receipt")
            payment.mpesa_receipt = receipt
        receipt = payment.mpesa_receipt
        key = _receipt_key(receipt) if receipt else f"mpesa:review:{payment.pk}"
        outcome = _credit_locked(payment, idempotency_key=key, reference=receipt or f"payment {payment.pk}",
                                 actor=actor.get_username(), paid_via=PaidVia.STAFF)
        _note(payment, note)
        payment.save(update_fields=["staff_note"])
        _audit(payment, action="credit", before=PaymentStatus.NEEDS_REVIEW, note=f"{note} ({outcome})", actor=actor)
    return payment


def payment_resolve_same_money(*, payment_id: int, actor, note: str, same_as_id: int) -> Payment:
    """Staff: this money is the money of payment `same_as_id` (a C2B confirmation of an STK
    push). If that push is still open it is credited with this money's receipt; if it was
    credited already, this record is closed as the same money. Never a second credit."""
    note = _note_required(note)
    with transaction.atomic():
        receipt = Payment.objects.filter(pk=payment_id).values_list("mpesa_receipt", flat=True).first()
        if receipt:
            _receipt_lock(receipt)
        first, second = sorted([payment_id, same_as_id])
        locked = {p.pk: p for p in Payment.objects.select_for_update().filter(pk__in=[first, second])}
        payment = _staff_payment_locked(payment_id=payment_id, actor=actor)
        other = locked.get(same_as_id)
        if other is None or other.pk == payment.pk:
            raise NotFound(f"Unknown payment {same_as_id}", field="same_as_id")
        if other.meter_id is None or other.amount_kes != payment.amount_kes:
            raise Conflict(f"Payment {other.pk} is not for the same meter and amount", field="same_as_id")
        if other.mpesa_receipt and payment.mpesa_receipt and other.mpesa_receipt != payment.mpesa_receipt:
            raise Conflict(f"Payment {other.pk} has another receipt ({other.mpesa_receipt}): different money",
                           field="same_as_id")
        if other.status in OPEN:
            moved, payment.mpesa_receipt = payment.mpesa_receipt, None
            payment.save(update_fields=["mpesa_receipt"])
            other.mpesa_receipt = moved
            other_before = other.status
            outcome = _credit_locked(other, idempotency_key=_receipt_key(moved) if moved else f"mpesa:review:{other.pk}",
                                     reference=moved or f"payment {other.pk}", actor=actor.get_username(),
                                     paid_via=PaidVia.STAFF)
            _audit(other, action="credit", before=other_before, note=f"{note} ({outcome})", actor=actor)
        elif other.status != PaymentStatus.SUCCEEDED:
            raise Conflict(f"Payment {other.pk} is {other.status}: credit this money instead", field="same_as_id")
        elif not other.mpesa_receipt and payment.mpesa_receipt:
            moved, payment.mpesa_receipt = payment.mpesa_receipt, None
            payment.save(update_fields=["mpesa_receipt"])
            other.mpesa_receipt = moved
            other.save(update_fields=["mpesa_receipt"])
        _same_money_locked(payment, primary=other, via=PaidVia.STAFF)
        _note(payment, note)
        payment.save(update_fields=["staff_note"])
        _audit(payment, action="same_money", before=PaymentStatus.NEEDS_REVIEW, note=f"{note} (payment {other.pk})",
               actor=actor)
    return payment


def payment_resolve_close(*, payment_id: int, actor, note: str) -> Payment:
    """Staff: no money was received (or it was refunded); close the payment as failed, with a note."""
    note = _note_required(note)
    with transaction.atomic():
        payment = _staff_payment_locked(payment_id=payment_id, actor=actor)
        now = timezone.now()
        payment.status = PaymentStatus.FAILED
        payment.resolved_at = now
        payment.updated_at = now
        _note(payment, note)
        payment.save()
        _audit(payment, action="close", before=PaymentStatus.NEEDS_REVIEW, note=note, actor=actor)
    return payment
