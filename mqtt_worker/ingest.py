"""Batched ingest: a batch of MQTT messages → one transaction of set-based statements.

Per batch: decode every message (bad ones become dead letters), lock the batch's meters in id
order (the services lock one meter row, so nobody deadlocks), read which report identities are
already stored, decide every debit in Python under those locks (mqtt_worker.accounting), then
write readings, ledger entries and meter rows with one statement each (PostgreSQL: `unnest()`
arrays; SQLite, the development default: bulk_create / executemany, same rows). Status updates,
balance reports, dead letters and the Firebase-mirror outbox go in the same transaction, so a
message's effects are committed together and the worker acks the batch only after that.

The rows written are exactly those `meters.services.ledger_debit` would write (kind, sign,
actor "meter", idempotency key per reading identity); commands still go through
`meters.services.meter_command_queue_balance`, the one entry point for the outbox.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from django.db import DataError, IntegrityError, connection, transaction
from django.utils import timezone

from meters.models import CommandKind, CommandStatus, LedgerEntry, LedgerKind, Meter, MeterCommand, Reading, StatusEvent
from meters.services import firebase_mirror_mark, meter_command_queue_balance
from mqtt_worker.accounting import ZERO, MeterState, charge
from mqtt_worker.codec import (
    TRUSTED_TIME_MIN_MS,
    BalanceReport,
    CodecError,
    ConsumptionReport,
    StatusUpdate,
    decimal_text,
    decode,
)
from mqtt_worker.models import DeadLetter

logger = logging.getLogger("mqtt_worker")

# remainingBalance farther than this from the ledger → a `resync` balance command, at most one
# per meter per RESYNC_INTERVAL (a meter that keeps drifting must not flood itself with commands).
RESYNC_TOLERANCE_KWH = Decimal("0.01")
RESYNC_INTERVAL = timedelta(minutes=10)
WORKER_ACTOR = "mqtt-worker"


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes


@dataclass
class BatchResult:
    consumption: int = 0
    duplicates: int = 0
    statuses: int = 0
    balance_reports: int = 0
    dead_letters: int = 0
    debited_kwh: Decimal = ZERO
    # Live events for after commit (meters.events.send_meter_events): dicts, or for consumption a
    # compact ConsumptionEvents per meter that `live_events()` expands. At 10,000 reports/s most
    # of them are coalesced away before they are sent, so the dicts are built only when sent.
    events: list = field(default_factory=list)
    # Seed-style log lines ("Consumption report - Meter: METER001, Units: 0.0048"), kept as
    # (meter_no, units, duplicate) for consumption and formatted only when logged: under a flood
    # the worker logs one summary line per batch, and formatting 500 lines it never writes cost
    # ~5 % of a batch.
    line_items: list = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return [item if isinstance(item, str) else _consumption_line(*item) for item in self.line_items]

    def merge(self, other: BatchResult) -> None:
        self.consumption += other.consumption
        self.duplicates += other.duplicates
        self.statuses += other.statuses
        self.balance_reports += other.balance_reports
        self.dead_letters += other.dead_letters
        self.debited_kwh += other.debited_kwh
        self.events.extend(other.events)
        self.line_items.extend(other.line_items)


def _consumption_line(meter_no: str, units: Decimal, duplicate: bool) -> str:
    return f"Consumption report - Meter: {meter_no}, Units: {decimal_text(units)}" + (" (duplicate)" if duplicate else "")


@dataclass(frozen=True, slots=True)
class ConsumptionEvents:
    """A meter's `balance` and `reading` live events after a batch, not yet rendered."""

    meter_no: str
    balance_kwh: Decimal
    debit_kwh: Decimal
    remaining_balance_kwh: Decimal | None
    energy_total_kwh: Decimal | None
    at: datetime

    def render(self) -> list[dict]:
        text = str(self.balance_kwh)
        return [
            {"meterNo": self.meter_no, "type": "balance", "balance": text, "kind": LedgerKind.CONSUMPTION_DEBIT},
            {
                "meterNo": self.meter_no, "type": "reading", "balance": text, "debit": str(self.debit_kwh),
                "remainingBalance": None if self.remaining_balance_kwh is None else str(self.remaining_balance_kwh),
                "energyTotal": None if self.energy_total_kwh is None else str(self.energy_total_kwh),
                "at": self.at.isoformat(),
            },
        ]


def live_events(events: list) -> list[dict]:
    """BatchResult.events as the dicts meters.events.send_meter_events sends."""
    rendered = []
    for event in events:
        if isinstance(event, ConsumptionEvents):
            rendered.extend(event.render())
        else:
            rendered.append(event)
    return rendered


def ingest_batch(messages: list[Message], *, client_id: str = "", on_locked=None) -> BatchResult:
    """Apply a batch in one transaction. Raises only OperationalError/InterfaceError (the
    database is unreachable: the caller retries the same batch, unacked).

    `on_locked()` is called once the batch holds its meters' row locks: a pipelined caller
    starts the next batch only then, so each meter's reports are applied in arrival order."""
    try:
        return _ingest(messages, client_id, on_locked)
    except (IntegrityError, DataError) as error:
        # A row the database refuses (a constraint we did not foresee): find the message that
        # causes it instead of retrying the batch forever, and dead-letter only that one.
        if len(messages) > 1:
            logger.warning("Batch of %d refused by the database (%s); applying one by one", len(messages), error)
            result = BatchResult()
            for message in messages:
                result.merge(ingest_batch([message], client_id=client_id))
            return result
        reason = f"rejected by the database: {error}".replace("\n", " ")[:255]
        with transaction.atomic():
            _store_dead_letters([(messages[0], reason)], client_id, timezone.now())
        return BatchResult(dead_letters=1, line_items=[f"Dead letter - {messages[0].topic}: {reason}"])


def _ingest(messages: list[Message], client_id: str, on_locked=None) -> BatchResult:
    now = timezone.now()
    result = BatchResult()
    dead: list[tuple[Message, str]] = []
    decoded: list[tuple[Message, ConsumptionReport | StatusUpdate | BalanceReport]] = []
    for message in messages:
        try:
            decoded.append((message, decode(message.topic, message.payload)))
        except CodecError as error:
            dead.append((message, str(error)[:255]))

    with transaction.atomic():
        meter_nos = {report.meter_no for _, report in decoded}
        if connection.vendor == "postgresql":
            # One round trip: lock the meters and read which identities of the batch's
            # consumption reports are already stored.
            keys = [(report.meter_no, report.dedup_key) for _, report in decoded if type(report) is ConsumptionReport]
            states, extra = _lock_meters_pg(meter_nos, keys)
        else:
            states, extra = _lock_meters(meter_nos)
        if on_locked is not None:
            on_locked()
        consumption: list[tuple[Message, ConsumptionReport]] = []
        statuses: list[tuple[Message, StatusUpdate]] = []
        balances: list[tuple[Message, BalanceReport]] = []
        for message, report in decoded:
            if report.meter_no not in states:
                dead.append((message, f"unknown meter {report.meter_no}"))
            elif isinstance(report, ConsumptionReport):
                consumption.append((message, report))
            elif isinstance(report, StatusUpdate):
                statuses.append((message, report))
            else:
                balances.append((message, report))
        touched: set[int] = set()
        if consumption:
            _apply_consumption(consumption, states, extra, now, result)
            touched.update(states[report.meter_no].meter_id for _, report in consumption)
        if statuses:
            _apply_statuses(statuses, states, now, result)
            touched.update(states[report.meter_no].meter_id for _, report in statuses)
        if balances:
            _apply_balance_reports(balances, states, now, result)
        if dead:
            _store_dead_letters(dead, client_id, now)
        if touched:
            firebase_mirror_mark(meter_ids=sorted(touched), at=now)
    result.dead_letters = len(dead)
    for message, reason in dead:
        result.line_items.append(f"Dead letter - {message.topic}: {reason}")
    return result


@dataclass(slots=True)
class _MeterRow:
    last_resync_at: datetime | None


_METER_COLUMNS = (
    "id", "meter_no", "balance_kwh", "last_energy_total_kwh", "energy_floor_kwh", "last_energy_seq", "anomaly",
    "last_resync_at",
)


def _meter_states(rows) -> tuple[dict[str, MeterState], dict[str, _MeterRow]]:
    states, extra = {}, {}
    for meter_id, meter_no, balance, high, floor, seq, anomaly, last_resync_at in rows:
        states[meter_no] = MeterState(meter_id, meter_no, balance, high, floor, seq, anomaly)
        extra[meter_no] = _MeterRow(last_resync_at)
    return states, extra


def _lock_meters(meter_nos: set[str]) -> tuple[dict[str, MeterState], dict[str, _MeterRow]]:
    if not meter_nos:
        return {}, {}
    rows = Meter.objects.select_for_update().filter(meter_no__in=meter_nos).order_by("id").values_list(*_METER_COLUMNS)
    return _meter_states(rows)


def _lock_meters_pg(
    meter_nos: set[str], keys: list[tuple[str, str]]
) -> tuple[dict[str, MeterState], dict[str, _MeterRow]]:
    """One statement: lock the batch's meters in id order (every other writer locks one meter,
    so nobody deadlocks) and, under those locks, read which of the batch's report identities
    are already stored as first copies. The ORM's `meter_no__in` of 500 names cost ~10 ms of
    Python per batch; joining the identities to the locked rows (not to the whole meter table,
    which PostgreSQL hashed for every batch) keeps the server side to a few milliseconds."""
    if not meter_nos:
        return {}, {}
    names, dedup_keys = ([list(column) for column in zip(*keys, strict=True)] if keys else [[], []])
    with _pg_cursor() as cursor:
        cursor.execute(
            f"WITH locked AS MATERIALIZED (SELECT {', '.join(_METER_COLUMNS)} FROM {Meter._meta.db_table}"
            "  WHERE meter_no = ANY(%b::varchar[]) ORDER BY id FOR UPDATE)"
            f" SELECT {', '.join(_METER_COLUMNS)}, NULL::varchar FROM locked"
            " UNION ALL"
            " SELECT NULL, l.meter_no, NULL, NULL, NULL, NULL, NULL, NULL, r.dedup_key"
            " FROM unnest(%b::varchar[], %b::varchar[]) AS t(meter_no, dedup_key)"
            " JOIN locked l ON l.meter_no = t.meter_no"
            # LIMIT 1 (the identity is unique among first copies anyway) keeps this a probe of
            # the identity index per report: as a plain join the planner sorted or hashed the
            # whole reading table whenever its statistics were stale (24 ms a batch).
            f" CROSS JOIN LATERAL (SELECT dedup_key FROM {Reading._meta.db_table}"
            "  WHERE meter_id = l.id AND dedup_key = t.dedup_key AND NOT is_duplicate LIMIT 1) AS r",
            [list(meter_nos), names, dedup_keys],
        )
        rows = cursor.fetchall()
    states, extra = _meter_states(row[:-1] for row in rows if row[0] is not None)
    for row in rows:
        if row[0] is None:
            states[row[1]].seen_keys.add(row[-1])
    return states, extra


def _load_seen_keys_orm(states: dict[str, MeterState], reports: list[ConsumptionReport]) -> None:
    pairs = {(states[r.meter_no].meter_id, r.dedup_key) for r in reports}
    by_id = {state.meter_id: state for state in states.values()}
    found = Reading.objects.filter(
        meter_id__in={meter_id for meter_id, _ in pairs},
        dedup_key__in={key for _, key in pairs},
        is_duplicate=False,
    ).values_list("meter_id", "dedup_key")
    for meter_id, key in found:
        if (meter_id, key) in pairs:
            by_id[meter_id].seen_keys.add(key)


def _apply_consumption(
    items: list[tuple[Message, ConsumptionReport]],
    states: dict[str, MeterState],
    extra: dict[str, _MeterRow],
    now: datetime,
    result: BatchResult,
) -> None:
    postgres = connection.vendor == "postgresql"
    if not postgres:
        _load_seen_keys_orm(states, [report for _, report in items])
    readings, debits = [], []
    touched: dict[str, None] = {}  # the batch's meters, in arrival order
    # Per meter, its newest report in the batch that advanced its state, with the ledger balance
    # right after it: the one whose remainingBalance is compared with the ledger. A late or
    # redelivered older report carries an older balance and must not look like drift.
    newest: dict[str, tuple[ConsumptionReport, Decimal]] = {}
    debited: dict[str, Decimal] = {}
    lines = result.line_items
    duplicates = 0
    for message, report in items:
        meter_no = report.meter_no
        state = states[meter_no]
        outcome = charge(state, report)
        timestamp_ms, key, debit, duplicate = report.timestamp_ms, report.dedup_key, outcome.debit_kwh, outcome.is_duplicate
        trusted = timestamp_ms >= TRUSTED_TIME_MIN_MS
        readings.append(
            (
                now, state.meter_id, _utc_from_ms(timestamp_ms) if trusted else now, trusted, timestamp_ms,
                report.units_consumed_kwh, report.remaining_balance_kwh, report.total_consumed_kwh, report.seq,
                report.energy_total_kwh, key, duplicate, debit, message.payload.decode(),
            )
        )
        if debit > 0:
            debits.append((LedgerKind.CONSUMPTION_DEBIT, "", "meter", now, state.meter_id, -debit,
                           f"reading:{state.meter_id}:{key}"))
            debited[meter_no] = debited[meter_no] + debit if meter_no in debited else debit
        if outcome.anomaly:
            logger.warning("Anomaly - Meter: %s, %s", meter_no, outcome.anomaly)
        touched[meter_no] = None
        if _advances(state, report, duplicate) and (
            meter_no not in newest or _order(report) >= _order(newest[meter_no][0])
        ):
            newest[meter_no] = (report, outcome.balance_after_kwh)
        duplicates += duplicate
        lines.append((meter_no, report.units_consumed_kwh, duplicate))
    result.consumption += len(items)
    result.duplicates += duplicates
    meter_rows = [
        (
            states[meter_no].meter_id, debited.get(meter_no, ZERO), states[meter_no].energy_high_kwh,
            states[meter_no].energy_floor_kwh, states[meter_no].energy_seq,
            newest[meter_no][0].remaining_balance_kwh if meter_no in newest else None, states[meter_no].anomaly[:200],
        )
        for meter_no in touched
    ]
    if postgres:
        _write_consumption_pg(readings, debits, meter_rows, now)
    else:
        _write_consumption_orm(readings, debits, meter_rows, now)
    result.debited_kwh += sum(debited.values(), ZERO)

    drifting = [
        meter_no
        for meter_no, (report, balance) in newest.items()
        if abs(report.remaining_balance_kwh - balance) > RESYNC_TOLERANCE_KWH
        and (extra[meter_no].last_resync_at is None or now - extra[meter_no].last_resync_at >= RESYNC_INTERVAL)
    ]
    for meter_no in drifting:
        meter_command_queue_balance(meter_no=meter_no, reason="resync", actor=WORKER_ACTOR)
        logger.info("Resync - Meter: %s, reported %s, ledger %s", meter_no, newest[meter_no][0].remaining_balance_kwh,
                    newest[meter_no][1])
    if drifting:
        Meter.objects.filter(id__in=[states[n].meter_id for n in drifting]).update(last_resync_at=now)
    result.events.extend(
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc_from_ms(timestamp_ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=timestamp_ms)


@contextmanager
def _pg_cursor():
    # A server-side-binding cursor on Django's own connection (same transaction): arrays go to
    # PostgreSQL as typed parameters instead of being rendered into SQL text client-side. Its
    # errors are turned into Django's (OperationalError → the worker retries the batch).
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


_READING_COLUMNS = (
    ("received_at", "timestamptz"), ("meter_id", "int8"), ("reading_at", "timestamptz"), ("time_trusted", "bool"),
    ("meter_timestamp_ms", "int8"), ("units_consumed_kwh", "numeric"), ("remaining_balance_kwh", "numeric"),
    ("total_consumed_kwh", "numeric"), ("seq", "int8"), ("energy_total_kwh", "numeric"), ("dedup_key", "text"),
    ("is_duplicate", "bool"), ("debit_kwh", "numeric"), ("raw_payload", "text"),
)
_LEDGER_COLUMNS = (
    ("kind", "text"), ("reason", "text"), ("actor", "text"), ("created_at", "timestamptz"), ("meter_id", "int8"),
    ("units_kwh", "numeric"), ("idempotency_key", "text"),
)


def _copy_rows(cursor, table: str, columns: tuple, rows: list) -> None:
    """Binary COPY straight into the table: psycopg formats each row in C, where `unnest()` of
    13 array parameters spent ~15 µs per report in Python dumping them (the largest cost of a
    batch). Constraints and triggers apply as for INSERT; a refused row fails the statement,
    which ingest_batch turns into one-by-one retries as before."""
    with cursor.copy(f"COPY {table} ({', '.join(name for name, _ in columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([kind for _, kind in columns])
        write_row = copy.write_row
        for row in rows:
            write_row(row)


def _write_consumption_pg(readings: list, debits: list, meter_rows: list, now: datetime) -> None:
    with _pg_cursor() as cursor:
        _copy_rows(cursor, Reading._meta.db_table, _READING_COLUMNS, readings)
        if debits:
            _copy_rows(cursor, LedgerEntry._meta.db_table, _LEDGER_COLUMNS, debits)
        ids, debit, high, floor, seq, reported, anomaly = (list(column) for column in zip(*meter_rows, strict=True))
        cursor.execute(
            f"UPDATE {Meter._meta.db_table} AS m SET balance_kwh = m.balance_kwh - t.debit, last_energy_total_kwh = t.high,"
            " energy_floor_kwh = t.floor, last_energy_seq = t.seq,"
            " last_reported_balance_kwh = COALESCE(t.reported, m.last_reported_balance_kwh),"
            " anomaly = t.anomaly, last_seen_at = %b"
            " FROM unnest(%b::bigint[], %b::numeric[], %b::numeric[], %b::numeric[], %b::bigint[], %b::numeric[],"
            " %b::text[]) AS t(id, debit, high, floor, seq, reported, anomaly) WHERE m.id = t.id",
            [now, ids, debit, high, floor, seq, reported, anomaly],
        )


def _write_consumption_orm(readings: list, debits: list, meter_rows: list, now: datetime) -> None:
    Reading.objects.bulk_create(
        Reading(
            received_at=now, meter_id=meter_id, reading_at=reading_at, time_trusted=trusted, meter_timestamp_ms=ts,
            units_consumed_kwh=units, remaining_balance_kwh=remaining, total_consumed_kwh=total, seq=seq,
            energy_total_kwh=energy, dedup_key=key, is_duplicate=duplicate, debit_kwh=debit, raw_payload=raw,
        )
        for _, meter_id, reading_at, trusted, ts, units, remaining, total, seq, energy, key, duplicate, debit, raw in readings
    )
    LedgerEntry.objects.bulk_create(
        LedgerEntry(
            meter_id=meter_id, kind=LedgerKind.CONSUMPTION_DEBIT, units_kwh=units, idempotency_key=key, actor="meter",
            created_at=now,
        )
        for _, _, _, _, meter_id, units, key in debits
    )
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {Meter._meta.db_table} SET balance_kwh = balance_kwh - %s, last_energy_total_kwh = %s,"
            " energy_floor_kwh = %s, last_energy_seq = %s,"
            " last_reported_balance_kwh = COALESCE(%s, last_reported_balance_kwh), anomaly = %s,"
            " last_seen_at = %s WHERE id = %s",
            [(debit, high, floor, seq, reported, anomaly, now, meter_id)
             for meter_id, debit, high, floor, seq, reported, anomaly in meter_rows],
        )


def _apply_statuses(
    items: list[tuple[Message, StatusUpdate]], states: dict[str, MeterState], now: datetime, result: BatchResult
) -> None:
    StatusEvent.objects.bulk_create(
        StatusEvent(
            meter_id=states[s.meter_no].meter_id, status=s.status, message=s.message, balance_kwh=s.balance_kwh,
            wifi_rssi=s.wifi_rssi, relay=s.relay, firmware=s.firmware, uptime_s=s.uptime_s,
            reset_reason=s.reset_reason, meter_timestamp_ms=s.timestamp_ms, received_at=now,
            raw_payload=message.payload.decode(),
        )
        for message, s in items
    )
    latest: dict[str, StatusUpdate] = {}
    reconnected: list[str] = []
    for _, status in items:
        latest[status.meter_no] = status
        if status.status == "online" and status.meter_no not in reconnected:
            reconnected.append(status.meter_no)
        result.line_items.append(f"Status update - Meter: {status.meter_no}, Status: {status.status}")
    for meter_no, status in latest.items():
        online = status.status != "offline"
        fields = {"online": online}
        if online:  # the Last Will is published by the broker, not a sign of life
            fields["last_seen_at"] = now
        if status.relay:
            fields["relay_state"] = status.relay
        Meter.objects.filter(id=states[meter_no].meter_id).update(**fields)
        result.events.append(
            {"meterNo": meter_no, "type": "status", "status": status.status, "online": online,
             "relay": status.relay or None, "message": status.message, "at": now.isoformat()}
        )
    # PROTOCOL.md: a meter that reports `online` after (re)connecting gets the current balance.
    for meter_no in reconnected:
        meter_command_queue_balance(meter_no=meter_no, reason="reconnect", actor=WORKER_ACTOR)
    result.statuses += len(items)


def _apply_balance_reports(
    items: list[tuple[Message, BalanceReport]], states: dict[str, MeterState], now: datetime, result: BatchResult
) -> None:
    for _, report in items:
        meter_id = states[report.meter_no].meter_id
        commands = MeterCommand.objects.filter(meter_id=meter_id, kind=CommandKind.BALANCE)
        if report.cmd_id:
            commands = commands.filter(cmd_id=report.cmd_id)
        else:
            commands = commands.filter(status=CommandStatus.SENT).order_by("-id")[:1]
        command_id = commands.values_list("id", flat=True).first()
        if command_id is None:
            result.line_items.append(
                f"Balance report - Meter: {report.meter_no}, Balance: {report.balance_kwh} (no matching command)"
            )
        else:
            MeterCommand.objects.filter(id=command_id).exclude(status=CommandStatus.ACKNOWLEDGED).update(
                status=CommandStatus.ACKNOWLEDGED, acknowledged_at=now, acknowledged_balance_kwh=report.balance_kwh
            )
            result.line_items.append(f"Balance report - Meter: {report.meter_no}, Balance: {decimal_text(report.balance_kwh)}")
        Meter.objects.filter(id=meter_id).update(last_seen_at=now)
    result.balance_reports += len(items)


def _store_dead_letters(dead: list[tuple[Message, str]], client_id: str, now: datetime) -> None:
    DeadLetter.objects.bulk_create(
        DeadLetter(topic=message.topic[:255], payload=message.payload, reason=reason, received_at=now, client_id=client_id[:64])
        for message, reason in dead
    )
