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
