"""Celery tasks: thin wrappers around services (settings.CELERY_BEAT_SCHEDULE runs these)."""

from celery import shared_task

from payments import services


@shared_task(ignore_result=True)
def reconcile_pending_payments() -> dict:
    """Every 30 s: query STK pushes whose callback has not come. Safe to overlap (rows are claimed)."""
    return services.payments_reconcile()


@shared_task(ignore_result=True)
def sweep_callbacks() -> int:
    """Every 30 s: process again the callbacks left unprocessed (a crash after they were stored)."""
    return services.callbacks_sweep()
