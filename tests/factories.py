"""Small builders for tests: meter reports as the codec would decode them."""

from decimal import Decimal

from meters.reports import ConsumptionReport

SEED_TIMESTAMP_MS = 1698765432000


def consumption_report(meter_no: str, units, *, seq=None, energy=None, ts=SEED_TIMESTAMP_MS, total=None, remaining=None):
    """A consumption report; numbers given as text or Decimal are exact."""
    units = Decimal(str(units))
    return ConsumptionReport(
        meter_no, units, Decimal(str(remaining if remaining is not None else 0)),
        Decimal(str(total)) if total is not None else units, ts, seq, None if energy is None else Decimal(str(energy)),
    )
