"""A batch of MQTT messages → decoded reports → `meters.consumption.ingest_reports`, with the
messages that cannot be accepted stored as dead letters in the same transaction.

What is MQTT's stays here: decoding (mqtt_worker.codec), dead letters (PROTOCOL.md "Bad input"),
and finding the one message of a batch that the database refuses. Everything the reports cause
is written by the meters app.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import DataError, IntegrityError, transaction
from django.utils import timezone

from meters.consumption import IngestOutcome, ingest_reports
from mqtt_worker.codec import CodecError, decimal_text, decode
from mqtt_worker.services import dead_letters_store

logger = logging.getLogger("mqtt_worker")


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes


@dataclass
class BatchResult:
    """What a batch did, for the worker's log: the outcomes of its transactions and its dead letters."""

    outcomes: list[IngestOutcome] = field(default_factory=list)
    dead: list[tuple[str, str]] = field(default_factory=list)  # (topic, reason)

    @property
    def events(self) -> list:
        return [event for outcome in self.outcomes for event in outcome.events]

    @property
    def consumption(self) -> int:
        return sum(outcome.consumption for outcome in self.outcomes)

    @property
    def duplicates(self) -> int:
        return sum(outcome.duplicates for outcome in self.outcomes)

    @property
    def statuses(self) -> int:
        return sum(outcome.statuses for outcome in self.outcomes)

    @property
    def balance_reports(self) -> int:
        return sum(outcome.balance_reports for outcome in self.outcomes)

    @property
    def debited_kwh(self) -> Decimal:
        return sum((outcome.debited_kwh for outcome in self.outcomes), Decimal(0))

    @property
    def dead_letters(self) -> int:
        return len(self.dead)

    @property
    def line_count(self) -> int:
        return self.dead_letters + sum(
            len(o.consumption_items) + len(o.status_items) + len(o.balance_items) for o in self.outcomes
        )

    @property
    def lines(self) -> list[str]:
        """The seed's log lines ("Consumption report - Meter: METER001, Units: 0.0048"), formatted
        only when they are logged: under a flood the worker logs one summary line per batch."""
        lines = []
        for outcome in self.outcomes:
            for meter_no, units, duplicate in outcome.consumption_items:
                lines.append(f"Consumption report - Meter: {meter_no}, Units: {decimal_text(units)}"
                             + (" (duplicate)" if duplicate else ""))
            lines.extend(f"Status update - Meter: {meter_no}, Status: {status}" for meter_no, status in outcome.status_items)
            for meter_no, balance, matched in outcome.balance_items:
                lines.append(f"Balance report - Meter: {meter_no}, Balance: {decimal_text(balance)}"
                             + ("" if matched else " (no matching command)"))
        lines.extend(f"Dead letter - {topic}: {reason}" for topic, reason in self.dead)
        return lines


def ingest_batch(messages: list[Message], *, client_id: str = "", on_locked=None) -> BatchResult:
    """Apply a batch in one transaction. Raises only OperationalError/InterfaceError (the
    database is unreachable: the caller retries the same batch, unacked).

    `on_locked()` is called once the batch holds its meters' row locks (ingest_reports)."""
    try:
        return _ingest(messages, client_id, on_locked)
    except (IntegrityError, DataError) as error:
        # A row the database refuses (a constraint we did not foresee): find the message that
        # causes it instead of retrying the batch forever, and dead-letter only that one.
        if len(messages) > 1:
            logger.warning("Batch of %d refused by the database (%s); applying one by one", len(messages), error)
            result = BatchResult()
            for message in messages:
                one = ingest_batch([message], client_id=client_id)
                result.outcomes.extend(one.outcomes)
                result.dead.extend(one.dead)
            return result
        reason = f"rejected by the database: {error}".replace("\n", " ")[:255]
        with transaction.atomic():
            dead_letters_store(letters=[(messages[0].topic, messages[0].payload, reason)], client_id=client_id)
        return BatchResult(dead=[(messages[0].topic, reason)])


def _ingest(messages: list[Message], client_id: str, on_locked=None) -> BatchResult:
    now = timezone.now()
    dead: list[tuple[Message, str]] = []
    decoded, sources = [], []
    for message in messages:
        try:
            decoded.append(decode(message.topic, message.payload))
            sources.append(message)
        except CodecError as error:
            dead.append((message, str(error)[:255]))
    with transaction.atomic():
        outcome = ingest_reports(decoded, now=now, on_locked=on_locked, send_events=False)
        dead.extend((sources[position], f"unknown meter {decoded[position].meter_no}") for position in outcome.unknown)
        if dead:
            dead_letters_store(
                letters=[(message.topic, message.payload, reason) for message, reason in dead], client_id=client_id, at=now
            )
    return BatchResult(outcomes=[outcome], dead=[(message.topic, reason) for message, reason in dead])
