"""What one consumption report debits (PROTOCOL.md "Accounting (exactly-once)"). Pure Python.

The caller holds the meter's row lock and passes its state; reports of one meter are applied one
after another to the same state, so a batch gives the same ledger as one report at a time.

With `energyTotal`, the meter's accounted consumption is the register range [floor, high]:
- the first report debits `unitsConsumed` and sets the range to [E − units, E];
- a report above the range debits E − high (a lost report costs nothing: the next one covers it);
- a report inside the range debits nothing (a duplicate or a stale replay);
- a report from just before the range (it ends within the tolerance of the floor, or its `seq`
  proves it older) debits the part below the floor and lowers the floor. This is what makes the
  ledger the same whatever the order of arrival: with two workers, report 2 of a meter can be
  committed before report 1, and report 1 must still be charged, once. In every order the total
  is high − floor = the register span the meter reported;
- a register below the range by more than the tolerance is an anomaly flagged for staff. With a
  `seq` newer than the one that set `high`, it is a reset (sensor replaced, register cleared):
  the range is rebased to the new register and the report debits its `unitsConsumed`, so billing
  goes on. Without a seq a late replay cannot be told from a reset, so the range is left alone
  (a replay must never rebase it) and nothing is debited until staff look.
- a report above the range whose seq is older than high's comes from before a reset: nothing.

Without `energyTotal` (a seed-only meter) the report debits `unitsConsumed` unless its identity
(`seq`, else timestamp + totalConsumed) was seen before; a second copy is stored as a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from meters.reports import ConsumptionReport

ZERO = Decimal("0.000000")
# How far a register may read below the accounted range before it is an anomaly rather than
# rounding: meters' energy sensors resolve 0.001 kWh.
REGISTER_TOLERANCE_KWH = Decimal("0.010000")


@dataclass
class MeterState:
    meter_id: int
    meter_no: str
    balance_kwh: Decimal
    energy_high_kwh: Decimal | None
    energy_floor_kwh: Decimal | None
    energy_seq: int | None
    anomaly: str = ""
    # When the meter was last sent a `resync` balance command (rate-limits drift commands).
    last_resync_at: datetime | None = None
    # Identities already stored as first copies (from the database and from this batch).
    seen_keys: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Charge:
    debit_kwh: Decimal
    is_duplicate: bool
    balance_after_kwh: Decimal
    anomaly: str = ""


def charge(state: MeterState, report: ConsumptionReport) -> Charge:
    """Decide the debit of `report` and advance `state` (the caller writes both)."""
    key = report.dedup_key
    if key in state.seen_keys:
        return Charge(ZERO, True, state.balance_kwh)
    state.seen_keys.add(key)
    anomaly = ""
    energy = report.energy_total_kwh
    if energy is None:
        debit = report.units_consumed_kwh
    else:
        debit, anomaly = _register_debit(state, report, energy)
    state.balance_kwh -= debit
    if anomaly:
        state.anomaly = anomaly
    return Charge(debit, False, state.balance_kwh, anomaly)


def _register_debit(state: MeterState, report: ConsumptionReport, energy: Decimal) -> tuple[Decimal, str]:
    start = max(energy - report.units_consumed_kwh, ZERO)
    seq, high, floor = report.seq, state.energy_high_kwh, state.energy_floor_kwh
    older = seq is not None and state.energy_seq is not None and seq < state.energy_seq
    newer = seq is not None and state.energy_seq is not None and seq > state.energy_seq
    if high is None or floor is None:
        _rebase(state, start, energy, seq)
        return report.units_consumed_kwh, ""
    if energy > high:
        if older:
            return ZERO, ""
        state.energy_high_kwh = energy
        if seq is not None:
            state.energy_seq = seq
        return energy - high, ""
    if start >= floor:
        return ZERO, ""
    if energy >= floor - REGISTER_TOLERANCE_KWH or older:
        state.energy_floor_kwh = start
        return floor - start, ""
    if newer:
        _rebase(state, start, energy, seq)
        return report.units_consumed_kwh, f"register reset: {energy} kWh after {high} kWh (seq {seq}); rebased"
    return ZERO, f"register went backwards: {energy} kWh below the accounted {floor}–{high} kWh; not debited"


def _rebase(state: MeterState, start: Decimal, energy: Decimal, seq: int | None) -> None:
    state.energy_floor_kwh = start
    state.energy_high_kwh = energy
    state.energy_seq = seq
