"""Shared fixtures: personas, a tariff and meters, and the real services.

Personas (as healthchecks names them): Alice owns METER-A1, Bob owns METER-B1, Sam is staff.
Every view is tested for the person who must not see it.
"""

import os
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.db import connection

from devtools.services import FakeServerProcess, PrivateMosquitto, module_server, require_services, url_reachable
from meters import services
from meters.models import Tariff
from payments import daraja

PASSWORD = "correct-horse-battery-42"


def _missing(what: str) -> None:
    if require_services():
        pytest.fail(f"{what} is required (REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Subprocesses (workers, web servers) may leave a PostgreSQL session open for a moment
    after they exit; end them so the test database can be dropped at the end of the run."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture
def postgres(db):
    """For tests that need real PostgreSQL (row locks, concurrency, set-based SQL)."""
    if connection.vendor != "postgresql":
        _missing("PostgreSQL (set DATABASE_URL=postgres://…)")


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL", "")
    if not url or not url_reachable(url, 6379):
        _missing(f"Redis at {url or 'REDIS_URL'}")
    return url


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    url = os.environ.get("MQTT_URL", "")
    if not url or not url_reachable(url, 1883):
        _missing(f"Mosquitto at {url or 'MQTT_URL'}")
    return url


@pytest.fixture
def private_mosquitto():
    """A Mosquitto of this test's own, with the project's config: it may be restarted or killed."""
    try:
        broker = PrivateMosquitto().start()
    except RuntimeError as error:
        _missing(str(error))
    yield broker
    broker.close()


@pytest.fixture
def tariff(db) -> Tariff:
    return services.tariff_create(name="Domestic", kes_per_kwh=Decimal("25.0000"))


@pytest.fixture
def alice(db):
    return services.customer_create(
        username="alice", password=PASSWORD, name="Alice Wanjiku", phone="0712345678", email="alice@example.com"
    )


@pytest.fixture
def bob(db):
    return services.customer_create(
        username="bob", password=PASSWORD, name="Bob Otieno", phone="+254 110 123 456", email="bob@example.com"
    )


@pytest.fixture
def staff_user(db, django_user_model):
    return django_user_model.objects.create_user("sam", "sam@example.com", PASSWORD, is_staff=True, is_superuser=True)


@pytest.fixture
def alice_meter(alice, tariff):
    return services.meter_provision(meter_no="METER-A1", owner=alice, tariff=tariff)


@pytest.fixture
def bob_meter(bob, tariff):
    return services.meter_provision(meter_no="METER-B1", owner=bob, tariff=tariff)


# The project's fake Daraja server (devtools.fake_daraja) as a real subprocess.


class FakeDarajaProcess(FakeServerProcess):
    def next(self, outcome: str, delay: float = 0.0) -> None:
        self.control("next", outcome=outcome, delay=delay)


@pytest.fixture(scope="session")
def fake_daraja_server():
    with module_server("devtools.fake_daraja", "--delay", "0", "--outcome", "hold", name="fake-daraja") as (port, process):
        yield FakeDarajaProcess(port, process)


@pytest.fixture
def fake_daraja(fake_daraja_server, settings):
    """A fresh fake (no tokens, no transactions; STK pushes held until a test delivers them)
    with MPESA_BASE_URL pointing at it and no cached token."""
    fake_daraja_server.control("reset")
    fake_daraja_server.control("config", outcome="hold", delay=0, c2b_delivery="once")
    settings.MPESA_BASE_URL = fake_daraja_server.url
    cache.delete(daraja._token_key())
    yield fake_daraja_server
    cache.delete(daraja._token_key())
