"""The environment wins over `.env` everywhere (manage.py, Celery, make run's honcho), commands
work from the checkout without an activated venv, and `check --deploy` is clean with production
settings. Each process is started for real, with a `.env` of the test's own (ENV_FILE)."""

import os
import subprocess
import sys

import pytest

from devtools.services import ROOT

# A production-like environment: nothing from the test run leaks in (tests.settings sets some).
BASE_ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def run(args: list[str], env_file, **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env={**BASE_ENV, "ENV_FILE": str(env_file), **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def dot_env(tmp_path):
    """A .env as `make run` makes it (from .env.example), on a SQLite file of this test."""
    text = (ROOT / ".env.example").read_text()
    text = text.replace("SECRET_KEY=change-me", "SECRET_KEY=" + "s" * 60)
    text = text.replace("DATABASE_URL=sqlite:///var/db.sqlite3", f"DATABASE_URL=sqlite:///{tmp_path}/fromfile.sqlite3")
    text += "\nREDIS_URL=redis://fromfile:6390/0\n"
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_manage_py_reads_env_under_the_environment(dot_env):
    show = ["-v", "0", "-c", "from django.conf import settings as s; print(s.DATABASES['default']['NAME'], s.DEBUG)"]
    from_file = run([sys.executable, "manage.py", "shell", *show], dot_env)
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout.split() == [f"{dot_env.parent}/fromfile.sqlite3", "True"]
    from_env = run([sys.executable, "manage.py", "shell", *show], dot_env,
                   DATABASE_URL="postgres://meter@db.example:5432/smartmeter", DEBUG="False", SECRET_KEY="e" * 60,
                   MPESA_CALLBACK_SECRET="c" * 40)
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.split() == ["smartmeter", "False"]


def test_createsuperuser_and_ledger_check_work_in_the_checkout_without_setting_anything(dot_env):
    venv_python = str(ROOT / ".venv" / "bin" / "python")  # as README says: no activated venv
    assert run([venv_python, "manage.py", "migrate", "--noinput"], dot_env).returncode == 0
    created = run([venv_python, "manage.py", "createsuperuser", "--noinput", "--username", "root", "--email", "r@x.org"],
                  dot_env, DJANGO_SUPERUSER_PASSWORD="correct-horse-battery-42")
    assert created.returncode == 0, created.stderr
    checked = run([venv_python, "manage.py", "ledger_check"], dot_env)
    assert checked.returncode == 0, checked.stderr


def test_celery_reads_env_under_the_environment(dot_env):
    show = ["-c", "from portal.celery import app; print(app.conf.broker_url)"]
    assert run([sys.executable, *show], dot_env).stdout.strip() == "redis://fromfile:6390/0"
    assert run([sys.executable, *show], dot_env, REDIS_URL="redis://fromenv:6379/1").stdout.strip() == "redis://fromenv:6379/1"


def test_make_runs_honcho_lets_the_environment_win(dot_env, tmp_path):
    procfile = tmp_path / "Procfile"
    procfile.write_text("show: python -c \"import os; print('DB=' + os.environ['DATABASE_URL'])\"\n")
    started = run([str(ROOT / "bin" / "start-all")], dot_env, PROCFILE=str(procfile),
                  DATABASE_URL="postgres://postgres@127.0.0.1:5432/fromenv")
    assert "DB=postgres://postgres@127.0.0.1:5432/fromenv" in started.stdout, started.stdout + started.stderr
    from_file = run([str(ROOT / "bin" / "start-all")], dot_env, PROCFILE=str(procfile))
    assert f"DB=sqlite:///{tmp_path}/fromfile.sqlite3" in from_file.stdout
    assert "honcho start --env /dev/null" in (ROOT / "bin" / "start-all").read_text()
    assert "exec bin/start-all" in (ROOT / "Makefile").read_text()


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    empty = tmp_path / "none.env"
    empty.write_text("")
    checked = run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], empty,
                  DEBUG="False", SECRET_KEY="p" * 20 + "roduction-secret-key-with-enough-variety-0123456789",
                  ALLOWED_HOSTS="meters.example.com", CSRF_TRUSTED_ORIGINS="https://meters.example.com",
                  MPESA_CALLBACK_SECRET="c" * 20 + "allback-secret-0123456789", TRUSTED_PROXY_HOPS="1",
                  DATABASE_URL="postgres://meter@db.example:5432/smartmeter", REDIS_URL="redis://cache.example:6379/0",
                  MQTT_URL="mqtts://backend.ingest:pw@broker.example:8883")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "System check identified no issues" in checked.stdout
