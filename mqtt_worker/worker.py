"""The ingest loop: paho's network thread receives, the main thread batches, commits, then acks.

- MQTT v5, a stable client id, `clean_start=False` with a session expiry: while the worker is
  away (crash, deploy) the broker keeps its share of the reports and redelivers what was unacked.
- Manual acks, sent in arrival order only after the batch's transaction committed. Unacked
  messages hold the broker's in-flight window, so a stalled database stops delivery
  (back-pressure) instead of piling reports up in this process.
- After a reconnect, message ids of the old connection mean nothing (or someone else's message):
  acks for messages received before the reconnect are dropped; the broker redelivers those and
  the database absorbs the duplicates (report identities, ledger idempotency keys).
- SIGTERM/SIGINT: the batch in hand is finished, committed and acked, then a clean disconnect.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import signal
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import orjson
import paho.mqtt.client as mqtt
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core import metrics
from meters.events import ConsumptionEvents, group_send_events, live_events
from mqtt_worker.client import configure_client, tune_socket
from mqtt_worker.codec import report_subscriptions
from mqtt_worker.ingest import BatchResult, Message, ingest_batch

logger = logging.getLogger("mqtt_worker")
# Per-report lines are logged at INFO while traffic is light (the seed's log style); under a
# flood a batch logs one summary line and the per-report lines go to DEBUG.
REPORT_LINES_PER_BATCH = 20
PUBACK = 0x40
_PUBACK = struct.Struct("!BBH")


@dataclass(frozen=True, slots=True)
class _Received:
    generation: int
    mid: int
    qos: int
    message: Message
    received: float  # time.perf_counter() at arrival (publish→commit metric)


class EventSender(threading.Thread):
    """Live events off the hot path. Committed state is queued here, coalesced per meter and
    kind (the latest wins), and sent to the meters' groups and the staff group (the messages
    meters.events.send_meter_events sends) from one asyncio loop of this thread's own, which is
    far cheaper per group_send than async_to_sync.

    The thread gets at most BUSY_SHARE of the time: after each slice of sends it sleeps in
    proportion. Sending through channels_redis costs the GIL that paho's network thread and
    the batch loop need (it was the main cause of publish→commit p99 at a steady load);
    meanwhile newer state simply replaces older in the queue, so a flood delays the view, never
    ingestion. Events are a view: if Redis is down they are logged and dropped."""

    BUSY_SHARE = 0.1
    SLICE = 32  # events per slice: short GIL holds between pauses (and one staff message)

    def __init__(self) -> None:
        super().__init__(name="live-events", daemon=True)
        self._lock = threading.Condition()
        self._pending: dict[tuple[str, str], object] = {}
        self._stopping = False

    def put(self, events: list) -> None:
        """Events as services return them: dicts, or ConsumptionEvents (rendered when sent)."""
        if not events:
            return
        with self._lock:
            pending = self._pending
            for event in events:
                if type(event) is ConsumptionEvents:  # the `balance` and `reading` events, when sent
                    pending[(event.meter_no, "consumption")] = event
                else:
                    pending[(event["meterNo"], event["type"])] = event
            self._lock.notify()

    def _take(self) -> list | None:
        with self._lock:
            while not self._pending and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            keys = list(itertools.islice(self._pending, self.SLICE))
            return [self._pending.pop(key) for key in keys]

    def run(self) -> None:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        loop = asyncio.new_event_loop()
        while (events := self._take()) is not None:
            if layer is None:
                continue
            started = time.monotonic()
            try:
                loop.run_until_complete(group_send_events(layer, live_events(events)))
            except Exception as error:
                logger.warning("Live events not sent: channel layer unavailable (%s)", error)
            busy = time.monotonic() - started
            if not self._stopping:
                time.sleep(busy * (1 - self.BUSY_SHARE) / self.BUSY_SHARE)
        loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self.join(timeout)


def receive_maximum(batch_size: int) -> int:
    return max(1, min(2 * batch_size, 65535))


class IngestWorker:
    def __init__(self, *, client_id: str, group: str, batch_size: int, batch_wait_ms: int, trace_path: str | None = None):
        self.client_id = client_id
        self.group = group
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.trace_path = trace_path
        self._inbox: queue.Queue[_Received] = queue.Queue(maxsize=2 * receive_maximum(batch_size))
        self._generation = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._events = EventSender()
        # Two batches in the database at once: while one waits for its commit (PostgreSQL does
        # the work, the GIL is free), the next one locks, reads and writes on a connection of
        # its own. Acks still go out strictly in arrival order (see run()). A batch starts only
        # once the one before it holds its meters' locks, so a meter's reports are applied in
        # arrival order (the second waits for the first's commit on a shared meter); batches
        # lock their meters in id order in one statement, so they never deadlock.
        self._pipeline_depth = max(1, settings.MQTT_PIPELINE_DEPTH)
        self._committers = ThreadPoolExecutor(max_workers=self._pipeline_depth, thread_name_prefix="ingest-db")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        configure_client(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_open = lambda client, userdata, sock: tune_socket(sock)

    # --- paho's network thread ------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.error("Connection refused by broker: %s", reason_code)
            return
        self._generation += 1
        metrics.MQTT_CONNECTS.labels("ingest").inc()
        metrics.MQTT_CONNECTED.labels("ingest").set(1)
        logger.info(
            "Connected to broker as %s (session %s)", self.client_id, "resumed" if flags.session_present else "new"
        )
        client.subscribe([(topic, 1) for topic in report_subscriptions(self.group)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic, code in zip(report_subscriptions(self.group), reason_codes, strict=False):
            if code.is_failure:
                logger.error("Subscription to %s refused: %s", topic, code)
            else:
                logger.debug("Subscribed to: %s", topic)
        logger.info("Subscribed to: %s", ", ".join(report_subscriptions(self.group)))
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        metrics.MQTT_CONNECTED.labels("ingest").set(0)
        if not self._stop.is_set():
            logger.warning("Disconnected from broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        # A full inbox blocks paho's network thread, so it stops reading the socket and TCP
        # pushes back to the broker: the broker's ReceiveMaximum window alone does not bound
        # the inbox after a stall on Mosquitto 2.0.11 (see connect()), and an unbounded inbox
        # then holds the whole backlog in memory.
        item = _Received(self._generation, msg.mid, msg.qos, Message(msg.topic, msg.payload), time.perf_counter())
        while True:
            try:
                self._inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._stop.is_set():
                    return  # never acked: the broker redelivers it

    # --- the main thread --------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        if not self._stop.is_set():
            logger.info("Stopping: finishing the current batch")
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def connect(self) -> None:
        config = settings.MQTT
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = settings.MQTT_SESSION_EXPIRY_S
        # MQTT v5 flow control: at most this many unacked QoS 1 messages, two batches (one being
        # committed while the next one fills), so a stalled database stops delivery instead of
        # piling reports up here. Mosquitto 2.0.11 keeps the window until acks resume, then
        # releases what it queued meanwhile beyond it (test_broker_facts.py): after a stall the
        # inbox can hold the backlog once; the batches drain it at full speed.
        properties.ReceiveMaximum = receive_maximum(self.batch_size)
        # connect_async + loop_start: the network thread (re)connects with back-off on its own,
        # also when the broker is not up yet when the worker starts.
        self.client.connect_async(
            config["host"], config["port"], keepalive=30, clean_start=False, properties=properties
        )
        self.client.loop_start()

    def run(self) -> None:
        # Everything loaded so far lives as long as the process: out of the collector's sight,
        # full collections no longer walk Django's and the libraries' objects in mid-batch.
        gc.collect()
        gc.freeze()
        self._events.start()
        self.connect()
        in_flight: deque[tuple[list[_Received], Future]] = deque()
        previous_locked = threading.Event()
        previous_locked.set()
        try:
            while not self._stop.is_set():
                # With a batch in the database, look for the next one only briefly, so the
                # finished batch's acks are not held back by an idle inbox.
                batch = self._gather(0.002 if in_flight else 0.2)
                if batch:
                    locked = threading.Event()
                    in_flight.append((batch, self._committers.submit(self._commit, batch, previous_locked, locked)))
                    previous_locked = locked
                # Finish batches oldest first: wait for the oldest when the pipeline is full or
                # nothing new arrived, and take any that are already done.
                while in_flight and (len(in_flight) >= self._pipeline_depth or not batch or in_flight[0][1].done()):
                    done_batch, future = in_flight.popleft()
                    self._ack_and_report(done_batch, future.result())
            while in_flight:  # stopping: what is in the database commits and is acked
                done_batch, future = in_flight.popleft()
                self._ack_and_report(done_batch, future.result())
        finally:
            self._committers.shutdown(wait=True)
            self.client.disconnect()
            self.client.loop_stop()
            self._events.stop()
            logger.info("Disconnected; worker stopped")

    def _gather(self, first_timeout: float = 0.2) -> list[_Received]:
        try:
            first = self._inbox.get(timeout=first_timeout)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_size:
            try:
                batch.append(self._inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _commit(
        self, batch: list[_Received], previous_locked: threading.Event, locked: threading.Event
    ) -> tuple[BatchResult, float, int] | None:
        """In a committer thread (its own database connection): the batch's transaction, retried
        while the database is away. None when stopping before it could commit (nothing acked)."""
        try:
            previous_locked.wait()
            return self._commit_in_order(batch, locked)
        finally:
            locked.set()  # whatever happened, the next batch may go

    def _commit_in_order(self, batch: list[_Received], locked: threading.Event) -> tuple[BatchResult, float, int] | None:
        messages = [item.message for item in batch]
        delay = 0.5
        first_try = time.perf_counter()
        while True:
            close_old_connections()
            try:
                started = time.perf_counter()
                result = ingest_batch(messages, client_id=self.client_id, on_locked=locked.set)
                break
            except (OperationalError, InterfaceError) as error:
                # The database is away. Nothing is acked, so the broker keeps the messages and
                # stops sending once its in-flight window is full; retry the same batch.
                logger.error("Database unavailable (%s); retrying the batch of %d in %.1f s",
                             str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                             len(batch), delay)
                connection.close()
                if self._stop.wait(delay):
                    logger.warning("Stopping without committing %d messages; the broker will redeliver them", len(batch))
                    return None
                delay = min(delay * 2, 10.0)
        metrics.BATCH_DB_SECONDS.observe(time.perf_counter() - first_try)
        return result, started, time.time_ns()

    def _ack_and_report(self, batch: list[_Received], outcome: tuple[BatchResult, float, int] | None) -> None:
        """In the main thread, in arrival order: ack a committed batch, then events and logs."""
        if outcome is None:
            return
        result, started, committed = outcome
        self._ack(batch)
        self._record(batch, result)
        self._events.put(result.events)
        self._log(result, len(batch), time.perf_counter() - started)
        if self.trace_path:
            self._trace(committed, batch)

    def _record(self, batch: list[_Received], result: BatchResult) -> None:
        """The batch in the metrics (core.metrics), after its acks. Latency once per batch, of its
        oldest message (the batch's longest wait): an observation per message would cost the
        main thread, which paces ingestion, more than the rest of this together."""
        metrics.PUBLISH_TO_COMMIT.observe(time.perf_counter() - batch[0].received)
        metrics.BATCH_SIZE.observe(len(batch))
        received = metrics.MESSAGES_RECEIVED
        for kind, count in (("consumption", result.consumption - result.duplicates), ("duplicate", result.duplicates),
                            ("status", result.statuses), ("balance", result.balance_reports)):
            if count:
                received.labels(kind).inc(count)
        if result.dead_letters:
            metrics.DEAD_LETTERS.inc(result.dead_letters)
        online = sum(status == "online" for o in result.outcomes for _, status in o.status_items)
        if online:
            metrics.METER_RECONNECTIONS.inc(online)
        metrics.add_kwh(metrics.CONSUMPTION_KWH, result.debited_kwh)

    def _ack(self, batch: list[_Received]) -> None:
        """PUBACKs in arrival order, as one write. `client.ack()` per message queues a packet,
        wakes the network thread through its socket pair and sends one TCP segment per ack
        (TCP_NODELAY): one of each per message of the batch. The PUBACKs are the same bytes `client.ack()`
        builds (paho 2.2's `_send_command_with_mid`: type, length 2, message id); they go into
        paho's outgoing queue as one packet, so they are written by the network thread in
        order with everything else it sends."""
        generation = self._generation
        stale = 0
        mids = []
        for item in batch:  # arrival order
            if item.qos == 0:
                continue
            if item.generation != generation:
                stale += 1
                continue
            if item.qos == 1:
                mids.append(item.mid)
            else:  # QoS 2 is not used by meters; paho's own path handles its PUBCOMP
                self.client.ack(item.mid, item.qos)
        if mids:
            self.client._packet_queue(PUBACK, b"".join(_PUBACK.pack(PUBACK, 2, mid) for mid in mids), 0, 1)
        if stale:
            logger.info("Dropped %d acks from an earlier connection; the broker redelivers them", stale)

    def _log(self, result: BatchResult, size: int, seconds: float) -> None:
        if result.line_count <= REPORT_LINES_PER_BATCH:
            for line in result.lines:
                logger.info(line)
        else:
            if logger.isEnabledFor(logging.DEBUG):
                for line in result.lines:
                    logger.debug(line)
            logger.info(
                "Batch: %d messages (%d consumption, %d duplicates, %d status, %d balance, %d dead letters), "
                "%s kWh debited, %.1f ms",
                size, result.consumption, result.duplicates, result.statuses, result.balance_reports,
                result.dead_letters, result.debited_kwh, seconds * 1000,
            )

    def _trace(self, committed_ns: int, batch: list[_Received]) -> None:
        """Benchmarks (--trace-commits): per commit, its time and the reports' meterNo:seq."""
        keys = []
        for item in batch:
            try:
                data = orjson.loads(item.message.payload)
                keys.append(f"{data.get('meterNo')}:{data.get('seq')}")
            except (orjson.JSONDecodeError, AttributeError):
                keys.append("-")
        with open(self.trace_path, "a") as trace:
            trace.write(f"{committed_ns} {','.join(keys)}\n")
