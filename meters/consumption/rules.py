"""What one consumption report debits (PROTOCOL.md "Accounting (exactly-once)"). Pure Python.

The caller holds the meter's row lock and passes its state; reports of one meter are applied one
after another to the same state, so a batch gives the same ledger as one report at a time.

Register histories. A meter's reports belong to a register history: its `regId`, or for a meter
that sends none, one implicit history ("") and provisional ones ("~1", "~2", …) opened when its
register goes backwards in a way only a reset explains. Within a history the accounted
consumption is the register range [floor, high], and accounting is order-independent:
- the first report of a history debits its `unitsConsumed` and sets the range to [E − u, E];
- a report above the range debits E − high (a lost report costs nothing: the next one covers it);
- a report inside the range debits nothing (a duplicate or a stale replay);
- a report from before the range debits the part below the floor and lowers the floor, when
  it is shown to be older (it overlaps the floor, its regId says it is the same register, or its
  time or seq is older) and the gap is physically possible;
- a new regId opens a new history ("register reset", shown to staff), whose first report debits
  its units; a late report of an older history is accounted within that history and never moves
  the current one.
Without a regId a reset can only be suspected: a register far below the range (by a gap no
late report explains), a register or seq lower than the newest accounted one at a later time on
the meter's clock, or an identity that comes again with different content opens a provisional
history for staff to confirm or merge back (meters.consumption.registers). A restarted register
whose report lies inside the range already accounted cannot be told from a stale replay: it is
not charged again (the span was charged once).

The physical bound. No report debits more than the meter could have drawn since the previous
accounted report of its history: rated power × the time between them (both on the meter's
trusted clock), or rated power × UNTIMED_BOUND_HOURS when the time is unknown. The excess is
held (not debited, not forgiven) for staff. A register beyond the bound is never the fence that
later reports are measured against: the high moves only by what was debited, and the highest
such register is kept as `suspect`; what lies between the high and it is the held energy. A seq
far beyond what the time allows is flagged and not taken as the history's seq.

Without `energyTotal` (a seed-only meter) a report debits `unitsConsumed` (bounded likewise)
unless its identity was seen before with the same content: a second copy is stored as a
duplicate. The same identity with other content is a different report (a meter whose seq
restarted): for a meter without regId it opens a provisional history with its own identities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from core.rules import KWH_QUANTUM
from meters.reports import ConsumptionReport

ZERO = Decimal("0.000000")
# How far a register may read below the accounted range before it is an anomaly rather than
# rounding: meters' energy sensors resolve 0.001 kWh.
REGISTER_TOLERANCE_KWH = Decimal("0.010000")
# The time a debit is bounded by when the meter's clock is unknown (per report).
UNTIMED_BOUND_HOURS = Decimal(1)
# Clock jitter allowed on top of the time between two reports.
BOUND_SLACK_MS = 60_000
# A seq may run ahead of the history's by at most this, plus one per second of trusted time:
# reboots skip up to a reserved block (64) of seqs each.
SEQ_SLACK = 10_000
UNTIMED_SEQ_JUMP = 1_000_000
_MS_PER_HOUR = Decimal(3_600_000)


@dataclass
class History:
    """One register history's accounted state (the current one lives on the Meter row)."""

    reg_id: str
    floor: Decimal | None = None
    high: Decimal | None = None
    high_seq: int | None = None
    high_at_ms: int | None = None
    floor_at_ms: int | None = None
    suspect: Decimal | None = None
    held: Decimal = ZERO
    provisional: bool = False
    # Set when the history is opened or changed here (the service writes it).
    opened_reason: str = ""
    changed: bool = False

    @property
    def empty(self) -> bool:
        return self.high is None and self.high_seq is None


@dataclass
class MeterState:
    meter_id: int
    meter_no: str
    balance_kwh: Decimal
    current: History
    rated_max_kw: Decimal = Decimal("18.4")
    generation: int = 0
    anomaly: str = ""
    online: bool = False
    # When the meter was last sent a balance command because of drift (rate-limits them).
    last_resync_at: datetime | None = None
    # Closed histories by reg_id, loaded by the service when a report needs one.
    others: dict[str, History] = field(default_factory=dict)
    # Identities already stored as first copies → (unitsConsumed, totalConsumed), from the
    # database and from this batch: a redelivered copy has the same values, a different report
    # under the same identity (a meter whose seq restarted) does not.
    seen: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)
    # What staff must see, in order: (StatusKind, message).
    notices: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Charge:
    debit_kwh: Decimal
    is_duplicate: bool
    balance_after_kwh: Decimal
    dedup_key: str
    reg_id: str
    held_kwh: Decimal = ZERO
    anomaly: str = ""


def identity(state: MeterState, report: ConsumptionReport, history: History) -> str:
    """The key a report is stored under: its identity, in a provisional history's namespace."""
    key = report.dedup_key
    return f"{key}@{history.reg_id[1:]}" if history.provisional else key


def charge(state: MeterState, report: ConsumptionReport) -> Charge:
    """Decide the debit of `report` and advance `state` (the caller writes both)."""
    history = _route(state, report)
    content = (report.units_consumed_kwh, report.total_consumed_kwh)
    key = identity(state, report, history)
    if state.seen.get(key) == content or _copy_elsewhere(state, report, content):
        return Charge(ZERO, True, state.balance_kwh, key, history.reg_id)
    if report.reg_id is None:
        why = _reset_suspected(state, history, report, key, content)
        if why:
            history = _open_provisional(state, why)
            key = identity(state, report, history)
    if key in state.seen:
        # Two different reports under one identity of one register history (a meter fault, an
        # impostor, or for a meter without regId a restarted register whose report lies inside
        # the range already accounted): the first one stands; this one is kept, flagged and not
        # debited, so that no register span is charged twice.
        note = f"a different report under identity {key} ({report.units_consumed_kwh} kWh); not debited"
        _notice(state, "anomaly", note)
        state.anomaly = note
        return Charge(ZERO, True, state.balance_kwh, key, history.reg_id, anomaly=note)
    state.seen[key] = content
    anomaly = ""
    if report.energy_total_kwh is None:
        debit, held = _units_debit(state, history, report)
        if held:
            history.held += held
            history.changed = True
            anomaly = f"{report.units_consumed_kwh} kWh in one report is more than the meter can draw; {held} kWh held for staff"
    else:
        debit, held, anomaly = _register_debit(state, history, report, report.energy_total_kwh)
    if anomaly:
        _notice(state, "anomaly", anomaly)
        state.anomaly = anomaly
    _check_seq(state, history, report)
    state.balance_kwh -= debit
    return Charge(debit, False, state.balance_kwh, key, history.reg_id, held, anomaly)


def _copy_elsewhere(state: MeterState, report: ConsumptionReport, content: tuple) -> bool:
    """A meter without regId that had provisional histories: a redelivered copy may have been
    stored in any of their namespaces."""
    if report.reg_id is not None or not state.generation:
        return False
    base = report.dedup_key
    return any(state.seen.get(key) == content for key in (base, *(f"{base}@{n}" for n in range(1, state.generation + 1))))


def _reset_suspected(state: MeterState, history: History, report: ConsumptionReport, key: str, content: tuple) -> str:
    """Why a report of a meter without regId can only come from a new register, or ""."""
    energy = report.energy_total_kwh
    if key in state.seen:
        # The same identity with other content: the seq (or the boot-relative time) restarted.
        # Unless the report's register lies inside the accounted range: then that span has been
        # charged already (possibly by reports of the new register taken as a continuation).
        if energy is not None and history.floor is not None and history.high is not None and (
            energy - report.units_consumed_kwh >= history.floor and energy <= history.high
        ):
            return ""
        return f"report identity {report.dedup_key} came again with different content"
    if energy is None or history.floor is None or history.high is None:
        return ""
    later = (
        report.time_trusted and history.high_at_ms is not None and report.timestamp_ms > history.high_at_ms + BOUND_SLACK_MS
    )
    # Neither the register nor seq goes back while the meter's clock goes forward: a report
    # later than the newest accounted one with a lower register or seq started again.
    if later and energy < history.high - REGISTER_TOLERANCE_KWH:
        return f"register {energy} kWh at a later time than the accounted {history.high} kWh"
    if later and report.seq is not None and history.high_seq is not None and report.seq < history.high_seq:
        return f"seq {report.seq} at a later time than the accounted seq {history.high_seq}"
    start = energy - report.units_consumed_kwh
    if energy >= history.floor - REGISTER_TOLERANCE_KWH or start >= history.floor - REGISTER_TOLERANCE_KWH:
        return ""
    gap = history.floor - energy
    plausible = gap <= _bound(state, _trusted_ms(report), history.floor_at_ms) and (
        report.units_consumed_kwh <= _bound(state, None, None)
    )
    if plausible and _shown_older(history, report):
        return ""  # a late report from before the range
    return f"register {energy} kWh below the accounted {history.floor}–{history.high} kWh"


# ---- which history a report belongs to -------------------------------------------------------


def _route(state: MeterState, report: ConsumptionReport) -> History:
    current = state.current
    reg_id = report.reg_id
    if reg_id is None:
        energy = report.energy_total_kwh
        if energy is not None and state.others and not (_inside(current, energy) or _plausibly_above(state, current, report)):
            # A meter without regId that had a (suspected) reset: a late report of an earlier
            # history goes to the history whose register it fits.
            for other in state.others.values():
                if _inside(other, energy) or _plausibly_above(state, other, report):
                    return other
        return current
    if reg_id == current.reg_id:
        return current
    if reg_id in state.others:
        return state.others[reg_id]
    # A regId never seen: a new register history.
    if current.empty:
        current.reg_id = reg_id
        current.provisional = False
        current.changed = True
        return current
    if current.reg_id == "" and _continues(state, current, report):
        # The same register, now named: a firmware update that started sending regId.
        current.reg_id = reg_id
        current.changed = True
        return current
    if (
        report.time_trusted and current.high_at_ms is not None
        and report.timestamp_ms + BOUND_SLACK_MS < current.high_at_ms
    ):
        # Older than what the current history has accounted: a late history, not the new one.
        history = History(reg_id=reg_id, opened_reason="a late report of a register history not seen before", changed=True)
        state.others[reg_id] = history
        _notice(state, "register_reset", f"reports of an earlier register history {reg_id} arrived late")
        return history
    previous = current
    state.others[previous.reg_id] = previous
    previous.changed = True
    reason = f"register reset: new register history {reg_id} after {previous.reg_id or '(no regId)'}" + (
        f" at {previous.high} kWh" if previous.high is not None else ""
    )
    state.current = History(reg_id=reg_id, opened_reason=reason, changed=True)
    state.anomaly = reason
    _notice(state, "register_reset", reason)
    return state.current


def _open_provisional(state: MeterState, why: str) -> History:
    previous = state.current
    state.others[previous.reg_id] = previous
    previous.changed = True
    state.generation += 1
    reason = (f"register reset suspected ({why}); provisional history ~{state.generation} opened: "
              "confirm it or merge it back")
    state.current = History(reg_id=f"~{state.generation}", provisional=True, opened_reason=reason, changed=True)
    state.anomaly = reason
    _notice(state, "register_reset", reason)
    return state.current


def _inside(history: History, energy: Decimal) -> bool:
    return (
        history.floor is not None and history.high is not None
        and history.floor - REGISTER_TOLERANCE_KWH <= energy <= history.high + REGISTER_TOLERANCE_KWH
    )


def _plausibly_above(state: MeterState, history: History, report: ConsumptionReport) -> bool:
    if history.high is None:
        return False
    gap = report.energy_total_kwh - history.high
    return ZERO <= gap <= _bound(state, history.high_at_ms, _trusted_ms(report))


def _continues(state: MeterState, history: History, report: ConsumptionReport) -> bool:
    """Whether a report's register carries on from the history's range (within the bound)."""
    if report.energy_total_kwh is None or history.high is None:
        return report.energy_total_kwh is None and report.seq is not None and history.high_seq is not None \
            and report.seq > history.high_seq
    start = report.energy_total_kwh - report.units_consumed_kwh
    return start >= history.high - REGISTER_TOLERANCE_KWH and _plausibly_above(state, history, report)


# ---- the physical bound -----------------------------------------------------------------------


def _trusted_ms(report: ConsumptionReport) -> int | None:
    return report.timestamp_ms if report.time_trusted else None


def _bound(state: MeterState, earlier_ms: int | None, later_ms: int | None) -> Decimal:
    """The most the meter can have drawn between two reports at these times (trusted meter time,
    None when unknown): rated power × the time between them, or × UNTIMED_BOUND_HOURS."""
    if earlier_ms is not None and later_ms is not None and later_ms > earlier_ms:
        hours = Decimal(later_ms - earlier_ms + BOUND_SLACK_MS) / _MS_PER_HOUR
    else:
        hours = UNTIMED_BOUND_HOURS
    return (state.rated_max_kw * hours).quantize(KWH_QUANTUM) + REGISTER_TOLERANCE_KWH


def _units_debit(state: MeterState, history: History, report: ConsumptionReport) -> tuple[Decimal, Decimal]:
    """A report's own unitsConsumed as (debit, held): at most what the meter can draw in the
    untimed bound (the interval a report covers is not on the wire)."""
    bound = _bound(state, None, None)
    units = report.units_consumed_kwh
    return (units, ZERO) if units <= bound else (bound, units - bound)


def _check_seq(state: MeterState, history: History, report: ConsumptionReport) -> None:
    """The history's seq is that of its newest report: the one that set the high register (a
    stale report inside the range, possibly of an earlier register, says nothing about it)."""
    seq = report.seq
    if seq is None:
        return
    if report.energy_total_kwh is not None and report.energy_total_kwh != history.high and history.high_seq is not None:
        return
    if history.high_seq is None or seq <= history.high_seq:
        if history.high_seq is None:
            history.high_seq = seq
            history.changed = True
        return
    if report.time_trusted and history.high_at_ms is not None and report.timestamp_ms >= history.high_at_ms:
        allowed = SEQ_SLACK + (report.timestamp_ms - history.high_at_ms) // 1000
    else:
        allowed = UNTIMED_SEQ_JUMP
    if seq - history.high_seq > allowed:
        note = f"seq {seq} is implausibly far ahead of {history.high_seq}; not taken as the meter's seq"
        state.anomaly = note
        _notice(state, "anomaly", note)
        return
    history.high_seq = seq
    history.changed = True


# ---- registers --------------------------------------------------------------------------------


def _register_debit(
    state: MeterState, history: History, report: ConsumptionReport, energy: Decimal
) -> tuple[Decimal, Decimal, str]:
    """(debit, newly held, anomaly) for a report with energyTotal, advancing `history`.

    The held energy of a register history is a level: the highest register seen beyond the
    bound (`suspect`) minus the accounted high; it shrinks as the high catches up."""
    units = report.units_consumed_kwh
    start = max(energy - units, ZERO)
    at_ms = _trusted_ms(report)
    if history.high is None or history.floor is None:
        debit, held = _units_debit(state, history, report)
        history.floor, history.high = start, start + debit
        history.floor_at_ms = history.high_at_ms = at_ms
        history.suspect = energy if held else None
        history.held = held
        history.changed = True
        note = f"first report of history {history.reg_id or '(no regId)'} claims {units} kWh; {held} kWh held for staff"
        return debit, held, note if held else ""
    high, floor = history.high, history.floor
    if energy > high:
        gap, bound = energy - high, _bound(state, history.high_at_ms, at_ms)
        held_before = history.held
        history.changed = True
        if gap <= bound:
            history.high = energy
            history.high_at_ms = at_ms if at_ms is not None else history.high_at_ms
            if history.suspect is not None and history.suspect <= energy:
                history.suspect = None
            history.held = history.suspect - energy if history.suspect is not None else ZERO
            return gap, ZERO, ""
        # Beyond the bound: debit what the meter could have drawn, hold the rest, and keep the
        # fence where the debits reach (a forged or glitched register must not become it).
        history.high = high + bound
        history.high_at_ms = at_ms if at_ms is not None else history.high_at_ms
        history.suspect = max(history.suspect or energy, energy)
        history.held = history.suspect - history.high
        return bound, max(history.held - held_before, ZERO), (
            f"register {energy} kWh is {gap} kWh above the accounted {high} kWh, more than the meter can draw "
            f"({bound} kWh); {bound} kWh debited, {history.held} kWh held for staff"
        )
    if start >= floor:
        return ZERO, ZERO, ""  # inside the range: a duplicate or a stale replay
    if start >= floor - REGISTER_TOLERANCE_KWH or energy >= floor - REGISTER_TOLERANCE_KWH:
        # Overlaps the floor: the part below it has not been accounted yet.
        history.floor = start
        history.floor_at_ms = at_ms if at_ms is not None else history.floor_at_ms
        history.changed = True
        return floor - start, ZERO, ""
    # Entirely below the accounted range.
    gap = floor - energy
    plausible = gap <= _bound(state, at_ms, history.floor_at_ms) and units <= _bound(state, None, None)
    if plausible and (report.reg_id is not None or history.provisional or _shown_older(history, report)):
        # A late report from before the range (a regId names the same register, so a lower
        # register is an earlier one): its part below the floor is accounted now.
        history.floor = start
        history.floor_at_ms = at_ms if at_ms is not None else history.floor_at_ms
        history.changed = True
        return floor - start, ZERO, ""
    # Far below the range of the same register (charge() sends a meter without regId to a
    # provisional history before this): a meter fault or an impostor.
    return ZERO, ZERO, (
        f"register {energy} kWh far below the accounted {floor}–{high} kWh of history {history.reg_id or '(no regId)'}; "
        "not debited"
    )


def _shown_older(history: History, report: ConsumptionReport) -> bool:
    """Whether the report is shown to come from before the history's range: by the meter's
    trusted clock, else (or when the times are equal) by its seq."""
    if report.time_trusted and history.floor_at_ms is not None and report.timestamp_ms != history.floor_at_ms:
        return report.timestamp_ms < history.floor_at_ms
    return report.seq is not None and history.high_seq is not None and report.seq < history.high_seq


def _notice(state: MeterState, kind: str, message: str) -> None:
    state.notices.append((kind, message[:255]))
