"""The customer's whole journey in a real browser (Debian's Chromium, driven by Playwright):
sign in, open the meter page, buy units with M-Pesa (the fake Daraja calls back), and watch the
balance change live over the WebSocket without reloading the page.

The web process is the real ASGI server (daphne) on the test database with a private Redis for
its Channels layer and Celery broker, so nothing leaks into another run's queues.
"""

import os
import shutil
import subprocess
import sys
from decimal import Decimal

import pytest

from devtools.services import ROOT, PrivateRedis, free_port, subprocess_database_url, wait_for_port
from meters import services
from meters.models import Meter
from tests.conftest import PASSWORD, _missing

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def chromium(monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are
    # ordinary blocking calls between browser steps, which is what this switch allows.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    path = shutil.which("chromium")
    if path is None:
        _missing("Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def web(postgres, fake_daraja, tmp_path):
    """daphne serving portal.asgi on a free port, pointed at the fake Daraja."""
    redis = PrivateRedis().start()
    port = free_port()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=subprocess_database_url(),
        REDIS_URL=redis.url,
        MPESA_BASE_URL=fake_daraja.url,
        MPESA_CALLBACK_BASE_URL=f"http://127.0.0.1:{port}",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    log = open(tmp_path / "daphne.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)
        redis.close()


def test_customer_buys_units_and_sees_the_balance_change_live(chromium, web, fake_daraja, alice_meter, tmp_path):
    from playwright.sync_api import expect

    services.ledger_credit(meter_no="METER-A1", units_kwh="2.5", idempotency_key="opening", actor="test")
    # The customer enters their PIN three seconds after the push reaches the phone.
    fake_daraja.control("config", outcome="success", delay=3)

    page = chromium.new_page()
    page.goto(f"{web}/")
    expect(page).to_have_url(f"{web}/accounts/login/?next=/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.click("text=METER-A1")
    balance = page.get_by_test_id("balance")
    expect(balance).to_have_text("2.500000")
    expect(page.locator("#live")).to_have_text("live", timeout=15_000)

    page.fill("input[name=phone]", "0712345678")
    page.fill("input[name=amount]", "100")
    page.click("text=Pay with M-Pesa")
    expect(page.locator(".notice")).to_contain_text("enter your M-Pesa PIN")
    expect(balance).to_have_text("2.500000")  # not paid yet: the PIN is still being typed
    expect(page.locator("#live")).to_have_text("live", timeout=15_000)
    # KES 100 at KES 25/kWh = 4 kWh, pushed by the callback over the WebSocket: no reload.
    expect(balance).to_have_text("6.500000", timeout=30_000)
    expect(page.locator("#balance-kes")).to_have_text("162.50")
    expect(page.locator("#payments")).to_contain_text("Succeeded")
    page.screenshot(path=str(tmp_path / "meter-page.png"), full_page=True)
    assert alice_meter.payments.get().status == "succeeded"
    assert Meter.objects.get(pk=alice_meter.pk).balance_kwh == Decimal("6.5")


def test_bob_cannot_open_alices_meter_page(chromium, web, alice_meter, bob):
    page = chromium.new_page()
    page.goto(f"{web}/accounts/login/")
    page.fill("input[name=username]", "bob")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    response = page.goto(f"{web}/meters/METER-A1/")
    assert response.status == 404
