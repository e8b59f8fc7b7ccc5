"""Writes of firmware releases and rollouts, and what meters' statuses say about them.

A rollout (one open at a time) goes in stages: `rollout_start` sends the release to one test
meter; `rollout_advance` adds a share of the fleet (`percent`, of all provisioned meters,
cumulative) or a list of meters, once every meter already in it has finished and the test meter
has updated. Meters in a stage are sent the OTA command in `position` order, at most
`max_in_flight` updating at once, by `rollouts_tick` (celery beat, every OTA_CHECK_INTERVAL_S)
and by the staff actions; the command goes through the meters' command outbox (MeterCommand
kind `ota`, published after commit by the MQTT side).

`rollouts_tick` also ends the wait of meters silent past the rollout's timeout (`timeout`) and
pauses a running rollout when more than `failure_percent` of the meters commanded since it started
(or was last resumed) failed to come back (`failed`, `rolledback`, `timeout`). Staff then resume
(failures are counted afresh from then) or abort (meters not yet sent the command are skipped;
those updating finish on their own). Every run and every action takes the rollout's row lock,
so two ticks, or a tick and a staff action, never command the same meter twice.

`ota_statuses_record` is called by meters.consumption for every batch of status messages.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Q
from django.urls import reverse
from django.utils import timezone

from core.errors import Conflict, InvalidInput, NotFound
from core.rules import FW_VERSION_HELP, OTA_URL_MAX_BYTES, valid_fw_version, valid_meter_no
from meters.models import CommandKind, CommandStatus, Meter, MeterCommand
from meters.ota import signing
from meters.ota.models import (
    FAILED_STATES,
    IN_FLIGHT_STATES,
    MAX_IMAGE_BYTES,
    OPEN_TARGET_STATES,
    FirmwareRelease,
    Rollout,
    RolloutEvent,
    RolloutState,
    RolloutTarget,
    TargetState,
)
from meters.outbox import dispatch_commands_on_commit
from meters.reports import StatusUpdate

logger = logging.getLogger("meters.ota")

# Who acts when no person does: the beat task.
TICK_ACTOR = "ota-check"
# A list given to `rollout_advance` at most this long (a share of the fleet has no such limit).
MAX_LIST = 10_000

# What a meter's otaState (for the release's version) means for its target.
_PROGRESS = {
    "downloading": TargetState.DOWNLOADING, "verifying": TargetState.VERIFYING,
    "rebooting": TargetState.REBOOTING, "pending": TargetState.PENDING,
}
_OUTCOME = {"failed": TargetState.FAILED, "rolledback": TargetState.ROLLED_BACK}
_FINISHED = (TargetState.UPDATED, TargetState.FAILED, TargetState.ROLLED_BACK)


def _actor_name(actor) -> str:
    name = getattr(actor, "get_username", lambda: actor)()
    if not name:
        raise InvalidInput("Who does this is required", field="actor")
    return str(name)[:150]


def _event(rollout: Rollout, actor: str, action: str, note: str = "", at: datetime | None = None) -> None:
    RolloutEvent.objects.create(rollout=rollout, actor=actor[:150], action=action, note=note[:500], at=at or timezone.now())
    logger.info("Rollout %s (%s): %s by %s %s", rollout.pk, rollout.release.version, action, actor, note)


# ---- releases -----------------------------------------------------------------------------------


def release_create(*, version: str, image: bytes, signature: str, actor, notes: str = "") -> FirmwareRelease:
    """A release from an image and its signature (`sign_firmware.py sign`'s output). The sha256
    is computed here; the signature must verify with OTA_PUBLIC_KEY over this version and hash,
    so an image that meters would refuse is never stored."""
    actor_name = _actor_name(actor)
    if not valid_fw_version(version):
        raise InvalidInput(f"Version: {FW_VERSION_HELP}", field="version")
    if not isinstance(image, bytes | bytearray) or not image:
        raise InvalidInput("The image is empty", field="image")
    if len(image) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"The image has {len(image)} bytes; an OTA slot holds {MAX_IMAGE_BYTES}", field="image")
    digest = hashlib.sha256(image).hexdigest()
    point = signing.configured_key()
    signature = signature.strip() if isinstance(signature, str) else signature
    if not signing.signature_valid(point=point, version=version, sha256_hex=digest, signature_b64=signature):
        raise InvalidInput(
            f"The signature does not verify with OTA_PUBLIC_KEY (key {signing.key_fingerprint(point)}) for version "
            f"{version} and the image's sha256 {digest}: sign this image with this version",
            field="signature",
        )
    if FirmwareRelease.objects.filter(version=version).exists():
        raise Conflict(f"Release {version} already exists", field="version")
    existing = FirmwareRelease.objects.filter(sha256=digest).values_list("version", flat=True).first()
    if existing is not None:
        raise Conflict(f"This image is already release {existing}", field="image")
    try:
        with transaction.atomic():
            return FirmwareRelease.objects.create(
                version=version, image=bytes(image), size_bytes=len(image), sha256=digest, signature=signature,
                key_fingerprint=signing.key_fingerprint(point), download_token=secrets.token_urlsafe(32),
                notes=notes.strip() if isinstance(notes, str) else "", uploaded_by=actor_name,
            )
    except IntegrityError:
        raise Conflict(f"Release {version} or this image was uploaded meanwhile", field="version") from None


def release_image_url(release: FirmwareRelease) -> str:
    """Where meters fetch the image: OTA_IMAGE_BASE_URL + meters.ota.views' path."""
    path = reverse("ota-image", kwargs={"token": release.download_token, "version": release.version})
    return settings.OTA_IMAGE_BASE_URL + path


def _check_release_sendable(release: FirmwareRelease) -> None:
    """Before any meter is sent it: the signature still verifies with the key configured now
    (the key may have been rotated since the upload), and the URL is one meters accept."""
    point = signing.configured_key()
    if not signing.signature_valid(point=point, version=release.version, sha256_hex=release.sha256,
                                   signature_b64=release.signature):
        raise InvalidInput(
            f"Release {release.version} is not signed with the configured OTA_PUBLIC_KEY "
            f"(key {signing.key_fingerprint(point)}); meters would refuse it", field="release",
        )
    url = release_image_url(release)
    if not url.startswith("https://") and not settings.OTA_ALLOW_HTTP:
        raise InvalidInput(f"Meters fetch images over https only; OTA_IMAGE_BASE_URL gives {url}", field="release")
    if len(url.encode()) > OTA_URL_MAX_BYTES or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput(f"The image URL must be at most {OTA_URL_MAX_BYTES} bytes without spaces: shorten "
                           "OTA_IMAGE_BASE_URL", field="release")


# ---- rollouts: staff actions --------------------------------------------------------------------


def _lock_rollout(rollout_id: int) -> Rollout:
    try:
        return Rollout.objects.select_for_update(of=("self",)).select_related("release").defer("release__image").get(
            pk=rollout_id
        )
    except (Rollout.DoesNotExist, ValueError, TypeError):
        raise NotFound(f"Unknown rollout {rollout_id}", field="rollout") from None


def _percent(value, field: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not ((0 if allow_zero else 1) <= value <= 100):
        raise InvalidInput(f"{field} must be a whole percentage ({'0' if allow_zero else '1'}-100)", field=field)
    return value


def rollout_start(
    *, release_id: int, test_meter_no: str, actor, failure_percent: int | None = None,
    silence_timeout_s: int | None = None, max_in_flight: int | None = None, now: datetime | None = None,
) -> Rollout:
    """A rollout of a release to one test meter (stage 0), whose command is queued at once."""
    actor_name = _actor_name(actor)
    now = now or timezone.now()
    failure_percent = _percent(
        settings.OTA_PAUSE_FAILURE_PERCENT if failure_percent is None else failure_percent, "failure_percent",
        allow_zero=True,
    )
    silence = settings.OTA_SILENCE_TIMEOUT_S if silence_timeout_s is None else silence_timeout_s
    if isinstance(silence, bool) or not isinstance(silence, int) or silence < 60:
        raise InvalidInput("silence_timeout_s must be at least 60 seconds", field="silence_timeout_s")
    flight = settings.OTA_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight
    if isinstance(flight, bool) or not isinstance(flight, int) or flight < 1:
        raise InvalidInput("max_in_flight must be at least 1", field="max_in_flight")
    if not valid_meter_no(test_meter_no):
        raise InvalidInput("The test meter's number is not valid", field="test_meter_no")
    with transaction.atomic():
        try:
            release = FirmwareRelease.objects.defer("image").get(pk=release_id)
        except (FirmwareRelease.DoesNotExist, ValueError, TypeError):
            raise NotFound(f"Unknown release {release_id}", field="release") from None
        _check_release_sendable(release)
        meter = Meter.objects.filter(meter_no=test_meter_no).first()
        if meter is None:
            raise NotFound(f"Unknown meter {test_meter_no}", field="test_meter_no")
        open_rollout = Rollout.objects.filter(is_open=True).select_related("release").first()
        if open_rollout is not None:
            raise Conflict(f"{open_rollout} is still open: abort it or let it complete first", field="release")
        try:
            with transaction.atomic():
                rollout = Rollout.objects.create(
                    release=release, failure_percent=failure_percent, silence_timeout_s=silence, max_in_flight=flight,
                    health_since=now, created_by=actor_name, created_at=now, updated_at=now,
                )
        except IntegrityError:
            raise Conflict("Another rollout was started meanwhile", field="release") from None
        _add_targets(rollout, [(meter.pk, meter.firmware)], stage=0, now=now)
        _event(rollout, actor_name, "start", f"test meter {meter.meter_no}", now)
        _command_next(rollout, now, actor_name)
    return rollout


def _order_key(release: FirmwareRelease, meter_no: str) -> str:
    # A spread of the fleet that is the same every time for a release (and differs between
    # releases): not the first meters by number, which are often one street or one batch.
    return hashlib.sha256(f"{release.sha256}:{meter_no}".encode()).hexdigest()


def _add_targets(rollout: Rollout, meters: list[tuple[int, str]], *, stage: int, now: datetime) -> list[RolloutTarget]:
    """Targets for (meter id, its current firmware); a meter that already runs the release is
    updated at once (it is part of the coverage, and is sent nothing)."""
    last = rollout.targets.aggregate(last=Max("position"))["last"]
    start = 0 if last is None else last + 1
    version = rollout.release.version
    rows = []
    for offset, (meter_id, firmware) in enumerate(meters):
        done = firmware == version
        rows.append(RolloutTarget(
            rollout=rollout, meter_id=meter_id, stage=stage, position=start + offset,
            state=TargetState.UPDATED if done else TargetState.WAITING, finished_at=now if done else None,
            reported_fw=firmware if done else "", error="already running this version" if done else "",
        ))
    return RolloutTarget.objects.bulk_create(rows)


def rollout_advance(
    *, rollout_id: int, actor, percent: int | None = None, meter_nos: Iterable[str] | None = None,
    now: datetime | None = None,
) -> list[RolloutTarget]:
    """The next stage: the rollout then covers `percent` of the fleet (all provisioned meters;
    cumulative, so 50 after the test meter adds the meters needed to reach half), or also the
    meters listed. Allowed when the rollout runs, the test meter has updated and no meter of
    an earlier stage is waiting or still updating."""
    actor_name = _actor_name(actor)
    now = now or timezone.now()
    if (percent is None) == (meter_nos is None):
        raise InvalidInput("Give either a percentage of the fleet or a list of meters", field="percent")
    with transaction.atomic():
        rollout = _lock_rollout(rollout_id)
        if rollout.state != RolloutState.RUNNING:
            raise Conflict(f"{rollout}: only a running rollout can be advanced"
                           + (" (resume it first)" if rollout.state == RolloutState.PAUSED else ""), field="rollout")
        busy = rollout.targets.filter(state__in=[TargetState.WAITING, *IN_FLIGHT_STATES]).count()
        if busy:
            raise Conflict(f"{rollout}: {busy} meter(s) of the current stage have not finished", field="rollout")
        test = rollout.targets.filter(stage=0).values_list("state", flat=True).first()
        if test != TargetState.UPDATED:
            raise Conflict(f"{rollout}: the test meter has not updated ({test})", field="rollout")
        _check_release_sendable(rollout.release)
        in_rollout = set(rollout.targets.values_list("meter_id", flat=True))
        if percent is not None:
            percent = _percent(percent, "percent")
            fleet = Meter.objects.count()
            wanted = math.ceil(fleet * percent / 100)
            missing = wanted - len(in_rollout)
            if missing <= 0:
                raise InvalidInput(f"The rollout already covers {len(in_rollout)} of {fleet} meters (≥ {percent} %)",
                                   field="percent")
            candidates = [
                row for row in Meter.objects.exclude(id__in=in_rollout).values_list("id", "meter_no", "firmware", "online")
            ]
            # Meters online now first: one that is away would only count as silent.
            candidates.sort(key=lambda row: (not row[3], _order_key(rollout.release, row[1])))
            chosen = [(row[0], row[2]) for row in candidates[:missing]]
            note = f"to {percent} % of the fleet: {len(chosen)} more meter(s)"
            rollout.coverage_percent = max(rollout.coverage_percent, percent)
        else:
            names = list(dict.fromkeys(m.strip() for m in meter_nos if isinstance(m, str) and m.strip()))
            if not names:
                raise InvalidInput("The list of meters is empty", field="meter_nos")
            if len(names) > MAX_LIST:
                raise InvalidInput(f"At most {MAX_LIST} meters per list", field="meter_nos")
            bad = [m for m in names if not valid_meter_no(m)]
            if bad:
                raise InvalidInput(f"Not meter numbers: {', '.join(bad[:5])}", field="meter_nos")
            found = {row[1]: row for row in Meter.objects.filter(meter_no__in=names).values_list("id", "meter_no", "firmware")}
            unknown = [m for m in names if m not in found]
            if unknown:
                raise NotFound(f"Unknown meters: {', '.join(unknown[:5])}", field="meter_nos")
            already = [m for m in names if found[m][0] in in_rollout]
            if already:
                raise Conflict(f"Already in this rollout: {', '.join(already[:5])}", field="meter_nos")
            chosen = [(found[m][0], found[m][2]) for m in names]
            note = f"to {len(chosen)} listed meter(s)"
        stage = rollout.stages
        targets = _add_targets(rollout, chosen, stage=stage, now=now)
        rollout.stages = stage + 1
        rollout.updated_at = now
        rollout.save(update_fields=["stages", "coverage_percent", "updated_at"])
        _event(rollout, actor_name, "advance", f"stage {stage} {note}", now)
        _command_next(rollout, now, actor_name)
    return targets


def rollout_pause(*, rollout_id: int, actor, note: str = "", now: datetime | None = None) -> Rollout:
    """No more meters are sent the update until staff resume; meters updating finish."""
    actor_name = _actor_name(actor)
    now = now or timezone.now()
    with transaction.atomic():
        rollout = _lock_rollout(rollout_id)
        if rollout.state != RolloutState.RUNNING:
            raise Conflict(f"{rollout} is not running", field="rollout")
        _pause(rollout, f"paused by {actor_name}" + (f": {note.strip()}" if note.strip() else ""), actor_name, now)
    return rollout


def _pause(rollout: Rollout, reason: str, actor: str, now: datetime) -> None:
    rollout.state = RolloutState.PAUSED
    rollout.paused_reason = reason[:255]
    rollout.updated_at = now
    rollout.save(update_fields=["state", "paused_reason", "updated_at"])
    _event(rollout, actor, "pause", reason, now)


def rollout_resume(*, rollout_id: int, actor, note: str = "", now: datetime | None = None) -> Rollout:
    """Carry on after a pause. The failure share is counted afresh, among the meters commanded
    from now on: the failures that caused the pause have been seen and accepted."""
    actor_name = _actor_name(actor)
    now = now or timezone.now()
    with transaction.atomic():
        rollout = _lock_rollout(rollout_id)
        if rollout.state != RolloutState.PAUSED:
            raise Conflict(f"{rollout} is not paused", field="rollout")
        _check_release_sendable(rollout.release)
        rollout.state = RolloutState.RUNNING
        rollout.paused_reason = ""
        rollout.health_since = now
        rollout.updated_at = now
        rollout.save(update_fields=["state", "paused_reason", "health_since", "updated_at"])
        _event(rollout, actor_name, "resume", note.strip(), now)
        _command_next(rollout, now, actor_name)
    return rollout


def rollout_abort(*, rollout_id: int, actor, note: str = "", now: datetime | None = None) -> Rollout:
    """Stop for good: meters not yet sent the command are skipped; a meter that was sent it
    cannot be stopped (the command may be on its way) and finishes on its own, its outcome
    still recorded."""
    actor_name = _actor_name(actor)
    now = now or timezone.now()
    with transaction.atomic():
        rollout = _lock_rollout(rollout_id)
        if not rollout.is_open:
            raise Conflict(f"{rollout} is already closed", field="rollout")
        skipped = rollout.targets.filter(state=TargetState.WAITING).update(state=TargetState.SKIPPED, finished_at=now)
        rollout.state = RolloutState.ABORTED
        rollout.is_open = False
        rollout.finished_at = now
        rollout.updated_at = now
        rollout.save(update_fields=["state", "is_open", "finished_at", "updated_at"])
        _event(rollout, actor_name, "abort", (f"{note.strip()}; " if note.strip() else "") + f"{skipped} meter(s) skipped",
               now)
    return rollout


# ---- rollouts: the periodic check ---------------------------------------------------------------


def _command_next(rollout: Rollout, now: datetime, actor: str) -> int:
    """Queue OTA commands for the next waiting meters, keeping at most max_in_flight updating.
    The caller holds the rollout's lock."""
    if rollout.state != RolloutState.RUNNING:
        return 0
    room = rollout.max_in_flight - rollout.targets.filter(state__in=IN_FLIGHT_STATES).count()
    if room <= 0:
        return 0
    waiting = list(rollout.targets.filter(state=TargetState.WAITING).order_by("position")[:room])
    if not waiting:
        return 0
    commands = MeterCommand.objects.bulk_create(
        MeterCommand(meter_id=t.meter_id, kind=CommandKind.OTA, cmd_id=f"ota-{uuid.uuid4().hex}", reason="ota",
                     release_id=rollout.release_id, actor=actor[:150], issued_at=now)
        for t in waiting
    )
    for target, command in zip(waiting, commands, strict=True):
        target.state = TargetState.COMMANDED
        target.command = command
        target.commanded_at = now
    RolloutTarget.objects.bulk_update(waiting, ["state", "command", "commanded_at"])
    dispatch_commands_on_commit([c.pk for c in commands])
    return len(commands)


def _failure_share(rollout: Rollout) -> tuple[int, int]:
    """(failed, commanded) among the meters commanded since the rollout's health_since."""
    since = rollout.targets.filter(commanded_at__gte=rollout.health_since)
    commanded = since.count()
    failed = since.filter(state__in=FAILED_STATES).count() if commanded else 0
    return failed, commanded


def _lock_open_rollout(rollout_id: int) -> Rollout | None:
    """The open rollout's row, locked; None when another run holds it (or it closed)."""
    return (
        Rollout.objects.select_for_update(skip_locked=True, of=("self",)).select_related("release")
        .defer("release__image").filter(pk=rollout_id, is_open=True).first()
    )


def _tick_one(rollout_id: int, now: datetime) -> str:
    # Two transactions: the timeouts write only target rows, the rest only waiting targets and
    # new commands (which take key-share locks on meter rows). The status ingest locks meter
    # rows, then target rows; doing both here in one transaction could wait on it in the other
    # order (a deadlock).
    with transaction.atomic():
        rollout = _lock_open_rollout(rollout_id)
        if rollout is None:
            return "busy"  # another run holds it, or it closed meanwhile
        silent = []
        for target in rollout.targets.filter(state__in=IN_FLIGHT_STATES).only("id", "commanded_at", "progress_at"):
            last = max(t for t in (target.commanded_at, target.progress_at) if t is not None)
            if now - last > timedelta(seconds=rollout.silence_timeout_s):
                silent.append(target.pk)
        if silent:
            RolloutTarget.objects.filter(id__in=silent, state__in=IN_FLIGHT_STATES).update(
                state=TargetState.TIMED_OUT, finished_at=now,
                error=f"nothing heard about the update for {rollout.silence_timeout_s} s",
            )
    with transaction.atomic():
        rollout = _lock_open_rollout(rollout_id)
        if rollout is None:
            return "busy"
        if rollout.state != RolloutState.RUNNING:
            return rollout.state
        failed, commanded = _failure_share(rollout)
        if commanded and failed * 100 > rollout.failure_percent * commanded:
            _pause(rollout, f"{failed} of {commanded} meters sent the update failed to come back "
                            f"(more than {rollout.failure_percent} %)", TICK_ACTOR, now)
            return rollout.state
        sent = _command_next(rollout, now, TICK_ACTOR)
        if not sent and not rollout.targets.filter(state__in=[TargetState.WAITING, *IN_FLIGHT_STATES]).exists():
            if not Meter.objects.exclude(rollout_targets__rollout=rollout).exists():
                rollout.state = RolloutState.COMPLETED
                rollout.is_open = False
                rollout.finished_at = now
                rollout.updated_at = now
                rollout.save(update_fields=["state", "is_open", "finished_at", "updated_at"])
                _event(rollout, TICK_ACTOR, "complete", "every meter of the fleet has had its turn", now)
        return rollout.state


def rollouts_tick(*, now: datetime | None = None) -> dict[int, str]:
    """The beat task's work for every open rollout: silent meters time out, the pause rule,
    the next meters. Idempotent, and safe to run twice at once (a rollout held by another run
    is skipped this time). Returns {rollout id: its state afterwards, or "busy"}."""
    now = now or timezone.now()
    open_ids = list(Rollout.objects.filter(is_open=True).values_list("id", flat=True))
    return {rollout_id: _tick_one(rollout_id, now) for rollout_id in open_ids}


# ---- what meters report -------------------------------------------------------------------------


def _outcome(target: RolloutTarget, status: StatusUpdate, version: str) -> tuple[str | None, str]:
    """(new state or None, error) that one status means for one target."""
    matches = bool(status.cmd_id) and target.command is not None and status.cmd_id == target.command.cmd_id
    if status.status == "offline" and not matches:
        return None, ""  # a Last Will: composed when the meter connected, maybe before the update
    if status.firmware == version:
        return (TargetState.PENDING if status.ota_state == "pending" else TargetState.UPDATED), ""
    about_it = status.ota_version == version and (matches or target.state in _PROGRESS.values())
    if about_it and status.ota_state in _PROGRESS:
        return _PROGRESS[status.ota_state], ""
    if about_it and status.ota_state in _OUTCOME:
        return _OUTCOME[status.ota_state], status.ota_error or status.message
    if matches and status.status == "error":
        return TargetState.FAILED, status.message  # refused or rejected ("busy with", "bad url", …)
    return None, ""


def ota_statuses_record(statuses: list[StatusUpdate], meter_ids: dict[str, int], now: datetime) -> int:
    """Apply a batch of status messages (in arrival order) to the rollout targets of their
    meters; statuses that echo an OTA command's cmdId acknowledge it. Called by
    meters.consumption inside its transaction. Returns how many targets changed."""
    relevant = [s for s in statuses if s.ota_state or s.cmd_id]
    if not relevant:
        return 0
    by_meter: dict[int, list[RolloutTarget]] = {}
    for target in (
        RolloutTarget.objects.filter(meter_id__in={meter_ids[s.meter_no] for s in relevant}, state__in=OPEN_TARGET_STATES)
        .select_related("rollout__release", "command").defer("rollout__release__image")
    ):
        by_meter.setdefault(target.meter_id, []).append(target)
    if not by_meter:
        return 0
    changed: dict[int, RolloutTarget] = {}
    acknowledged: set[int] = set()
    for status in relevant:
        for target in by_meter.get(meter_ids[status.meter_no], ()):
            if target.command is not None and status.cmd_id and status.cmd_id == target.command.cmd_id:
                acknowledged.add(target.command_id)
            state, error = _outcome(target, status, target.rollout.release.version)
            if state is None:
                continue
            target.state = state
            target.progress_at = now
            target.reported_fw = status.firmware[:32]
            target.reported_ota_state = status.ota_state
            target.error = error[:255] if state in (TargetState.FAILED, TargetState.ROLLED_BACK) else ""
            target.finished_at = now if state in _FINISHED else None
            changed[target.pk] = target
    if changed:
        RolloutTarget.objects.bulk_update(
            list(changed.values()),
            ["state", "progress_at", "reported_fw", "reported_ota_state", "error", "finished_at"],
        )
    if acknowledged:
        MeterCommand.objects.filter(id__in=acknowledged).filter(~Q(status=CommandStatus.ACKNOWLEDGED)).update(
            status=CommandStatus.ACKNOWLEDGED, acknowledged_at=now
        )
    return len(changed)
