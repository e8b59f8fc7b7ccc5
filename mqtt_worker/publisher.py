"""Publishing the MeterCommand outbox: QoS 1, not retained, marked `sent` on the broker's PUBACK.

One persistent paho client per process (a Celery worker process keeps it between tasks), with
TCP_NODELAY: a task publishes and waits only for PUBACKs, so "callback → command at the broker"
costs little beyond Celery picking the task up. Its client id is unique per process
(a prefork pool has several): outgoing QoS 1 is kept only in memory anyway, which is why the
database outbox, not the MQTT session, makes delivery reliable. A row stays `queued` until its
PUBACK; the beat sweep publishes whatever is still queued (a lost hint, a broker outage).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

import paho.mqtt.client as mqtt
from django.conf import settings
from django.utils import timezone
from paho.mqtt.enums import CallbackAPIVersion

from core import metrics
from meters.models import CommandKind, MeterCommand
from meters.ota.selectors import release_for_command
from meters.ota.services import release_image_url
from meters.selectors import meter_commands_pending
from meters.services import meter_commands_claim, meter_commands_mark_sent
from mqtt_worker.client import configure_client, tune_socket
from mqtt_worker.codec import command_topic, encode_balance_command, encode_ota_command, encode_relay_command

logger = logging.getLogger("mqtt_worker.publisher")

CONNECT_TIMEOUT_S = 10.0
PUBACK_TIMEOUT_S = 10.0
# The sweep leaves the newest rows to the after-commit hint that is publishing them right now.
SWEEP_GRACE = timedelta(seconds=2)
SWEEP_LIMIT = 1000


class Publisher:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self._connected = threading.Event()
        client_id = f"{settings.MQTT_PUBLISHER_CLIENT_ID}-{socket.gethostname()}-{self.pid}"[:64]
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        configure_client(self.client, settings.MQTT_PUBLISHER)
        # A small in-flight window: paho slows sharply with a large one (measured).
        self.client.max_inflight_messages_set(100)
        self.client.on_socket_open = lambda client, userdata, sock: tune_socket(sock)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        config = settings.MQTT_PUBLISHER
        self.client.connect_async(config["host"], config["port"], keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, code, properties) -> None:
        if code.is_failure:
            logger.error("Broker refused publisher: %s", code)
            return
        metrics.MQTT_CONNECTS.labels("publisher").inc()
        metrics.MQTT_CONNECTED.labels("publisher").set(1)
        self._connected.set()

    def _on_disconnect(self, *args) -> None:
        metrics.MQTT_CONNECTED.labels("publisher").set(0)
        self._connected.clear()

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT_S) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1, retain=False)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


def get_publisher() -> Publisher:
    """This process's client, created on first use (after a fork, a new one for the child)."""
    global _publisher
    with _publisher_lock:
        if _publisher is None or _publisher.pid != os.getpid():
            _publisher = Publisher()
        return _publisher


def _payload(command: MeterCommand) -> bytes:
    timestamp_ms = int(command.issued_at.timestamp() * 1000)
    if command.kind == CommandKind.BALANCE:
        return encode_balance_command(
            balance_kwh=command.balance_kwh,
            timestamp_ms=timestamp_ms,
            energy_total_kwh=command.energy_total_kwh,
            reg_id=command.reg_id or None,
            cmd_id=command.cmd_id,
            reason=command.reason,
        )
    if command.kind == CommandKind.OTA:
        release = release_for_command(release_id=command.release_id)
        return encode_ota_command(
            url=release_image_url(release), version=release.version, sha256=release.sha256,
            signature=release.signature, cmd_id=command.cmd_id,
        )
    return encode_relay_command(
        state=command.relay_state, timestamp_ms=timestamp_ms, cmd_id=command.cmd_id, reason=command.reason
    )


def publish_commands(command_ids: list[int]) -> int:
    """Publish the given queued commands; return how many the broker acknowledged (PUBACK)."""
    ids = sorted({int(i) for i in command_ids})
    if not ids:
        return 0
    publisher = get_publisher()
    if not publisher.wait_connected():
        raise ConnectionError("MQTT broker not reachable; the commands stay queued for the sweep")
    claimed = meter_commands_claim(command_ids=ids, encode=_payload)
    infos = []
    for command in claimed:
        topic = command_topic(command.meter_no, command.kind)
        infos.append((command.id, topic, publisher.publish(topic, command.payload)))
    deadline = time.monotonic() + PUBACK_TIMEOUT_S
    acked = []
    kinds = {command.id: command.kind for command in claimed}
    for command_id, topic, info in infos:
        try:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.001))
        except (RuntimeError, ValueError) as error:  # not queued: the client lost its connection
            logger.warning("Command %s to %s not published: %s", command_id, topic, error)
            continue
        if info.is_published():
            acked.append(command_id)
            metrics.COMMANDS_SENT.labels(kinds[command_id]).inc()
    meter_commands_mark_sent(command_ids=acked)
    if len(acked) < len(infos):
        logger.warning("%d of %d commands without PUBACK; they stay queued", len(infos) - len(acked), len(infos))
    return len(acked)


def pending_command_ids() -> list[int]:
    return meter_commands_pending(queued_before=timezone.now() - SWEEP_GRACE, limit=SWEEP_LIMIT)
