"""M-Pesa payments, the raw callback log and the staff audit trail.

A payment moves from an open state (`pending`, `checking`, `needs_review`) to one terminal state,
only under its row lock (services.py). Every external identifier (CheckoutRequestID,
MpesaReceiptNumber, C2B TransID) is unique, so the database refuses a second payment for the
same money even if the code had a bug; a second record of the same money (an STK push and the
C2B confirmation of it) points at the first with `same_money_as` and shares its ledger entry.
Money is KES with 2 places, units kWh with 6 (meters.models), never float.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from meters.models import kes_field, kwh_field


class PaymentStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    # The push request's answer was lost (timeout, dropped connection, 5xx): the customer may
    # have been prompted and may pay. Settled by a callback, a C2B confirmation or staff.
    CHECKING = "checking", "Checking (outcome unknown)"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled by customer"
    TIMED_OUT = "timed_out", "Timed out"
    NEEDS_REVIEW = "needs_review", "Needs review"


class PaidVia(models.TextChoices):
    CALLBACK = "callback", "STK callback"
    QUERY = "query", "STK push query"
    C2B = "c2b", "C2B confirmation"
    STAFF = "staff", "Staff"


class PaymentChannel(models.TextChoices):
    STK = "stk", "STK push"
    C2B = "c2b", "Paybill (C2B)"


class Payment(models.Model):
    # Empty only for money received that matched no meter (kept for staff, needs_review).
    meter = models.ForeignKey("meters.Meter", on_delete=models.PROTECT, related_name="payments", null=True, blank=True)
    initiated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="mpesa_payments",
        help_text="Who started the STK push; empty for Paybill",
    )
    channel = models.CharField(max_length=8, choices=PaymentChannel.choices)
    status = models.CharField(max_length=16, choices=PaymentStatus.choices, default=PaymentStatus.PENDING)
    paid_via = models.CharField(max_length=8, choices=PaidVia.choices, blank=True, help_text="What brought the money first")
    # Another record of the same money (a C2B confirmation of an STK push): this one credits
    # nothing itself and shares that payment's ledger entry.
    same_money_as = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    review_reason = models.CharField(max_length=255, blank=True, help_text="Why staff must look at it")
    amount_kes = kes_field()
    phone = models.CharField(max_length=12, blank=True, help_text="2547XXXXXXXX; empty when M-Pesa masks it (C2B)")
    units_kwh = kwh_field(null=True, blank=True, help_text="Units credited; empty until credited")
    # The rule (services.units_for_amount): units = amount / rate rounded DOWN to 6 places;
    # what rounding left over is kept here so that nothing is lost silently.
    kes_per_kwh = models.DecimalField(max_digits=10, decimal_places=4, null=True, blank=True)
    remainder_kes = models.DecimalField(
        max_digits=20, decimal_places=10, null=True, blank=True, help_text="Money not turned into units by rounding down"
    )
    merchant_request_id = models.CharField(max_length=64, blank=True)
    checkout_request_id = models.CharField(max_length=64, unique=True, null=True, blank=True)
    mpesa_receipt = models.CharField(max_length=32, unique=True, null=True, blank=True)
    c2b_trans_id = models.CharField(max_length=32, unique=True, null=True, blank=True)
    bill_ref = models.CharField(max_length=64, blank=True, help_text="C2B account number as the customer typed it")
    result_code = models.CharField(max_length=16, blank=True)
    result_desc = models.CharField(max_length=255, blank=True)
    client_idempotency_key = models.CharField(max_length=64, null=True, blank=True)
    command = models.ForeignKey(
        "meters.MeterCommand", on_delete=models.PROTECT, null=True, blank=True, related_name="+",
        help_text="The balance command that carried this credit to the meter",
    )
    ledger_entry = models.ForeignKey(
        "meters.LedgerEntry", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)
    resolved_at = models.DateTimeField(null=True, blank=True)
    # Reconciliation: how often Daraja was asked, and when to ask next (null: not due).
    query_attempts = models.PositiveIntegerField(default=0)
    next_query_at = models.DateTimeField(null=True, blank=True)
    last_query_error = models.CharField(max_length=255, blank=True)
    staff_note = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount_kes__gt=0), name="payment_amount_positive"),
            models.CheckConstraint(
                condition=~Q(status="succeeded") | Q(units_kwh__gt=0, ledger_entry__isnull=False),
                name="payment_success_has_credit",
            ),
            models.CheckConstraint(
                condition=Q(channel="stk") | Q(c2b_trans_id__isnull=False), name="payment_c2b_has_trans_id"
            ),
            models.CheckConstraint(
                condition=Q(meter__isnull=False) | Q(status__in=["needs_review", "failed"]), name="payment_has_meter"
            ),
            # A customer's retry with the same key finds the first payment (NULL keys never collide).
            models.UniqueConstraint(
                fields=["initiated_by", "client_idempotency_key"], name="payment_client_key_unique"
            ),
            # One STK push in flight per meter: a second is refused while the first is pending.
            models.UniqueConstraint(
                fields=["meter"], condition=Q(status="pending", channel="stk"), name="payment_one_pending_stk_per_meter"
            ),
        ]
        indexes = [models.Index(fields=["status", "next_query_at"], name="payment_status_next_query")]

    def __str__(self) -> str:
        return f"Payment {self.pk} KES {self.amount_kes} → {self.meter_id} ({self.status})"


class CallbackKind(models.TextChoices):
    STK = "stk", "STK callback"
    C2B_VALIDATION = "c2b_validation", "C2B validation"
    C2B_CONFIRMATION = "c2b_confirmation", "C2B confirmation"


class CallbackStatus(models.TextChoices):
    RECEIVED = "received", "Received"
    PROCESSED = "processed", "Processed"
    REFUSED = "refused", "Refused"
    FAILED = "failed", "Failed"


class Callback(models.Model):
    """One request from Daraja, stored exactly as it came, before it is processed."""

    kind = models.CharField(max_length=20, choices=CallbackKind.choices)
    body = models.TextField()
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=12, choices=CallbackStatus.choices, default=CallbackStatus.RECEIVED)
    error = models.CharField(max_length=500, blank=True, help_text="Why it was refused or failed")
    outcome = models.CharField(max_length=255, blank=True, help_text="What processing did (e.g. credited, duplicate)")
    reply = models.CharField(max_length=255, blank=True, help_text="The JSON answered to Daraja")
    attempts = models.PositiveIntegerField(default=0, help_text="Times processing was tried")
    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, null=True, blank=True, related_name="callbacks")

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["status", "id"], name="callback_status_id")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.pk} ({self.status})"


class PaymentAudit(models.Model):
    """Who changed a payment outside the automatic flow, and why (staff resolutions, reviews)."""

    payment = models.ForeignKey(Payment, on_delete=models.PROTECT, related_name="audit")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    actor_name = models.CharField(max_length=150)
    action = models.CharField(max_length=32)
    from_status = models.CharField(max_length=16)
    to_status = models.CharField(max_length=16)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor_name}: {self.from_status} → {self.to_status}"
