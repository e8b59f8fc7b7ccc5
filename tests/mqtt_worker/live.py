"""Helpers for tests that run the real worker (`manage.py mqtt_worker` subprocesses) against a
private Mosquitto and the test database, and a meter fleet whose exact expected ledger is known."""

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from random import Random

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devtools.services import ROOT, subprocess_database_url
from meters.models import Meter
from mqtt_worker.codec import ConsumptionReport, encode_consumption_report, report_topic


@dataclass
class WorkerProcess:
    broker_url: str
    client_id: str = "ingest-t0"
    group: str = "ingest"
    batch_size: int = 500
    log_dir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))
    trace: bool = False
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"worker-{self.client_id}.log"

    @property
    def trace_path(self) -> Path:
        return self.log_dir / f"worker-{self.client_id}.trace"

    def start(self) -> "WorkerProcess":
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=subprocess_database_url(),
                   MQTT_URL=self.broker_url, PYTHONUNBUFFERED="1")
        command = [sys.executable, "manage.py", "mqtt_worker", "--client-id", self.client_id, "--group", self.group,
                   "--batch-size", str(self.batch_size), "--batch-wait-ms", "10"]
        if self.trace:
            command += ["--trace-commits", str(self.trace_path)]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "Subscribed to:" in self.log(offset), f"worker {self.client_id} subscribed", process=self.process)
        return self

    def log(self, offset: int = 0) -> str:
        return self.log_path.read_bytes()[offset:].decode(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
        return self.process.returncode


def wait_until(condition, what: str, *, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll until `condition()` holds. The generous timeout only turns a hang into a failure;
    nothing here asserts how fast anything is (the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Publisher:
    """A meter-side client: QoS 1, at most WINDOW reports awaiting PUBACK (queuing thousands
    inside paho stalls it), resending whatever the broker did not acknowledge, as meters do."""

    WINDOW = 100

    def __init__(self, broker_port: int, client_id: str = "test-meters"):
        self.window = threading.BoundedSemaphore(self.WINDOW)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(self.WINDOW)
        self.client.reconnect_delay_set(0.2, 2)
        self.acked_mids: set[int] = set()
        self.client.on_publish = lambda client, userdata, mid, code, properties: self._release(mid)
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()

    def _acknowledged(self, info) -> bool:
        try:
            return info.is_published()
        except RuntimeError:
            # Published while the broker was away (rc "not connected"): paho keeps a QoS 1
            # message and resends it on reconnect, but its info keeps the error; the PUBACK's
            # message id tells.
            return info.mid in self.acked_mids

    def _release(self, mid: int) -> None:
        self.acked_mids.add(mid)
        try:
            self.window.release()
        except ValueError:  # a PUBACK for a message resent after a reconnect, already released
            pass

    def publish_all(self, messages: list[tuple[str, bytes]], *, qos: int = 1, timeout: float = 180.0) -> None:
        pending = list(messages)
        deadline = time.monotonic() + timeout
        while pending:
            infos = []
            for topic, payload in pending:
                if qos and not self.window.acquire(timeout=max(deadline - time.monotonic(), 0.1)):
                    raise AssertionError("the broker stopped acknowledging publishes")
                infos.append(((topic, payload), self.client.publish(topic, payload, qos=qos)))
            if qos == 0:
                return
            wait_until(lambda sent=infos: all(self._acknowledged(info) for _, info in sent) or time.monotonic() > deadline,
                       "PUBACKs", timeout=timeout)
            pending = [message for message, info in infos if not self._acknowledged(info)]
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pending)} messages never acknowledged by the broker")

    def publish_in_background(self, messages: list[tuple[str, bytes]]) -> threading.Thread:
        self.error: BaseException | None = None

        def run():
            try:
                self.publish_all(messages)
            except BaseException as error:  # reported by join()
                self.error = error

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Fleet:
    """Meters and a stream of contiguous reports with the exact total they must debit.

    Even meters send `seq` + `energyTotal` (the ext path: register deltas), odd meters are
    seed-only (identity = timestamp + totalConsumed). remainingBalance agrees with the ledger,
    so no resync commands are involved."""

    meter_nos: list[str]
    messages: list[tuple[str, bytes]]
    expected_debit: Decimal

    @classmethod
    def create(cls, tariff, *, meters: int, reports_per_meter: int, prefix: str = "F", seed: int = 1) -> "Fleet":
        rng = Random(seed)
        meter_nos = [f"{prefix}{index:05d}" for index in range(meters)]
        Meter.objects.bulk_create(Meter(meter_no=meter_no, tariff=tariff) for meter_no in meter_nos)
        streams, total = [], Decimal(0)
        for index, meter_no in enumerate(meter_nos):
            cumulative, energy, stream = Decimal(0), Decimal("1000"), []
            for k in range(1, reports_per_meter + 1):
                units = Decimal(rng.randint(1, 9999)) / 100000  # up to 12 kW over 30 s: within the physical bound
                cumulative += units
                energy += units
                ext = index % 2 == 0
                report = ConsumptionReport(meter_no, units, -cumulative, cumulative, 1700000000000 + k * 30000,
                                           k if ext else None, energy if ext else None)
                stream.append((report_topic(meter_no, "consumption"), encode_consumption_report(report)))
            total += cumulative
            streams.append(stream)
        # Interleave meters as a fleet reports: round k of every meter, then round k + 1.
        messages = [stream[k] for k in range(reports_per_meter) for stream in streams]
        return cls(meter_nos, messages, total)
