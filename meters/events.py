"""Live events to browsers and the mobile app, sent after commit through the Channels layer.

Groups: `meter.<meterNo>` for a meter's own page (`{"type": "meter.event", "event": …}` per
event), `staff` for the utility's dashboards (one `{"type": "meter.events", "events": […]}` per
send: a fleet's events in few messages). Live
events are a view of committed state, never the state itself: if Redis is down the event is
logged and dropped, and a client that reconnects reads the current state from the database.
"""

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from asgiref.sync import async_to_sync
from django.db import transaction

from meters.models import LedgerKind

logger = logging.getLogger(__name__)

STAFF_GROUP = "staff"
_warned_unavailable = False


@dataclass(frozen=True, slots=True)
class ConsumptionEvents:
    """A meter's `balance` and `reading` live events after a batch of its reports, not yet
    rendered: under a flood most of them are coalesced away before they are sent (the worker's
    event sender keeps the latest per meter), so the dicts are built only when sent."""

    meter_no: str
    balance_kwh: Decimal
    debit_kwh: Decimal
    remaining_balance_kwh: Decimal | None
    energy_total_kwh: Decimal | None
    at: datetime

    def render(self) -> list[dict]:
        text = str(self.balance_kwh)
        return [
            {"meterNo": self.meter_no, "type": "balance", "balance": text, "kind": LedgerKind.CONSUMPTION_DEBIT},
            {
                "meterNo": self.meter_no, "type": "reading", "balance": text, "debit": str(self.debit_kwh),
                "remainingBalance": None if self.remaining_balance_kwh is None else str(self.remaining_balance_kwh),
                "energyTotal": None if self.energy_total_kwh is None else str(self.energy_total_kwh),
                "at": self.at.isoformat(),
            },
        ]


def live_events(events: list) -> list[dict]:
    """Events as services return them (dicts, or ConsumptionEvents) as the dicts that are sent."""
    rendered = []
    for event in events:
        if isinstance(event, ConsumptionEvents):
            rendered.extend(event.render())
        else:
            rendered.append(event)
    return rendered


def meter_group(meter_no: str) -> str:
    return f"meter.{meter_no}"


async def group_send_events(layer, events: list[dict]) -> None:
    """One message per event to its meter's group, one message with them all to staff."""
    for event in events:
        await layer.group_send(meter_group(event["meterNo"]), {"type": "meter.event", "event": event})
    await layer.group_send(STAFF_GROUP, {"type": "meter.events", "events": events})


def send_meter_events(events: list) -> None:
    """Send now (the caller has committed). Each event: {"meterNo", "type", ...} or ConsumptionEvents."""
    if not events:
        return
    events = live_events(events)
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(group_send_events)(layer, events)
    except Exception as error:
        # Said once per process (e.g. `seed_demo` runs before make run's Redis is up); later
        # failures go to DEBUG so a Redis outage does not flood the log.
        global _warned_unavailable
        level = logging.DEBUG if _warned_unavailable else logging.WARNING
        _warned_unavailable = True
        logger.log(level, "Live events not sent: channel layer unavailable (%s)", error)


def send_meter_events_on_commit(events: list) -> None:
    transaction.on_commit(lambda: send_meter_events(events))
