"""Batched ingest against the database (SQLite's ORM path or PostgreSQL's set-based path, per
DATABASE_URL): PROTOCOL.md's accounting, duplicates, order, status, balance reports, dead letters."""

import random
from decimal import Decimal

import orjson
import pytest
from django.core.management import call_command

from meters import services
from meters.models import (
    CommandStatus,
    FirebaseMirror,
    LedgerEntry,
    Meter,
    MeterCommand,
    Reading,
    RegisterHistory,
    StatusEvent,
)
from meters.selectors import ledger_mismatches, meter_balance_get
from mqtt_worker.codec import ConsumptionReport, encode_consumption_report
from mqtt_worker.ingest import Message, ingest_batch
from mqtt_worker.models import DeadLetter
from tests.mqtt_worker.test_codec import SEED_BALANCE, SEED_CONSUMPTION, SEED_STATUS

pytestmark = pytest.mark.django_db


@pytest.fixture
def meter001(tariff):
    meter = services.meter_provision(meter_no="METER001", owner=None, tariff=tariff)
    services.ledger_credit(meter_no="METER001", units_kwh="10.5", idempotency_key="pay-1", actor="mpesa")
    return meter


def consumption(meter_no, units, *, seq=None, energy=None, ts=1698765432000, total=None, remaining=None):
    """A report as a meter sends it, numbers written exactly (through the codec's encoder)."""
    units = Decimal(str(units))
    report = ConsumptionReport(
        meter_no, units, Decimal(str(remaining if remaining is not None else 0)),
        Decimal(str(total)) if total is not None else units, ts, seq, None if energy is None else Decimal(str(energy)),
    )
    return Message(f"smartmeter/{meter_no}/consumption", encode_consumption_report(report))


@pytest.fixture(autouse=True)
def _ledger_stays_exact():
    yield
    assert ledger_mismatches() == []
    call_command("ledger_check")


def test_seed_examples_are_accepted_and_accounted(meter001):
    result = ingest_batch([
        Message("smartmeter/METER001/consumption", SEED_CONSUMPTION),
        Message("smartmeter/METER001/status", SEED_STATUS),
        Message("smartmeter/METER001/balance", SEED_BALANCE),
    ], client_id="t")
    assert (result.consumption, result.statuses, result.balance_reports, result.dead_letters) == (1, 1, 1, 0)
    assert meter_balance_get(meter_no="METER001") == Decimal("10.4952")
    reading = Reading.objects.get()
    assert (reading.debit_kwh, reading.remaining_balance_kwh, reading.time_trusted) == (
        Decimal("0.0048"), Decimal("10.4952"), True)
    assert reading.reading_at.timestamp() == 1698765432
    entry = LedgerEntry.objects.filter(kind="consumption_debit").get()
    assert (entry.units_kwh, entry.actor, entry.idempotency_key) == (
        Decimal("-0.0048"), "meter", f"reading:{meter001.pk}:t:1698765432000:0.004800")
    meter = Meter.objects.get(meter_no="METER001")
    assert meter.online and meter.last_seen_at and meter.last_reported_balance_kwh == Decimal("10.4952")
    assert StatusEvent.objects.get().wifi_rssi == -65
    # `online` pushes the current balance (after this batch's consumption), the seed's schema + ext.
    command = MeterCommand.objects.get(reason="reconnect")
    assert command.balance_kwh == Decimal("10.4952") and command.status == CommandStatus.QUEUED
    assert FirebaseMirror.objects.get(meter=meter).version >= 1


def test_duplicate_copies_are_stored_flagged_and_never_debited(meter001):
    report = consumption("METER001", 0.25, remaining=10.25)
    ingest_batch([report, report], client_id="t")
    ingest_batch([report], client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("10.25")
    assert list(Reading.objects.order_by("id").values_list("is_duplicate", flat=True)) == [False, True, True]
    with_seq = [consumption("METER001", 0.5, seq=9, ts=1), consumption("METER001", 0.5, seq=9, ts=2)]
    ingest_batch(with_seq, client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("9.75")


def test_energy_total_debits_deltas_whatever_the_arrival_order(meter001):
    """Contiguous reports of one meter: E_i = E_(i-1) + u_i. Every order (and every split into
    batches) must debit exactly Σu = high − (first start)."""
    rng = random.Random(7)
    units = [Decimal(rng.randint(1, 5000)) / 10000 for _ in range(40)]
    energy, reports = Decimal("100"), []
    for seq, u in enumerate(units, start=1):
        energy += u
        reports.append(consumption("METER001", str(u), seq=seq, energy=str(energy)))
    copies = reports + rng.sample(reports, 10)
    rng.shuffle(copies)
    for start in range(0, len(copies), 7):
        ingest_batch(copies[start:start + 7], client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("10.5") - sum(units)
    assert Reading.objects.filter(is_duplicate=True).count() == 10
    meter = Meter.objects.get(meter_no="METER001")
    assert (meter.energy_floor_kwh, meter.last_energy_total_kwh, meter.anomaly) == (Decimal("100"), energy, "")


def test_lost_report_costs_nothing_and_stale_replay_debits_nothing(meter001):
    ingest_batch([consumption("METER001", 0.1, seq=1, energy=50.1)], client_id="t")
    ingest_batch([consumption("METER001", 0.2, seq=3, energy=50.5)], client_id="t")  # seq 2 (0.2) was lost
    assert meter_balance_get(meter_no="METER001") == Decimal("10.0")
    ingest_batch([consumption("METER001", 0.2, seq=2, energy=50.3)], client_id="t")  # late, inside the range
    assert meter_balance_get(meter_no="METER001") == Decimal("10.0")
    assert Reading.objects.get(seq=2).debit_kwh == 0


def test_register_backwards_without_reg_id_opens_a_provisional_history(meter001):
    ingest_batch([consumption("METER001", 0.1, seq=10, energy=500)], client_id="t")
    # No regId, no seq, no time: a replay cannot be told from a reset, and no late report can be
    # 497 kWh below the range. A provisional history takes it (for staff to confirm or merge).
    ingest_batch([consumption("METER001", 0.1, energy=3, ts=5)], client_id="t")
    meter = Meter.objects.get(meter_no="METER001")
    assert "reset suspected" in meter.anomaly and meter.reg_id == "~1" and meter.last_energy_total_kwh == Decimal("3")
    assert meter_balance_get(meter_no="METER001") == Decimal("10.3")
    histories = {h.reg_id: h for h in RegisterHistory.objects.filter(meter=meter)}
    assert histories[""].high_kwh == Decimal("500") and not histories[""].current and histories[""].closed_at
    assert histories["~1"].current and histories["~1"].review == "pending"
    assert StatusEvent.objects.filter(meter=meter, status="register_reset").count() == 1
    # Billing goes on in the provisional history.
    ingest_batch([consumption("METER001", 0.3, energy=3.3, ts=30005)], client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("10.0")
    # A late report of the old register is accounted in the old history: inside its range, nothing.
    ingest_batch([consumption("METER001", 0.05, seq=9, energy=499.95)], client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("10.0")
    assert Reading.objects.get(seq=9).reg_id == "" and Meter.objects.get(meter_no="METER001").reg_id == "~1"


def test_time_unknown_timestamps_are_placed_at_receipt(meter001):
    ingest_batch([consumption("METER001", 0.1, ts=123456)], client_id="t")
    reading = Reading.objects.get()
    assert not reading.time_trusted and reading.reading_at == reading.received_at
    assert reading.meter_timestamp_ms == 123456


def test_drift_queues_one_rate_limited_resync(meter001):
    ingest_batch([consumption("METER001", 0.5, seq=1, remaining=10.0)], client_id="t")  # agrees with the ledger
    assert not MeterCommand.objects.exists()
    ingest_batch([consumption("METER001", 0.5, seq=2, remaining=7.0)], client_id="t")
    ingest_batch([consumption("METER001", 0.5, seq=3, remaining=6.0)], client_id="t")
    command = MeterCommand.objects.get()
    assert (command.reason, command.balance_kwh) == ("resync", Decimal("9.5"))
    assert Meter.objects.get(meter_no="METER001").last_resync_at is not None


def test_balance_report_acknowledges_by_cmd_id_else_latest_sent(meter001):
    first = services.meter_command_queue_balance(meter_no="METER001", reason="payment")
    second = services.meter_command_queue_balance(meter_no="METER001", reason="payment")
    MeterCommand.objects.filter(pk__in=[first.pk, second.pk]).update(status=CommandStatus.SENT)
    ingest_batch([Message("smartmeter/METER001/balance", orjson.dumps(
        {"meterNo": "METER001", "balance": 10.5, "cmdId": first.cmd_id, "timestamp": 1}))], client_id="t")
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.acknowledged_balance_kwh, second.status) == ("acknowledged", Decimal("10.5"), "sent")
    ingest_batch([Message("smartmeter/METER001/balance", SEED_BALANCE)], client_id="t")
    second.refresh_from_db()
    assert second.status == "acknowledged" and second.acknowledged_at is not None


def test_status_offline_and_relay_are_recorded(meter001):
    ingest_batch([Message("smartmeter/METER001/status", b'{"meterNo":"METER001","status":"online","relay":"on"}')], client_id="t")
    ingest_batch([Message("smartmeter/METER001/status", b'{"meterNo":"METER001","status":"offline"}')], client_id="t")
    meter = Meter.objects.get(meter_no="METER001")
    assert (meter.online, meter.relay_state) == (False, "on")
    assert list(StatusEvent.objects.order_by("id").values_list("status", flat=True)) == ["online", "offline"]


def test_bad_messages_become_dead_letters_and_valid_ones_around_them_count(meter001):
    bad = [
        Message("smartmeter/METER001/consumption", b"\xff\xfe not json"),
        Message("smartmeter/METER001/consumption", b'{"meterNo":"OTHER","unitsConsumed":1,"remainingBalance":1,'
                                                   b'"totalConsumed":1,"timestamp":1}'),
        Message("smartmeter/NOPE/consumption", b'{"meterNo":"NOPE","unitsConsumed":1,"remainingBalance":1,'
                                               b'"totalConsumed":1,"timestamp":1}'),
        Message("smartmeter/METER001/consumption", b"x" * 2000),
    ]
    result = ingest_batch([consumption("METER001", 0.5, seq=1), *bad, consumption("METER001", 0.5, seq=2)], client_id="w1")
    assert result.dead_letters == 4 and result.consumption == 2
    assert meter_balance_get(meter_no="METER001") == Decimal("9.5")
    letters = list(DeadLetter.objects.order_by("id"))
    assert sorted(bytes(letter.payload) for letter in letters) == sorted(m.payload for m in bad)
    assert [letter.client_id for letter in letters] == ["w1"] * 4
    reasons = " | ".join(letter.reason for letter in letters)
    assert "invalid JSON" in reasons and "differs from the topic" in reasons and "unknown meter NOPE" in reasons
    assert "more than 1024" in reasons
    assert any(letter.payload_text.startswith("\\xff\\xfe not json") for letter in letters)


def test_batch_of_meters_with_and_without_debits(meter001, alice_meter):
    first = consumption("METER001", 0.5, seq=1, energy=20.5, remaining=10.0)
    ingest_batch([first], client_id="t")
    # METER001 sends only a copy (no debit), METER-A1 a new report: one statement for both rows.
    ingest_batch([first, consumption("METER-A1", 0.25, seq=1, remaining=-0.25)], client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("10.0")
    assert meter_balance_get(meter_no="METER-A1") == Decimal("-0.25")


def test_a_late_older_report_is_not_drift(meter001):
    ingest_batch([consumption("METER001", 0.5, seq=2, energy=21, remaining=10.0)], client_id="t")
    ingest_batch([consumption("METER001", 0.5, seq=3, energy=21.5, remaining=9.5)], client_id="t")
    # seq 1 arrives last (a redelivery): charged once, its old remainingBalance is no drift.
    ingest_batch([consumption("METER001", 0.5, seq=1, energy=20.5, remaining=10.5)], client_id="t")
    assert meter_balance_get(meter_no="METER001") == Decimal("9.0")
    assert not MeterCommand.objects.exists()
    assert Meter.objects.get(meter_no="METER001").last_reported_balance_kwh == Decimal("9.5")
