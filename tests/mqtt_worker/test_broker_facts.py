"""Facts about the broker that the worker's design relies on, checked on the real Mosquitto
with the project's config: if a broker upgrade changes them, these tests say so."""

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = pytest.mark.services


def _persistent_subscriber(port: int, topic: str, received: set):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="facts-worker", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, userdata, flags, code, props: c.subscribe(topic, 1)
    client.on_message = lambda c, userdata, message: received.add(message.payload)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()
    return client


def _published_during_absence_after_restart(broker, topic: str) -> int:
    """A persistent subscriber leaves, the broker restarts, 50 reports are published, the
    subscriber comes back: how many does it get?"""
    received: set = set()
    client = _persistent_subscriber(broker.port, topic, received)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    broker.restart()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="facts-meter", protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    for index in range(50):
        publisher.publish("smartmeter/M1/consumption", b"%d" % index, qos=1).wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()
    client = _persistent_subscriber(broker.port, topic, received)
    deadline = time.monotonic() + 10
    while len(received) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # anything still arriving would only raise the count
    client.disconnect()
    client.loop_stop()
    return len(received)


def test_plain_persistent_subscription_keeps_reports_across_a_broker_restart(private_mosquitto):
    assert _published_during_absence_after_restart(private_mosquitto, "smartmeter/+/consumption") == 50


def test_shared_subscription_after_a_broker_restart_is_what_mosquitto_2_0_11_loses(private_mosquitto):
    """Why a single worker subscribes without a group (README, "Scaling out"). A broker that
    keeps these reports makes this test fail: then shared groups are safe across restarts."""
    kept = _published_during_absence_after_restart(private_mosquitto, "$share/ingest/smartmeter/+/consumption")
    assert kept == 0
