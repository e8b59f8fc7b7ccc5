"""End to end: a simulated fleet with every fault switched on, against the real MQTT worker.

Real PostgreSQL (the test database, committed rows), a private Mosquitto with the project's
config, `manage.py mqtt_worker` as a subprocess. Balance commands go out through the real
publisher: the worker runs Celery tasks eagerly, so the command a meter's `online` status
triggers is published from the worker process right after its commit. The simulated meters start
with an empty flash (local balance 0, relay open), so no energy flows until that command has
made the whole round trip; the test requires energy on every meter.

Afterwards the ledger must equal, per meter and to the last of its 6 decimals, the energy each
simulated meter measured (its core's energyTotal, as the wire carries it).
"""

from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db.models import Sum

from devtools.sim.fleet import Broker, Fleet, FleetOptions
from meters import services
from meters.models import CommandStatus, LedgerEntry, LedgerKind, Meter, MeterCommand, Reading
from meters.selectors import ledger_mismatches
from mqtt_worker.models import DeadLetter
from tests.simulator.conftest import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

METERS = [f"E2E{i:03d}" for i in range(20)]
REPORTS_PER_METER = 12


def debits_per_meter() -> dict[str, Decimal]:
    rows = (
        LedgerEntry.objects.filter(kind=LedgerKind.CONSUMPTION_DEBIT)
        .values_list("meter__meter_no")
        .annotate(total=Sum("units_kwh"))
    )
    return {meter_no: -total for meter_no, total in rows}


def test_fleet_with_all_faults_bills_exactly_the_measured_energy(worker, private_mosquitto, tariff):
    for meter_no in METERS:
        services.meter_provision(meter_no=meter_no, owner=None, tariff=tariff)
        services.ledger_credit(meter_no=meter_no, units_kwh=Decimal("100.000000"), idempotency_key=f"open:{meter_no}",
                               actor="test", reason="opening credit")

    fleet = Fleet(FleetOptions(
        meter_nos=METERS, broker=Broker(port=private_mosquitto.port), interval_s=5, connections=2, speed=10,
        drop_rate=0.15, duplicate_rate=0.1, register_reset_rate=0.05, garbage_rate=0.02, seed=6,
        client_id_prefix="sim-e2e",
    )).start()
    try:
        def enough() -> bool:
            if fleet.failed() is not None:
                raise AssertionError(f"the fleet failed: {fleet.failed()!r}")
            st = fleet.snapshot()["stats"]
            # Run until every fault has happened at least once and every meter has been billed
            # for a while (fault draws are random: the loop, not the clock, decides).
            return (
                st.reports_acked >= len(METERS) * REPORTS_PER_METER and st.drops >= 2 and st.duplicates_sent >= 1
                and st.register_resets >= 1 and st.garbage_sent >= 1
                and all(m.measured_kwh > 0 for m in fleet.meters.values())
            )

        wait_until(enough, "the fleet to run with every fault", process=worker)
    finally:
        delivered = fleet.stop(flush_timeout=60)
    assert delivered, "every report and garbage message was PUBACKed by the broker"

    print(fleet.progress_line())  # the run's figures, for -s
    measured = {meter_no: meter.measured_kwh for meter_no, meter in fleet.meters.items()}
    stats = fleet.snapshot()["stats"]
    # Energy flowed on every meter, so each got its balance command (its relay starts open).
    assert all(kwh > 0 for kwh in measured.values()), measured
    assert stats.commands_received >= len(METERS)

    # Let the worker drain: every meter's final register committed, every garbage message stored.
    wait_until(lambda: debits_per_meter() == measured, "the ledger to reach the measured energy", process=worker)
    garbage = {bytes(payload) for c in fleet.connections for payload in c.garbage}
    assert len(garbage) == stats.garbage_acked >= 1
    wait_until(lambda: garbage <= {bytes(p) for p in DeadLetter.objects.values_list("payload", flat=True)},
               "every garbage message in the dead letters", process=worker)

    assert worker.poll() is None
    worker.terminate()
    assert worker.wait(60) == 0

    # The exact check, after the worker stopped (nothing can still be in flight).
    assert debits_per_meter() == measured
    assert sum(measured.values()) > Decimal("0.1")
    assert DeadLetter.objects.count() >= len(garbage)
    assert Reading.objects.filter(is_duplicate=True).count() >= 1, "duplicate copies are flagged"
    # The register on the wire never went backwards (register resets are absorbed by the core).
    assert list(Meter.objects.exclude(anomaly="").values_list("meter_no", "anomaly")) == []
    # Balance reports echoed the commands' cmdId back to the outbox.
    assert MeterCommand.objects.filter(status=CommandStatus.ACKNOWLEDGED).count() >= len(METERS)
    assert ledger_mismatches() == []
    call_command("ledger_check")
