"""/metrics: who may read it, and each metric moves when what it measures happens: the database
gauges in this process, the worker's and publisher's counters and histograms from a real
`manage.py mqtt_worker` writing in prometheus-client's multiprocess mode, and the web's and
Celery's counters."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from devtools.services import ROOT, subprocess_database_url
from meters import services
from meters.models import Meter, Reading
from mqtt_worker.models import DeadLetter
from notifications.alerts import run_alerts as alerts_now
from notifications.services import notifications_deliver
from notifications.tasks import run_alerts
from payments.models import Payment, PaymentChannel, PaymentStatus
from tests.mqtt_worker.live import Publisher, wait_until

pytestmark = pytest.mark.django_db


def scrape(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_staff_a_bearer_token_or_an_allowed_address(staff_user, alice, settings):
    settings.METRICS_TOKEN, settings.METRICS_ALLOWED_IPS = "scrape-token-0123456789", ["10.0.0.7"]
    assert Client().get("/metrics").status_code == 403
    customer = Client()
    customer.force_login(alice.user)
    assert customer.get("/metrics").status_code == 403
    staff = Client()
    staff.force_login(staff_user)
    assert staff.get("/metrics").status_code == 200
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-0123456789").status_code == 200
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-012345678").status_code == 403
    assert Client().get("/metrics", REMOTE_ADDR="10.0.0.7").status_code == 200
    assert Client().get("/metrics", REMOTE_ADDR="10.0.0.8").status_code == 403
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403, "no token configured: none works"


def test_the_database_gauges_move(admin_client, alice_meter, bob_meter):
    before = scrape(admin_client)
    assert value(before, "smartmeter_meters", state="offline") == 2 and value(before, "smartmeter_meters", state="online") == 0
    Meter.objects.filter(pk=alice_meter.pk).update(online=True)
    command = services.meter_command_queue_balance(meter_no="METER-A1", reason="resync")
    services.meter_command_queue_relay(meter_no="METER-B1", state="off", reason="test", actor="sam")
    services.meter_commands_mark_sent(command_ids=[command.pk])
    services.firebase_mirror_mark(meter_ids=[alice_meter.pk, bob_meter.pk])
    Payment.objects.create(meter=alice_meter, channel=PaymentChannel.STK, status=PaymentStatus.NEEDS_REVIEW,
                           amount_kes=Decimal("10"))
    after = scrape(admin_client)
    assert value(after, "smartmeter_meters", state="online") == 1
    assert value(after, "smartmeter_commands", status="queued") == value(before, "smartmeter_commands", status="queued") + 1
    assert value(after, "smartmeter_commands", status="sent") == 1, "sent, not yet acknowledged by the meter"
    assert value(after, "smartmeter_firebase_outbox_depth") == 2
    assert value(after, "smartmeter_payments", status="needs_review") == 1
    assert value(after, "smartmeter_payments", status="succeeded") == 0


def test_http_requests_and_celery_tasks_are_counted(client, alice_meter):
    def http(status):
        return REGISTRY.get_sample_value("smartmeter_http_requests_total", {"method": "GET", "status": status}) or 0

    ok, missing = http("2xx"), http("4xx")
    client.get("/healthz")
    client.get("/no-such-page/")
    assert (http("2xx"), http("4xx")) == (ok + 1, missing + 1)
    labels = {"task": "notifications.tasks.run_alerts", "outcome": "success"}
    before = REGISTRY.get_sample_value("smartmeter_celery_tasks_total", labels) or 0
    run_alerts.apply()
    assert REGISTRY.get_sample_value("smartmeter_celery_tasks_total", labels) == before + 1


def test_notification_and_alert_counters_move(alice_meter, staff_user):
    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0

    alerts = sample("smartmeter_alerts_total", kind="commands_unacknowledged")
    sent = sample("smartmeter_notifications_total", channel="email", outcome="sent")
    command = services.meter_command_queue_balance(meter_no="METER-A1", reason="resync")
    alerts_now(now=command.issued_at + timedelta(hours=1))
    notifications_deliver()
    assert sample("smartmeter_alerts_total", kind="commands_unacknowledged") == alerts + 1
    assert sample("smartmeter_notifications_total", channel="email", outcome="sent") >= sent + 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.services
def test_the_workers_metrics_reach_the_webs_metrics(postgres, private_mosquitto, tariff, staff_user, tmp_path, monkeypatch):
    services.meter_provision(meter_no="MET1", owner=None, tariff=tariff)
    services.ledger_credit(meter_no="MET1", units_kwh="20", idempotency_key="open", actor="test")
    shared = tmp_path / "prometheus"
    shared.mkdir()
    # The worker and this process (the web's /metrics) share the folder, as make run's processes do.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=subprocess_database_url(),
               MQTT_URL=private_mosquitto.url, CELERY_TASK_ALWAYS_EAGER="True", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "manage.py", "mqtt_worker", "--client-id", "ingest-metrics"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    meter = Publisher(private_mosquitto.port, client_id="met1")
    try:
        wait_until(lambda: "Subscribed to:" in log_path.read_text(errors="replace"), "the worker", process=worker)
        report = {"meterNo": "MET1", "unitsConsumed": 0.25, "remainingBalance": 19.75, "totalConsumed": 0.25,
                  "timestamp": 1698765432000, "seq": 1, "energyTotal": 100.25, "regId": "r1"}
        first = {**report, "seq": 0, "energyTotal": 100.0, "unitsConsumed": 0, "totalConsumed": 0, "timestamp": 1698765402000}
        meter.publish_all([
            ("smartmeter/MET1/status", json.dumps({"meterNo": "MET1", "status": "online", "timestamp": 1698765400000}).encode()),
            ("smartmeter/MET1/consumption", json.dumps(first).encode()),
            ("smartmeter/MET1/consumption", json.dumps(report).encode()),
            ("smartmeter/MET1/consumption", json.dumps(report).encode()),  # a duplicate
            ("smartmeter/MET1/balance", json.dumps({"meterNo": "MET1", "balance": 19.75, "timestamp": 1698765433000}).encode()),
            ("smartmeter/MET1/consumption", b"not json"),
        ])
        wait_until(lambda: Reading.objects.count() == 3 and DeadLetter.objects.count() == 1, "the reports", process=worker)
        staff = Client()
        staff.force_login(staff_user)

        def moved():
            samples = scrape(staff)
            return samples if value(samples, "smartmeter_commands_sent_total", kind="balance") >= 1 else None

        wait_until(lambda: moved() is not None, "the balance command the online status causes", process=worker)
        samples = moved()
    finally:
        meter.close()
        worker.terminate()
        worker.wait(60)
    assert value(samples, "smartmeter_messages_received_total", kind="consumption") == 2
    assert value(samples, "smartmeter_messages_received_total", kind="duplicate") == 1
    assert value(samples, "smartmeter_messages_received_total", kind="status") == 1
    assert value(samples, "smartmeter_messages_received_total", kind="balance") == 1
    assert value(samples, "smartmeter_dead_letters_total") == 1
    assert value(samples, "smartmeter_meter_reconnections_total") == 1
    assert value(samples, "smartmeter_consumption_kwh_total") == pytest.approx(0.25)
    batches = value(samples, "smartmeter_ingest_batch_messages_count")
    assert value(samples, "smartmeter_publish_to_commit_seconds_count") == batches
    assert value(samples, "smartmeter_publish_to_commit_seconds_sum") > 0
    assert value(samples, "smartmeter_ingest_batch_messages_sum") == 6
    assert value(samples, "smartmeter_ingest_batch_messages_count") >= 1
    assert value(samples, "smartmeter_ingest_batch_db_seconds_count") == value(samples, "smartmeter_ingest_batch_messages_count")
    assert value(samples, "smartmeter_mqtt_connects_total", client="ingest") >= 1
    assert value(samples, "smartmeter_mqtt_connects_total", client="publisher") >= 1
    assert value(samples, "smartmeter_mqtt_connected", client="ingest") == 1
