"""Releases, rollouts and each meter's progress, through the services and the status ingest
(meters.consumption.ingest_reports, the worker's path), with the command outbox recorded."""

import json
import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from core.errors import Conflict, InvalidInput, NotFound
from devtools.sim.meter_core import decode_ota_command
from meters.consumption import ingest_reports
from meters.models import CommandKind, CommandStatus, Meter, MeterCommand
from meters.ota import selectors
from meters.ota import services as ota
from meters.ota.models import FirmwareRelease, Rollout, RolloutState, RolloutTarget, TargetState
from meters.reports import StatusUpdate
from meters.tasks import ota_rollouts_tick
from mqtt_worker.publisher import _payload
from tests.ota.conftest import TEST_PUBLIC_KEY_HEX, image_for, signed

pytestmark = pytest.mark.django_db


def status(meter_no, *, fw="1.0.0", state="idle", version="", error="", cmd_id="", kind="online", message=""):
    return StatusUpdate(meter_no=meter_no, status=kind, message=message, firmware=fw, ota_state=state,
                        ota_version=version, ota_error=error, cmd_id=cmd_id)


def target(rollout, meter_no) -> RolloutTarget:
    return RolloutTarget.objects.select_related("command").get(rollout=rollout, meter__meter_no=meter_no)


def update_ok(rollout, meter_no, version="1.1.0"):
    """What a meter that installs the update sends (firmware/PROTOCOL-ext.md), in one batch."""
    cmd = target(rollout, meter_no).command.cmd_id
    ingest_reports([
        status(meter_no, state="downloading", version=version, cmd_id=cmd, message=f"OTA {version}: downloading"),
        status(meter_no, state="rebooting", version=version, cmd_id=cmd),
        status(meter_no, kind="offline", state="idle"),  # the will, composed before the update
        status(meter_no, fw=version, state="pending", version=version),
        status(meter_no, fw=version, state="valid", version=version, cmd_id=cmd, message=f"OTA {version}: confirmed"),
    ])


def roll_back(rollout, meter_no, version="1.1.0"):
    cmd = target(rollout, meter_no).command.cmd_id
    ingest_reports([
        status(meter_no, state="downloading", version=version, cmd_id=cmd),
        status(meter_no, state="rebooting", version=version, cmd_id=cmd),
        status(meter_no, state="rolledback", version=version, error="the new image crashed (panic)"),
        status(meter_no, kind="error", state="rolledback", version=version, error="the new image crashed (panic)",
               cmd_id=cmd, message=f"OTA {version} rolled back: the new image crashed (panic)"),
    ])


# ---- releases ---------------------------------------------------------------------------------


def test_a_release_is_stored_with_the_sha256_the_backend_computed(ota_settings):
    image, sig = signed("1.1.0")
    release = ota.release_create(version="1.1.0", image=image, signature=sig["signature"], actor="sam", notes="fixes")
    assert release.sha256 == sig["sha256"] and release.size_bytes == len(image)
    assert bytes(FirmwareRelease.objects.get(pk=release.pk).image) == image
    assert len(release.download_token) == 43
    assert ota.release_image_url(release) == f"http://testserver/firmware/images/{release.download_token}/1.1.0.bin"


def test_a_release_whose_signature_does_not_verify_is_refused(ota_settings):
    image, sig = signed("1.1.0")
    with pytest.raises(InvalidInput, match="does not verify") as caught:
        ota.release_create(version="1.1.1", image=image, signature=sig["signature"], actor="sam")
    assert caught.value.field == "signature"
    with pytest.raises(InvalidInput, match="does not verify"):
        ota.release_create(version="1.1.0", image=image + b"x", signature=sig["signature"], actor="sam")
    with pytest.raises(InvalidInput, match="base64"):
        ota.release_create(version="1.1.0", image=image, signature="%%%", actor="sam")
    assert not FirmwareRelease.objects.exists()


def test_release_rules(ota_settings, release):
    image, sig = signed("1.1.0")
    with pytest.raises(Conflict):
        ota.release_create(version="1.1.0", image=image, signature=sig["signature"], actor="sam")
    # The same image under another version cannot be signed for both (the image says its fw).
    same = image_for("1.1.0")
    _, sig2 = signed("1.1.9", same)
    with pytest.raises(Conflict, match="already release 1.1.0"):
        ota.release_create(version="1.1.9", image=same, signature=sig2["signature"], actor="sam")
    for version in ("", "1 0", "x" * 32):
        with pytest.raises(InvalidInput):
            ota.release_create(version=version, image=image, signature=sig["signature"], actor="sam")
    with pytest.raises(InvalidInput, match="empty"):
        ota.release_create(version="1.2.0", image=b"", signature=sig["signature"], actor="sam")
    big, big_sig = signed("9.0.0", b"\0" * (0x1C0000 + 1))
    with pytest.raises(InvalidInput, match="OTA slot"):
        ota.release_create(version="9.0.0", image=big, signature=big_sig["signature"], actor="sam")


def test_without_a_configured_key_nothing_can_be_uploaded_or_rolled_out(ota_settings, release, fleet):
    ota_settings.OTA_PUBLIC_KEY = ""
    image, sig = signed("1.2.0")
    with pytest.raises(InvalidInput, match="OTA_PUBLIC_KEY is not set"):
        ota.release_create(version="1.2.0", image=image, signature=sig["signature"], actor="sam")
    with pytest.raises(InvalidInput, match="OTA_PUBLIC_KEY is not set"):
        ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")


def test_a_release_signed_with_a_rotated_key_is_not_rolled_out(ota_settings, release, fleet):
    # Another valid P-256 point (the generator of the curve): the release no longer verifies.
    ota_settings.OTA_PUBLIC_KEY = (
        "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
        "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
    )
    with pytest.raises(InvalidInput, match="not signed with the configured"):
        ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    assert not Rollout.objects.exists()
    ota_settings.OTA_PUBLIC_KEY = TEST_PUBLIC_KEY_HEX


def test_http_image_urls_only_when_allowed(ota_settings, release, fleet):
    ota_settings.OTA_ALLOW_HTTP = False
    with pytest.raises(InvalidInput, match="https only"):
        ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    ota_settings.OTA_IMAGE_BASE_URL = "https://portal.example.com"
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    command = target(rollout, fleet[0]).command
    decoded, error, _ = decode_ota_command(_payload(command))  # the meter's own rules: https required
    assert error == "" and decoded.url.startswith("https://portal.example.com/firmware/images/")


# ---- the test meter, the command ----------------------------------------------------------------


def test_a_rollout_starts_with_one_command_to_the_test_meter(
    ota_settings, release, fleet, dispatched_commands, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[3], actor="sam")
    command = MeterCommand.objects.get()
    assert (command.kind, command.meter.meter_no, command.release_id, command.status) == (
        CommandKind.OTA, fleet[3], release.pk, CommandStatus.QUEUED)
    assert dispatched_commands == [command.pk]
    t = target(rollout, fleet[3])
    assert (t.state, t.stage, t.command_id) == (TargetState.COMMANDED, 0, command.pk)
    # What the publisher sends is what the meter decodes, with the release's fields.
    payload = _payload(command)
    decoded, error, cmd_id = decode_ota_command(payload, require_https=False)
    assert error == "" and cmd_id == command.cmd_id
    assert (decoded.version, decoded.sha256) == ("1.1.0", release.sha256)
    assert decoded.url == ota.release_image_url(release)
    assert json.loads(payload)["signature"] == release.signature
    # One open rollout at a time.
    image, sig = signed("1.2.0")
    other = ota.release_create(version="1.2.0", image=image, signature=sig["signature"], actor="sam")
    with pytest.raises(Conflict, match="still open"):
        ota.rollout_start(release_id=other.pk, test_meter_no=fleet[4], actor="sam")
    with pytest.raises(NotFound):
        ota.rollout_start(release_id=other.pk, test_meter_no="NOPE", actor="sam")


def test_progress_comes_from_the_meters_statuses(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    cmd = target(rollout, fleet[0]).command.cmd_id
    ingest_reports([status(fleet[0], state="downloading", version="1.1.0", cmd_id=cmd)])
    t = target(rollout, fleet[0])
    assert t.state == TargetState.DOWNLOADING and t.command.status == CommandStatus.ACKNOWLEDGED
    meter = Meter.objects.get(meter_no=fleet[0])
    assert (meter.firmware, meter.ota_state, meter.ota_version) == ("1.0.0", "downloading", "1.1.0")
    update_ok(rollout, fleet[0])
    t = target(rollout, fleet[0])
    assert (t.state, t.reported_fw, t.reported_ota_state, t.error) == (TargetState.UPDATED, "1.1.0", "valid", "")
    assert t.finished_at is not None
    meter = Meter.objects.get(meter_no=fleet[0])
    assert (meter.firmware, meter.ota_state, meter.ota_version) == ("1.1.0", "valid", "1.1.0")


def test_a_rollback_is_recorded_with_the_meters_reason(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    roll_back(rollout, fleet[0])
    t = target(rollout, fleet[0])
    assert (t.state, t.reported_fw, t.error) == (TargetState.ROLLED_BACK, "1.0.0", "the new image crashed (panic)")
    assert Meter.objects.get(meter_no=fleet[0]).firmware == "1.0.0"
    # The test meter failed: the next check pauses the rollout, and it cannot be advanced.
    assert ota.rollouts_tick() == {rollout.pk: RolloutState.PAUSED}
    rollout.refresh_from_db()
    assert rollout.paused_reason == "1 of 1 meters sent the update failed to come back (more than 20 %)"
    with pytest.raises(Conflict, match="resume"):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=50)


def test_statuses_that_are_not_about_this_command_change_nothing(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    # An earlier attempt's outcome for the same version (no cmdId, the meter not yet heard on
    # this one): not this command's result.
    ingest_reports([
        status(fleet[0], state="failed", version="1.1.0", error="download failed: HTTP 404"),
        status(fleet[0], kind="offline", fw="1.1.0", state="valid", version="1.1.0"),  # a will is not news
        status(fleet[0], state="downloading", version="0.9.0", cmd_id="ota-someone-else"),
    ])
    assert target(rollout, fleet[0]).state == TargetState.COMMANDED
    assert Meter.objects.get(meter_no=fleet[0]).ota_version == "0.9.0"


@pytest.mark.parametrize("message, state, version, expected", [
    ("OTA command rejected: bad url", "idle", "", TargetState.FAILED),
    ("OTA 1.1.0 refused: busy with 1.0.5", "downloading", "1.0.5", TargetState.FAILED),
    ("OTA 1.1.0 refused: this image rolled back before", "rolledback", "1.1.0", TargetState.ROLLED_BACK),
])
def test_a_refused_command_ends_the_meters_turn(ota_settings, release, fleet, message, state, version, expected):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    cmd = target(rollout, fleet[0]).command.cmd_id
    ingest_reports([status(fleet[0], kind="error", state=state, version=version, cmd_id=cmd, message=message,
                           error="the new image crashed (panic)" if state == "rolledback" else "")])
    t = target(rollout, fleet[0])
    assert t.state == expected and t.error


def test_a_meter_already_on_the_version_is_updated_without_a_command(ota_settings, release, fleet):
    Meter.objects.filter(meter_no=fleet[0]).update(firmware="1.1.0")
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    t = target(rollout, fleet[0])
    assert (t.state, t.command_id, t.error) == (TargetState.UPDATED, None, "already running this version")
    assert not MeterCommand.objects.exists()


# ---- stages, waves, the pause rule ---------------------------------------------------------------


def test_advance_to_half_the_fleet_in_waves(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam", max_in_flight=2)
    with pytest.raises(Conflict, match="not finished"):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=50)
    update_ok(rollout, fleet[0])
    targets = ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=50)
    assert len(targets) == 4  # 5 of 10 with the test meter
    assert {t.stage for t in targets} == {1} and [t.position for t in targets] == [1, 2, 3, 4]
    commanded = list(RolloutTarget.objects.filter(rollout=rollout, stage=1, state=TargetState.COMMANDED))
    assert len(commanded) == 2  # max_in_flight
    # The same selection every time for a release (a spread, not the first meter numbers).
    assert [t.meter.meter_no for t in targets] == sorted(
        (m for m in fleet if m != fleet[0]), key=lambda m: ota._order_key(release, m))[:4]
    # Ticks while both are updating command nobody else; once one has updated, the next goes.
    assert ota.rollouts_tick() == {rollout.pk: RolloutState.RUNNING}
    assert RolloutTarget.objects.filter(rollout=rollout, state=TargetState.COMMANDED).count() == 2
    update_ok(rollout, commanded[0].meter.meter_no)
    ota.rollouts_tick()
    ota.rollouts_tick()  # idempotent: a second run changes nothing
    assert RolloutTarget.objects.filter(rollout=rollout, state=TargetState.COMMANDED).count() == 2
    assert RolloutTarget.objects.filter(rollout=rollout, state=TargetState.WAITING).count() == 1
    assert MeterCommand.objects.filter(kind=CommandKind.OTA).count() == 4
    while commanded := list(RolloutTarget.objects.filter(rollout=rollout, state=TargetState.COMMANDED)):
        for t in commanded:
            update_ok(rollout, t.meter.meter_no)
        ota.rollouts_tick()
    assert RolloutTarget.objects.filter(rollout=rollout, state=TargetState.UPDATED).count() == 5
    with pytest.raises(InvalidInput, match="already covers"):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=40)


def test_the_rollout_pauses_when_more_than_the_share_fails(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam", failure_percent=30,
                                max_in_flight=3)
    update_ok(rollout, fleet[0])
    ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=70)  # 6 more, 3 at once
    first = [t.meter.meter_no for t in RolloutTarget.objects.filter(rollout=rollout, state=TargetState.COMMANDED)]
    roll_back(rollout, first[0])
    # 1 failed of 4 commanded = 25 %: not more than 30 %.
    assert ota.rollouts_tick()[rollout.pk] == RolloutState.RUNNING
    update_ok(rollout, first[1])
    roll_back(rollout, first[2])
    # 2 of 5 commanded (the test meter, the first three and the one sent next) = 40 %.
    assert ota.rollouts_tick()[rollout.pk] == RolloutState.PAUSED
    rollout.refresh_from_db()
    assert rollout.paused_reason.startswith("2 of 5 meters")
    waiting = RolloutTarget.objects.filter(rollout=rollout, state=TargetState.WAITING).count()
    assert waiting == 2
    ota.rollouts_tick()
    assert RolloutTarget.objects.filter(rollout=rollout, state=TargetState.WAITING).count() == waiting
    progress = selectors.rollout_progress(rollout)
    assert (progress.updated, progress.failed, progress.waiting, progress.in_flight) == (2, 2, 2, 1)

    # Resumed: counted afresh from now, the next meters are sent it.
    ota.rollout_resume(rollout_id=rollout.pk, actor="sam", note="bad batch of boards, replaced")
    rollout.refresh_from_db()
    assert rollout.state == RolloutState.RUNNING and rollout.paused_reason == ""
    assert RolloutTarget.objects.filter(rollout=rollout, state=TargetState.WAITING).count() == 0
    assert ota.rollouts_tick()[rollout.pk] == RolloutState.RUNNING
    assert [e.action for e in rollout.events.all()] == ["start", "advance", "pause", "resume"]
    assert rollout.events.get(action="pause").actor == ota.TICK_ACTOR


def test_silent_meters_time_out_and_count_as_failed(ota_settings, release, fleet):
    start = timezone.now()
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam", silence_timeout_s=600,
                                now=start)
    assert ota.rollouts_tick(now=start + timedelta(seconds=599))[rollout.pk] == RolloutState.RUNNING
    assert target(rollout, fleet[0]).state == TargetState.COMMANDED
    assert ota.rollouts_tick(now=start + timedelta(seconds=601))[rollout.pk] == RolloutState.PAUSED
    t = target(rollout, fleet[0])
    assert t.state == TargetState.TIMED_OUT and "600 s" in t.error
    # A late answer is still the truth.
    update_ok(rollout, fleet[0])
    assert target(rollout, fleet[0]).state == TargetState.UPDATED


def test_progress_restarts_the_silence_clock(ota_settings, release, fleet):
    start = timezone.now()
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam", silence_timeout_s=600,
                                now=start)
    cmd = target(rollout, fleet[0]).command.cmd_id
    ingest_reports([status(fleet[0], state="downloading", version="1.1.0", cmd_id=cmd)],
                   now=start + timedelta(seconds=500))
    assert ota.rollouts_tick(now=start + timedelta(seconds=1000))[rollout.pk] == RolloutState.RUNNING
    assert target(rollout, fleet[0]).state == TargetState.DOWNLOADING


def test_advance_by_list_pause_and_abort(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    update_ok(rollout, fleet[0])
    with pytest.raises(NotFound, match="NOPE"):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam", meter_nos=[fleet[1], "NOPE"])
    with pytest.raises(Conflict, match="Already"):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam", meter_nos=[fleet[0]])
    with pytest.raises(InvalidInput):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam")
    ota.rollout_pause(rollout_id=rollout.pk, actor="sam", note="waiting for the weekend")
    with pytest.raises(Conflict):
        ota.rollout_advance(rollout_id=rollout.pk, actor="sam", meter_nos=[fleet[1]])
    ota.rollout_resume(rollout_id=rollout.pk, actor="sam")
    targets = ota.rollout_advance(rollout_id=rollout.pk, actor="sam", meter_nos=[fleet[2], fleet[1], fleet[2]])
    assert [t.meter.meter_no for t in targets] == [fleet[2], fleet[1]]
    ota.rollout_abort(rollout_id=rollout.pk, actor="sam", note="wrong build")
    rollout.refresh_from_db()
    assert (rollout.state, rollout.is_open) == (RolloutState.ABORTED, False)
    # Both were sent the command already: they finish on their own, and it is still recorded.
    update_ok(rollout, fleet[1])
    assert target(rollout, fleet[1]).state == TargetState.UPDATED
    with pytest.raises(Conflict):
        ota.rollout_abort(rollout_id=rollout.pk, actor="sam")
    # A new rollout may start now.
    image, sig = signed("1.2.0")
    other = ota.release_create(version="1.2.0", image=image, signature=sig["signature"], actor="sam")
    assert ota.rollout_start(release_id=other.pk, test_meter_no=fleet[5], actor="sam").state == RolloutState.RUNNING


def test_abort_skips_the_meters_not_yet_sent_it(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam", max_in_flight=1)
    update_ok(rollout, fleet[0])
    ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=100)
    ota.rollout_abort(rollout_id=rollout.pk, actor="sam")
    states = list(RolloutTarget.objects.filter(rollout=rollout).values_list("state", flat=True))
    assert states.count(TargetState.SKIPPED) == 8 and states.count(TargetState.COMMANDED) == 1
    assert ota.rollouts_tick() == {}


def test_a_rollout_completes_when_the_whole_fleet_has_had_its_turn(ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam")
    update_ok(rollout, fleet[0])
    ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=100)
    for t in RolloutTarget.objects.filter(rollout=rollout, stage=1):
        update_ok(rollout, t.meter.meter_no)
    assert ota_rollouts_tick() == {str(rollout.pk): RolloutState.COMPLETED}  # the beat task
    rollout.refresh_from_db()
    assert rollout.is_open is False and rollout.finished_at is not None
    assert set(Meter.objects.values_list("firmware", flat=True)) == {"1.1.0"}


@pytest.mark.django_db(transaction=True)
def test_a_tick_skips_a_rollout_another_run_holds(postgres, ota_settings, release, fleet):
    rollout = ota.rollout_start(release_id=release.pk, test_meter_no=fleet[0], actor="sam", max_in_flight=3)
    update_ok(rollout, fleet[0])
    ota.rollout_advance(rollout_id=rollout.pk, actor="sam", percent=100)
    update_ok(rollout, RolloutTarget.objects.filter(rollout=rollout, state=TargetState.COMMANDED).first().meter.meter_no)
    locked, release_lock = threading.Event(), threading.Event()

    def hold():  # another tick (or a staff action) in its transaction, on its own connection
        try:
            with transaction.atomic():
                Rollout.objects.select_for_update().get(pk=rollout.pk)
                locked.set()
                release_lock.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(30)
        assert ota.rollouts_tick() == {rollout.pk: "busy"}  # skipped, not waited for, nothing sent
        assert MeterCommand.objects.filter(kind=CommandKind.OTA).count() == 4
    finally:
        release_lock.set()
        holder.join(30)
    assert ota.rollouts_tick() == {rollout.pk: RolloutState.RUNNING}
    assert MeterCommand.objects.filter(kind=CommandKind.OTA).count() == 5
