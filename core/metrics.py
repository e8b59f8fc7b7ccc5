"""The Prometheus metrics the processes record (prometheus-client), named once here.

Counters and histograms live in each process; with PROMETHEUS_MULTIPROC_DIR set (make run,
systemd) every process on the host writes them to files there and the web's /metrics adds them
up (prometheus-client's multiprocess mode), so the worker's and Celery's metrics appear beside
the web's. What the database already knows (meters online, outbox depths, payments by status)
is read at scrape time instead (portal.metrics), so it is right whichever process changed it.
No Django here.
"""

import os
from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

# Multiprocess mode writes into this folder from the first metric on; a checkout's `make clean`
# or a fresh tmpfs may not have it yet.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

PREFIX = "smartmeter"

MESSAGES_RECEIVED = Counter(
    f"{PREFIX}_messages_received_total", "Meter messages the ingest worker committed, by kind", ["kind"]
)
DEAD_LETTERS = Counter(f"{PREFIX}_dead_letters_total", "Messages the ingest worker refused (kept as dead letters)")
METER_RECONNECTIONS = Counter(
    f"{PREFIX}_meter_reconnections_total", "`online` statuses from meters: each (re)connection of a meter"
)
CONSUMPTION_KWH = Counter(f"{PREFIX}_consumption_kwh_total", "Energy debited from the meters' ledgers by reports (kWh)")
BATCH_SIZE = Histogram(
    f"{PREFIX}_ingest_batch_messages", "Messages per ingest batch (one transaction)",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
BATCH_DB_SECONDS = Histogram(
    f"{PREFIX}_ingest_batch_db_seconds", "Database time of an ingest batch (its transaction, retries included)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
PUBLISH_TO_COMMIT = Histogram(
    f"{PREFIX}_publish_to_commit_seconds",
    "Meter message latency, from the broker's delivery to the worker to the commit: per ingest batch, of its "
    "oldest message (the batch's longest)",
    buckets=(0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COMMANDS_SENT = Counter(
    f"{PREFIX}_commands_sent_total", "Commands to meters acknowledged by the broker (PUBACK), by kind (balance updates)",
    ["kind"],
)
MQTT_CONNECTS = Counter(f"{PREFIX}_mqtt_connects_total", "Connections of the backend's MQTT clients to the broker", ["client"])
MQTT_CONNECTED = Gauge(
    f"{PREFIX}_mqtt_connected", "Backend MQTT clients connected now", ["client"], multiprocess_mode="livesum"
)
HTTP_REQUESTS = Counter(f"{PREFIX}_http_requests_total", "HTTP requests answered by the web process", ["method", "status"])
CELERY_TASKS = Counter(f"{PREFIX}_celery_tasks_total", "Celery tasks run, by task and outcome", ["task", "outcome"])
NOTIFICATIONS = Counter(
    f"{PREFIX}_notifications_total", "Notification deliveries tried, by channel and outcome", ["channel", "outcome"]
)
ALERTS = Counter(f"{PREFIX}_alerts_total", "Alerts raised (one per event), by kind", ["kind"])


def add_kwh(counter: Counter, kwh: Decimal) -> None:
    """Metrics are floats; the ledger stays Decimal (this is a view of it, not accounting)."""
    if kwh:
        counter.inc(float(kwh))
