"""Decide, once per test run, which Redis and Mosquitto the tests use.

Called from tests/settings.py before the project's settings are read. If DATABASE_URL /
REDIS_URL / MQTT_URL are set, those services are used as they are. Otherwise the usual local ports are tried, and if
nothing listens there a private process is started from the system's binary and its URL is put
in the environment, so that subprocesses the tests start (a worker, a Celery worker) use it too.
"""

import atexit
import os
import shutil

from devtools.services import PrivateMosquitto, PrivatePostgres, PrivateRedis, url_reachable

_started = []


def _cleanup() -> None:
    for service in _started:
        service.close()


def provision() -> None:
    # The suite runs on PostgreSQL, as production does. Without DATABASE_URL a private cluster
    # is started from the system's binaries; SQLITE_TESTS=1 runs the suite on SQLite instead.
    if "DATABASE_URL" not in os.environ and os.environ.get("SQLITE_TESTS") != "1":
        if PrivatePostgres.bindir() is not None:
            postgres = PrivatePostgres().start()
            _started.append(postgres)
            os.environ["DATABASE_URL"] = postgres.url
    if "REDIS_URL" not in os.environ:
        local = "redis://127.0.0.1:6379/0"
        if url_reachable(local, 6379):
            os.environ["REDIS_URL"] = local
        elif shutil.which("redis-server"):
            redis = PrivateRedis().start()
            _started.append(redis)
            os.environ["REDIS_URL"] = redis.url
    if "MQTT_URL" not in os.environ:
        local = "mqtt://127.0.0.1:1883"
        if url_reachable(local, 1883):
            os.environ["MQTT_URL"] = local
        elif shutil.which("mosquitto"):
            broker = PrivateMosquitto().start()
            _started.append(broker)
            os.environ["MQTT_URL"] = broker.url
    if _started:
        atexit.register(_cleanup)
