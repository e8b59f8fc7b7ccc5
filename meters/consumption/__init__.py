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
from meters.consumption.rules import ZERO, Charge, MeterState, charge
from meters.consumption.stores import ConsumptionStore, DebitRow, MeterRow, ReadingRow, store_for_connection
from meters.events import ConsumptionEvents, send_meter_events_on_commit
from meters.models import CommandKind, CommandStatus, Meter, MeterCommand, StatusEvent
from meters.reports import BalanceReport, ConsumptionReport, Report, StatusUpdate
from meters.services import balance_commands_queue_locked, firebase_mirror_mark

logger = logging.getLogger("meters.consumption")

# remainingBalance farther than this from the ledger → a `resync` balance command, at most one
# per meter per RESYNC_INTERVAL (a meter that keeps drifting must not flood itself with commands).
RESYNC_TOLERANCE_KWH = Decimal("0.01")
RESYNC_INTERVAL = timedelta(minutes=10)
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
    readings: list[ReadingRow] = []
    debits: list[DebitRow] = []
    touched: dict[str, None] = {}  # the batch's meters, in arrival order
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
        result = charge(state, report)
        outcome.charges.append(result)
        key, debit, duplicate = report.dedup_key, result.debit_kwh, result.is_duplicate
        readings.append(ReadingRow(
            now, state.meter_id, _reading_time(report, now), report.time_trusted, report.timestamp_ms, report.units_consumed_kwh,
            report.remaining_balance_kwh, report.total_consumed_kwh, report.seq, report.energy_total_kwh, key, duplicate,
            debit, report.raw_payload,
        ))
        if debit > 0:
            debits.append(DebitRow(state.meter_id, -debit, f"reading:{state.meter_id}:{key}", now))
            debited[meter_no] = debited[meter_no] + debit if meter_no in debited else debit
        if result.anomaly:
            logger.warning("Anomaly - Meter: %s, %s", meter_no, result.anomaly)
        touched[meter_no] = None
        if _advances(state, report, duplicate) and (
            meter_no not in newest or _order(report) >= _order(newest[meter_no][0])
        ):
            newest[meter_no] = (report, result.balance_after_kwh)
        duplicates += duplicate
        items.append((meter_no, report.units_consumed_kwh, duplicate))
    outcome.consumption += len(reports)
    outcome.duplicates += duplicates
    meter_rows = [
        MeterRow(
            states[meter_no].meter_id, debited.get(meter_no, ZERO), states[meter_no].energy_high_kwh,
            states[meter_no].energy_floor_kwh, states[meter_no].energy_seq,
            newest[meter_no][0].remaining_balance_kwh if meter_no in newest else None, states[meter_no].anomaly[:200],
        )
        for meter_no in touched
    ]
    store.write(readings, debits, meter_rows, now)
    outcome.debited_kwh += sum(debited.values(), ZERO)

    drifting = [
        meter_no
        for meter_no, (report, balance) in newest.items()
        if abs(report.remaining_balance_kwh - balance) > RESYNC_TOLERANCE_KWH
        and (states[meter_no].last_resync_at is None or now - states[meter_no].last_resync_at >= RESYNC_INTERVAL)
    ]
    if drifting:
        _queue_balance_commands([states[meter_no] for meter_no in drifting], reason="resync", now=now)
        for meter_no in drifting:
            logger.info("Resync - Meter: %s, reported %s, ledger %s", meter_no, newest[meter_no][0].remaining_balance_kwh,
                        newest[meter_no][1])
        Meter.objects.filter(id__in=[states[n].meter_id for n in drifting]).update(last_resync_at=now)
    outcome.events.extend(
        ConsumptionEvents(
            meter_no, states[meter_no].balance_kwh, debited.get(meter_no, ZERO),
            newest[meter_no][0].remaining_balance_kwh if meter_no in newest else None,
            states[meter_no].energy_high_kwh, now,
        )
        for meter_no in touched
    )


def _advances(state: MeterState, report: ConsumptionReport, is_duplicate: bool) -> bool:
    if is_duplicate:
        return False
    return report.energy_total_kwh is None or report.energy_total_kwh == state.energy_high_kwh


def _order(report: ConsumptionReport) -> tuple[int, int]:
    return (report.seq if report.seq is not None else -1, report.timestamp_ms)


def _queue_balance_commands(states: list[MeterState], *, reason: str, now: datetime) -> None:
    """Balance commands from the batch's state (locked, and already reflecting its debits)."""
    balance_commands_queue_locked(
        meters=[(state.meter_id, state.balance_kwh, state.energy_high_kwh) for state in states],
        reason=reason, actor=REPORTS_ACTOR, at=now,
    )


def _apply_statuses(items: list[StatusUpdate], states: dict[str, MeterState], now: datetime, outcome: IngestOutcome) -> None:
    StatusEvent.objects.bulk_create(
        StatusEvent(
            meter_id=states[s.meter_no].meter_id, status=s.status, message=s.message, balance_kwh=s.balance_kwh,
            wifi_rssi=s.wifi_rssi, relay=s.relay, firmware=s.firmware, uptime_s=s.uptime_s,
            reset_reason=s.reset_reason, meter_timestamp_ms=s.timestamp_ms, received_at=now, raw_payload=s.raw_payload,
        )
        for s in items
    )
    latest: dict[str, StatusUpdate] = {}
    reconnected: dict[str, None] = {}
    for status in items:
        latest[status.meter_no] = status
        if status.status == "online":
            reconnected[status.meter_no] = None
        outcome.status_items.append((status.meter_no, status.status))
    for meter_no, status in latest.items():
        online = status.status != "offline"
        fields = {"online": online}
        if online:  # the Last Will is published by the broker, not a sign of life
            fields["last_seen_at"] = now
        if status.relay:
            fields["relay_state"] = status.relay
        Meter.objects.filter(id=states[meter_no].meter_id).update(**fields)
        outcome.events.append(
            {"meterNo": meter_no, "type": "status", "status": status.status, "online": online,
             "relay": status.relay or None, "message": status.message, "at": now.isoformat()}
        )
    # PROTOCOL.md: a meter that reports `online` after (re)connecting gets the current balance.
    if reconnected:
        _queue_balance_commands([states[meter_no] for meter_no in reconnected], reason="reconnect", now=now)
    outcome.statuses += len(items)


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
