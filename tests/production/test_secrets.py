"""Secrets stay secret: the callback secret's length at start, masked in the logs, and sign-in
lockout per account and per address (django-axes) on the portal's login page."""

import logging
import os
import subprocess
import sys

import pytest
from django.test import Client

from devtools.services import ROOT
from portal.logsafety import MASK
from tests.conftest import PASSWORD

SECRET = "test-callback-secret-0123456789abcdef"


def _start(**env) -> subprocess.CompletedProcess:
    clean = dict(os.environ, DJANGO_SETTINGS_MODULE="portal.settings", ENV_FILE="", **env)
    return subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=60)


def test_a_short_callback_secret_stops_the_process_when_debug_is_off():
    short = _start(DEBUG="False", SECRET_KEY="k" * 60, MPESA_CALLBACK_SECRET="a" * 31)
    assert short.returncode != 0 and "MPESA_CALLBACK_SECRET must be a random string of 32+" in short.stderr
    assert _start(DEBUG="False", SECRET_KEY="k" * 60, MPESA_CALLBACK_SECRET="a" * 32).returncode == 0
    assert _start(DEBUG="True", MPESA_CALLBACK_SECRET="a").returncode == 0, "development may use anything"


@pytest.mark.django_db
def test_callback_paths_are_logged_with_the_secret_masked(caplog):
    caplog.set_level(logging.INFO)
    client = Client()
    assert client.get(f"/payments/callbacks/stk/{SECRET}/").status_code == 405  # logged by django.request
    assert client.post(f"/payments/callbacks/stk/{SECRET}/", data="not json", content_type="application/json")
    assert client.post("/payments/callbacks/stk/a-wrong-guess/", data="{}", content_type="application/json").status_code == 404
    lines = [record.getMessage() for record in caplog.records]
    assert any(f"/payments/callbacks/stk/{MASK}/" in line and record.name == "django.request"
               for line, record in zip(lines, caplog.records, strict=True)), lines
    assert not any(SECRET in line for line in lines), lines
    assert SECRET not in caplog.text


def test_the_console_handler_masks_what_any_logger_writes():
    from portal.logsafety import MaskSecrets

    record = logging.LogRecord("payments", logging.ERROR, __file__, 1, "calling %s failed", (f"/x/{SECRET}/",), None)
    assert MaskSecrets().filter(record) and record.getMessage() == f"calling /x/{MASK}/ failed"


def test_daphnes_access_log_is_masked():
    import io

    from portal.web import MaskedAccessLog

    stream = io.StringIO()
    MaskedAccessLog(stream)("http", "complete", {"client": ["127.0.0.1", 5], "method": "POST",
                                                 "path": f"/payments/callbacks/stk/{SECRET}/", "status": 200, "size": 2})
    assert SECRET not in stream.getvalue() and f"/stk/{MASK}/" in stream.getvalue()


def _login(client, username, password, address="10.0.0.1"):
    return client.post("/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.django_db
def test_portal_sign_in_locks_an_account_after_the_failure_limit(alice, settings):
    settings.AXES_FAILURE_LIMIT = 5
    client = Client()
    for _ in range(4):
        assert _login(client, "alice", "wrong", address=f"10.0.0.{_ + 1}").status_code == 200  # the form again
    assert _login(client, "alice", "wrong", address="10.0.0.9").status_code == 429
    # Locked: even the right password, from yet another address, is refused.
    assert _login(client, "alice", PASSWORD, address="10.0.0.10").status_code == 429
    assert "_auth_user_id" not in client.session


@pytest.mark.django_db
def test_portal_sign_in_locks_an_address_trying_many_accounts(alice, bob, settings):
    settings.AXES_FAILURE_LIMIT = 5
    client = Client()
    for number in range(5):
        _login(client, f"nobody{number}", "wrong", address="10.9.9.9")
    assert _login(client, "bob", PASSWORD, address="10.9.9.9").status_code == 429, "this address is locked"
    assert _login(Client(), "bob", PASSWORD, address="10.1.1.1").status_code == 302, "bob himself is not"


@pytest.mark.django_db
def test_a_success_before_the_limit_resets_the_count(alice, settings):
    settings.AXES_FAILURE_LIMIT = 3
    client = Client()
    _login(client, "alice", "wrong")
    _login(client, "alice", "wrong")
    assert _login(client, "alice", PASSWORD).status_code == 302
    client.logout()
    _login(client, "alice", "wrong")
    assert _login(client, "alice", PASSWORD).status_code == 302


@pytest.mark.django_db
def test_the_address_axes_counts_is_the_trusted_proxy_hop(alice, settings):
    settings.AXES_FAILURE_LIMIT = 2
    settings.TRUSTED_PROXY_HOPS = 1
    client = Client()
    for spoofed in ("1.1.1.1", "2.2.2.2"):
        client.post("/accounts/login/", {"username": f"x{spoofed}", "password": "no"}, REMOTE_ADDR="127.0.0.1",
                    HTTP_X_FORWARDED_FOR=f"{spoofed}, 10.5.5.5")
    # The client-controlled leftmost entry changed each time; the proxy's hop did not.
    locked = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD}, REMOTE_ADDR="127.0.0.1",
                         HTTP_X_FORWARDED_FOR="3.3.3.3, 10.5.5.5")
    assert locked.status_code == 429
