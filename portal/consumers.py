"""Live balances for the browser: one WebSocket per meter page.

The consumer checks access once at connect with the same selector the views use, sends the
current state from the database, then relays the events that services and the MQTT worker send
to the meter's group after commit.
"""

from decimal import Decimal, InvalidOperation

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from core.errors import DomainError
from core.rules import KES_QUANTUM
from meters.events import meter_group
from meters.selectors import meter_balance_kes, meter_get_for_user


@database_sync_to_async
def _snapshot(user, meter_no: str) -> tuple[dict, Decimal] | None:
    try:
        meter = meter_get_for_user(user=user, meter_no=meter_no)
    except DomainError:
        return None
    return {
        "type": "snapshot",
        "meterNo": meter.meter_no,
        "balance": str(meter.balance_kwh),
        "balanceKes": str(meter_balance_kes(meter)),
        "online": meter.online,
        "relay": meter.relay_state,
        "lastSeen": meter.last_seen_at.isoformat() if meter.last_seen_at else None,
    }, meter.tariff.kes_per_kwh


class MeterLiveConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        self.meter_no = self.scope["url_route"]["kwargs"]["meter_no"]
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        found = await _snapshot(user, self.meter_no)
        if found is None:
            await self.close(code=4404)
            return
        snapshot, self.kes_per_kwh = found
        self.group = meter_group(self.meter_no)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json(snapshot)

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def meter_event(self, message):
        event = message["event"]
        if event.get("type") == "balance" and "balanceKes" not in event:
            # Senders (services, the worker's batches) know units; the money value at this
            # meter's tariff is added here, exactly, for the page that shows it.
            try:
                kes = (Decimal(event["balance"]) * self.kes_per_kwh).quantize(KES_QUANTUM)
                event = {**event, "balanceKes": str(kes)}
            except (KeyError, InvalidOperation):
                pass
        await self.send_json(event)
