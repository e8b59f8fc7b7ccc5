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


def test_receive_maximum_bounds_the_first_window_only_on_mosquitto_2_0_11(private_mosquitto):
    """The worker asks for a window of 2 × batch size (CONNECT ReceiveMaximum). Mosquitto 2.0.11
    sends that many unacked QoS 1 messages and waits, but once PUBACKs come back it releases
    everything queued meanwhile, beyond the window (max_inflight_messages behaves the same).
    So the worker's inbox is bounded by the window only while nothing is queued: after a
    stall, it receives the backlog. A broker that keeps the window makes the last assertion
    fail: then the bound is strict."""
    from mqtt_worker.worker import receive_maximum

    received: list = []
    worker = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="facts-window", protocol=mqtt.MQTTv5, manual_ack=True)
    worker.on_connect = lambda c, userdata, flags, code, props: c.subscribe("smartmeter/+/consumption", 1)
    worker.on_message = lambda c, userdata, message: received.append(message)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = receive_maximum(5)
    worker.connect("127.0.0.1", private_mosquitto.port, clean_start=True, properties=properties)
    worker.loop_start()
    time.sleep(0.5)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="facts-meters", protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", private_mosquitto.port)
    publisher.loop_start()
    for index in range(40):
        publisher.publish("smartmeter/M1/consumption", b"%d" % index, qos=1).wait_for_publish(10)
    time.sleep(1.0)  # anything beyond the window would arrive meanwhile
    assert len(received) == 10
    for message in list(received):  # ack the window: the 30 queued ones follow
        worker.ack(message.mid, message.qos)
    deadline = time.monotonic() + 10
    while len(received) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    publisher.disconnect()
    publisher.loop_stop()
    worker.disconnect()
    worker.loop_stop()
    assert len(received) == 40, "only 10 more: the broker keeps the window after acks (strict bound)"
