"""Settings come from the environment; a wrong or missing one stops the process naming it."""

import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from devtools.services import ROOT
from portal.env import database_from_url, env_bool, mqtt_from_url


def _start_django(**env) -> subprocess.CompletedProcess:
    """Start Django the way every process does (settings + app registry) in a fresh interpreter."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    clean.update(env)
    clean["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DEBUG": "False", "SECRET_KEY": ""}, "SECRET_KEY"),
        ({"DEBUG": "maybe"}, "DEBUG"),
        ({"DEBUG": "True", "DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"DEBUG": "True", "MQTT_URL": "http://broker:1883"}, "MQTT_URL"),
        ({"DEBUG": "True", "MQTT_URL": "mqtt://broker:notaport"}, "MQTT_URL"),
        ({"DEBUG": "True", "REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"DEBUG": "True", "MQTT_BATCH_SIZE": "lots"}, "MQTT_BATCH_SIZE"),
        ({"DEBUG": "False", "SECRET_KEY": "x" * 50, "MPESA_CALLBACK_SECRET": ""}, "MPESA_CALLBACK_SECRET"),
    ],
)
def test_a_bad_setting_stops_the_process_and_names_it(env, named):
    result = _start_django(**env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr.splitlines()[-1]


def test_defaults_start_on_one_machine():
    result = _start_django(DEBUG="True", SECRET_KEY="", DATABASE_URL="", REDIS_URL="", MQTT_URL="")
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


def test_sqlite_url_gets_wal_immediate_and_busy_timeout(tmp_path):
    config = database_from_url("DATABASE_URL", f"sqlite:///{tmp_path}/db.sqlite3", ROOT)
    assert config["NAME"] == f"{tmp_path}/db.sqlite3"
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in config["OPTIONS"]["init_command"]
    assert config["OPTIONS"]["timeout"] > 0


def test_postgres_and_mqtt_urls_are_parsed():
    pg = database_from_url("DATABASE_URL", "postgres://meter:p%40ss@db.example:5433/smartmeter", ROOT)
    parsed = (pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"], pg["NAME"])
    assert parsed == ("meter", "p@ss", "db.example", "5433", "smartmeter")
    assert mqtt_from_url("MQTT_URL", "mqtts://ingest:secret@broker.example") == {
        "host": "broker.example", "port": 8883, "username": "ingest", "password": "secret", "tls": True,
    }
    assert mqtt_from_url("MQTT_URL", "mqtt://127.0.0.1:1884")["port"] == 1884


def test_bool_accepts_only_true_or_false(monkeypatch):
    monkeypatch.setenv("FLAG", "True")
    assert env_bool("FLAG", False) is True
    monkeypatch.setenv("FLAG", "false")
    assert env_bool("FLAG", True) is False
    monkeypatch.setenv("FLAG", "enabled")
    with pytest.raises(ImproperlyConfigured, match="FLAG"):
        env_bool("FLAG", False)
