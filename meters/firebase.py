"""The Firebase Realtime Database mirror: each meter's committed state at `meters/{meterNo}`.

PostgreSQL's ledger is the source of truth (PROTOCOL.md rule 2); the mirror is a copy for the
mobile app, written from the FirebaseMirror outbox and never read back. Writers bump a meter's
outbox version in the transaction that changes it (`meters.services.firebase_mirror_mark`); the
sync below claims pending rows, reads each meter's state and the version in one statement (one
snapshot: a state is never paired with an older version than the one it reflects), writes the whole
batch with ONE multi-path update through firebase-admin, then marks each row synced at the
version it read, conditionally, so a change committed meanwhile stays pending and is pushed again.

Nothing here runs inside a transaction: the network write must not hold row locks. Concurrent
syncs (a slow run overlapping the next beat) are kept off each other's meters by session-level
PostgreSQL advisory locks, one per meter, so the writes for one meter never race each other (a
late write of an older state after a newer one). On other databases (SQLite in development) a
cache lock makes the sync single-flight instead.

A failing Realtime Database (network, 5xx; firebase-admin already retries 500/503 itself) leaves
the rows pending; this process then skips runs for a growing pause (2 s doubling to 60 s), so an
outage does not fill the Celery workers, which also publish meter commands, with doomed syncs.

Emulator / fake: firebase-admin talks plain HTTP to `FIREBASE_DATABASE_EMULATOR_HOST` (host:port)
with the namespace from the URL's first label (`https://smartmeter-dev.firebaseio.com` →
`?ns=smartmeter-dev`) and the emulator's admin token, needing no credentials; `make run` and the
tests point it at `python -m devtools.fake_firebase`.
"""

import json
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import firebase_admin
import google.auth.exceptions
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.models import F
from django.utils import timezone
from firebase_admin import credentials, db
from firebase_admin import exceptions as firebase_exceptions

from meters.models import FirebaseMirror
from meters.selectors import meter_balance_kes

logger = logging.getLogger("meters.firebase")

APP_NAME = "meters-mirror"
EMULATOR_HOST_ENV = "FIREBASE_DATABASE_EMULATOR_HOST"  # read by firebase_admin.db itself
MIRROR_ROOT = "meters"
# Per request; firebase-admin's default is 120 s, far longer than a 2 s beat should wait.
HTTP_TIMEOUT_S = 10
MAX_BATCHES = 20
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 60.0
# Namespace of this module's advisory locks (pg_try_advisory_lock(int, int)): "FBMR".
ADVISORY_LOCK_CLASS = 0x46424D52
# Single-flight lock for databases without advisory locks; outlives the slowest possible run.
CACHE_LOCK_KEY = "meters:firebase-mirror:sync"
CACHE_LOCK_TTL_S = 300

_state_lock = threading.Lock()
_app: firebase_admin.App | None = None
_app_key: tuple | None = None
_disabled_logged = False
_failures = 0
_retry_at = 0.0
_clock = time.monotonic


def mirror_enabled() -> bool:
    return bool(settings.FIREBASE_DATABASE_URL)


def mirror_close() -> None:
    """Forget the firebase-admin app and the failure pause (a configuration change, tests)."""
    global _app, _app_key, _failures, _retry_at, _disabled_logged
    with _state_lock:
        if _app is not None:
            firebase_admin.delete_app(_app)
        _app, _app_key, _failures, _retry_at, _disabled_logged = None, None, 0, 0.0, False


def _mirror_app() -> firebase_admin.App:
    """One app per process and configuration. Raises ImproperlyConfigured with the reason."""
    global _app, _app_key
    url = settings.FIREBASE_DATABASE_URL
    credentials_path = settings.FIREBASE_CREDENTIALS
    key = (url, credentials_path, os.environ.get(EMULATOR_HOST_ENV, ""))
    with _state_lock:
        if _app is not None and _app_key == key:
            return _app
        if _app is not None:
            firebase_admin.delete_app(_app)
            _app = _app_key = None
        credential = None  # Application Default Credentials, loaded lazily (never in emulator mode)
        if credentials_path:
            try:
                credential = credentials.Certificate(credentials_path)
            except (OSError, ValueError) as error:
                raise ImproperlyConfigured(
                    f"FIREBASE_CREDENTIALS={credentials_path!r} is not a readable service-account JSON file: {error}"
                ) from None
        app = firebase_admin.initialize_app(
            credential, {"databaseURL": url, "httpTimeout": HTTP_TIMEOUT_S}, name=f"{APP_NAME}-{uuid.uuid4().hex[:8]}"
        )
        try:
            db.reference("/", app=app)  # builds the client now: a bad URL or emulator host fails here, not mid-run
        except ValueError as error:
            firebase_admin.delete_app(app)
            raise ImproperlyConfigured(f"FIREBASE_DATABASE_URL={url!r}: {error}") from None
        except google.auth.exceptions.DefaultCredentialsError as error:
            firebase_admin.delete_app(app)
            raise ImproperlyConfigured(
                f"No Firebase credentials: set FIREBASE_CREDENTIALS to a service-account JSON file ({error})"
            ) from None
        _app, _app_key = app, key
        return app


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _display_number(value: Decimal):
    """The JSON number the app displays. The Realtime Database stores every number as a double, so
    this is the double nearest the exact decimal (its JSON text is the decimal's own digits for
    any balance this system can hold); the exact value travels beside it as a string."""
    return json.loads(format(value, "f"))


def meter_document(mirror: FirebaseMirror, *, updated_at: datetime) -> dict:
    """What the app reads at meters/{meterNo}. Absent keys (lastSeen) mean "never"."""
    meter = mirror.meter
    document = {
        "meterNo": meter.meter_no,
        "balance": _display_number(meter.balance_kwh),
        "balanceKwh": format(meter.balance_kwh, "f"),
        "balanceKes": format(meter_balance_kes(meter), "f"),
        "online": meter.online,
        "relay": meter.relay_state,
        "updatedAt": _iso(updated_at),
    }
    if meter.last_seen_at is not None:
        document["lastSeen"] = _iso(meter.last_seen_at)
    return document


# Claiming. PostgreSQL: a per-meter session advisory lock, taken only for the batch's candidates
# (the MATERIALIZED CTE stops the planner from trying the lock on rows the LIMIT would drop),
# released when the batch is done or, if the process dies, when its connection closes.


def _claim_postgres(limit: int) -> list[int]:
    table = FirebaseMirror._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH candidates AS MATERIALIZED ("
            f" SELECT meter_id FROM {table} WHERE version > synced_version ORDER BY marked_at, meter_id LIMIT %s)"
            " SELECT meter_id FROM candidates"
            " WHERE pg_try_advisory_lock(%s, (meter_id & 2147483647)::int)",
            [limit, ADVISORY_LOCK_CLASS],
        )
        return [row[0] for row in cursor.fetchall()]


def _release_postgres(meter_ids: list[int]) -> None:
    if not meter_ids:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_unlock(%s, (id & 2147483647)::int) FROM unnest(%s::bigint[]) AS t(id)",
            [ADVISORY_LOCK_CLASS, meter_ids],
        )


def _claim_other(limit: int) -> list[int]:
    return list(
        FirebaseMirror.objects.filter(version__gt=F("synced_version"))
        .order_by("marked_at", "meter_id")
        .values_list("meter_id", flat=True)[:limit]
    )


def _mark_synced(read_versions: dict[int, int], at: datetime) -> int:
    """synced_version = the version read, only where no change came since (version unchanged)."""
    table = FirebaseMirror._meta.db_table
    ids = list(read_versions)
    versions = [read_versions[meter_id] for meter_id in ids]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                f"UPDATE {table} AS m SET synced_version = r.version, synced_at = %s"
                " FROM unnest(%s::bigint[], %s::bigint[]) AS r(id, version)"
                " WHERE m.meter_id = r.id AND m.version = r.version",
                [at, ids, versions],
            )
            return cursor.rowcount
        marked = 0
        for meter_id, version in zip(ids, versions, strict=True):
            cursor.execute(
                f"UPDATE {table} SET synced_version = %s, synced_at = %s WHERE meter_id = %s AND version = %s",
                [version, at, meter_id, version],
            )
            marked += cursor.rowcount
        return marked


def _sync_batch(app: firebase_admin.App, meter_ids: list[int]) -> tuple[int, int]:
    """Write one batch; (meters written, rows marked synced). Raises FirebaseError on failure."""
    # One statement: the version and the state it describes come from one snapshot.
    rows = list(FirebaseMirror.objects.filter(meter_id__in=meter_ids).select_related("meter__tariff"))
    if not rows:
        return 0, 0
    now = timezone.now()
    update = {f"{MIRROR_ROOT}/{row.meter.meter_no}": meter_document(row, updated_at=now) for row in rows}
    db.reference("/", app=app).update(update)
    return len(rows), _mark_synced({row.meter_id: row.version for row in rows}, now)


def _paused() -> bool:
    with _state_lock:
        return _failures > 0 and _clock() < _retry_at


def _record_failure() -> float:
    global _failures, _retry_at
    with _state_lock:
        _failures += 1
        pause = min(BACKOFF_FIRST_S * 2 ** (_failures - 1), BACKOFF_MAX_S)
        _retry_at = _clock() + pause
        return pause


def _record_success() -> None:
    global _failures, _retry_at
    with _state_lock:
        _failures, _retry_at = 0, 0.0


def firebase_mirror_sync(*, limit: int = 500, max_batches: int = MAX_BATCHES, force: bool = False) -> int:
    """Push pending meters to the Realtime Database, `limit` meters per multi-path update, until
    none is pending or `max_batches` updates were made. Returns how many meter documents were
    written. Disabled (FIREBASE_DATABASE_URL empty): does nothing and leaves the rows pending.
    After a failure, runs within the pause return 0 at once unless `force`.
    """
    global _disabled_logged
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer, got {max_batches!r}")
    if connection.in_atomic_block:
        raise RuntimeError("firebase_mirror_sync writes to the network: call it outside any transaction")
    if not mirror_enabled():
        with _state_lock:
            first, _disabled_logged = not _disabled_logged, True
        if first:
            logger.info("Firebase mirror disabled (FIREBASE_DATABASE_URL is empty); meters stay marked for later")
        return 0
    if not force and _paused():
        return 0
    app = _mirror_app()
    if connection.vendor == "postgresql":
        return _run(app, limit, max_batches, _claim_postgres, _release_postgres)
    token = uuid.uuid4().hex
    if not cache.add(CACHE_LOCK_KEY, token, timeout=CACHE_LOCK_TTL_S):
        return 0  # another process is syncing
    try:
        return _run(app, limit, max_batches, _claim_other, lambda ids: None)
    finally:
        if cache.get(CACHE_LOCK_KEY) == token:
            cache.delete(CACHE_LOCK_KEY)


def _run(app, limit: int, max_batches: int, claim, release) -> int:
    written = 0
    for _ in range(max_batches):
        meter_ids = claim(limit)
        if not meter_ids:
            break
        try:
            count, marked = _sync_batch(app, meter_ids)
        except firebase_exceptions.FirebaseError as error:
            pause = _record_failure()
            logger.warning(
                "Firebase mirror: update of %d meters failed (%s: %s); they stay pending, next try in %.0f s",
                len(meter_ids), type(error).__name__, error, pause,
            )
            return written
        finally:
            release(meter_ids)
        _record_success()
        written += count
        logger.debug("Firebase mirror: wrote %d meters in one update (%d marked synced)", count, marked)
        if len(meter_ids) < limit:
            break
    return written
