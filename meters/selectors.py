"""Reads. Views, the API and the admin read through these."""

from decimal import Decimal

from django.db.models import DecimalField, F, QuerySet, Sum, Value, Window
from django.db.models.functions import Coalesce

from meters.errors import NotFound
from meters.models import KES_QUANTUM, KWH_QUANTUM, LedgerEntry, Meter, Reading
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


def meter_balance_kes(meter: Meter) -> Decimal:
    """What the balance is worth at the meter's tariff (for display; not an accounting value)."""
    return (meter.balance_kwh * meter.tariff.kes_per_kwh).quantize(KES_QUANTUM)


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
