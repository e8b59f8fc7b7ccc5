"""Customers, meters, tariffs, the ledger, readings, status events and the command outbox.

Units: energy is kWh with 6 decimal places (`*_kwh`), money is KES with 2 (`*_kes`). The
ledger is append-only; `Meter.balance_kwh` is a cache of the sum of the meter's entries and is
changed only by `meters.services` and `meters.consumption`, in the same transaction as the
entries, under a row lock.
"""

from decimal import Decimal

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from core.rules import KES_PLACES, KWH_PLACES, METER_NO_HELP, METER_NO_REGEX, PHONE_REGEX


def kwh_field(**kwargs) -> models.DecimalField:
    return models.DecimalField(max_digits=18, decimal_places=KWH_PLACES, **kwargs)


def kes_field(**kwargs) -> models.DecimalField:
    return models.DecimalField(max_digits=14, decimal_places=KES_PLACES, **kwargs)


class Customer(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="customer"
    )
    name = models.CharField(max_length=120)
    phone = models.CharField(
        max_length=12,
        validators=[RegexValidator(PHONE_REGEX, "Phone must look like 2547XXXXXXXX or 2541XXXXXXXX")],
        help_text="Normalised to 2547XXXXXXXX / 2541XXXXXXXX",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.phone})"


class Tariff(models.Model):
    name = models.CharField(max_length=64)
    kes_per_kwh = models.DecimalField(max_digits=10, decimal_places=4)
    effective_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name", "-effective_from"]
        constraints = [
            models.CheckConstraint(condition=Q(kes_per_kwh__gt=0), name="tariff_rate_positive"),
            models.UniqueConstraint(fields=["name", "effective_from"], name="tariff_name_from_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name}: KES {self.kes_per_kwh}/kWh from {self.effective_from:%Y-%m-%d}"


class RelayState(models.TextChoices):
    ON = "on", "On"
    OFF = "off", "Off"
    UNKNOWN = "unknown", "Unknown"


class RelayOverride(models.TextChoices):
    AUTO = "auto", "Automatic (on while balance > 0)"
    ON = "on", "Forced on"
    OFF = "off", "Forced off"


class Meter(models.Model):
    meter_no = models.CharField(
        max_length=32,
        unique=True,
        validators=[RegexValidator(METER_NO_REGEX, f"Meter number: {METER_NO_HELP}")],
    )
    owner = models.ForeignKey(
        Customer, on_delete=models.PROTECT, related_name="meters", null=True, blank=True
    )
    tariff = models.ForeignKey(Tariff, on_delete=models.PROTECT, related_name="meters")
    balance_kwh = kwh_field(default=Decimal("0"))
    # The lifetime energy register (PROTOCOL.md `energyTotal`) up to which consumption has been
    # debited; NULL until the first report that carries one sets the baseline.
    last_energy_total_kwh = kwh_field(null=True, blank=True)
    # The lowest register reading from which consumption has been debited (the start of the first
    # accounted interval). With last_energy_total_kwh it bounds the accounted range, so a report
    # that arrives late from before that range is charged once and one inside it never
    # (meters.consumption.rules).
    energy_floor_kwh = kwh_field(null=True, blank=True)
    # The `seq` of the report that set last_energy_total_kwh (never an implausible one).
    last_energy_seq = models.BigIntegerField(null=True, blank=True)
    # The register history these fields account (PROTOCOL.md `regId`): the meter's regId, "" for
    # a meter that sends none, "~N" for the N-th provisional history opened for such a meter
    # when its register (or seq) went backwards. Closed histories are RegisterHistory rows.
    reg_id = models.CharField(max_length=17, blank=True)
    reg_generation = models.PositiveIntegerField(default=0, help_text="Provisional histories opened so far")
    # The meter's time (trusted Unix ms only) of the reports that set the high and the floor:
    # the physical bound on a debit is the rated power times the time between reports.
    energy_high_at_ms = models.BigIntegerField(null=True, blank=True)
    energy_floor_at_ms = models.BigIntegerField(null=True, blank=True)
    # The highest register seen beyond that bound above the high: never the fence later reports
    # are measured against; what lies between the high and it is held.
    energy_suspect_kwh = kwh_field(null=True, blank=True)
    energy_held_kwh = kwh_field(
        default=Decimal("0"),
        help_text="Energy the current history reported beyond the physical bound: neither debited nor forgiven; staff decide",
    )
    rated_max_kw = models.DecimalField(
        max_digits=7, decimal_places=3, default=Decimal("18.400"),
        help_text="The most the meter can deliver (default 80 A × 230 V); bounds each debit",
    )
    last_reported_balance_kwh = kwh_field(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    online = models.BooleanField(default=False)
    relay_state = models.CharField(max_length=8, choices=RelayState.choices, default=RelayState.UNKNOWN)
    relay_override = models.CharField(
        max_length=8, choices=RelayOverride.choices, default=RelayOverride.AUTO
    )
    anomaly = models.CharField(
        max_length=200, blank=True, help_text="Set when a report looks wrong (e.g. register went backwards)"
    )
    last_resync_at = models.DateTimeField(null=True, blank=True)
    # What the meter's latest status said about its firmware (`fw`) and its last update
    # (`otaState`, `otaVersion`; firmware/PROTOCOL-ext.md), written by meters.consumption.
    firmware = models.CharField(max_length=32, blank=True)
    ota_state = models.CharField(max_length=16, blank=True)
    ota_version = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["meter_no"]
        constraints = [
            models.CheckConstraint(
                condition=Q(meter_no__regex=METER_NO_REGEX), name="meter_no_valid"
            ),
            models.CheckConstraint(condition=Q(rated_max_kw__gt=0), name="meter_rated_power_positive"),
            models.CheckConstraint(condition=Q(energy_held_kwh__gte=0), name="meter_held_not_negative"),
        ]
        # Staff operations beyond Django's add/change/view (portal's staff-roles migration gives
        # them to groups; the admin actions and the API check them).
        permissions = [
            ("adjust_balance", "Can request balance adjustments"),
            ("approve_adjustment", "Can approve another staff member's large adjustment"),
            ("resend_balance", "Can send a meter its current balance"),
            ("command_relay", "Can override a meter's relay"),
            ("review_registers", "Can decide register resets and held energy"),
            ("manage_credentials", "Can issue, rotate and revoke meters' MQTT credentials"),
        ]

    def __str__(self) -> str:
        return self.meter_no


class HistoryKind(models.TextChoices):
    REPORTED = "reported", "Reported by the meter (regId)"
    IMPLICIT = "implicit", "A meter that sends no regId"
    PROVISIONAL = "provisional", "Provisional: a suspected reset"


class HistoryReview(models.TextChoices):
    NONE = "", "Nothing to review"
    PENDING = "pending", "Awaiting staff review"
    CONFIRMED = "confirmed", "Confirmed as a reset"
    MERGED = "merged", "Merged back into the previous history"


class RegisterHistory(models.Model):
    """One register history of a meter (PROTOCOL.md `regId`): opened when a meter starts a
    register from scratch (or, for a meter without regId, when a reset is suspected), closed at
    its highest accounted register when the next one opens. The current history's live range is
    on the Meter row; a closed history's range is kept here, so late reports of it are accounted
    within it."""

    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="register_histories")
    reg_id = models.CharField(max_length=17)
    kind = models.CharField(max_length=12, choices=HistoryKind.choices)
    current = models.BooleanField(default=True)
    floor_kwh = kwh_field(null=True, blank=True)
    high_kwh = kwh_field(null=True, blank=True)
    high_seq = models.BigIntegerField(null=True, blank=True)
    high_at_ms = models.BigIntegerField(null=True, blank=True)
    floor_at_ms = models.BigIntegerField(null=True, blank=True)
    suspect_kwh = kwh_field(null=True, blank=True)
    held_kwh = kwh_field(default=Decimal("0"))
    opened_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=255, blank=True, help_text="Why it was opened")
    review = models.CharField(max_length=12, choices=HistoryReview.choices, default=HistoryReview.NONE, blank=True)
    reviewed_by = models.CharField(max_length=150, blank=True)
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_note = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "register histories"
        constraints = [
            models.UniqueConstraint(fields=["meter", "reg_id"], name="register_history_unique"),
            models.UniqueConstraint(fields=["meter"], condition=Q(current=True), name="register_history_one_current"),
        ]

    def __str__(self) -> str:
        return f"{self.meter_id} {self.reg_id or '(no regId)'} ({'current' if self.current else 'closed'})"


class LedgerKind(models.TextChoices):
    PAYMENT_CREDIT = "payment_credit", "Payment credit"
    CONSUMPTION_DEBIT = "consumption_debit", "Consumption debit"
    ADJUSTMENT = "adjustment", "Adjustment"


class LedgerEntry(models.Model):
    """One movement of units on a meter. Rows are never updated or deleted."""

    # Indexed by (meter, id) below; a separate meter_id index would only cost writes.
    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="ledger_entries", db_index=False)
    kind = models.CharField(max_length=24, choices=LedgerKind.choices)
    units_kwh = kwh_field(help_text="Signed: credits positive, debits negative")
    amount_kes = kes_field(null=True, blank=True, help_text="Money behind a credit, if any")
    idempotency_key = models.CharField(max_length=160, unique=True)
    reason = models.CharField(max_length=255, blank=True)
    actor = models.CharField(max_length=150, help_text="Who caused it: a username, 'mpesa', 'meter'")
    # The second staff member of a four-eyes adjustment (meters.adjustments). A database default,
    # because the ingest's COPY of consumption debits names its columns and leaves this one out.
    approved_by = models.CharField(max_length=150, blank=True, db_default="", default="")
    # Time-range queries use a BRIN index on PostgreSQL (migration 0005): rows arrive in time
    # order, and a B-tree here was one more write per report on the ingest hot path.
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(kind="payment_credit", units_kwh__gt=0)
                    | Q(kind="consumption_debit", units_kwh__lt=0)
                    | (Q(kind="adjustment") & ~Q(units_kwh=0))
                ),
                name="ledger_sign_matches_kind",
            ),
            models.CheckConstraint(
                condition=Q(amount_kes__isnull=True) | Q(amount_kes__gte=0),
                name="ledger_amount_not_negative",
            ),
        ]
        indexes = [models.Index(fields=["meter", "id"], name="ledger_meter_id")]

    def __str__(self) -> str:
        return f"{self.meter_id} {self.kind} {self.units_kwh}"

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.get("force_insert"):
            raise ValueError("Ledger entries are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ValueError("Ledger entries are append-only")


class Reading(models.Model):
    """One consumption report as received, with what it was charged."""

    # Indexed by (meter, dedup_key) and (meter, reading_at) below; no separate meter_id index.
    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="readings", db_index=False)
    received_at = models.DateTimeField(default=timezone.now)
    # When the consumption happened: the meter's timestamp if it is real Unix time, else the
    # time of receipt (a meter without NTP sends ms since boot; PROTOCOL.md).
    reading_at = models.DateTimeField()
    time_trusted = models.BooleanField(default=True)
    meter_timestamp_ms = models.BigIntegerField()
    units_consumed_kwh = kwh_field()
    remaining_balance_kwh = kwh_field()
    total_consumed_kwh = kwh_field()
    seq = models.BigIntegerField(null=True, blank=True)
    energy_total_kwh = kwh_field(null=True, blank=True)
    # The register history the report was accounted in (Meter.reg_id's forms).
    reg_id = models.CharField(max_length=17, blank=True)
    # The report's identity (meters.reports.ConsumptionReport.dedup_key), with "@N" for the N-th
    # provisional history of a meter without regId.
    dedup_key = models.CharField(max_length=80)
    is_duplicate = models.BooleanField(default=False)
    debit_kwh = kwh_field(default=Decimal("0"))
    # What this report measured beyond the physical bound: not debited, held for staff.
    held_kwh = kwh_field(default=Decimal("0"))
    raw_payload = models.TextField()

    class Meta:
        ordering = ["-id"]
        constraints = [
            # A second copy of a report is stored, flagged, but never twice as a first copy.
            models.UniqueConstraint(
                fields=["meter", "dedup_key"],
                condition=Q(is_duplicate=False),
                name="reading_identity_unique",
            ),
            models.CheckConstraint(condition=Q(debit_kwh__gte=0), name="reading_debit_not_negative"),
            models.CheckConstraint(condition=Q(held_kwh__gte=0), name="reading_held_not_negative"),
        ]
        indexes = [models.Index(fields=["meter", "reading_at"], name="reading_meter_time")]


class StatusKind(models.TextChoices):
    ONLINE = "online", "Online"
    OFFLINE = "offline", "Offline"
    LOW_BALANCE = "low_balance", "Low balance"
    ERROR = "error", "Error"
    # Written by the backend's accounting, not sent by meters:
    REGISTER_RESET = "register_reset", "Register reset"
    ANOMALY = "anomaly", "Implausible report"


class StatusEvent(models.Model):
    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="status_events")
    status = models.CharField(max_length=16, choices=StatusKind.choices)
    message = models.CharField(max_length=255, blank=True)
    balance_kwh = kwh_field(null=True, blank=True)
    wifi_rssi = models.IntegerField(null=True, blank=True)
    relay = models.CharField(max_length=8, blank=True)
    firmware = models.CharField(max_length=32, blank=True)
    uptime_s = models.BigIntegerField(null=True, blank=True)
    reset_reason = models.CharField(max_length=32, blank=True)
    reg_id = models.CharField(max_length=17, blank=True)
    meter_timestamp_ms = models.BigIntegerField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    raw_payload = models.TextField()

    class Meta:
        ordering = ["-id"]


class CommandKind(models.TextChoices):
    BALANCE = "balance", "Balance"
    RELAY = "relay", "Relay"
    OTA = "ota", "Firmware update"


class CommandStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    SENT = "sent", "Sent (broker PUBACK)"
    ACKNOWLEDGED = "acknowledged", "Acknowledged by meter"
    SUPERSEDED = "superseded", "Superseded by a newer command"


class MeterCommand(models.Model):
    """Outbox of commands to meters. Rows are written in the transaction that decides them and
    published after commit by the MQTT side; a row stays `queued` until the broker's PUBACK."""

    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="commands")
    kind = models.CharField(max_length=8, choices=CommandKind.choices)
    cmd_id = models.CharField(max_length=40, unique=True)
    reason = models.CharField(max_length=32)
    # Balance command: the ledger balance and the register it accounts up to, read together
    # under the meter's lock so the pair is consistent (PROTOCOL.md reconciliation).
    balance_kwh = kwh_field(null=True, blank=True)
    energy_total_kwh = kwh_field(null=True, blank=True)
    # The register history energy_total_kwh belongs to (a regId the meter reported, else "").
    reg_id = models.CharField(max_length=16, blank=True)
    relay_state = models.CharField(max_length=8, blank=True)
    # OTA command: the release it installs (meters.ota).
    release = models.ForeignKey(  # not indexed: nothing looks commands up by release
        "meters.FirmwareRelease", on_delete=models.PROTECT, null=True, blank=True, related_name="commands", db_index=False
    )
    issued_at = models.DateTimeField(default=timezone.now)
    payload = models.TextField(blank=True, help_text="The exact JSON published")
    status = models.CharField(max_length=16, choices=CommandStatus.choices, default=CommandStatus.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    sent_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_balance_kwh = kwh_field(null=True, blank=True)
    actor = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["status", "id"], name="command_status_id"),
            models.Index(fields=["meter", "status"], name="command_meter_status"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind="relay", relay_state__in=["on", "off", "auto"])
                | Q(kind="balance", balance_kwh__isnull=False)
                | Q(kind="ota", release__isnull=False),
                name="command_fields_match_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.cmd_id} → {self.meter_id} ({self.status})"


class FirebaseMirror(models.Model):
    """Outbox of the Firebase mirror: one row per meter whose state changed, coalesced.

    Writers bump `version` (set-based upsert, any number of changes per row); the mirror task
    pushes the meter's current state and then sets `synced_version` to the version it read,
    conditionally, so a change made while it pushed is pushed again. Pending: version > synced.
    """

    meter = models.OneToOneField(Meter, on_delete=models.CASCADE, primary_key=True, related_name="firebase_mirror")
    version = models.BigIntegerField(default=1)
    synced_version = models.BigIntegerField(default=0)
    marked_at = models.DateTimeField(default=timezone.now)
    synced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["marked_at"], name="firebase_mirror_marked")]

    def __str__(self) -> str:
        return f"{self.meter_id} v{self.version} (synced v{self.synced_version})"


class MeterCredential(models.Model):
    """A meter's MQTT password (its broker username is its meterNo), kept only as the hash the
    broker's `password_file` holds (core.broker_auth), so `manage.py mqtt_auth export` can write
    the broker's files from the database and nobody can read a password back. A revoked meter
    keeps its row (who revoked it and when) with no hash: the broker refuses it."""

    meter = models.OneToOneField(Meter, on_delete=models.CASCADE, primary_key=True, related_name="mqtt_credential")
    password_hash = models.CharField(max_length=200, blank=True)
    issued_at = models.DateTimeField(default=timezone.now)
    issued_by = models.CharField(max_length=150)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.CharField(max_length=150, blank=True)
    # Bumped by every issue and revocation: the broker-file exporter's change marker.
    changed_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(revoked_at__isnull=True, password_hash__startswith="$7$")
                | Q(revoked_at__isnull=False, password_hash=""),
                name="credential_hash_unless_revoked",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.meter_id} ({'revoked' if self.revoked_at else 'active'})"


class AdjustmentStatus(models.TextChoices):
    PENDING = "pending", "Awaiting a second staff member"
    APPROVED = "approved", "Approved and posted"
    REJECTED = "rejected", "Rejected"


class AdjustmentRequest(models.Model):
    """A balance adjustment above ADJUSTMENT_APPROVAL_KWH: it posts only once a second staff
    member approves it (meters.adjustments), with both names on the ledger entry."""

    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="adjustment_requests")
    units_kwh = kwh_field()
    reason = models.CharField(max_length=255)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    requested_at = models.DateTimeField(default=timezone.now)
    idempotency_key = models.CharField(max_length=160, unique=True)
    status = models.CharField(max_length=12, choices=AdjustmentStatus.choices, default=AdjustmentStatus.PENDING)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.CharField(max_length=255, blank=True)
    ledger_entry = models.OneToOneField(LedgerEntry, on_delete=models.PROTECT, null=True, blank=True, related_name="+")

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=~Q(units_kwh=0), name="adjustment_request_not_zero"),
            models.CheckConstraint(
                condition=~Q(status="approved") | Q(ledger_entry__isnull=False), name="adjustment_approved_has_entry"
            ),
            models.CheckConstraint(
                condition=Q(decided_by__isnull=True) | ~Q(decided_by=models.F("requested_by")),
                name="adjustment_four_eyes",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.units_kwh} kWh on {self.meter_id} ({self.status})"


# Firmware releases and rollouts (meters.ota) are models of this app, defined in their module.
from meters.ota.models import FirmwareRelease, Rollout, RolloutEvent, RolloutTarget  # noqa: E402, F401
