"""The meter page's WebSocket: access checked once, a snapshot, then balance events after commit."""

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from meters import services
from portal.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)


async def _session(user, meter_no: str, then=None):
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), f"/ws/meters/{meter_no}/")
    communicator.scope["user"] = user
    connected, code = await communicator.connect(timeout=5)
    messages = []
    if connected:
        messages.append(await communicator.receive_json_from(timeout=5))
        if then is not None:
            from channels.db import database_sync_to_async

            await database_sync_to_async(then)()
            messages.append(await communicator.receive_json_from(timeout=5))
        await communicator.disconnect()
    return connected, code, messages


def test_owner_gets_snapshot_then_live_balance(redis_url, alice_meter):
    def pay():
        services.ledger_credit(meter_no="METER-A1", units_kwh="3.5", idempotency_key="k", actor="mpesa")

    connected, _, messages = async_to_sync(_session)(alice_meter.owner.user, "METER-A1", then=pay)
    assert connected
    assert messages[0]["type"] == "snapshot" and messages[0]["balance"] == "0.000000"
    assert messages[1]["type"] == "balance" and messages[1]["balance"] == "3.500000"
    assert messages[1]["balanceKes"] == "87.50"


def test_other_customer_and_anonymous_are_refused(redis_url, alice_meter, bob):
    connected, code, _ = async_to_sync(_session)(bob.user, "METER-A1")
    assert not connected and code == 4404
    connected, code, _ = async_to_sync(_session)(AnonymousUser(), "METER-A1")
    assert not connected and code == 4401


def test_staff_group_gets_a_fleets_events_in_one_message(redis_url, alice_meter, bob_meter):
    from channels.layers import get_channel_layer

    from meters.events import STAFF_GROUP, send_meter_events

    async def listen_then_send():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(STAFF_GROUP, channel)
        try:
            from channels.db import database_sync_to_async

            await database_sync_to_async(send_meter_events)([
                {"meterNo": "METER-A1", "type": "balance", "balance": "1.000000"},
                {"meterNo": "METER-B1", "type": "balance", "balance": "2.000000"},
            ])
            return await layer.receive(channel)
        finally:
            await layer.group_discard(STAFF_GROUP, channel)

    message = async_to_sync(listen_then_send)()
    assert message["type"] == "meter.events"
    assert [event["meterNo"] for event in message["events"]] == ["METER-A1", "METER-B1"]
