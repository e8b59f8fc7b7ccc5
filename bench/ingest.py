"""Benchmark: meter reports through the real Mosquitto into the worker on PostgreSQL.

    python -m bench.ingest          (make bench-ingest)

Uses DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test) only to create and drop a
database of its own, starts a private Mosquitto with the project's config, and prints:
1. sustained reports/s, first publish → last commit (REPORTS reports from METERS meters),
   checked exactly-once against the expected ledger;
2. p50/p99 publish → commit latency at a steady 1,000 reports/s;
3. the worker's peak memory (VmHWM);
4. the same kind of load through a naive ingester (bench.ingest_naive) and the ratio.

Environment knobs: BENCH_METERS (10000), BENCH_REPORTS (200000), BENCH_LATENCY_REPORTS (10000),
BENCH_NAIVE_REPORTS (20000), BENCH_BATCH_SIZE (settings default 500).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parents[1]
METERS = int(os.environ.get("BENCH_METERS", "10000"))
REPORTS = int(os.environ.get("BENCH_REPORTS", "200000"))
LATENCY_REPORTS = int(os.environ.get("BENCH_LATENCY_REPORTS", "10000"))
NAIVE_REPORTS = int(os.environ.get("BENCH_NAIVE_REPORTS", "20000"))
BATCH_SIZE = os.environ.get("BENCH_BATCH_SIZE", "")
DB_NAME = os.environ.get("BENCH_DB_NAME", "bench_ingest")


def _database_urls() -> tuple[str, str]:
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
    parts = urlsplit(base)
    if parts.scheme not in ("postgres", "postgresql"):
        sys.exit("bench.ingest needs PostgreSQL: set DATABASE_URL=postgres://…")
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
    return admin, urlunsplit((parts.scheme, parts.netloc, f"/{DB_NAME}", "", ""))


def _recreate_database(admin_url: str, drop_only: bool = False) -> None:
    with psycopg.connect(admin_url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        if not drop_only:
            conn.execute(f"CREATE DATABASE {DB_NAME}")


def _wait_for(condition, what: str, timeout: float = 600.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            sys.exit(f"process exited while waiting for {what}")
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


class Run:
    def __init__(self, workdir: Path, broker) -> None:
        self.workdir = workdir
        self.broker = broker
        self.env = dict(os.environ)

    def start(self, module_args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        process = subprocess.Popen([sys.executable, *module_args], cwd=ROOT, env=self.env,
                                   stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        _wait_for(lambda: "Subscribed to:" in log.read_text(errors="replace"), f"{name} to subscribe", 60, process)
        return process, log


_registers: dict[str, tuple[Decimal, Decimal]] = {}  # meterNo → (energy register, units consumed so far)


def _reports(meter_nos: list[str], rounds: range, *, ext: bool = True):
    """Contiguous reports per meter (energyTotal + seq on even meters, seed-only + seq on odd
    ones), interleaved as a fleet reports; remainingBalance agrees with the ledger (balance 0 −
    consumption). Returns [(topic, payload, "meterNo:seq")] and the exact total to debit."""
    from random import Random

    from mqtt_worker.codec import ConsumptionReport, encode_consumption_report, report_topic

    rng = Random(rounds.start)
    messages, total = [], Decimal(0)
    for k in rounds:
        for index, meter_no in enumerate(meter_nos):
            units = Decimal(rng.randint(1, 9999)) / 100000  # up to 12 kW over 30 s: within the physical bound
            energy, consumed = _registers.get(meter_no, (Decimal(1000), Decimal(0)))
            energy, consumed = energy + units, consumed + units
            _registers[meter_no] = (energy, consumed)
            total += units
            report = ConsumptionReport(meter_no, units, -consumed, consumed, 1700000000000 + k * 30000, k,
                                       energy if ext and index % 2 == 0 else None)
            payload = encode_consumption_report(report)
            messages.append((report_topic(meter_no, "consumption"), payload, f"{meter_no}:{k}"))
    return messages, total


class _Publisher:
    """Meters' side: QoS 1 with at most WINDOW reports awaiting PUBACK. Queuing 200,000 messages
    inside paho instead stalls it (seen here: it stopped sending after ~70,000)."""

    WINDOW = 100

    def __init__(self, port: int) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from mqtt_worker.client import tune_socket

        self.window = threading.BoundedSemaphore(self.WINDOW)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-meters", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(self.WINDOW)
        self.client.on_socket_open = lambda c, u, sock: tune_socket(sock)
        self.client.on_publish = lambda c, u, mid, rc, props: self.window.release()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.window.acquire()
        self.client.publish(topic, payload, qos=1)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _end_session(port: int, client_id: str) -> None:
    """Connect as `client_id` with a clean start and no session expiry: the broker drops the
    persistent session and whatever it had queued for it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop_start()
    _wait_for(client.is_connected, f"a clean session for {client_id}", 30)
    client.disconnect()
    client.loop_stop()


def _trace(path: Path) -> dict[str, int]:
    commits = {}
    if path.exists():
        for line in path.read_text().splitlines():
            when, keys = line.split(" ", 1)
            for key in keys.split(","):
                commits.setdefault(key, int(when))
    return commits


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> None:
    admin_url, bench_url = _database_urls()
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    sys.path.insert(0, str(ROOT))
    from devtools.services import PrivateMosquitto

    broker = PrivateMosquitto().start()
    if os.geteuid() == 0:
        shutil.chown(broker.workdir, user="mosquitto")  # it drops to this user and saves there
    os.environ.update(
        DJANGO_SETTINGS_MODULE="portal.settings", DATABASE_URL=bench_url, MQTT_URL=broker.url, DEBUG="False",
        SECRET_KEY="bench-ingest-secret-key-not-for-production-use-0123456789",
        MPESA_CALLBACK_SECRET="bench-ingest-callback-secret-0123456789", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1",
        HTTPS_ONLY="False", ENV_FILE="",  # nothing from a checkout's .env
    )
    processes: list[subprocess.Popen] = []
    try:
        _recreate_database(admin_url)
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        import django

        django.setup()
        from django.db import connection

        from meters import services
        from meters.models import LedgerEntry, Reading
        from meters.selectors import ledger_mismatches

        tariff = services.tariff_create(name="Bench", kes_per_kwh=Decimal("25"))
        meter_nos = [f"BENCH{index:05d}" for index in range(METERS)]
        naive_nos = [f"NAIVE{index:05d}" for index in range(METERS)]
        services.meter_provision_many(meter_nos=meter_nos + naive_nos, tariff=tariff)
        run = Run(workdir, broker)

        def committed(prefix: str) -> int:
            return Reading.objects.filter(meter__meter_no__startswith=prefix, is_duplicate=False).count()

        # 1. Throughput.
        rounds = max(1, REPORTS // METERS)
        messages, expected = _reports(meter_nos, range(rounds))
        trace = workdir / "worker.trace"
        args = ["manage.py", "mqtt_worker", "--client-id", "bench-0", "--trace-commits", str(trace)]
        if BATCH_SIZE:
            args += ["--batch-size", BATCH_SIZE]
        worker, worker_log = run.start(args, "worker")
        processes.append(worker)
        client = _Publisher(broker.port)
        print(f"Publishing {len(messages):,} reports from {METERS:,} meters…", flush=True)
        first_publish = time.time_ns()
        for topic, payload, _ in messages:
            client.publish(topic, payload)
        publish_done = time.time_ns()
        _wait_for(lambda: committed("BENCH") >= len(messages), "every report committed", process=worker)
        last_commit = max(_trace(trace).values())
        seconds = (last_commit - first_publish) / 1e9
        debited = -sum(LedgerEntry.objects.filter(kind="consumption_debit").values_list("units_kwh", flat=True), Decimal(0))
        exact = debited == expected and not ledger_mismatches()
        print(f"Throughput: {len(messages) / seconds:,.0f} reports/s sustained ({len(messages):,} reports, first publish → "
              f"last commit {seconds:.2f} s; publishing alone {(publish_done - first_publish) / 1e9:.2f} s); "
              f"ledger exact: {exact} (debited {debited} kWh, expected {expected})", flush=True)

        # 2. Latency at a steady 1,000 reports/s (the next rounds of the same meters).
        steady, _ = _reports(meter_nos, range(rounds, rounds + max(1, LATENCY_REPORTS // METERS) + 1))
        steady = steady[:LATENCY_REPORTS]
        published = {}
        start = time.monotonic()
        for index, (topic, payload, key) in enumerate(steady):
            delay = start + index / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            published[key] = time.time_ns()
            client.publish(topic, payload)
        _wait_for(lambda: committed("BENCH") >= len(messages) + len(steady), "steady reports committed", process=worker)
        commits = _trace(trace)
        latencies = [(commits[key] - at) / 1e6 for key, at in published.items() if key in commits]
        print(f"Latency at 1,000 reports/s (publish → commit, {len(latencies):,} reports): "
              f"p50 {_percentile(latencies, 0.5):.1f} ms, p99 {_percentile(latencies, 0.99):.1f} ms", flush=True)

        # 3. Peak memory of the worker.
        status = Path(f"/proc/{worker.pid}/status").read_text()
        peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        print(f"Worker peak memory (VmHWM): {peak_kb / 1024:.1f} MB", flush=True)
        worker.terminate()
        worker.wait(60)
        # Its persistent session would otherwise keep collecting the naive phase's reports in
        # the broker (plain subscription), slowing the broker during the naive run.
        _end_session(broker.port, "bench-0")

        # 4. The naive ingester on the same kind of load (fewer reports: it is slow).
        naive_messages, naive_expected = _reports(naive_nos, range(max(1, NAIVE_REPORTS // METERS)))
        naive_trace = workdir / "naive.trace"
        naive, _ = run.start(["-m", "bench.ingest_naive", "bench-naive", str(naive_trace)], "naive")
        processes.append(naive)
        first_publish = time.time_ns()
        for topic, payload, _ in naive_messages:
            client.publish(topic, payload)
        _wait_for(lambda: committed("NAIVE") >= len(naive_messages), "the naive ingester", process=naive)
        naive_seconds = (max(_trace(naive_trace).values()) - first_publish) / 1e9
        naive_rate = len(naive_messages) / naive_seconds
        naive_debited = -sum(LedgerEntry.objects.filter(kind="consumption_debit", meter__meter_no__startswith="NAIVE")
                             .values_list("units_kwh", flat=True), Decimal(0))
        print(f"Naive ingester (one transaction + ORM saves per report): {naive_rate:,.0f} reports/s "
              f"({len(naive_messages):,} reports; ledger exact: {naive_debited == naive_expected}); "
              f"batched worker is {len(messages) / seconds / naive_rate:.1f}× faster", flush=True)
        client.disconnect()
        connection.close()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        broker.close()
        _recreate_database(admin_url, drop_only=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
