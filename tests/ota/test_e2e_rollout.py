"""End to end: staff publish a release and roll it out to 1 meter, then to 50 % of a 20-meter
simulated fleet; meters whose new image fails to boot roll back, the rollout pauses itself, the
staff page shows each meter's version and state; after a resume the rest of the stage updates.

Real: PostgreSQL (the test database, committed rows), a private Mosquitto with the project's
config, the MQTT worker (`manage.py mqtt_worker` subprocess) that ingests the meters' statuses,
the publisher (mqtt_worker.publisher.publish_commands: paho, QoS 1, marked sent on PUBACK) to
which the outbox's after-commit hint goes, the staff pages (the admin, through Django's test
client, signed in as staff with model permissions only), and the image download view over
plain HTTP from pytest-django's live server (production serves it over https; meters refuse
http, the simulated ones accept it here because OtaOptions.require_https is False).
In place of celery: the outbox hint calls the publisher directly (no Celery worker), and the
test calls the beat task's function (`rollouts_tick`) in its wait loop instead of celery beat.
No timed assertions: every wait is wait_until with a generous timeout.
"""

import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from devtools.services import ROOT, subprocess_database_url
from devtools.sim.fleet import SIM_FW_VERSION, Broker, Fleet, FleetOptions, OtaOptions
from meters import outbox, services
from meters.models import CommandKind, CommandStatus, Meter, MeterCommand
from meters.ota import services as ota
from meters.ota.models import FirmwareRelease, Rollout, RolloutState, RolloutTarget, TargetState
from mqtt_worker import publisher
from portal.env import mqtt_from_url
from tests.ota.conftest import TEST_PUBLIC_KEY, image_for, signed
from tests.ota.test_staff_pages import OPERATOR_PERMS, _staff
from tests.simulator.conftest import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

METERS = [f"OTA{i:02d}" for i in range(20)]
VERSION = "2.0.0"


@pytest.fixture
def worker(postgres, private_mosquitto, tmp_path):
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="tests.settings", DATABASE_URL=subprocess_database_url(),
               MQTT_URL=private_mosquitto.url, CELERY_TASK_ALWAYS_EAGER="True", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "mqtt_worker", "--client-id", "ingest-ota-e2e", "--batch-wait-ms", "10"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    process.log_path = log_path
    wait_until(lambda: "Subscribed to:" in log_path.read_text(errors="replace"), "the worker to subscribe", process=process)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(30)


@pytest.fixture
def real_publisher(private_mosquitto, settings, monkeypatch):
    """Commands queued in this process are published by the real publisher to the private broker."""
    settings.MQTT = settings.MQTT_PUBLISHER = mqtt_from_url("MQTT_URL", private_mosquitto.url)
    monkeypatch.setattr(publisher, "_publisher", None)
    monkeypatch.setattr(outbox, "_command_dispatchers", [publisher.publish_commands])
    yield
    if publisher._publisher is not None:
        publisher._publisher.close()


def _targets(rollout) -> dict[str, RolloutTarget]:
    return {t.meter.meter_no: t for t in RolloutTarget.objects.filter(rollout=rollout).select_related("meter")}


def _tick_until(condition, what: str, worker) -> None:
    def check():
        ota.rollouts_tick()  # what celery beat runs every OTA_CHECK_INTERVAL_S
        return condition()

    wait_until(check, what, timeout=180, process=worker)


def test_staged_rollout_over_mqtt_pauses_on_failed_boots(
    worker, real_publisher, private_mosquitto, live_server, client, settings, tariff, django_user_model, ota_settings,
):
    settings.OTA_IMAGE_BASE_URL = live_server.url
    for meter_no in METERS:
        services.meter_provision(meter_no=meter_no, owner=None, tariff=tariff)
        services.ledger_credit(meter_no=meter_no, units_kwh=Decimal("50"), idempotency_key=f"open:{meter_no}",
                               actor="test", reason="opening credit")
    fail_boot: set[str] = set()
    fleet = Fleet(FleetOptions(
        meter_nos=METERS, broker=Broker(port=private_mosquitto.port), interval_s=5, connections=2, speed=10, seed=13,
        client_id_prefix="sim-ota-e2e",
        ota=OtaOptions(public_key=TEST_PUBLIC_KEY, require_https=False, fail_boot_meters=fail_boot),
    )).start()
    try:
        def fleet_ok():
            if fleet.failed() is not None:
                raise AssertionError(f"the fleet failed: {fleet.failed()!r}")
            return True

        wait_until(lambda: fleet_ok() and Meter.objects.filter(online=True, firmware=SIM_FW_VERSION).count() == 20,
                   "every meter online, reporting its firmware", process=worker)

        # Staff publish the release: upload the image and its signature on the staff page.
        operator = _staff(django_user_model, "olive", OPERATOR_PERMS)
        client.force_login(operator)
        image, sig = signed(VERSION, image_for(VERSION, 64 * 1024))
        response = client.post(reverse("admin:meters_firmwarerelease_add"), {
            "version": VERSION, "signature": sig["signature"], "notes": "e2e",
            "image_file": SimpleUploadedFile("firmware.bin", image, content_type="application/octet-stream"),
        })
        assert response.status_code == 302, response.content.decode()[:3000]
        release = FirmwareRelease.objects.get()

        # To one test meter.
        releases = reverse("admin:meters_firmwarerelease_changelist")
        response = client.post(releases, {"action": "start_rollout", "_selected_action": [release.pk], "apply": "1",
                                          "test_meter_no": METERS[0], "max_in_flight": "3", "failure_percent": "10"})
        assert response.status_code == 302
        rollout = Rollout.objects.get()
        _tick_until(lambda: fleet_ok() and _targets(rollout)[METERS[0]].state == TargetState.UPDATED,
                    "the test meter to update", worker)
        assert fleet.meters[METERS[0]].fw == VERSION

        # The stage to 50 %: 9 more meters, 3 at a time, in the order the service spreads them.
        # Two of the first three have a board on which the new image panics at boot.
        order = sorted(METERS[1:], key=lambda m: ota._order_key(release, m))
        stage, first_wave = order[:9], order[:3]
        fail_boot.update(first_wave[1:])
        rollouts = reverse("admin:meters_rollout_changelist")
        response = client.post(rollouts, {"action": "advance", "_selected_action": [rollout.pk], "apply": "1",
                                          "percent": "50"})
        assert response.status_code == 302
        targets = _targets(rollout)
        assert sorted(targets) == sorted([METERS[0], *stage])
        assert {m for m, t in targets.items() if t.state == TargetState.COMMANDED} == set(first_wave)

        def paused_and_settled():
            fleet_ok()
            rollout.refresh_from_db()
            return rollout.state == RolloutState.PAUSED and not RolloutTarget.objects.filter(
                rollout=rollout, state__in=[TargetState.COMMANDED, TargetState.DOWNLOADING, TargetState.VERIFYING,
                                            TargetState.REBOOTING, TargetState.PENDING]).exists()

        _tick_until(paused_and_settled, "the rollout to pause and its updating meters to finish", worker)
        assert rollout.paused_reason.endswith("failed to come back (more than 10 %)")
        targets = _targets(rollout)
        for meter_no in first_wave[1:]:
            t = targets[meter_no]
            assert (t.state, t.reported_fw, t.error) == (TargetState.ROLLED_BACK, SIM_FW_VERSION,
                                                         "the new image crashed (panic)"), meter_no
            assert fleet.meters[meter_no].fw == SIM_FW_VERSION
        updated = [m for m, t in targets.items() if t.state == TargetState.UPDATED]
        waiting = [m for m, t in targets.items() if t.state == TargetState.WAITING]
        assert METERS[0] in updated and first_wave[0] in updated
        assert waiting and set(updated) | set(first_wave[1:]) | set(waiting) == set(targets)
        # The pause stopped the stage: the waiting meters were sent nothing and run the old image.
        assert not MeterCommand.objects.filter(kind=CommandKind.OTA, meter__meter_no__in=waiting).exists()
        for meter_no in METERS:
            meter = Meter.objects.get(meter_no=meter_no)
            assert meter.firmware == fleet.meters[meter_no].fw == (VERSION if meter_no in updated else SIM_FW_VERSION)
        # Every OTA command went out through the publisher and was answered (cmdId in a status).
        assert set(MeterCommand.objects.filter(kind=CommandKind.OTA).values_list("status", flat=True)) == {
            CommandStatus.ACKNOWLEDGED}

        # The staff page shows each meter's version and state.
        page = client.get(reverse("admin:meters_rollout_change", args=[rollout.pk])).content.decode()
        for meter_no, target in targets.items():
            row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*>{meter_no}</a>(?:(?!</tr>).)*</tr>", page, re.S)
            assert row, meter_no
            assert Meter.objects.get(meter_no=meter_no).firmware in row.group(0)
            assert target.get_state_display() in row.group(0)
        assert "Paused" in page and "failed to come back" in page

        # Staff resume (the failed boards are being replaced): the rest of the stage updates.
        response = client.post(rollouts, {"action": "resume", "_selected_action": [rollout.pk], "apply": "1",
                                          "note": "two bad boards"})
        assert response.status_code == 302
        _tick_until(lambda: fleet_ok() and all(_targets(rollout)[m].state == TargetState.UPDATED for m in waiting),
                    "the rest of the stage to update", worker)
        rollout.refresh_from_db()
        assert rollout.state == RolloutState.RUNNING
        assert sum(meter.fw == VERSION for meter in fleet.meters.values()) == 8  # 10 in the rollout, 2 rolled back
        stats = fleet.snapshot()["stats"]
        assert stats.images_failed_boot == 2 and stats.ota_commands == 10  # the test meter and 9
        assert worker.poll() is None
    finally:
        delivered = fleet.stop(flush_timeout=60)
    print(fleet.progress_line())
    assert delivered
