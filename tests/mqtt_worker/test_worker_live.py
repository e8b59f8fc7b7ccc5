"""The worker as deployed: `manage.py mqtt_worker` processes, a private Mosquitto with the
project's config, the PostgreSQL test database. Faults mid-stream; afterwards every report is
accounted exactly once (the ledger to the last decimal, `ledger_check`)."""

import os
import shutil
import subprocess
import time
from decimal import Decimal

import orjson
import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.services import require_services
from meters.models import LedgerEntry, Reading
from meters.selectors import ledger_mismatches
from mqtt_worker import codec
from mqtt_worker.models import DeadLetter
from tests.mqtt_worker.live import Fleet, Publisher, WorkerProcess, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services, pytest.mark.slow]

STREAM = 20_000  # the fault-test stream: 200 meters × 100 reports


@pytest.fixture
def broker(postgres, private_mosquitto):
    # Mosquitto started as root drops to the `mosquitto` user, which must be able to write its
    # persistence file, or a restart silently loses every session and queued message.
    if os.geteuid() == 0 and shutil.which("mosquitto"):
        try:
            shutil.chown(private_mosquitto.workdir, user="mosquitto")
        except LookupError:
            pass
    return private_mosquitto


@pytest.fixture
def workers(broker, tmp_path):
    started = []

    def start(client_id="ingest-t0", **kwargs):
        worker = WorkerProcess(broker.url, client_id=client_id, log_dir=tmp_path, **kwargs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process and worker.process.poll() is None:
            worker.kill()


@pytest.fixture
def meters_client(broker):
    client = Publisher(broker.port)
    yield client
    client.close()


def first_copies() -> int:
    return Reading.objects.filter(is_duplicate=False).count()


def debited() -> Decimal:
    return -(LedgerEntry.objects.filter(kind="consumption_debit").aggregate(total=Sum("units_kwh"))["total"] or 0)


def assert_exactly_once(fleet: Fleet) -> None:
    try:
        wait_until(lambda: first_copies() == len(fleet.messages), "every report committed", timeout=60)
    except AssertionError:
        raise AssertionError(f"{first_copies()} of {len(fleet.messages)} reports committed") from None
    assert debited() == fleet.expected_debit
    # One entry per report at most: a register report redelivered after a later one is covered by
    # the later one's delta (it debits nothing), so after an outage there may be fewer.
    assert LedgerEntry.objects.filter(kind="consumption_debit").count() <= len(fleet.messages)
    assert ledger_mismatches() == []
    call_command("ledger_check")


def test_kill_9_mid_stream_then_restart(tariff, workers, meters_client):
    fleet = Fleet.create(tariff, meters=200, reports_per_meter=STREAM // 200)
    worker = workers()
    publishing = meters_client.publish_in_background(fleet.messages)
    wait_until(lambda: first_copies() >= 3000, "a part of the stream committed")
    worker.kill()  # SIGKILL: no batch finished, no ack sent, nothing cleaned up
    assert first_copies() < len(fleet.messages)
    workers()  # same client id: resumes the persistent session, gets the unacked share again
    publishing.join(240)
    assert meters_client.error is None
    assert_exactly_once(fleet)


def test_mosquitto_restart_mid_stream(tariff, broker, workers, meters_client):
    """The single-worker deployment (plain subscriptions, the default): a broker restart loses
    nothing. With a shared group, Mosquitto 2.0.11 drops what is published before the worker
    re-subscribes (test_broker_facts.py), which is why a single worker subscribes plainly."""
    fleet = Fleet.create(tariff, meters=200, reports_per_meter=STREAM // 200)
    worker = workers(group="")
    publishing = meters_client.publish_in_background(fleet.messages)
    wait_until(lambda: first_copies() >= 3000, "a part of the stream committed")
    broker.restart()
    publishing.join(240)
    assert meters_client.error is None
    assert_exactly_once(fleet)
    assert "Disconnected from broker" in worker.log()


def _can_stop_postgres() -> bool:
    host = connection.settings_dict["HOST"] or "127.0.0.1"
    return host in ("127.0.0.1", "localhost") and shutil.which("pg_ctlcluster") and os.geteuid() == 0


def _pg(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
                   + (["-m", "fast"] if action == "stop" else []), check=True, capture_output=True, timeout=60)


def _pg_accepts() -> bool:
    try:
        connection.close()
        connection.ensure_connection()
        return True
    except Exception:
        return False


def test_postgres_stopped_for_10s_mid_stream(tariff, workers, meters_client):
    if not _can_stop_postgres():
        message = "stopping PostgreSQL needs a local cluster, pg_ctlcluster and root"
        pytest.fail(message) if require_services() else pytest.skip(message)
    fleet = Fleet.create(tariff, meters=200, reports_per_meter=STREAM // 200)
    worker = workers()
    publishing = meters_client.publish_in_background(fleet.messages)
    wait_until(lambda: first_copies() >= 3000, "a part of the stream committed")
    connection.close()
    try:
        _pg("stop")
        # Not a timed assertion: the outage lasts (at least) 10 s while the stream goes on.
        wait_until(lambda: "Database unavailable" in worker.log(), "the worker to notice", timeout=60)
        time.sleep(10)
    finally:
        _pg("start")
        wait_until(_pg_accepts, "PostgreSQL to accept connections again", timeout=120)
    publishing.join(240)
    assert meters_client.error is None
    assert_exactly_once(fleet)
    assert worker.process.poll() is None, "the worker survives a database outage"


def test_two_workers_in_one_group_split_the_load(tariff, workers, meters_client):
    fleet = Fleet.create(tariff, meters=100, reports_per_meter=100)
    first = workers("ingest-a", trace=True)
    second = workers("ingest-b", trace=True)
    meters_client.publish_all(fleet.messages)
    assert_exactly_once(fleet)
    assert first.stop() == 0 and second.stop() == 0
    counts = [sum(len(line.split()[1].split(",")) for line in w.trace_path.read_text().splitlines()) for w in (first, second)]
    assert min(counts) > 0, f"both workers take a share, got {counts}"
    # Every message was committed by one worker only (duplicates would show as a larger sum).
    assert sum(counts) == len(fleet.messages)


def test_sigterm_finishes_the_batch_acks_and_disconnects(tariff, workers, meters_client):
    fleet = Fleet.create(tariff, meters=50, reports_per_meter=40)
    worker = workers()
    meters_client.publish_all(fleet.messages)
    wait_until(lambda: first_copies() >= 500, "part of the stream")
    assert worker.stop() == 0
    assert "worker stopped" in worker.log()
    workers()  # whatever was not acked before the stop is redelivered to the same session
    assert_exactly_once(fleet)
    assert Reading.objects.filter(is_duplicate=True).count() < len(fleet.messages) // 2


MALFORMED = st.one_of(
    st.binary(max_size=1100),
    st.text(max_size=200).map(str.encode),
    st.builds(lambda extra: orjson.dumps({"meterNo": "LIVE00000", **extra}), st.dictionaries(
        st.sampled_from(["unitsConsumed", "remainingBalance", "totalConsumed", "timestamp", "seq", "energyTotal"]),
        st.none() | st.booleans() | st.text(max_size=5) | st.integers(max_value=-1, min_value=-(2**63)))),
    st.just(b'{"meterNo":"LIVE1","unitsConsumed":NaN,"remainingBalance":0,"totalConsumed":0,"timestamp":1}'),
    st.just(b'{"meterNo":"LIVE2","unitsConsumed":1,"remainingBalance":0,"totalConsumed":1,"timestamp":1}'),
    st.just(b'{"meterNo":"GHOST","unitsConsumed":1,"remainingBalance":0,"totalConsumed":1,"timestamp":1}'),
)


def test_malformed_payloads_at_a_running_worker_land_in_dead_letters(tariff, broker, workers, meters_client):
    fleet = Fleet.create(tariff, meters=1, reports_per_meter=400, prefix="LIVE")
    workers()
    valid = iter(fleet.messages)
    sent_bad, sent_valid = [], []

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
    @given(st.lists(MALFORMED, min_size=1, max_size=25), st.sampled_from(["consumption", "status", "balance"]))
    def run(payloads, kind):
        bad = [(f"smartmeter/{'GHOST' if b'GHOST' in p else 'LIVE00000'}/{kind}", p) for p in payloads]
        bad = [(topic, payload) for topic, payload in bad if _rejected(topic, payload)]
        around = [next(valid) for _ in range(10)]
        meters_client.publish_all(around[:5] + bad + around[5:])
        sent_bad.extend(bad)
        sent_valid.extend(around)
        wait_until(lambda: DeadLetter.objects.count() == len(sent_bad) and first_copies() == len(sent_valid),
                   "dead letters and the valid reports around them")

    run()
    assert Reading.objects.count() == len(sent_valid)
    assert debited() == sum(codec.decode(topic, payload).units_consumed_kwh for topic, payload in sent_valid)
    stored = sorted((letter.topic, bytes(letter.payload)) for letter in DeadLetter.objects.all())
    assert stored == sorted(sent_bad)
    assert ledger_mismatches() == []


def _rejected(topic: str, payload: bytes) -> bool:
    """The ones the worker must refuse: the codec refuses them, or the meter is unknown."""
    try:
        report = codec.decode(topic, payload)
    except codec.CodecError:
        return True
    return report.meter_no == "GHOST"
