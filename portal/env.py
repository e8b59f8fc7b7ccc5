"""Typed readers for settings that come from environment variables.

Every reader names the variable in its error, so a wrong setting stops the process at start
with a message that says which one (as healthchecks does: `True`/`False` only, nothing clever).
"""

import dataclasses
import os
from decimal import Decimal, InvalidOperation
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

from core.rules import parse_mqtt_url


def load_env_file(base_dir) -> None:
    """Read the checkout's `.env` (or the file ENV_FILE names; ENV_FILE empty: none) into the
    environment, under what is already set: the environment always wins, so
    `DATABASE_URL=postgres://… make run` and `DEBUG=False python manage.py check` mean what they
    say even with a `.env`. Every process reads it through the settings (manage.py, daphne,
    Celery, the worker, the simulator), so nothing needs an activated venv or honcho."""
    path = os.environ.get("ENV_FILE", str(base_dir / ".env"))
    if path:
        load_dotenv(path, override=False)


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ImproperlyConfigured(f"{name} is required but not set (see .env.example)")
        return default
    return value


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ImproperlyConfigured(f"{name} must be True or False, got {value!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def env_decimal(name: str, default: str, *, minimum: Decimal | None = None) -> Decimal:
    value = env_str(name, default)
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name} must be a decimal number, got {value!r}") from None
    if not number.is_finite() or (minimum is not None and number < minimum):
        raise ImproperlyConfigured(f"{name} must be a number of at least {minimum}, got {value!r}")
    return number


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default or " ").split(",") if item.strip()]


def database_from_url(name: str, url: str, base_dir) -> dict:
    """Turn DATABASE_URL into Django's DATABASES entry.

    SQLite runs in WAL mode with IMMEDIATE transactions: a writer takes the write lock when
    its transaction starts instead of upgrading later, which is what makes concurrent writers
    wait on the busy timeout rather than fail with "database is locked" mid-transaction.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        if not path:
            raise ImproperlyConfigured(f"{name} has no SQLite file path: {url!r}")
        if not os.path.isabs(path):
            path = str(base_dir / path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": path,
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;"
                ),
            },
        }
    if parts.scheme in ("postgres", "postgresql", "pgsql"):
        try:
            port = parts.port
        except ValueError:
            raise ImproperlyConfigured(f"{name} has an invalid port: {url!r}") from None
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise ImproperlyConfigured(f"{name} names no database: {url!r}")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": database,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(port or ""),
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    raise ImproperlyConfigured(
        f"{name} must start with sqlite:// or postgres://, got {parts.scheme or url!r}"
    )


def mqtt_from_url(name: str, url: str) -> dict:
    """mqtt://user:pass@host:port or mqtts://… (TLS) → connection parameters (core.rules)."""
    try:
        return dataclasses.asdict(parse_mqtt_url(url))
    except ValueError as error:
        raise ImproperlyConfigured(f"{name}: {error}") from None


def redis_url_checked(name: str, url: str) -> str:
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ImproperlyConfigured(f"{name} must start with redis://, got {url!r}")
    return url
