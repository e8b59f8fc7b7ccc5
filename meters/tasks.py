"""Celery tasks of the meters app: thin wrappers around services (settings.CELERY_BEAT_SCHEDULE runs these)."""

from celery import shared_task

from meters import firebase
from meters.ota import services as ota


@shared_task(ignore_result=True)
def firebase_mirror_sync() -> int:
    """Every 2 s: push meters whose state changed to the Firebase Realtime Database. Safe to
    overlap (each meter is claimed by one run); failures leave the meters pending for a later run."""
    return firebase.firebase_mirror_sync()


@shared_task(ignore_result=True)
def ota_rollouts_tick() -> dict:
    """Every OTA_CHECK_INTERVAL_S: open rollouts time out silent meters, pause when too many
    failed to come back, and send the next meters their update. Idempotent; safe to overlap."""
    return {str(rollout_id): state for rollout_id, state in ota.rollouts_tick().items()}
