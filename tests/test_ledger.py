"""The ledger services: exact, idempotent, append-only, safe under concurrency."""

import threading
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections

from core.errors import Conflict, InvalidInput, NotFound
from meters import services
from meters.consumption import ledger_debit
from meters.models import LedgerEntry, LedgerKind, Meter, MeterCommand
from meters.selectors import ledger_statement, meter_balance_get
from tests.factories import consumption_report

pytestmark = pytest.mark.django_db


def test_credit_then_debit_is_exact(alice_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="10.5", amount_kes="262.50", idempotency_key="c1", actor="mpesa")
    ledger_debit(report=consumption_report("METER-A1", "0.0048", seq=1))
    ledger_debit(report=consumption_report("METER-A1", "0.000001", seq=2))
    assert meter_balance_get(meter_no="METER-A1") == Decimal("10.495199")
    kinds = list(LedgerEntry.objects.order_by("id").values_list("kind", "units_kwh"))
    assert kinds == [
        (LedgerKind.PAYMENT_CREDIT, Decimal("10.5")),
        (LedgerKind.CONSUMPTION_DEBIT, Decimal("-0.0048")),
        (LedgerKind.CONSUMPTION_DEBIT, Decimal("-0.000001")),
    ]


def test_same_idempotency_key_twice_is_one_entry(alice_meter):
    first = services.ledger_credit(meter_no="METER-A1", units_kwh="4", idempotency_key="receipt:NLJ7RT61SV", actor="mpesa")
    second = services.ledger_credit(meter_no="METER-A1", units_kwh="4", idempotency_key="receipt:NLJ7RT61SV", actor="mpesa")
    assert first.created and not second.created
    assert second.entry.pk == first.entry.pk
    assert LedgerEntry.objects.count() == 1
    assert meter_balance_get(meter_no="METER-A1") == Decimal("4")


def test_reused_key_for_a_different_posting_is_a_conflict(alice_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="4", idempotency_key="k", actor="mpesa")
    with pytest.raises(Conflict):
        services.ledger_credit(meter_no="METER-A1", units_kwh="5", idempotency_key="k", actor="mpesa")
    assert meter_balance_get(meter_no="METER-A1") == Decimal("4")


@pytest.mark.parametrize(
    "units",
    ["-1", "0", "NaN", "Infinity", "-Infinity", "abc", "", "1.0000001", 1.5, True, None, "1e9"],
)
def test_bad_amounts_are_refused_and_nothing_is_written(alice_meter, units):
    with pytest.raises(InvalidInput):
        services.ledger_credit(meter_no="METER-A1", units_kwh=units, idempotency_key=f"bad:{units!r}", actor="x")
    assert LedgerEntry.objects.count() == 0
    assert meter_balance_get(meter_no="METER-A1") == Decimal("0")


@pytest.mark.parametrize("meter_no", ["METER/1", "METER+", "METER#", "MET ER", "", "X" * 33, "smartmeter/+/x"])
def test_bad_meter_numbers_are_refused(tariff, meter_no):
    with pytest.raises(InvalidInput):
        services.ledger_credit(meter_no=meter_no, units_kwh="1", idempotency_key="k", actor="mpesa")
    with pytest.raises(InvalidInput):
        services.meter_provision(meter_no=meter_no, owner=None, tariff=tariff)
    assert not Meter.objects.exists()
    assert not LedgerEntry.objects.exists()


def test_unknown_meter_is_not_found(db):
    with pytest.raises(NotFound):
        ledger_debit(report=consumption_report("NOPE001", "1", seq=1))
    assert not LedgerEntry.objects.exists()


def test_missing_key_or_actor_is_refused(alice_meter):
    with pytest.raises(InvalidInput):
        services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="", actor="mpesa")
    with pytest.raises(InvalidInput):
        services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="k", actor="")
    assert not LedgerEntry.objects.exists()


def test_adjustment_needs_a_reason_records_actor_and_tells_the_meter(alice_meter, staff_user):
    with pytest.raises(InvalidInput):
        services.ledger_adjust(meter_no="METER-A1", units_kwh="2", reason="  ", actor=staff_user)
    posting = services.ledger_adjust(meter_no="METER-A1", units_kwh="-1.25", reason="Meter swap", actor=staff_user)
    assert posting.entry.actor == "sam"
    assert posting.entry.reason == "Meter swap"
    assert posting.balance_kwh == Decimal("-1.25")
    command = MeterCommand.objects.get()
    assert (command.kind, command.reason, command.balance_kwh) == ("balance", "adjustment", Decimal("-1.25"))


def test_ledger_rows_are_append_only(alice_meter):
    entry = services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="k", actor="mpesa").entry
    entry.reason = "tampered"
    with pytest.raises(ValueError):
        entry.save()
    with pytest.raises(ValueError):
        entry.delete()


def test_database_refuses_updates_of_ledger_rows_on_postgres(postgres, alice_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="1", idempotency_key="k", actor="mpesa")
    from django.db import DatabaseError, transaction

    with pytest.raises(DatabaseError), transaction.atomic():
        LedgerEntry.objects.update(units_kwh=Decimal("100"))
    assert meter_balance_get(meter_no="METER-A1") == Decimal("1")


def test_statement_has_running_balance(alice_meter):
    services.ledger_credit(meter_no="METER-A1", units_kwh="3", idempotency_key="a", actor="mpesa")
    ledger_debit(report=consumption_report("METER-A1", "0.5", seq=1))
    services.ledger_credit(meter_no="METER-A1", units_kwh="1.25", idempotency_key="c", actor="mpesa")
    rows = [(e.units_kwh, e.balance_after_kwh) for e in ledger_statement(meter=alice_meter)]
    assert rows == [(Decimal("1.25"), Decimal("3.75")), (Decimal("-0.5"), Decimal("2.5")), (Decimal("3"), Decimal("3"))]


def test_ledger_check_passes_then_names_the_meter_that_drifted(alice_meter, bob_meter, capsys):
    services.ledger_credit(meter_no="METER-A1", units_kwh="2", idempotency_key="a", actor="mpesa")
    call_command("ledger_check")
    assert "all balances equal" in capsys.readouterr().out
    # Corrupt the cache behind the services' back, as a bug or a hand edit would.
    Meter.objects.filter(meter_no="METER-B1").update(balance_kwh=Decimal("0.000001"))
    with pytest.raises(CommandError):
        call_command("ledger_check")
    assert "METER-B1" in capsys.readouterr().err


@pytest.mark.django_db(transaction=True)
def test_concurrent_credits_and_debits_lose_nothing(postgres, alice_meter, bob_meter):
    """8 threads × 500 postings on one meter (and a second meter interleaved) on real PostgreSQL."""
    threads, per_thread = 8, 500
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                key = f"t{worker}:{i}"
                if i % 2 == 0:
                    services.ledger_credit(meter_no="METER-A1", units_kwh="0.333333", idempotency_key=key, actor="test")
                else:
                    ledger_debit(report=consumption_report("METER-A1", "0.111111", seq=worker * per_thread + i))
                if i % 50 == 0:
                    # The same key from every thread at once: exactly one of them posts.
                    services.ledger_credit(meter_no="METER-B1", units_kwh="1", idempotency_key=f"shared:{i}", actor="test")
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)
        finally:
            connections.close_all()

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors[:3]

    credits = threads * (per_thread // 2)
    expected = Decimal("0.333333") * credits - Decimal("0.111111") * (threads * per_thread - credits)
    assert meter_balance_get(meter_no="METER-A1") == expected
    assert meter_balance_get(meter_no="METER-B1") == Decimal(per_thread // 50)
    assert LedgerEntry.objects.filter(meter__meter_no="METER-A1").count() == threads * per_thread
    call_command("ledger_check")
    assert connection.vendor == "postgresql"
