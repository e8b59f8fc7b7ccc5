"""The money-to-units rule as a property: nothing is created, nothing is lost."""

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from meters.services import units_for_amount

amounts = st.integers(min_value=1, max_value=250_000_00).map(lambda cents: Decimal(cents) / 100)
rates = st.integers(min_value=1, max_value=10**10 - 1).map(lambda r: Decimal(r) / 10_000)


@given(amount=amounts, rate=rates)
def test_units_times_rate_plus_remainder_is_the_amount(amount, rate):
    units, remainder = units_for_amount(amount_kes=amount, kes_per_kwh=rate)
    assert units == units.quantize(Decimal("0.000001"))
    assert units * rate + remainder == amount
    # Rounded down: the remainder is never negative and always less than one ledger quantum's price.
    assert Decimal(0) <= remainder < rate * Decimal("0.000001")
