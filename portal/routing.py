"""WebSocket routes (Channels)."""

from django.urls import path

from portal.consumers import MeterLiveConsumer

websocket_urlpatterns = [
    path("ws/meters/<str:meter_no>/", MeterLiveConsumer.as_asgi()),
]
