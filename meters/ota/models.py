"""Firmware releases, rollouts and each meter's part in a rollout (imported by meters.models).

A release is an image staff uploaded with its signature (checked against OTA_PUBLIC_KEY); the
image itself is kept in the database (at most one OTA slot, 1.75 MiB) and served to meters by
`meters.ota.views`. A rollout carries one release to meters in stages: first one test meter,
then a share of the fleet or a list; each meter in it is a RolloutTarget whose state follows the
meter's status messages (`fw`, `otaState`, `otaVersion`, `otaError`, firmware/PROTOCOL-ext.md).
Only `meters.ota.services` writes these rows.
"""

from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from core.rules import FW_VERSION_HELP, FW_VERSION_PATTERN

# The firmware's OTA slot (firmware/esp32/partitions.csv, app0/app1 = 0x1C0000 bytes).
MAX_IMAGE_BYTES = 0x1C0000


class FirmwareRelease(models.Model):
    version = models.CharField(
        max_length=31, unique=True,
        validators=[RegexValidator(rf"^{FW_VERSION_PATTERN}$", f"Version: {FW_VERSION_HELP}")],
        help_text="What the image reports as `fw` once it runs (FW_VERSION it was built with)",
    )
    image = models.BinaryField()
    size_bytes = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64, unique=True, help_text="Computed by the backend from the uploaded image")
    signature = models.CharField(max_length=100, help_text="base64 DER ECDSA P-256 over the release manifest")
    # The key the signature was checked with at upload (its fingerprint, meters.ota.signing).
    key_fingerprint = models.CharField(max_length=16)
    # The secret part of the image's URL: only meters that were sent the command know it.
    download_token = models.CharField(max_length=43, unique=True)
    notes = models.TextField(blank=True)
    uploaded_by = models.CharField(max_length=150)
    uploaded_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-uploaded_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(version__regex=rf"^{FW_VERSION_PATTERN}$"), name="release_version_valid"),
            models.CheckConstraint(condition=Q(sha256__regex=r"^[0-9a-f]{64}$"), name="release_sha256_valid"),
        ]

    def __str__(self) -> str:
        return f"firmware {self.version}"


class RolloutState(models.TextChoices):
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    COMPLETED = "completed", "Completed"
    ABORTED = "aborted", "Aborted"


class Rollout(models.Model):
    """One release on its way to the fleet. At most one rollout is open (running or paused) at
    a time, so a meter is never sent two updates at once."""

    release = models.ForeignKey(FirmwareRelease, on_delete=models.PROTECT, related_name="rollouts")
    state = models.CharField(max_length=12, choices=RolloutState.choices, default=RolloutState.RUNNING)
    # True while running or paused; a partial unique index lets only one row hold True.
    is_open = models.BooleanField(default=True)
    failure_percent = models.PositiveSmallIntegerField(
        help_text="Pause when more than this percent of the meters sent the update fail to come back",
    )
    silence_timeout_s = models.PositiveIntegerField(
        help_text="A meter that says nothing about the update this long after the command (or its last progress) has failed",
    )
    max_in_flight = models.PositiveIntegerField(help_text="Meters updating at once at most")
    # The share of the fleet the rollout was asked to cover so far (the last `advance` by percent).
    coverage_percent = models.PositiveSmallIntegerField(default=0)
    stages = models.PositiveSmallIntegerField(default=1, help_text="Stage 0 is the test meter")
    # Failures are counted among the meters commanded since this time: the start, or the last resume.
    health_since = models.DateTimeField(default=timezone.now)
    paused_reason = models.CharField(max_length=255, blank=True)
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["is_open"], condition=Q(is_open=True), name="rollout_one_open"),
            models.CheckConstraint(condition=Q(failure_percent__lte=100), name="rollout_failure_percent_range"),
            models.CheckConstraint(condition=Q(coverage_percent__lte=100), name="rollout_coverage_percent_range"),
            models.CheckConstraint(
                condition=Q(is_open=True, state__in=["running", "paused"])
                | Q(is_open=False, state__in=["completed", "aborted"]),
                name="rollout_open_matches_state",
            ),
        ]

    def __str__(self) -> str:
        return f"rollout #{self.pk} of {self.release.version} ({self.state})"


class TargetState(models.TextChoices):
    WAITING = "waiting", "Waiting for its turn"
    COMMANDED = "commanded", "Command sent, no answer yet"
    DOWNLOADING = "downloading", "Downloading"
    VERIFYING = "verifying", "Verifying"
    REBOOTING = "rebooting", "Restarting into the new image"
    PENDING = "pending", "Running the new image, not yet confirmed"
    UPDATED = "updated", "Updated"
    FAILED = "failed", "Failed (still on its old image)"
    ROLLED_BACK = "rolledback", "Rolled back"
    TIMED_OUT = "timeout", "Silent past the timeout"
    SKIPPED = "skipped", "Not sent (rollout aborted)"


# Commanded and not finished: the meter may still be updating.
IN_FLIGHT_STATES = (
    TargetState.COMMANDED, TargetState.DOWNLOADING, TargetState.VERIFYING, TargetState.REBOOTING, TargetState.PENDING,
)
FAILED_STATES = (TargetState.FAILED, TargetState.ROLLED_BACK, TargetState.TIMED_OUT)
# What statuses may still change: in flight, and timed out (a late answer is still the truth).
OPEN_TARGET_STATES = (*IN_FLIGHT_STATES, TargetState.TIMED_OUT)


class RolloutTarget(models.Model):
    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="targets")
    meter = models.ForeignKey("meters.Meter", on_delete=models.PROTECT, related_name="rollout_targets")
    stage = models.PositiveSmallIntegerField(help_text="0: the test meter; then one per advance")
    position = models.PositiveIntegerField(help_text="Order in which meters are sent the update")
    state = models.CharField(max_length=12, choices=TargetState.choices, default=TargetState.WAITING)
    command = models.OneToOneField(
        "meters.MeterCommand", on_delete=models.PROTECT, null=True, blank=True, related_name="rollout_target",
    )
    commanded_at = models.DateTimeField(null=True, blank=True)
    # The last status that spoke of this update.
    progress_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    reported_fw = models.CharField(max_length=32, blank=True, help_text="`fw` of the meter's last status about it")
    reported_ota_state = models.CharField(max_length=16, blank=True)
    error = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["rollout_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "meter"], name="rollout_target_unique"),
            models.UniqueConstraint(fields=["rollout", "position"], name="rollout_target_position_unique"),
        ]
        indexes = [
            # Status ingest looks up the open targets of a batch's meters.
            models.Index(fields=["meter"], condition=Q(state__in=[s.value for s in OPEN_TARGET_STATES]),
                         name="rollout_target_open_meter"),
            models.Index(fields=["rollout", "state", "position"], name="rollout_target_progress"),
        ]

    def __str__(self) -> str:
        meter = self.meter.meter_no if RolloutTarget.meter.is_cached(self) else f"meter {self.meter_id}"
        return f"{meter}: {self.get_state_display()}"


class RolloutEvent(models.Model):
    """What happened to a rollout and who did it: start, each advance, pauses (staff's or the
    automatic one, with the figures), resumes, abort, completion. Rows are never changed."""

    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=16)
    note = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor}: {self.action}"
