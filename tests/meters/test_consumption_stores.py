"""The two storage strategies of meters.consumption write the same rows.

One randomized trace of a small fleet (reports shuffled, duplicated and lost; reboots that reset
totalConsumed and jump seq; meters with and without energyTotal and seq; statuses and balance
reports among them) goes through `ingest_reports` with the PostgreSQL store, the rows are read,
the whole thing is rolled back, and the same trace goes through the portable ORM store. Every
row of every table the batch writes must be the same (ids and random command ids aside).
"""

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.forms.models import model_to_dict

from meters import services
from meters.consumption import ingest_reports
from meters.consumption.stores import OrmStore, PostgresStore
from meters.models import FirebaseMirror, LedgerEntry, Meter, MeterCommand, Reading, StatusEvent
from meters.reports import BalanceReport, ConsumptionReport, StatusUpdate

KINDS = ("energy+seq", "energy", "seq", "seed")


def _trace(seed: int, meter_nos: list[str]) -> list[list]:
    rng = random.Random(seed)
    reports = []
    for index, meter_no in enumerate(meter_nos):
        kind = KINDS[index % len(KINDS)]
        energy, total, seq, ts = Decimal(rng.randint(0, 5000)), Decimal(0), 0, 1_700_000_000_000
        for _ in range(rng.randint(15, 40)):
            if rng.random() < 0.1:  # a reboot: totalConsumed restarts, seq jumps to the next block
                total, seq = Decimal(0), seq + 64
            units = Decimal(rng.randint(0, 20000)) / 10000
            energy, total, seq, ts = energy + units, total + units, seq + 1, ts + 30_000
            report = ConsumptionReport(
                meter_no, units, Decimal(rng.randint(-500, 5000)) / 100, total, ts,
                seq if "seq" in kind else None, energy if "energy" in kind else None,
                raw_payload=f'{{"meterNo":"{meter_no}","n":{seq}}}',
            )
            if rng.random() < 0.1:
                continue  # lost
            reports.append(report)
            if rng.random() < 0.15:
                reports.append(report)  # a redelivered copy
        reports.append(StatusUpdate(meter_no, rng.choice(["online", "low_balance", "offline"]), balance_kwh=energy % 7,
                                    raw_payload="{}"))
        reports.append(BalanceReport(meter_no, Decimal("1.5"), cmd_id="no-such-command"))
    reports.append(ConsumptionReport("UNKNOWN-METER", Decimal("1"), Decimal("0"), Decimal("1"), 1))
    rng.shuffle(reports)
    batches, start = [], 0
    while start < len(reports):
        size = rng.randint(1, 40)
        batches.append(reports[start:start + size])
        start += size
    return batches


def _rows() -> dict:
    def dump(model, exclude=("id",), order="id"):
        return [
            {k: v for k, v in model_to_dict(row).items() if k not in exclude}
            for row in model.objects.order_by(order)
        ]

    return {
        "meters": dump(Meter, exclude=()),
        "readings": dump(Reading),
        "ledger": dump(LedgerEntry),
        "statuses": dump(StatusEvent),
        "commands": dump(MeterCommand, exclude=("id", "cmd_id")),
        "mirror": dump(FirebaseMirror, exclude=(), order="meter_id"),
    }


class _Rollback(Exception):
    pass


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_postgres_and_orm_stores_write_identical_rows(postgres, tariff, seed):
    meter_nos = [f"EQ{n:02d}" for n in range(8)]
    for meter_no in meter_nos:
        services.meter_provision(meter_no=meter_no, owner=None, tariff=tariff)
        services.ledger_credit(meter_no=meter_no, units_kwh="25", idempotency_key=f"open:{meter_no}", actor="test")
    batches = _trace(seed, meter_nos)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    results = []
    for store in (PostgresStore(), OrmStore()):
        try:
            with transaction.atomic():
                unknown = 0
                for n, batch in enumerate(batches):
                    outcome = ingest_reports(batch, now=start + timedelta(seconds=n), store=store, send_events=False)
                    unknown += len(outcome.unknown)
                results.append((_rows(), unknown))
                raise _Rollback
        except _Rollback:
            pass
    (pg_rows, pg_unknown), (orm_rows, orm_unknown) = results
    assert pg_unknown == orm_unknown == 1
    assert len(pg_rows["readings"]) > 100 and len(pg_rows["ledger"]) > 50
    assert any(r["is_duplicate"] for r in pg_rows["readings"])
    for table in pg_rows:
        assert pg_rows[table] == orm_rows[table], table
