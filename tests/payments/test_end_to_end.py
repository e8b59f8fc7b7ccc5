"""End to end with real services: STK push → fake Daraja callback → the web process credits →
after commit a Celery task publishes → the meter's command topic gets the balance → the meter's
balance report marks the payment delivered.

Processes: the web (daphne on the project's ASGI app), a Celery worker, the MQTT worker, the fake
Daraja server, a private Mosquitto and a private Redis (so no other run's worker can take this
run's tasks), PostgreSQL's test database; this test is the customer and, through paho, the meter.
"""

import json
import os
import subprocess
import sys
import threading
from decimal import Decimal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.services import ROOT, PrivateRedis, free_port, subprocess_database_url, wait_for_port
from meters.models import CommandStatus, MeterCommand
from payments import services
from payments.models import Payment, PaymentStatus
from payments.selectors import payment_delivered_to_meter
from tests.payments.helpers import wait_until

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def private_redis():
    redis = PrivateRedis().start()
    yield redis
    redis.close()


@pytest.fixture
def backend(postgres, private_redis, private_mosquitto, tmp_path, settings):
    """The web process, a Celery worker and the MQTT worker, on this test's database and brokers."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": subprocess_database_url(),
        "REDIS_URL": private_redis.url,
        "MQTT_URL": private_mosquitto.url,
        "MQTT_CLIENT_ID": "ingest-e2e",
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    commands = {
        "web": [f"{BIN}/daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        "celery": [f"{BIN}/celery", "-A", "portal", "worker", "--pool=solo", "--without-gossip", "--without-mingle",
                   "--loglevel=INFO"],
        "mqtt": [sys.executable, "manage.py", "mqtt_worker"],
    }
    processes = {}
    try:
        for name, command in commands.items():
            log = open(tmp_path / f"{name}.log", "wb")
            processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", port, timeout=60)
        settings.MPESA_CALLBACK_BASE_URL = f"http://127.0.0.1:{port}"
        yield tmp_path
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


class Meter:
    """A paho client standing in for the ESP32: it receives balance commands and reports back."""

    def __init__(self, url: str, meter_no: str):
        host, port = url.removeprefix("mqtt://").split(":")
        self.meter_no = meter_no
        self.commands: list[dict] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"meter-{meter_no}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda client, *a: client.subscribe(f"smartmeter/{meter_no}/command/balance", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda client, userdata, message: self._command(json.loads(message.payload))
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _command(self, payload: dict) -> None:
        self.commands.append(payload)
        # As the firmware does: apply, then report the balance with the command's id.
        report = {"meterNo": self.meter_no, "balance": payload["balance"], "timestamp": payload["timestamp"],
                  "cmdId": payload.get("cmdId")}
        self.client.publish(f"smartmeter/{self.meter_no}/balance", json.dumps(report), qos=0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _logs(folder) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(folder.glob("*.log")))


@pytest.mark.django_db(transaction=True)
def test_stk_push_to_balance_command_on_the_meter(backend, fake_daraja, private_mosquitto, alice_meter):
    meter = Meter(private_mosquitto.url, "METER-A1")
    try:
        assert meter.subscribed.wait(30)
        # The customer enters the PIN a second later; Daraja calls the web process back.
        fake_daraja.next("success", delay=1.0)
        payment = services.stk_push_start(
            user=alice_meter.owner.user, meter_no="METER-A1", phone="0712345678", amount_kes="250", idempotency_key="e2e-1"
        )
        assert payment.status == PaymentStatus.PENDING
        try:
            wait_until(lambda: meter.commands, what="balance command at the meter")
            payment = wait_until(
                lambda: Payment.objects.filter(pk=payment.pk).first() if payment_delivered_to_meter(
                    Payment.objects.get(pk=payment.pk)) else None,
                what="balance report acknowledging the command",
            )
        except AssertionError:
            pytest.fail(f"{_logs(backend)}\n--- fake daraja\n{json.dumps(fake_daraja.state()['deliveries'])[-2000:]}")
        command = MeterCommand.objects.get()
        assert payment.status == PaymentStatus.SUCCEEDED and payment.units_kwh == Decimal("10")
        assert payment.command == command and command.status == CommandStatus.ACKNOWLEDGED and command.sent_at
        # PROTOCOL.md balance command: the ledger balance in kWh as a JSON number, Unix ms, ext fields.
        (received,) = meter.commands
        assert received["balance"] == 10 and received["cmdId"] == command.cmd_id and received["reason"] == "payment"
        assert isinstance(received["timestamp"], int) and received["timestamp"] > 1_000_000_000_000
        assert json.loads(command.payload) == received
    finally:
        meter.close()
