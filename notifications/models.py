"""Every notification the system sends (customers: e-mail and SMS; staff: e-mail), recorded
with its delivery: pending → sent, or retried and finally failed. Each one has a key naming the
event it is about, unique per channel and recipient, so an alert that runs again (every minute,
or twice at once) never notifies twice."""

from django.db import models
from django.utils import timezone


class Kind(models.TextChoices):
    METER_OFFLINE = "meter_offline", "Meters went offline"
    LOW_BALANCE = "low_balance", "Low balance"
    PAYMENT_CREDITED = "payment_credited", "Payment credited"
    COMMANDS_UNACKNOWLEDGED = "commands_unacknowledged", "Commands not acknowledged"
    PAYMENT_REVIEW = "payment_review", "Payment needs review"
    DEAD_LETTER_SPIKE = "dead_letter_spike", "Dead-letter spike"
    REGISTER_RESET = "register_reset", "Register reset awaiting review"


class Channel(models.TextChoices):
    EMAIL = "email", "E-mail"
    SMS = "sms", "SMS"


class Audience(models.TextChoices):
    CUSTOMER = "customer", "Customer"
    STAFF = "staff", "Staff"


class Status(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    RETRYING = "retrying", "Failed, to be retried"
    FAILED = "failed", "Failed"


class Notification(models.Model):
    key = models.CharField(max_length=160, help_text="The event it is about (one notification per event and recipient)")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    audience = models.CharField(max_length=8, choices=Audience.choices)
    channel = models.CharField(max_length=8, choices=Channel.choices)
    recipient = models.CharField(max_length=254, help_text="E-mail address or phone (2547…)")
    meter = models.ForeignKey("meters.Meter", on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    subject = models.CharField(max_length=200)
    body = models.TextField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.CharField(max_length=500, blank=True)
    provider_id = models.CharField(max_length=100, blank=True, help_text="The gateway's message id (SMS)")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["key", "channel", "recipient"], name="notification_once_per_event"),
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="notification_due")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} → {self.recipient} ({self.channel}, {self.status})"


class LowBalanceState(models.Model):
    """Whether a meter's balance is below LOW_BALANCE_KWH as last seen by the alert, and how many
    times it has crossed it: one notification per crossing, re-armed when the balance is back."""

    meter = models.OneToOneField("meters.Meter", on_delete=models.CASCADE, primary_key=True, related_name="+")
    low = models.BooleanField(default=False)
    crossings = models.PositiveIntegerField(default=0)
    changed_at = models.DateTimeField(default=timezone.now)
