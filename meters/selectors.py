"""Reads. Views, the API and the admin read through these."""

from datetime import datetime
from decimal import Decimal

from django.db.models import Count, DecimalField, F, Max, QuerySet, Sum, Value, Window
from django.db.models.functions import Coalesce
from django.utils import timezone

from core.errors import NotFound
from core.rules import KES_QUANTUM, KWH_QUANTUM, valid_meter_no
from meters.models import CommandKind, CommandStatus, LedgerEntry, Meter, MeterCommand, MeterCredential, Reading, Tariff
from meters.validation import validate_meter_no


def meter_get(*, meter_no: str) -> Meter:
    validate_meter_no(meter_no)
    try:
        return Meter.objects.select_related("tariff", "owner").get(meter_no=meter_no)
    except Meter.DoesNotExist:
        raise NotFound(f"Unknown meter {meter_no}", field="meter_no") from None


def meter_balance_get(*, meter_no: str) -> Decimal:
    """The meter's balance in kWh: the cached sum of its ledger entries."""
    return meter_get(meter_no=meter_no).balance_kwh


def tariff_rate_in_effect(*, tariff: Tariff, at: datetime | None = None) -> Decimal:
    """KES per kWh of `tariff` at `at` (default now): the newest price of the tariff's name that
    is in effect by then (tariffs are history: a price change is a new row from a date). A row
    whose date has not come yet is the only price a meter provisioned on it can have."""
    rate = (
        Tariff.objects.filter(name=tariff.name, effective_from__lte=at or timezone.now())
        .order_by("-effective_from", "-id")
        .values_list("kes_per_kwh", flat=True)
        .first()
    )
    return tariff.kes_per_kwh if rate is None else rate


def meter_balance_kes(meter: Meter) -> Decimal:
    """What the balance is worth at the meter's tariff (for display; not an accounting value)."""
    return (meter.balance_kwh * tariff_rate_in_effect(tariff=meter.tariff)).quantize(KES_QUANTUM)


def meter_for_account_reference(*, reference: str) -> Meter | None:
    """The meter a customer named as an account number (M-Pesa's BillRefNumber): exact, else
    case-insensitive when that is unambiguous."""
    ref = reference.strip() if isinstance(reference, str) else ""
    if not valid_meter_no(ref):
        return None
    meter = Meter.objects.filter(meter_no=ref).first()
    if meter is None:
        candidates = list(Meter.objects.filter(meter_no__iexact=ref)[:2])
        meter = candidates[0] if len(candidates) == 1 else None
    return meter


def balance_acknowledged_since(*, meter_id: int, command_id: int) -> bool:
    """Whether the meter has acknowledged this balance command or a later one (which carries a
    balance computed after it)."""
    return MeterCommand.objects.filter(
        meter_id=meter_id, kind=CommandKind.BALANCE, id__gte=command_id, status=CommandStatus.ACKNOWLEDGED
    ).exists()


def meter_commands_pending(*, queued_before: datetime, limit: int) -> list[int]:
    """Ids of commands still queued (no PUBACK yet) since before `queued_before`, oldest first."""
    return list(
        MeterCommand.objects.filter(status=CommandStatus.QUEUED, issued_at__lt=queued_before)
        .order_by("id")
        .values_list("id", flat=True)[:limit]
    )


def meter_get_for_user(*, user, meter_no: str) -> Meter:
    """The one object-level check: staff see every meter, a customer only their own.

    A meter that exists but is not the caller's is reported as not found, so that meter
    numbers cannot be probed.
    """
    meter = meter_get(meter_no=meter_no)
    if user.is_staff:
        return meter
    customer = getattr(user, "customer", None)
    if customer is None or meter.owner_id != customer.pk:
        raise NotFound(f"Unknown meter {meter_no}", field="meter_no")
    return meter


def meters_for_user(*, user) -> QuerySet[Meter]:
    meters = Meter.objects.select_related("tariff", "owner").order_by("meter_no")
    if user.is_staff:
        return meters
    customer = getattr(user, "customer", None)
    if customer is None:
        return meters.none()
    return meters.filter(owner=customer)


def ledger_statement(*, meter: Meter) -> QuerySet[LedgerEntry]:
    """The meter's entries, newest first, each with the balance after it (a running sum)."""
    return (
        LedgerEntry.objects.filter(meter=meter)
        .annotate(
            balance_after_kwh=Window(
                Sum("units_kwh"), order_by=F("id").asc(), output_field=DecimalField(max_digits=18, decimal_places=6)
            )
        )
        .order_by("-id")
    )


def ledger_mismatches() -> list[tuple[str, Decimal, Decimal]]:
    """Meters whose cached balance differs from the sum of their ledger: (meterNo, cached, sum).

    Compared in Python after quantizing: SQLite (the development default) sums decimals as
    doubles, so an SQL equality could report a one-ulp difference that is not a real one.
    """
    rows = Meter.objects.annotate(
        ledger_sum=Coalesce(
            Sum("ledger_entries__units_kwh"),
            Value(Decimal("0")),
            output_field=DecimalField(max_digits=18, decimal_places=6),
        )
    ).values_list("meter_no", "balance_kwh", "ledger_sum")
    mismatches = []
    for meter_no, cached, total in rows.iterator(chunk_size=2000):
        if Decimal(cached).quantize(KWH_QUANTUM) != Decimal(total).quantize(KWH_QUANTUM):
            mismatches.append((meter_no, cached, total))
    return mismatches


def recent_readings(*, meter: Meter, limit: int = 20) -> QuerySet[Reading]:
    return Reading.objects.filter(meter=meter).order_by("-id")[:limit]


def meter_broker_accounts() -> list[tuple[str, str]]:
    """(meterNo, broker password hash) of every meter that may connect (meters.MeterCredential)."""
    return list(
        MeterCredential.objects.filter(revoked_at__isnull=True)
        .order_by("meter__meter_no")
        .values_list("meter__meter_no", "password_hash")
    )


def meter_broker_accounts_marker() -> tuple:
    """Changes whenever a meter's credential is issued, rotated or revoked (cheap to poll)."""
    return tuple(MeterCredential.objects.aggregate(n=Count("pk"), last=Max("changed_at")).values())
