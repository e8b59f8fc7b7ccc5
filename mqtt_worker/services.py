"""Writes of the MQTT side's own rows: dead letters (PROTOCOL.md "Bad input")."""

from datetime import datetime

from django.utils import timezone

from mqtt_worker.models import DeadLetter


def dead_letters_store(*, letters: list[tuple[str, bytes, str]], client_id: str, at: datetime | None = None) -> None:
    """Keep messages the worker could not accept, raw, with the reason: (topic, payload, reason)."""
    at = at or timezone.now()
    DeadLetter.objects.bulk_create(
        DeadLetter(topic=topic[:255], payload=payload, reason=reason[:255], received_at=at, client_id=client_id[:64])
        for topic, payload, reason in letters
    )
