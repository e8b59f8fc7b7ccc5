"""Per-meter broker accounts against a real Mosquitto running the project's generated config
(mqtt_worker.broker_files: TLS listener, no anonymous access, the password and ACL files that
`manage.py mqtt_auth export` writes from the database).

Personas: meters METER-A1 (Alice's) and METER-B1 (Bob's); the backend's users backend.ingest
and backend.publisher.
"""

import ssl

import pytest
from django.core.management import call_command

from core.broker_auth import mosquitto_verify
from devtools.services import PrivateMosquitto
from meters import services
from meters.models import MeterCredential
from mqtt_worker.broker_files import broker_config
from mqtt_worker.services import broker_accounts_export, service_user_set
from tests.mqtt_worker.live import wait_until
from tests.production.broker import Client

pytestmark = pytest.mark.django_db


@pytest.fixture
def accounts(alice_meter, bob_meter):
    return {
        "METER-A1": alice_meter.issued_password,
        "METER-B1": bob_meter.issued_password,
        "backend.ingest": service_user_set(username="backend.ingest", can_ingest=True, can_publish=False),
        "backend.publisher": service_user_set(username="backend.publisher", can_ingest=False, can_publish=True),
    }


@pytest.fixture
def broker(accounts):
    broker = PrivateMosquitto(secure=True)
    broker_accounts_export(directory=broker.auth_dir)
    try:
        broker.start()
    except RuntimeError as error:
        pytest.fail(str(error))
    yield broker
    broker.close()


@pytest.fixture
def connect(broker, accounts):
    clients = []

    def connect(username, password=None, **kwargs):
        kwargs.setdefault("ca_file", broker.ca_file)
        password = accounts.get(username) if password is None else password
        client = Client(broker.port, username=username, password=password, client_id=f"t-{len(clients)}", **kwargs)
        clients.append(client)
        return client.connect()

    yield connect
    for client in clients:
        client.close()


def test_provisioning_issues_a_password_stored_only_as_the_brokers_hash(alice_meter):
    credential = MeterCredential.objects.get(meter=alice_meter)
    assert len(alice_meter.issued_password) >= 32
    assert alice_meter.issued_password not in credential.password_hash
    assert mosquitto_verify(alice_meter.issued_password, credential.password_hash)
    assert not mosquitto_verify("guess", credential.password_hash)


def test_a_meter_cannot_publish_on_another_meters_topics(connect):
    ingest = connect("backend.ingest")
    ingest.subscribe("smartmeter/+/consumption", "smartmeter/+/status")
    alice = connect("METER-A1")
    assert alice.accepted
    # MQTT v5 tells the denied publisher why; a v3.1.1 meter would get a plain PUBACK.
    assert alice.publish("smartmeter/METER-B1/consumption", b"forged") == "Not authorized"
    assert alice.publish("smartmeter/METER-B1/status", b"forged") == "Not authorized"
    assert alice.publish("smartmeter/METER-A1/consumption", b"own") == "Success"
    wait_until(lambda: ("smartmeter/METER-A1/consumption", b"own") in ingest.messages, "Alice's own report")
    assert [payload for _, payload in ingest.messages] == [b"own"]


def test_a_meter_cannot_receive_another_meters_commands(connect):
    alice, bob = connect("METER-A1"), connect("METER-B1")
    # Mosquitto grants the subscriptions but delivers only what the ACL lets the meter read.
    alice.subscribe("smartmeter/METER-B1/command/#", "smartmeter/+/command/#", "smartmeter/METER-A1/command/balance")
    bob.subscribe("smartmeter/METER-B1/command/#")
    publisher = connect("backend.publisher")
    assert publisher.publish("smartmeter/METER-B1/command/balance", b"for bob") == "Success"
    assert publisher.publish("smartmeter/METER-B1/command/relay", b"for bob too") == "Success"
    assert publisher.publish("smartmeter/METER-A1/command/balance", b"for alice") == "Success"
    wait_until(lambda: (b"for alice" in {p for _, p in alice.messages}) and len(bob.messages) == 2, "the commands")
    assert {payload for _, payload in alice.messages} == {b"for alice"}
    assert [payload for _, payload in bob.messages] == [b"for bob", b"for bob too"]


def test_the_backend_users_can_do_their_jobs_and_only_those(connect):
    ingest = connect("backend.ingest")
    ingest.subscribe("$share/ingest/smartmeter/+/consumption", "smartmeter/+/balance")
    meter = connect("METER-B1")
    meter.subscribe("smartmeter/METER-B1/command/#")
    assert meter.publish("smartmeter/METER-B1/consumption", b"report") == "Success"
    assert meter.publish("smartmeter/METER-B1/balance", b"balance") == "Success"
    wait_until(lambda: len(ingest.messages) == 2, "the reports at the ingest user")
    publisher = connect("backend.publisher")
    assert publisher.publish("smartmeter/METER-B1/command/balance", b"cmd") == "Success"
    wait_until(lambda: meter.messages == [("smartmeter/METER-B1/command/balance", b"cmd")], "the command at the meter")
    # Neither may do the other's job, nor forge a meter's report.
    assert ingest.publish("smartmeter/METER-B1/command/balance", b"x") == "Not authorized"
    assert publisher.publish("smartmeter/METER-B1/consumption", b"x") == "Not authorized"
    assert ingest.publish("smartmeter/METER-B1/consumption", b"x") == "Not authorized"


def test_anonymous_and_wrong_passwords_are_refused(connect):
    assert connect(None).connack == "Not authorized"
    assert connect("METER-A1", "not-the-password").connack == "Not authorized"
    assert connect("METER-B1", "").connack == "Not authorized"
    assert connect("backend.ingest", "wrong").connack == "Not authorized"
    assert connect("METER-A1").accepted


def test_a_revoked_meter_is_refused_after_the_reload_without_a_broker_restart(broker, connect):
    alice = connect("METER-A1")
    bob = connect("METER-B1")
    assert alice.accepted and bob.accepted
    pid = broker.process.pid
    services.meter_credential_revoke(meter_no="METER-A1", actor="test")
    assert broker_accounts_export(directory=broker.auth_dir) is True
    broker.reload()
    wait_until(lambda: alice.disconnects, "the broker to drop the revoked meter")
    assert connect("METER-A1").connack == "Not authorized"
    assert broker.process.pid == pid and broker.process.poll() is None
    assert bob.accepted, "other meters stay connected"
    # Re-issued, it connects again with the new password only.
    new_password = services.meter_credential_issue(meter_no="METER-A1", actor="test")
    call_command("mqtt_auth", "export", "--dir", str(broker.auth_dir))
    broker.reload()
    assert connect("METER-A1", new_password).accepted
    assert connect("METER-A1").connack == "Not authorized"  # the provisioning password


def test_rotation_from_the_command_line_and_export_says_unchanged(broker, connect, capsys):
    call_command("mqtt_auth", "issue", "METER-B1")
    password = capsys.readouterr().out.split(": ", 1)[1].split()[0]
    call_command("mqtt_auth", "export", "--dir", str(broker.auth_dir))
    assert "written" in capsys.readouterr().out
    call_command("mqtt_auth", "export", "--dir", str(broker.auth_dir))
    assert "unchanged" in capsys.readouterr().out
    broker.reload()
    assert connect("METER-B1", password).accepted


def test_tls_works_with_the_ca_and_fails_without_it(broker, connect):
    assert connect("METER-A1").accepted
    # The system's CAs do not know the development CA: the handshake fails, nothing is sent.
    untrusting = connect("METER-A1", ca_file=None)
    assert isinstance(untrusting.error, ssl.SSLCertVerificationError)
    # Plain MQTT to the TLS listener never gets a CONNACK.
    plain = connect("METER-A1", tls=False)
    assert plain.connack is None and (plain.error is not None or plain.disconnects)


def test_the_production_config_in_deploy_is_the_generated_one():
    from pathlib import Path

    from devtools.services import ROOT
    from mqtt_worker.broker_files import Tls

    etc = Path("/etc/mosquitto")
    expected = broker_config(
        port=8883, bind=None, persistence_dir=Path("/var/lib/mosquitto"), auth_dir=etc / "smartmeter",
        tls=Tls(etc / "certs/ca.crt", etc / "certs/server.crt", etc / "certs/server.key"),
        pid_file=Path("/run/mosquitto/mosquitto.pid"), log_dest="syslog",
    )
    assert (ROOT / "deploy/mosquitto/production.conf").read_text() == expected
    assert "allow_anonymous false" in expected and "listener 8883\n" in expected and "listener 1883" not in expected
