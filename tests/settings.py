"""Settings for the test suite: the project's settings with test defaults for what must be set.

Real values still come from the environment (.ci/run sets DATABASE_URL, REDIS_URL, MQTT_URL);
subprocesses that tests start (the MQTT worker, a Celery worker) inherit this module.
"""

import os

os.environ.setdefault("SECRET_KEY", "test-secret-key-that-is-long-enough-for-django-checks")
os.environ.setdefault("MPESA_CALLBACK_SECRET", "test-callback-secret-0123456789abcdef")
os.environ.setdefault("DEBUG", "False")
# The tests see only what they set: no .env of the checkout (subprocesses inherit this too).
os.environ.setdefault("ENV_FILE", "")
# DEBUG=False, but the test client and the live servers speak plain HTTP.
os.environ.setdefault("HTTPS_ONLY", "False")

from tests.support.provision import provision  # noqa: E402

provision()

from portal.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast hashes in tests only

# One test database per pytest process, so that two runs on one PostgreSQL server (two
# developers, or a run beside CI) never drop each other's database. Subprocesses that tests
# start are given the test database's name explicitly.
if DATABASES["default"]["ENGINE"].endswith("postgresql"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}  # noqa: F405

# The same for the Channels layer on a shared Redis: live events of another process (a benchmark,
# another run) never reach this run's groups. Subprocesses the tests start inherit the name.
os.environ.setdefault("TEST_CHANNEL_PREFIX", f"test{os.getpid()}")
CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = os.environ["TEST_CHANNEL_PREFIX"]  # noqa: F405
