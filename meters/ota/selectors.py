"""Reads of firmware releases and rollouts, for the admin, the API, the image view and the
publisher. The image bytes are read only where they are served."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Q, QuerySet

from core.errors import NotFound
from meters.ota.models import (
    FAILED_STATES,
    IN_FLIGHT_STATES,
    FirmwareRelease,
    Rollout,
    RolloutTarget,
    TargetState,
)


def releases_list() -> QuerySet[FirmwareRelease]:
    return FirmwareRelease.objects.defer("image").order_by("-uploaded_at", "-id")


def release_get(*, release_id: int) -> FirmwareRelease:
    try:
        return FirmwareRelease.objects.defer("image").get(pk=release_id)
    except (FirmwareRelease.DoesNotExist, ValueError, TypeError):
        raise NotFound(f"Unknown release {release_id}", field="release") from None


def release_for_command(*, release_id: int) -> FirmwareRelease:
    """What an OTA command carries (version, sha256, signature, the image's URL)."""
    return FirmwareRelease.objects.only("version", "sha256", "signature", "download_token").get(pk=release_id)


def release_image(*, token: str, version: str) -> FirmwareRelease | None:
    """The release whose image is at this URL, with its bytes; None when there is none."""
    return FirmwareRelease.objects.filter(download_token=token, version=version).first()


@dataclass(frozen=True)
class RolloutProgress:
    """Where a rollout stands: meters per target state, and the failure share the pause rule
    looks at (among the meters commanded since the start or the last resume)."""

    total: int
    waiting: int
    in_flight: int
    updated: int
    failed: int
    skipped: int
    counted_commanded: int
    counted_failed: int

    @property
    def failure_percent(self) -> float:
        return 100.0 * self.counted_failed / self.counted_commanded if self.counted_commanded else 0.0


def rollout_progress(rollout: Rollout) -> RolloutProgress:
    row = rollout.targets.aggregate(
        total=Count("id"),
        waiting=Count("id", filter=Q(state=TargetState.WAITING)),
        in_flight=Count("id", filter=Q(state__in=IN_FLIGHT_STATES)),
        updated=Count("id", filter=Q(state=TargetState.UPDATED)),
        failed=Count("id", filter=Q(state__in=FAILED_STATES)),
        skipped=Count("id", filter=Q(state=TargetState.SKIPPED)),
        counted_commanded=Count("id", filter=Q(commanded_at__gte=rollout.health_since)),
        counted_failed=Count("id", filter=Q(commanded_at__gte=rollout.health_since, state__in=FAILED_STATES)),
    )
    return RolloutProgress(**row)


def rollouts_list() -> QuerySet[Rollout]:
    return Rollout.objects.select_related("release").defer("release__image").order_by("-id")


def rollout_get(*, rollout_id: int) -> Rollout:
    try:
        return rollouts_list().get(pk=rollout_id)
    except (Rollout.DoesNotExist, ValueError, TypeError):
        raise NotFound(f"Unknown rollout {rollout_id}", field="rollout") from None


def rollout_targets(rollout: Rollout) -> QuerySet[RolloutTarget]:
    """Each meter of the rollout in the order it gets the update, with the meter's current
    firmware and OTA state (Meter.firmware, ota_state, from its latest status)."""
    return (
        rollout.targets.select_related("meter", "command")
        .only(
            "id", "rollout_id", "stage", "position", "state", "commanded_at", "progress_at", "finished_at", "reported_fw",
            "reported_ota_state", "error", "command__status", "command__cmd_id", "meter__meter_no", "meter__firmware",
            "meter__ota_state", "meter__ota_version", "meter__online",
        )
        .order_by("position")
    )
