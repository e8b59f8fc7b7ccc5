"""Where a batch of consumption reports is read from and written to: two storage strategies
behind one interface, chosen by the database (`store_for_connection`).

- `PostgresStore`: one statement locks the batch's meters and reads the report identities
  already stored; binary COPY writes readings and ledger rows; one UPDATE over `unnest()` arrays
  writes the meters. The production path.
- `OrmStore`: the same reads and writes through the ORM (`select_for_update`, `bulk_create`,
  an `executemany` UPDATE), for any database Django supports (SQLite in development).

Both write exactly the rows of `ReadingRow`, `DebitRow` and `MeterRow`, which the service in
`meters.consumption` decides; tests/meters/test_consumption_stores.py feeds one randomized trace
through both and compares every row.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple, Protocol

import psycopg
from django.db import connection

from meters.consumption.rules import History, MeterState
from meters.models import LedgerEntry, LedgerKind, Meter, Reading


class ReadingRow(NamedTuple):
    """One `meters.Reading`: a report as received, with what it was charged."""

    received_at: datetime
    meter_id: int
    reading_at: datetime
    time_trusted: bool
    meter_timestamp_ms: int
    units_consumed_kwh: Decimal
    remaining_balance_kwh: Decimal
    total_consumed_kwh: Decimal
    seq: int | None
    energy_total_kwh: Decimal | None
    reg_id: str
    dedup_key: str
    is_duplicate: bool
    debit_kwh: Decimal
    held_kwh: Decimal
    raw_payload: str


class DebitRow(NamedTuple):
    """One consumption debit in the ledger (`meters.LedgerEntry`); `units_kwh` is negative."""

    meter_id: int
    units_kwh: Decimal
    idempotency_key: str
    created_at: datetime
    kind: str = LedgerKind.CONSUMPTION_DEBIT
    actor: str = "meter"
    reason: str = ""


class MeterRow(NamedTuple):
    """What a batch changes on one meter: its balance (by `debit_kwh`), the state of its current
    register history, the newest remainingBalance it reported (None: keep the stored one) and its
    anomaly."""

    meter_id: int
    debit_kwh: Decimal
    reg_id: str
    reg_generation: int
    energy_high_kwh: Decimal | None
    energy_floor_kwh: Decimal | None
    energy_seq: int | None
    energy_high_at_ms: int | None
    energy_floor_at_ms: int | None
    energy_suspect_kwh: Decimal | None
    energy_held_kwh: Decimal
    reported_balance_kwh: Decimal | None
    anomaly: str

    @classmethod
    def of(cls, state: MeterState, debit_kwh: Decimal, reported_balance_kwh: Decimal | None) -> MeterRow:
        h = state.current
        return cls(
            state.meter_id, debit_kwh, h.reg_id, state.generation, h.high, h.floor, h.high_seq, h.high_at_ms,
            h.floor_at_ms, h.suspect, h.held, reported_balance_kwh, state.anomaly[:200],
        )


class ConsumptionStore(Protocol):
    def lock_meters(self, meter_nos: set[str], identities: list[tuple[str, str]]) -> dict[str, MeterState]:
        """Lock the meters (in id order: every other writer locks one meter, so nobody
        deadlocks) and return their state, with the given (meterNo, identity) pairs that are
        already stored as first copies in `seen_keys`. Unknown meters are left out."""

    def write(self, readings: list[ReadingRow], debits: list[DebitRow], meters: list[MeterRow], now: datetime) -> None:
        """Write a batch's readings, ledger debits and meter changes (inside the caller's transaction)."""


# The meter columns the rules need (see _state).
_STATE_COLUMNS = (
    "id", "meter_no", "balance_kwh", "reg_id", "reg_generation", "last_energy_total_kwh", "energy_floor_kwh",
    "last_energy_seq", "energy_high_at_ms", "energy_floor_at_ms", "energy_suspect_kwh", "energy_held_kwh",
    "rated_max_kw", "anomaly", "online", "last_resync_at",
)


def _state(row) -> MeterState:
    (meter_id, meter_no, balance, reg_id, generation, high, floor, seq, high_at, floor_at, suspect, held, rated,
     anomaly, online, last_resync_at) = row
    current = History(reg_id, floor, high, seq, high_at, floor_at, suspect, held, provisional=reg_id.startswith("~"))
    return MeterState(meter_id, meter_no, balance, current, rated, generation, anomaly, online, last_resync_at)


def _seen(state: MeterState, key: str, units: Decimal, total: Decimal) -> None:
    state.seen[key] = (units, total)


class OrmStore:
    def lock_meters(self, meter_nos: set[str], identities: list[tuple[str, str]]) -> dict[str, MeterState]:
        if not meter_nos:
            return {}
        rows = Meter.objects.select_for_update().filter(meter_no__in=meter_nos).order_by("id").values_list(*_STATE_COLUMNS)
        states = {row[1]: _state(row) for row in rows}
        pairs = {(states[meter_no].meter_id, key) for meter_no, key in identities if meter_no in states}
        if pairs:
            by_id = {state.meter_id: state for state in states.values()}
            found = Reading.objects.filter(
                meter_id__in={meter_id for meter_id, _ in pairs},
                dedup_key__in={key for _, key in pairs},
                is_duplicate=False,
            ).values_list("meter_id", "dedup_key", "units_consumed_kwh", "total_consumed_kwh")
            for meter_id, key, units, total in found:
                if (meter_id, key) in pairs:
                    _seen(by_id[meter_id], key, units, total)
        return states

    def write(self, readings: list[ReadingRow], debits: list[DebitRow], meters: list[MeterRow], now: datetime) -> None:
        Reading.objects.bulk_create(Reading(**row._asdict()) for row in readings)
        LedgerEntry.objects.bulk_create(LedgerEntry(**row._asdict()) for row in debits)
        with connection.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {Meter._meta.db_table} SET balance_kwh = balance_kwh - %s, reg_id = %s, reg_generation = %s,"
                " last_energy_total_kwh = %s, energy_floor_kwh = %s, last_energy_seq = %s, energy_high_at_ms = %s,"
                " energy_floor_at_ms = %s, energy_suspect_kwh = %s, energy_held_kwh = %s,"
                " last_reported_balance_kwh = COALESCE(%s, last_reported_balance_kwh), anomaly = %s,"
                " last_seen_at = %s WHERE id = %s",
                [(*m[1:], now, m.meter_id) for m in meters],
            )


# PostgreSQL types of the COPY columns, by field name.
_PG_TYPES = {
    "received_at": "timestamptz", "meter_id": "int8", "reading_at": "timestamptz", "time_trusted": "bool",
    "meter_timestamp_ms": "int8", "units_consumed_kwh": "numeric", "remaining_balance_kwh": "numeric",
    "total_consumed_kwh": "numeric", "seq": "int8", "energy_total_kwh": "numeric", "dedup_key": "text",
    "is_duplicate": "bool", "debit_kwh": "numeric", "raw_payload": "text", "units_kwh": "numeric",
    "idempotency_key": "text", "created_at": "timestamptz", "kind": "text", "actor": "text", "reason": "text",
    "reg_id": "text", "held_kwh": "numeric",
}


@contextmanager
def _pg_cursor():
    # A server-side-binding cursor on Django's own connection (same transaction): arrays go to
    # PostgreSQL as typed parameters instead of being rendered into SQL text client-side. Its
    # errors are turned into Django's (OperationalError → the worker retries the batch).
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield cursor


def _copy(cursor, table: str, row_type: type[NamedTuple], rows: list) -> None:
    """Binary COPY straight into the table: psycopg formats each row in C, which is the cheapest
    way to hand thousands of rows over. Constraints and triggers apply as for INSERT; a refused
    row fails the statement (the worker then retries the batch's messages one by one)."""
    columns = row_type._fields
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([_PG_TYPES[name] for name in columns])
        write_row = copy.write_row
        for row in rows:
            write_row(row)


class PostgresStore:
    def lock_meters(self, meter_nos: set[str], identities: list[tuple[str, str]]) -> dict[str, MeterState]:
        """One round trip. The identities are joined to the locked rows (not to the whole meter
        table) and probed one by one with LIMIT 1 (the identity is unique among first copies
        anyway): as a plain join the planner may sort or hash the whole reading table when its
        statistics are stale."""
        if not meter_nos:
            return {}
        names, keys = ([list(column) for column in zip(*identities, strict=True)] if identities else [[], []])
        columns = ", ".join(_STATE_COLUMNS)
        with _pg_cursor() as cursor:
            cursor.execute(
                f"WITH locked AS MATERIALIZED (SELECT {columns} FROM {Meter._meta.db_table}"
                "  WHERE meter_no = ANY(%b::varchar[]) ORDER BY id FOR UPDATE),"
                " seen AS (SELECT l.id,"
                "   array_agg(concat_ws('|', r.dedup_key, r.units_consumed_kwh, r.total_consumed_kwh)) AS keys"
                "  FROM unnest(%b::varchar[], %b::varchar[]) AS t(meter_no, dedup_key)"
                "  JOIN locked l ON l.meter_no = t.meter_no"
                f"  CROSS JOIN LATERAL (SELECT dedup_key, units_consumed_kwh, total_consumed_kwh"
                f"   FROM {Reading._meta.db_table}"
                "   WHERE meter_id = l.id AND dedup_key = t.dedup_key AND NOT is_duplicate LIMIT 1) AS r"
                "  GROUP BY l.id)"
                f" SELECT {', '.join('l.' + name for name in _STATE_COLUMNS)}, s.keys"
                " FROM locked l LEFT JOIN seen s ON s.id = l.id",
                [list(meter_nos), names, keys],
            )
            rows = cursor.fetchall()
        states = {}
        for row in rows:
            state = _state(row[:-1])
            for found in row[-1] or ():
                key, units, total = found.split("|")
                _seen(state, key, Decimal(units), Decimal(total))
            states[state.meter_no] = state
        return states

    def write(self, readings: list[ReadingRow], debits: list[DebitRow], meters: list[MeterRow], now: datetime) -> None:
        with _pg_cursor() as cursor:
            if readings:
                _copy(cursor, Reading._meta.db_table, ReadingRow, readings)
            if debits:
                _copy(cursor, LedgerEntry._meta.db_table, DebitRow, debits)
            if not meters:
                return
            cursor.execute(
                f"UPDATE {Meter._meta.db_table} AS m SET balance_kwh = m.balance_kwh - t.debit, reg_id = t.reg_id,"
                " reg_generation = t.gen, last_energy_total_kwh = t.high, energy_floor_kwh = t.floor,"
                " last_energy_seq = t.seq, energy_high_at_ms = t.high_at, energy_floor_at_ms = t.floor_at,"
                " energy_suspect_kwh = t.suspect, energy_held_kwh = t.held,"
                " last_reported_balance_kwh = COALESCE(t.reported, m.last_reported_balance_kwh),"
                " anomaly = t.anomaly, last_seen_at = %b"
                " FROM unnest(%b::bigint[], %b::numeric[], %b::text[], %b::int[], %b::numeric[], %b::numeric[],"
                " %b::bigint[], %b::bigint[], %b::bigint[], %b::numeric[], %b::numeric[], %b::numeric[], %b::text[])"
                " AS t(id, debit, reg_id, gen, high, floor, seq, high_at, floor_at, suspect, held, reported, anomaly)"
                " WHERE m.id = t.id",
                [now, *(list(column) for column in zip(*meters, strict=True))],
            )


def store_for_connection() -> ConsumptionStore:
    return PostgresStore() if connection.vendor == "postgresql" else OrmStore()
