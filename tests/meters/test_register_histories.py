"""Meter registers under real failures (issue 10, findings 3, 4, 6, 7 and 8): register histories
(`regId`), provisional histories for meters without one, the physical bound on a debit, a
forged seq, consumption past zero, balance commands on `online`, identities across reboots."""

from decimal import Decimal

import orjson
import pytest
from django.core.management import call_command

from meters import services
from meters.consumption import ingest_reports
from meters.models import CommandKind, Meter, MeterCommand, Reading, RegisterHistory, StatusEvent
from meters.reports import ConsumptionReport, StatusUpdate
from meters.selectors import ledger_mismatches, meter_balance_get
from mqtt_worker.publisher import _payload

pytestmark = pytest.mark.django_db
T0 = 1_700_000_000_000  # trusted Unix ms


@pytest.fixture
def meter(tariff):
    meter = services.meter_provision(meter_no="M1", owner=None, tariff=tariff)
    services.ledger_credit(meter_no="M1", units_kwh="100", idempotency_key="open", actor="test")
    return meter


@pytest.fixture(autouse=True)
def _ledger_stays_exact():
    yield
    assert ledger_mismatches() == []
    call_command("ledger_check")


def report(units, *, energy=None, seq=None, reg_id=None, ts=None, total=None, boot=None, remaining="0"):
    units = Decimal(str(units))
    return ConsumptionReport(
        "M1", units, Decimal(remaining), Decimal(str(total)) if total is not None else units,
        ts if ts is not None else T0 + (seq or 0) * 30_000, seq, None if energy is None else Decimal(str(energy)),
        reg_id=reg_id, boot=boot,
    )


def balance() -> Decimal:
    return meter_balance_get(meter_no="M1")


def newest_command() -> dict:
    command = MeterCommand.objects.filter(kind=CommandKind.BALANCE).order_by("-id").first()
    return orjson.loads(_payload(command))


def status(kind="online", *, balance_kwh=None):
    return StatusUpdate("M1", kind, balance_kwh=None if balance_kwh is None else Decimal(str(balance_kwh)))


# ---- finding 3: a register that starts again --------------------------------------------------


def test_a_seq_restart_after_the_stored_state_was_erased_is_no_phantom_debit(meter):
    ingest_reports([report("0.1", energy="5000", seq=100), report("0.1", energy="5000.1", seq=101)])
    assert balance() == Decimal("99.8")
    # Stored state erased: seq and the register start again. Before: 4,999 kWh debited at once.
    ingest_reports([report("0.2", energy="0.2", seq=0, ts=T0 + 90_000)])
    ingest_reports([report("0.1", energy="0.3", seq=1, ts=T0 + 120_000)])
    assert balance() == Decimal("99.5")
    meter = Meter.objects.get(meter_no="M1")
    assert meter.reg_id == "~1" and meter.last_energy_total_kwh == Decimal("0.3") and "reset suspected" in meter.anomaly
    assert RegisterHistory.objects.get(meter=meter, reg_id="").high_kwh == Decimal("5000.1")
    # Commands now carry the new register: a meter computing balance − (myEnergyTotal − energyTotal)
    # does not credit itself its lifetime consumption.
    services.meter_command_queue_balance(meter_no="M1", reason="test")
    assert newest_command()["energyTotal"] == 0.3 and "regId" not in newest_command()


def test_without_seq_a_reset_is_flagged_and_billing_goes_on(meter):
    ingest_reports([report("0.1", energy="5000", ts=5), report("0.1", energy="5000.1", ts=30_005)])
    ingest_reports([report("0.2", energy="0.2", ts=1_000)])  # a reboot with the register erased, no NTP
    ingest_reports([report("0.3", energy="0.5", ts=31_000)])
    assert balance() == Decimal("99.3")  # before: nothing debited until the register passed 5000.1
    assert StatusEvent.objects.filter(meter=meter, status="register_reset").exists()
    history = RegisterHistory.objects.get(meter=meter, current=True)
    assert history.reg_id == "~1" and history.review == "pending"


def test_a_new_reg_id_opens_a_history_and_debits_resume_from_its_first_report(meter):
    ingest_reports([report("0.1", energy="5000", seq=100, reg_id="boardA"), report("0.1", energy="5000.1", seq=101,
                                                                                   reg_id="boardA")])
    # The board is replaced under the same meterNo: a new regId, its register from zero.
    ingest_reports([report("0.05", energy="0.05", seq=0, reg_id="boardB", ts=T0 + 3_100_000)])
    ingest_reports([report("0.1", energy="0.15", seq=1, reg_id="boardB", ts=T0 + 3_130_000)])
    assert balance() == Decimal("99.65")
    meter = Meter.objects.get(meter_no="M1")
    assert meter.reg_id == "boardB" and meter.last_energy_total_kwh == Decimal("0.15")
    assert StatusEvent.objects.get(meter=meter, status="register_reset").message.startswith("register reset: new")
    old = RegisterHistory.objects.get(meter=meter, reg_id="boardA")
    assert (old.current, old.high_kwh) == (False, Decimal("5000.1"))
    services.meter_command_queue_balance(meter_no="M1", reason="test")
    assert newest_command()["regId"] == "boardB" and newest_command()["energyTotal"] == 0.15
    # A late report of the old board is accounted within its own history and moves nothing else.
    ingest_reports([report("0.05", energy="5000.15", seq=102, reg_id="boardA")])
    assert balance() == Decimal("99.6")
    assert Meter.objects.get(meter_no="M1").reg_id == "boardB"
    assert RegisterHistory.objects.get(meter=meter, reg_id="boardA").high_kwh == Decimal("5000.15")


def test_accounting_within_a_history_does_not_depend_on_arrival_order(meter):
    reports = [report("0.1", energy=f"{10 + 0.1 * k:.1f}", seq=k, reg_id="r1") for k in range(1, 9)]
    ingest_reports(list(reversed(reports[4:])))
    ingest_reports(reports[:4][::-1])
    assert balance() == Decimal("99.2")


def test_a_register_jump_beyond_the_physical_bound_is_held_not_debited_and_not_the_fence(meter):
    ingest_reports([report("0.1", energy="100", seq=1, reg_id="r1")])
    # 4,999 kWh in 30 s from an 18.4 kW meter: physically impossible.
    ingest_reports([report("0.1", energy="5099", seq=2, reg_id="r1")])
    meter = Meter.objects.get(meter_no="M1")
    assert meter.energy_held_kwh > Decimal("4998") and "more than the meter can draw" in meter.anomaly
    bounded = Decimal("100") - Decimal("0.1") - balance()
    assert bounded < Decimal("0.5")  # at most what 18.4 kW can draw in the time between
    # Genuine reports that follow are billed against the old register, not the forged one.
    ingest_reports([report("0.3", energy="100.8", seq=3, reg_id="r1", ts=T0 + 30 * 60_000)])
    assert Decimal("100") - balance() == Decimal("0.9")
    assert Reading.objects.get(seq=2).held_kwh > 0


# ---- finding 4: one forged seq --------------------------------------------------------------------


def test_a_forged_seq_does_not_stop_billing(meter):
    ingest_reports([report("0.1", energy="10", seq=5)])
    ingest_reports([report("0.1", energy="10.1", seq=2**63 - 1, ts=T0 + 180_000)])
    assert "implausibly far ahead" in Meter.objects.get(meter_no="M1").anomaly
    for k in range(6, 10):
        ingest_reports([report("0.1", energy=f"{10.1 + 0.1 * (k - 5):.1f}", seq=k)])
    assert balance() == Decimal("99.4")  # every genuine report debited
    assert Meter.objects.get(meter_no="M1").last_energy_seq == 9


def test_a_forged_seq_of_a_seed_style_meter_does_not_swallow_later_reports(meter):
    ingest_reports([report("0.5", seq=2**63 - 1, ts=T0)])
    ingest_reports([report("0.5", seq=1), report("0.5", seq=2)])
    assert balance() == Decimal("98.5")


# ---- finding 6: consumption past zero -------------------------------------------------------------


def test_consumption_past_zero_is_acted_on_once_and_shown_as_arrears(tariff):
    services.meter_provision(meter_no="M1", owner=None, tariff=tariff)
    for k in range(20):  # a seed-only meter whose own balance drifted: it says it has 10 kWh left
        ingest_reports([report("5", ts=T0 + k * 30_000, total=5 * (k + 1), remaining="10")])
    assert balance() == Decimal("-100")
    commands = MeterCommand.objects.filter(reason="no_credit")
    assert commands.count() == 1 and commands.get().balance_kwh == Decimal("-5")
    assert Meter.objects.filter(balance_kwh__lt=0).count() == 1  # in arrears
    # The next top-up pays the arrears first, and the statement says so.
    purchase = services.ledger_credit_purchase(meter_no="M1", amount_kes=Decimal("2600"), idempotency_key="pay",
                                               actor="mpesa", reference="M-Pesa X")
    assert balance() == Decimal("4") and "100.000000 kWh pays arrears" in purchase.posting.entry.reason


# ---- finding 7: balance commands on `online` --------------------------------------------------------


def test_periodic_online_statuses_of_an_online_meter_queue_no_commands(meter):
    ingest_reports([status("online", balance_kwh="100")])
    assert MeterCommand.objects.filter(reason="reconnect").count() == 1  # (re)connected
    for _ in range(288):  # a day of 300 s status messages
        ingest_reports([status("online", balance_kwh="100")])
    assert MeterCommand.objects.count() == 1
    ingest_reports([status("offline")])
    ingest_reports([status("online", balance_kwh="100")])
    assert MeterCommand.objects.filter(reason="reconnect").count() == 2


def test_an_online_meter_whose_balance_disagrees_gets_one_command(meter):
    ingest_reports([status("online", balance_kwh="100")])
    ingest_reports([status("online", balance_kwh="140")])  # the meter thinks it has more than it paid for
    ingest_reports([status("online", balance_kwh="140")])  # rate-limited
    assert list(MeterCommand.objects.order_by("id").values_list("reason", flat=True)) == ["reconnect", "resync"]


# ---- finding 8: identities across reboots ----------------------------------------------------------


def test_a_boot_counter_keeps_identities_apart_across_reboots(meter):
    # No seq, no NTP: the first report after each boot has the same timestamp and totalConsumed.
    ingest_reports([report("0.4", ts=30_000, boot=1), report("0.4", ts=30_000, boot=2)])
    assert balance() == Decimal("99.2")
    assert Reading.objects.filter(is_duplicate=True).count() == 0


def test_a_pure_seed_meter_without_time_cannot_be_told_apart_the_documented_limit(meter):
    ingest_reports([report("0.4", ts=30_000)])
    ingest_reports([report("0.4", ts=30_000)])  # after a reboot, or a redelivery: the same identity
    assert balance() == Decimal("99.6") and Reading.objects.filter(is_duplicate=True).count() == 1


# ---- staff decisions -----------------------------------------------------------------------------


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("engineer", password="x-correct-horse-42", is_staff=True)


def test_staff_merge_back_a_provisional_history_that_was_no_reset(meter, staff):
    from meters.consumption import registers

    ingest_reports([report("0.1", energy="500", ts=5), report("0.1", energy="500.1", ts=30_005)])
    # A glitched report (no regId, no seq, no time) far below: a reset is suspected...
    ingest_reports([report("0.2", energy="3", ts=1_000)])
    ingest_reports([report("0.1", energy="3.1", ts=31_000)])
    assert balance() == Decimal("99.5") and Meter.objects.get(meter_no="M1").reg_id == "~1"
    # ...but it was none: merged back, its reports accounted within the old range (nothing
    # below 500 was unaccounted... except by these glitches), the difference given back.
    given_back = registers.register_history_merge(meter_no="M1", reg_id="~1", actor=staff, note="glitch")
    assert given_back == Decimal("0.3") and balance() == Decimal("99.8")
    meter = Meter.objects.get(meter_no="M1")
    assert meter.reg_id == "" and meter.last_energy_total_kwh == Decimal("500.1")
    assert RegisterHistory.objects.get(meter=meter, reg_id="~1").review == "merged"
    ingest_reports([report("0.1", energy="500.2", ts=60_005)])  # billing goes on in the old range
    assert balance() == Decimal("99.7")


def test_staff_release_or_dismiss_held_energy(meter, staff):
    from meters.consumption import registers

    ingest_reports([report("0.1", energy="100", seq=1, reg_id="r1")])
    ingest_reports([report("0.1", energy="300", seq=2, reg_id="r1")])  # 200 kWh in 30 s: held
    held = Meter.objects.get(meter_no="M1").energy_held_kwh
    before = balance()
    assert registers.energy_held_release(meter_no="M1", actor=staff, note="meter was offline for days") == held
    assert balance() == before - held and Meter.objects.get(meter_no="M1").last_energy_total_kwh == Decimal("300")
    ingest_reports([report("0.1", energy="1300", seq=3, reg_id="r1")])  # another impossible jump
    before = balance()
    registers.energy_held_dismiss(meter_no="M1", actor=staff, note="sensor glitch")
    assert balance() == before and Meter.objects.get(meter_no="M1").energy_held_kwh == 0
