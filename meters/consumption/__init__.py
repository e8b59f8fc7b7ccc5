"""What meter reports cause, written in one place: readings, consumption debits in the ledger,
the meters' reported state, status events and the balance commands they call for.

`ingest_reports(reports)` applies a batch in one transaction: lock the batch's meters in id
order and read which report identities are already stored (one statement on PostgreSQL), decide
every debit in Python under those locks (`meters.consumption.rules`), then write readings, ledger
debits and meter rows set-wise through a storage strategy (`meters.consumption.stores`), and
status events, balance acknowledgements, resync and reconnect commands and the Firebase-mirror
marks in the same transaction. `ledger_debit(report=…)` is the one-report case of the same path.

The MQTT worker decodes messages into `meters.reports` objects, calls `ingest_reports`, stores
dead letters for the reports whose meter is unknown, and acks after commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from core.errors import NotFound
from meters.consumption.rules import ZERO, Charge, History, MeterState, charge
from meters.consumption.stores import ConsumptionStore, DebitRow, MeterRow, ReadingRow, store_for_connection
from meters.events import ConsumptionEvents, send_meter_events_on_commit
from meters.models import (
    CommandKind,
    CommandStatus,
    HistoryKind,
    HistoryReview,
    Meter,
    MeterCommand,
    Reading,
    RegisterHistory,
    StatusEvent,
)
from meters.ota.services import ota_statuses_record
from meters.reports import BalanceReport, ConsumptionReport, Report, StatusUpdate
from meters.services import balance_commands_queue_locked, firebase_mirror_mark

logger = logging.getLogger("meters.consumption")

# remainingBalance farther than this from the ledger → a `resync` balance command, at most one
# per meter per RESYNC_INTERVAL (a meter that keeps drifting must not flood itself with commands).
RESYNC_TOLERANCE_KWH = Decimal("0.01")
RESYNC_INTERVAL = timedelta(minutes=10)
# How long a status's balance may lag the meter's last report (its own billing since then).
STATUS_UNREPORTED_HOURS = Decimal(5) / 60
# Who queues the commands that reports call for.
REPORTS_ACTOR = "mqtt-worker"


@dataclass
class IngestOutcome:
    """What a batch did. `unknown` holds the positions (in the input) of reports whose meter is
    not provisioned: nothing was written for them; the caller dead-letters them. `events` are
    the live events for after commit (dicts, or ConsumptionEvents)."""

    consumption: int = 0
    duplicates: int = 0
    statuses: int = 0
    balance_reports: int = 0
    debited_kwh: Decimal = ZERO
    unknown: list[int] = field(default_factory=list)
    events: list = field(default_factory=list)
    # What each consumption report was charged, in input order.
    charges: list[Charge] = field(default_factory=list)
    # For the worker's log lines (formatted only if they are logged): (meterNo, units, duplicate),
    # (meterNo, status) and (meterNo, balance, matched a command).
    consumption_items: list[tuple[str, Decimal, bool]] = field(default_factory=list)
    status_items: list[tuple[str, str]] = field(default_factory=list)
    balance_items: list[tuple[str, Decimal, bool]] = field(default_factory=list)


def ingest_reports(
    reports: list[Report],
    *,
    now: datetime | None = None,
    on_locked=None,
    store: ConsumptionStore | None = None,
    send_events: bool = True,
) -> IngestOutcome:
    """Apply a batch of decoded reports in one transaction (a savepoint inside the caller's).

    `on_locked()` is called once the batch holds its meters' row locks: a pipelined caller starts
    the next batch only then, so each meter's reports are applied in arrival order. With
    `send_events` the live events go out after commit; the worker sends them itself, coalesced.
    Database errors propagate (nothing is written)."""
    now = now or timezone.now()
    store = store or store_for_connection()
    outcome = IngestOutcome()
    with transaction.atomic():
        identities = [(report.meter_no, report.dedup_key) for report in reports if type(report) is ConsumptionReport]
        states = store.lock_meters({report.meter_no for report in reports}, identities)
        if on_locked is not None:
            on_locked()
        consumption: list[ConsumptionReport] = []
        statuses: list[StatusUpdate] = []
        balances: list[BalanceReport] = []
        for position, report in enumerate(reports):
            if report.meter_no not in states:
                outcome.unknown.append(position)
            elif isinstance(report, ConsumptionReport):
                consumption.append(report)
            elif isinstance(report, StatusUpdate):
                statuses.append(report)
            else:
                balances.append(report)
        touched: set[int] = set()
        if consumption:
            _apply_consumption(consumption, states, store, now, outcome)
            touched.update(states[report.meter_no].meter_id for report in consumption)
        if statuses:
            _apply_statuses(statuses, states, now, outcome)
            touched.update(states[report.meter_no].meter_id for report in statuses)
        if balances:
            _apply_balance_reports(balances, states, now, outcome)
        if touched:
            firebase_mirror_mark(meter_ids=sorted(touched), at=now)
    if send_events:
        send_meter_events_on_commit(outcome.events)
    return outcome


def ledger_debit(*, report: ConsumptionReport, now: datetime | None = None, store: ConsumptionStore | None = None) -> Charge:
    """Account one consumption report: the one-report case of `ingest_reports` (same rules,
    same rows, same idempotency: the report's identity)."""
    outcome = ingest_reports([report], now=now, store=store)
    if outcome.unknown:
        raise NotFound(f"Unknown meter {report.meter_no}", field="meter_no")
    return outcome.charges[0]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _reading_time(report: ConsumptionReport, now: datetime) -> datetime:
    """When the consumption happened: the meter's time if it is real Unix time, else the time of
    receipt (a meter without NTP sends milliseconds since boot, PROTOCOL.md)."""
    return _EPOCH + timedelta(milliseconds=report.timestamp_ms) if report.time_trusted else now


def _apply_consumption(
    reports: list[ConsumptionReport], states: dict[str, MeterState], store: ConsumptionStore, now: datetime,
    outcome: IngestOutcome,
) -> None:
    _load_histories(reports, states)
    readings: list[ReadingRow] = []
    debits: list[DebitRow] = []
    # The batch's meters in arrival order, with their balance and history before it.
    touched: dict[str, tuple[Decimal, str]] = {}
    # Per meter, its newest report in the batch that advanced its state, with the ledger balance
    # right after it: the one whose remainingBalance is compared with the ledger. A late or
    # redelivered older report carries an older balance and must not look like drift.
    newest: dict[str, tuple[ConsumptionReport, Decimal]] = {}
    debited: dict[str, Decimal] = {}
    items = outcome.consumption_items
    duplicates = 0
    for report in reports:
        meter_no = report.meter_no
        state = states[meter_no]
        if meter_no not in touched:
            touched[meter_no] = (state.balance_kwh, state.current.reg_id)
        result = charge(state, report)
        outcome.charges.append(result)
        debit, duplicate = result.debit_kwh, result.is_duplicate
        readings.append(ReadingRow(
            now, state.meter_id, _reading_time(report, now), report.time_trusted, report.timestamp_ms,
            report.units_consumed_kwh, report.remaining_balance_kwh, report.total_consumed_kwh, report.seq,
            report.energy_total_kwh, result.reg_id, result.dedup_key, duplicate, debit, result.held_kwh, report.raw_payload,
        ))
        if debit > 0:
            debits.append(DebitRow(state.meter_id, -debit, f"reading:{state.meter_id}:{result.dedup_key}", now))
            debited[meter_no] = debited[meter_no] + debit if meter_no in debited else debit
        if result.anomaly:
            logger.warning("Anomaly - Meter: %s, %s", meter_no, result.anomaly)
        if _advances(state, report, result) and (
            meter_no not in newest or _order(report) >= _order(newest[meter_no][0])
        ):
            newest[meter_no] = (report, result.balance_after_kwh)
        duplicates += duplicate
        items.append((meter_no, report.units_consumed_kwh, duplicate))
    outcome.consumption += len(reports)
    outcome.duplicates += duplicates
    store.write(
        readings, debits,
        [MeterRow.of(states[meter_no], debited.get(meter_no, ZERO),
                     newest[meter_no][0].remaining_balance_kwh if meter_no in newest else None) for meter_no in touched],
        now,
    )
    outcome.debited_kwh += sum(debited.values(), ZERO)
    for meter_no, (_, reg_id_before) in touched.items():
        _save_histories(states[meter_no], reg_id_before, now)
    _store_notices([states[meter_no] for meter_no in touched], now)

    # Balance commands the batch calls for: a meter whose credit ran out (so that a seed-only
    # meter whose own balance drifted still cuts), and one whose remainingBalance drifted.
    run_out = [
        meter_no for meter_no, (before, _) in touched.items()
        if (before > 0 >= states[meter_no].balance_kwh) or (before >= 0 > states[meter_no].balance_kwh)
    ]
    drifting = [
        meter_no
        for meter_no, (report, balance) in newest.items()
        if meter_no not in run_out and abs(report.remaining_balance_kwh - balance) > RESYNC_TOLERANCE_KWH
        and (states[meter_no].last_resync_at is None or now - states[meter_no].last_resync_at >= RESYNC_INTERVAL)
    ]
    if run_out:
        _queue_balance_commands([states[meter_no] for meter_no in run_out], reason="no_credit", now=now)
        for meter_no in run_out:
            logger.info("No credit - Meter: %s, ledger %s", meter_no, states[meter_no].balance_kwh)
    if drifting:
        _queue_balance_commands([states[meter_no] for meter_no in drifting], reason="resync", now=now)
        for meter_no in drifting:
            logger.info("Resync - Meter: %s, reported %s, ledger %s", meter_no, newest[meter_no][0].remaining_balance_kwh,
                        newest[meter_no][1])
    if run_out or drifting:
        Meter.objects.filter(id__in=[states[n].meter_id for n in run_out + drifting]).update(last_resync_at=now)
    outcome.events.extend(
        ConsumptionEvents(
            meter_no, states[meter_no].balance_kwh, debited.get(meter_no, ZERO),
            newest[meter_no][0].remaining_balance_kwh if meter_no in newest else None,
            states[meter_no].current.high, now,
        )
        for meter_no in touched
    )


def _advances(state: MeterState, report: ConsumptionReport, result: Charge) -> bool:
    if result.is_duplicate or result.reg_id != state.current.reg_id:
        return False
    return report.energy_total_kwh is None or report.energy_total_kwh == state.current.high


def _order(report: ConsumptionReport) -> tuple[int, int]:
    return (report.seq if report.seq is not None else -1, report.timestamp_ms)


def _queue_balance_commands(states: list[MeterState], *, reason: str, now: datetime) -> None:
    """Balance commands from the batch's state (locked, and already reflecting its debits)."""
    balance_commands_queue_locked(
        meters=[(state.meter_id, state.balance_kwh, state.current.high, state.current.reg_id) for state in states],
        reason=reason, actor=REPORTS_ACTOR, at=now,
    )


def _load_histories(reports: list[ConsumptionReport], states: dict[str, MeterState]) -> None:
    """The rare path: closed register histories for reports of another regId than the meter's
    current one, and (for meters that have had provisional histories) the identities stored in
    those histories' namespaces. One query each, only when needed."""
    need = {
        states[r.meter_no].meter_id for r in reports
        if (r.reg_id is not None and r.reg_id != states[r.meter_no].current.reg_id) or states[r.meter_no].generation
    }
    if not need:
        return
    by_id = {state.meter_id: state for state in states.values()}
    for row in RegisterHistory.objects.filter(meter_id__in=need):
        state = by_id[row.meter_id]
        if row.reg_id != state.current.reg_id:
            state.others[row.reg_id] = History(
                row.reg_id, row.floor_kwh, row.high_kwh, row.high_seq, row.high_at_ms, row.floor_at_ms, row.suspect_kwh,
                row.held_kwh, provisional=row.kind == HistoryKind.PROVISIONAL,
            )
    keys = set()
    for report in reports:
        state = states[report.meter_no]
        if report.reg_id is None and state.meter_id in need:
            keys.update((state.meter_id, f"{report.dedup_key}@{n}") for n in range(1, state.generation + 1))
    if keys:
        found = Reading.objects.filter(
            meter_id__in={meter_id for meter_id, _ in keys}, dedup_key__in={key for _, key in keys}, is_duplicate=False,
        ).values_list("meter_id", "dedup_key", "units_consumed_kwh", "total_consumed_kwh")
        for meter_id, key, units, total in found:
            if (meter_id, key) in keys:
                by_id[meter_id].seen[key] = (units, total)


def _history_fields(history: History) -> dict:
    return {
        "floor_kwh": history.floor, "high_kwh": history.high, "high_seq": history.high_seq,
        "high_at_ms": history.high_at_ms, "floor_at_ms": history.floor_at_ms, "suspect_kwh": history.suspect,
        "held_kwh": history.held,
    }


def _history_kind(history: History) -> str:
    if history.provisional:
        return HistoryKind.PROVISIONAL
    return HistoryKind.REPORTED if history.reg_id else HistoryKind.IMPLICIT


def _save_histories(state: MeterState, reg_id_before: str, now: datetime) -> None:
    """Write what the batch changed of the meter's register histories (the current one's live
    state is on the Meter row). Rare: only when a history opened, closed or was accounted late."""
    current = state.current
    for history in state.others.values():
        if not history.changed:
            continue
        defaults = {**_history_fields(history), "kind": _history_kind(history), "current": False}
        if history.reg_id == reg_id_before:
            defaults["closed_at"] = now
        if history.opened_reason:
            defaults["reason"] = history.opened_reason[:255]
        RegisterHistory.objects.update_or_create(meter_id=state.meter_id, reg_id=history.reg_id, defaults=defaults)
        history.changed = False
    if current.reg_id == reg_id_before:
        return
    if not current.opened_reason:
        # The same register, now named (the meter started sending regId): rename its row.
        RegisterHistory.objects.filter(meter_id=state.meter_id, reg_id=reg_id_before).update(reg_id=current.reg_id)
        return
    RegisterHistory.objects.filter(meter_id=state.meter_id, current=True).update(current=False)
    RegisterHistory.objects.update_or_create(
        meter_id=state.meter_id, reg_id=current.reg_id,
        defaults={
            **_history_fields(current), "kind": _history_kind(current), "current": True, "opened_at": now,
            "reason": current.opened_reason[:255],
            "review": HistoryReview.PENDING if current.provisional else HistoryReview.NONE,
        },
    )
    current.opened_reason = ""


def _store_notices(states: list[MeterState], now: datetime) -> None:
    """What staff must see (register resets, implausible reports) as status events: per meter
    and kind at most one per batch, the latest, so a misbehaving meter cannot flood them."""
    events = []
    for state in states:
        latest = {kind: message for kind, message in state.notices}
        events.extend(
            StatusEvent(meter_id=state.meter_id, status=kind, message=message, reg_id=state.current.reg_id,
                        received_at=now, raw_payload="")
            for kind, message in latest.items()
        )
        state.notices.clear()
    if events:
        StatusEvent.objects.bulk_create(events)


def _apply_statuses(items: list[StatusUpdate], states: dict[str, MeterState], now: datetime, outcome: IngestOutcome) -> None:
    StatusEvent.objects.bulk_create(
        StatusEvent(
            meter_id=states[s.meter_no].meter_id, status=s.status, message=s.message, balance_kwh=s.balance_kwh,
            wifi_rssi=s.wifi_rssi, relay=s.relay, firmware=s.firmware, uptime_s=s.uptime_s,
            reset_reason=s.reset_reason, reg_id=s.reg_id or "", meter_timestamp_ms=s.timestamp_ms, received_at=now,
            raw_payload=s.raw_payload,
        )
        for s in items
    )
    latest: dict[str, StatusUpdate] = {}
    # The newest status that speaks for the meter's firmware now: not a Last Will, which the
    # meter composed when it connected (maybe before an update).
    reported: dict[str, StatusUpdate] = {}
    reconnected: dict[str, None] = {}
    disagreeing: dict[str, None] = {}
    online = {meter_no: states[meter_no].online for meter_no in {s.meter_no for s in items}}
    for status in items:
        meter_no = status.meter_no
        latest[meter_no] = status
        if status.status != "offline" and (status.firmware or status.ota_state):
            reported[meter_no] = status
        if status.status == "offline":
            online[meter_no] = False
        else:
            # PROTOCOL.md: a meter that reports `online` after (re)connecting gets the current
            # balance; one that was online already only when its balance disagrees with the ledger.
            if not online[meter_no]:
                reconnected[meter_no] = None
            elif _disagrees(states[meter_no], status, now):
                disagreeing[meter_no] = None
            online[meter_no] = True
        outcome.status_items.append((meter_no, status.status))
    for meter_no, status in latest.items():
        fields = {"online": online[meter_no]}
        if online[meter_no]:  # the Last Will is published by the broker, not a sign of life
            fields["last_seen_at"] = now
        if status.relay:
            fields["relay_state"] = status.relay
        if meter_no in disagreeing:
            fields["last_resync_at"] = now
        if meter_no in reported:
            firmware = reported[meter_no]
            if firmware.firmware:
                fields["firmware"] = firmware.firmware
            if firmware.ota_state:
                fields["ota_state"], fields["ota_version"] = firmware.ota_state, firmware.ota_version
        Meter.objects.filter(id=states[meter_no].meter_id).update(**fields)
        states[meter_no].online = online[meter_no]
        outcome.events.append(
            {"meterNo": meter_no, "type": "status", "status": status.status, "online": online[meter_no],
             "relay": status.relay or None, "message": status.message, "at": now.isoformat()}
        )
    if reconnected:
        _queue_balance_commands([states[meter_no] for meter_no in reconnected], reason="reconnect", now=now)
    disagreeing = {meter_no: None for meter_no in disagreeing if meter_no not in reconnected}
    if disagreeing:
        _queue_balance_commands([states[meter_no] for meter_no in disagreeing], reason="resync", now=now)
    # Firmware updates: each meter's part in a rollout, from the same statuses (meters.ota).
    ota_statuses_record(items, {meter_no: states[meter_no].meter_id for meter_no in online}, now)
    outcome.statuses += len(items)


def _disagrees(state: MeterState, status: StatusUpdate, now: datetime) -> bool:
    """Whether an online meter's own balance is off the ledger's beyond the tolerance. The meter
    has billed what it drew since its last report, so it may be below the ledger by up to what it
    can draw in a few minutes; above the ledger it never should be. Rate-limited like drift."""
    if status.balance_kwh is None:
        return False
    if state.last_resync_at is not None and now - state.last_resync_at < RESYNC_INTERVAL:
        return False
    ledger = state.balance_kwh
    unreported = state.rated_max_kw * STATUS_UNREPORTED_HOURS
    return status.balance_kwh > ledger + RESYNC_TOLERANCE_KWH or status.balance_kwh < ledger - RESYNC_TOLERANCE_KWH - unreported


def _apply_balance_reports(
    items: list[BalanceReport], states: dict[str, MeterState], now: datetime, outcome: IngestOutcome
) -> None:
    for report in items:
        meter_id = states[report.meter_no].meter_id
        commands = MeterCommand.objects.filter(meter_id=meter_id, kind=CommandKind.BALANCE)
        if report.cmd_id:
            commands = commands.filter(cmd_id=report.cmd_id)
        else:
            commands = commands.filter(status=CommandStatus.SENT).order_by("-id")[:1]
        command_id = commands.values_list("id", flat=True).first()
        if command_id is not None:
            MeterCommand.objects.filter(id=command_id).exclude(status=CommandStatus.ACKNOWLEDGED).update(
                status=CommandStatus.ACKNOWLEDGED, acknowledged_at=now, acknowledged_balance_kwh=report.balance_kwh
            )
        outcome.balance_items.append((report.meter_no, report.balance_kwh, command_id is not None))
        Meter.objects.filter(id=meter_id).update(last_seen_at=now)
    outcome.balance_reports += len(items)
