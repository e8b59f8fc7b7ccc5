"""Publishing the MeterCommand outbox: QoS 1, not retained, marked `sent` on the broker's PUBACK.

One persistent paho client per process (a Celery worker process keeps it between tasks), with
TCP_NODELAY: a task publishes and waits only for PUBACKs, so "callback → command at the broker"
costs a few milliseconds after Celery picks the task up. Its client id is unique per process
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
from django.db import transaction
from django.db.models import F, Max
from django.utils import timezone
from paho.mqtt.enums import CallbackAPIVersion

from meters.models import CommandKind, CommandStatus, MeterCommand
from mqtt_worker.codec import command_topic, encode_balance_command, encode_relay_command
from mqtt_worker.worker import configure_client, tune_socket

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
        configure_client(self.client)
        # A small in-flight window: paho slows sharply with a large one (measured).
        self.client.max_inflight_messages_set(100)
        self.client.on_socket_open = lambda client, userdata, sock: tune_socket(sock)
        self.client.on_connect = lambda client, userdata, flags, code, props: (
            self._connected.set() if not code.is_failure else logger.error("Broker refused publisher: %s", code)
        )
        self.client.on_disconnect = lambda *args: self._connected.clear()
        config = settings.MQTT
        self.client.connect_async(config["host"], config["port"], keepalive=30)
        self.client.loop_start()

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


def _prepare(command_ids: list[int]) -> list[tuple[int, str, bytes]]:
    """Supersede older balance commands, write payloads, count attempts: (id, topic, payload)."""
    with transaction.atomic():
        commands = list(
            MeterCommand.objects.select_for_update(skip_locked=True)
            .filter(id__in=command_ids, status=CommandStatus.QUEUED)
            .select_related("meter")
            .order_by("id")
        )
        balance_meters = {c.meter_id for c in commands if c.kind == CommandKind.BALANCE}
        newest = dict(
            MeterCommand.objects.filter(meter_id__in=balance_meters, kind=CommandKind.BALANCE, status=CommandStatus.QUEUED)
            .values("meter_id")
            .annotate(newest=Max("id"))
            .values_list("meter_id", "newest")
        )
        superseded = MeterCommand.objects.filter(
            meter_id__in=balance_meters, kind=CommandKind.BALANCE, status=CommandStatus.QUEUED
        ).exclude(id__in=newest.values())
        if balance_meters and superseded.update(status=CommandStatus.SUPERSEDED):
            logger.info("Superseded older queued balance commands of %d meter(s)", len(balance_meters))
        to_send = []
        for command in commands:
            if command.kind == CommandKind.BALANCE and command.id != newest.get(command.meter_id):
                continue
            if not command.payload:
                command.payload = _payload(command).decode()
            topic = command_topic(command.meter.meter_no, command.kind)
            to_send.append((command.id, topic, command.payload.encode(), command.payload))
        for command_id, _, _, text in to_send:
            MeterCommand.objects.filter(id=command_id).update(payload=text, attempts=F("attempts") + 1)
    return [(command_id, topic, payload) for command_id, topic, payload, _ in to_send]


def _payload(command: MeterCommand) -> bytes:
    timestamp_ms = int(command.issued_at.timestamp() * 1000)
    if command.kind == CommandKind.BALANCE:
        return encode_balance_command(
            balance_kwh=command.balance_kwh,
            timestamp_ms=timestamp_ms,
            energy_total_kwh=command.energy_total_kwh,
            cmd_id=command.cmd_id,
            reason=command.reason,
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
    prepared = _prepare(ids)
    infos = [(command_id, topic, publisher.publish(topic, payload)) for command_id, topic, payload in prepared]
    deadline = time.monotonic() + PUBACK_TIMEOUT_S
    acked = []
    for command_id, topic, info in infos:
        try:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.001))
        except (RuntimeError, ValueError) as error:  # not queued: the client lost its connection
            logger.warning("Command %s to %s not published: %s", command_id, topic, error)
            continue
        if info.is_published():
            acked.append(command_id)
    if acked:
        # Conditional: a meter may have acknowledged a command before we got here.
        MeterCommand.objects.filter(id__in=acked, status=CommandStatus.QUEUED).update(
            status=CommandStatus.SENT, sent_at=timezone.now()
        )
    if len(acked) < len(infos):
        logger.warning("%d of %d commands without PUBACK; they stay queued", len(infos) - len(acked), len(infos))
    return len(acked)


def pending_command_ids() -> list[int]:
    cutoff = timezone.now() - SWEEP_GRACE
    return list(
        MeterCommand.objects.filter(status=CommandStatus.QUEUED, issued_at__lt=cutoff)
        .order_by("id")
        .values_list("id", flat=True)[:SWEEP_LIMIT]
    )
