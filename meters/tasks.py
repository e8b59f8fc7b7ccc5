"""Celery tasks of the meters app: thin wrappers around services (settings.CELERY_BEAT_SCHEDULE runs these)."""

from celery import shared_task

from meters import firebase


@shared_task(ignore_result=True)
def firebase_mirror_sync() -> int:
    """Every 2 s: push meters whose state changed to the Firebase Realtime Database. Safe to
    overlap (each meter is claimed by one run); failures leave the meters pending for a later run."""
    return firebase.firebase_mirror_sync()
