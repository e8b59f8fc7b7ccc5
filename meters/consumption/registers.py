"""Staff decisions about register histories and held energy (meters.consumption.rules), each an
audited action under the meter's lock:

- confirm a provisional history (a meter without regId whose register really was reset);
- merge a provisional history back into the one it replaced (it was not a reset: its reports are
  accounted again within the earlier history, and the difference is posted as an adjustment);
- release held energy (the reports beyond the physical bound were real: debit it now) or dismiss
  it (they were not: the register the fence never moved to is forgotten).
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from core.errors import Conflict, InvalidInput, NotFound
from meters.consumption.rules import ZERO, History, MeterState, charge
from meters.models import HistoryKind, HistoryReview, LedgerKind, Meter, Reading, RegisterHistory, StatusEvent
from meters.reports import ConsumptionReport
from meters.services import meter_lock, post_entry_and_tell_meter_locked

_SAME_REGISTER = "merge"


def _actor_name(actor) -> str:
    name = getattr(actor, "get_username", lambda: actor)()
    if not name:
        raise InvalidInput("A staff decision needs the staff member who made it", field="actor")
    return str(name)


def _note(note) -> str:
    if not isinstance(note, str) or not note.strip():
        raise InvalidInput("A staff decision needs a note saying why", field="note")
    return note.strip()


def _pending_provisional(meter: Meter, reg_id: str) -> RegisterHistory:
    history = RegisterHistory.objects.select_for_update().filter(meter=meter, reg_id=reg_id).first()
    if history is None:
        raise NotFound(f"{meter.meter_no} has no register history {reg_id!r}", field="reg_id")
    if history.kind != HistoryKind.PROVISIONAL or history.review != HistoryReview.PENDING:
        raise Conflict(f"History {reg_id} of {meter.meter_no} is not a provisional history awaiting review")
    return history


def _reviewed(history: RegisterHistory, review: str, actor: str, note: str) -> None:
    history.review, history.reviewed_by, history.reviewed_at, history.review_note = review, actor, timezone.now(), note
    history.save(update_fields=["review", "reviewed_by", "reviewed_at", "review_note"])


def _event(meter: Meter, message: str) -> None:
    StatusEvent.objects.create(meter=meter, status="register_reset", message=message[:255], reg_id=meter.reg_id,
                               raw_payload="")


def register_history_confirm(*, meter_no: str, reg_id: str, actor, note: str) -> RegisterHistory:
    """Staff: the provisional history is a real reset; it stays as it is."""
    name, note = _actor_name(actor), _note(note)
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        history = _pending_provisional(meter, reg_id)
        _reviewed(history, HistoryReview.CONFIRMED, name, note)
        _event(meter, f"provisional history {reg_id} confirmed as a reset by {name}: {note}")
    return history


def register_history_merge(*, meter_no: str, reg_id: str, actor, note: str) -> Decimal:
    """Staff: the provisional (current) history was no reset. Its reports are accounted again
    within the history it replaced, with the same rules, and the difference to what they were
    debited is posted as one adjustment; the earlier history is current again. Returns the
    adjustment (positive: units given back)."""
    name, note = _actor_name(actor), _note(note)
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        history = _pending_provisional(meter, reg_id)
        if meter.reg_id != reg_id:
            raise Conflict(f"Only the current history can be merged back ({meter.meter_no}'s is {meter.reg_id or 'none'})")
        previous = (
            RegisterHistory.objects.select_for_update().filter(meter=meter, current=False, closed_at__lte=history.opened_at)
            .exclude(review=HistoryReview.MERGED).exclude(reg_id=reg_id).order_by("-closed_at", "-id").first()
        )
        if previous is None:
            raise Conflict(f"History {reg_id} of {meter.meter_no} replaced no earlier history")
        # Staff say these reports are of the earlier register: replayed as reports of one named
        # register history (the rules then never suspect a reset among them).
        state = MeterState(
            meter.pk, meter.meter_no, meter.balance_kwh,
            History(_SAME_REGISTER, previous.floor_kwh, previous.high_kwh, previous.high_seq, previous.high_at_ms,
                    previous.floor_at_ms, previous.suspect_kwh, previous.held_kwh),
            meter.rated_max_kw, meter.reg_generation,
        )
        readings = list(Reading.objects.filter(meter=meter, reg_id=reg_id, is_duplicate=False).order_by("id"))
        debited = sum((r.debit_kwh for r in readings), ZERO)
        redebit = ZERO
        for reading in readings:
            result = charge(state, ConsumptionReport(
                meter.meter_no, reading.units_consumed_kwh, reading.remaining_balance_kwh, reading.total_consumed_kwh,
                reading.meter_timestamp_ms, reading.seq, reading.energy_total_kwh, reg_id=_SAME_REGISTER,
            ))
            redebit += result.debit_kwh
        difference = debited - redebit
        if difference:
            post_entry_and_tell_meter_locked(
                meter, command_reason="adjustment", kind=LedgerKind.ADJUSTMENT, units_kwh=difference,
                idempotency_key=f"merge:{meter.pk}:{reg_id}", actor=name,
                reason=f"history {reg_id} merged back into {previous.reg_id or '(no regId)'}: {note}"[:255],
                amount_kes=None,
            )
        merged = state.current
        merged.reg_id = previous.reg_id
        Meter.objects.filter(pk=meter.pk).update(
            reg_id=merged.reg_id, last_energy_total_kwh=merged.high, energy_floor_kwh=merged.floor,
            last_energy_seq=merged.high_seq, energy_high_at_ms=merged.high_at_ms, energy_floor_at_ms=merged.floor_at_ms,
            energy_suspect_kwh=merged.suspect, energy_held_kwh=merged.held, anomaly="",
        )
        history.current, history.closed_at = False, timezone.now()
        history.save(update_fields=["current", "closed_at"])
        _reviewed(history, HistoryReview.MERGED, name, note)
        previous.current = True
        previous.save(update_fields=["current"])
        _event(meter, f"provisional history {reg_id} merged back by {name} ({difference} kWh adjusted): {note}")
    return difference


def energy_held_release(*, meter_no: str, actor, note: str) -> Decimal:
    """Staff: the energy held beyond the physical bound was drawn: debit it now, once; the
    highest register seen becomes the accounted one."""
    name, note = _actor_name(actor), _note(note)
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        held = meter.energy_held_kwh
        if held <= 0:
            raise Conflict(f"{meter.meter_no} holds no energy")
        post_entry_and_tell_meter_locked(
            meter, command_reason="adjustment", kind=LedgerKind.CONSUMPTION_DEBIT, units_kwh=-held,
            idempotency_key=f"held:{meter.pk}:{uuid.uuid4().hex}", actor=name,
            reason=f"held energy released: {note}"[:255], amount_kes=None,
        )
        high = meter.energy_suspect_kwh if meter.energy_suspect_kwh is not None else meter.last_energy_total_kwh
        Meter.objects.filter(pk=meter.pk).update(
            last_energy_total_kwh=high, energy_suspect_kwh=None, energy_held_kwh=Decimal("0"), anomaly=""
        )
        _event(meter, f"{held} kWh held energy released (debited) by {name}: {note}")
    return held


def energy_held_dismiss(*, meter_no: str, actor, note: str) -> Decimal:
    """Staff: the reports beyond the bound were not real (a glitch, an impostor): nothing is
    debited and the register they claimed is forgotten."""
    name, note = _actor_name(actor), _note(note)
    with transaction.atomic():
        meter = meter_lock(meter_no=meter_no)
        held = meter.energy_held_kwh
        if held <= 0:
            raise Conflict(f"{meter.meter_no} holds no energy")
        Meter.objects.filter(pk=meter.pk).update(energy_suspect_kwh=None, energy_held_kwh=Decimal("0"), anomaly="")
        _event(meter, f"{held} kWh held energy dismissed (not debited) by {name}: {note}")
    return held
