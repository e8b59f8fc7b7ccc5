"""Celery tasks: thin wrappers (settings.CELERY_BEAT_SCHEDULE runs these)."""

from celery import shared_task

from notifications.alerts import run_alerts as _run_alerts
from notifications.services import notifications_deliver


@shared_task(ignore_result=True)
def run_alerts() -> dict:
    """Every minute: each alert, idempotent (see notifications.alerts)."""
    return _run_alerts()


@shared_task(ignore_result=True)
def deliver_notifications() -> dict:
    """Every 10 s: send what is due and retry what failed."""
    return notifications_deliver()
