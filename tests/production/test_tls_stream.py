"""The simulator and the real worker over TLS, each meter with its own broker account, on a
private Mosquitto with the project's generated config: the ledger is exact to the last decimal.

The worker connects as backend.ingest and publishes the balance commands (Celery eager) as
backend.publisher; the simulated meters start with an empty flash, so no energy flows until a
command has made the round trip through the ACL."""

import os
import subprocess
import sys
from decimal import Decimal

import pytest

from devtools.services import ROOT, PrivateMosquitto, subprocess_database_url
from devtools.sim.fleet import Broker, Fleet, FleetOptions
from meters import services
from meters.selectors import ledger_mismatches
from mqtt_worker.services import broker_accounts_export, service_user_set
from tests.simulator.conftest import wait_until
from tests.simulator.test_e2e_fleet import debits_per_meter

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

METERS = [f"TLS{i:02d}" for i in range(6)]


def test_simulator_and_worker_over_tls_with_per_meter_credentials_bill_exactly(postgres, tariff, tmp_path):
    passwords = {}
    for meter_no in METERS:
        passwords[meter_no] = services.meter_provision(meter_no=meter_no, owner=None, tariff=tariff).issued_password
        services.ledger_credit(meter_no=meter_no, units_kwh=Decimal("50"), idempotency_key=f"open:{meter_no}",
                               actor="test", reason="opening credit")
    ingest = service_user_set(username="backend.ingest", can_ingest=True, can_publish=False)
    publisher = service_user_set(username="backend.publisher", can_ingest=False, can_publish=True)
    broker = PrivateMosquitto(secure=True)
    broker_accounts_export(directory=broker.auth_dir)
    broker.start()
    url = f"mqtts://{{}}@localhost:{broker.port}"
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=subprocess_database_url(),
               MQTT_URL=url.format(f"backend.ingest:{ingest}"), MQTT_PUBLISHER_URL=url.format(f"backend.publisher:{publisher}"),
               MQTT_CA_FILE=str(broker.ca_file), CELERY_TASK_ALWAYS_EAGER="True", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "manage.py", "mqtt_worker", "--client-id", "ingest-tls"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    worker.log_path = log_path
    fleet, delivered = None, False
    try:
        wait_until(lambda: "Subscribed to:" in log_path.read_text(errors="replace"), "the worker to subscribe", process=worker)
        fleet = Fleet(FleetOptions(
            meter_nos=METERS, broker=Broker(host="localhost", port=broker.port, tls=True, ca_file=str(broker.ca_file)),
            credentials=passwords, interval_s=5, speed=10, drop_rate=0.1, duplicate_rate=0.1, seed=12,
            client_id_prefix="sim-tls",
        )).start()
        assert len(fleet.connections) == len(METERS), "one connection per meter, each as itself"

        def billed() -> bool:
            if fleet.failed() is not None:
                raise AssertionError(f"the fleet failed: {fleet.failed()!r}")
            stats = fleet.snapshot()["stats"]
            return stats.reports_acked >= len(METERS) * 8 and all(m.measured_kwh > 0 for m in fleet.meters.values())

        wait_until(billed, "every meter to be billed over TLS", process=worker)
        delivered = fleet.stop(flush_timeout=60)
        assert delivered, "every report was PUBACKed"
        measured = {meter_no: meter.measured_kwh for meter_no, meter in fleet.meters.items()}
        wait_until(lambda: debits_per_meter() == measured, "the ledger to reach the measured energy", process=worker)
    finally:
        if fleet is not None and not delivered:
            fleet.stop(flush_timeout=1)
        worker.terminate()
        worker.wait(60)
        broker.close()
    assert "Not authorized" not in log_path.read_text(errors="replace")
    assert debits_per_meter() == measured and all(kwh > 0 for kwh in measured.values())
    assert ledger_mismatches() == []
