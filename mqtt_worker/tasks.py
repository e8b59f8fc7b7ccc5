"""Celery tasks that publish the MeterCommand outbox (thin: ids in, the publisher does the work)."""

from celery import shared_task

from mqtt_worker.publisher import pending_command_ids, publish_commands


@shared_task(acks_late=True, autoretry_for=(ConnectionError,), retry_backoff=1, retry_backoff_max=30, max_retries=5)
def publish_meter_commands(command_ids: list[int]) -> int:
    """Called after commit by meters.outbox's dispatcher with the ids of new command rows."""
    return publish_commands(command_ids)


@shared_task(ignore_result=True)
def publish_pending_commands() -> int:
    """The beat sweep: whatever is still queued (a lost hint, no PUBACK yet, a broker outage)."""
    ids = pending_command_ids()
    return publish_commands(ids) if ids else 0
