"""The paho-mqtt client setup that the ingest worker and the command publisher share.

Credentials and TLS come from settings (MQTT_URL, MQTT_CA_FILE); TCP_NODELAY at our end of the
socket, because Nagle's algorithm delays small packets (reports, PUBACKs, commands) by
milliseconds on a connection that sends them one at a time.
"""

import socket
import ssl

import paho.mqtt.client as mqtt
from django.conf import settings


def tune_socket(sock) -> None:
    """TCP_NODELAY on the client's socket (see the module note)."""
    raw = getattr(sock, "_sock", sock)  # paho may wrap the socket (TLS, websockets)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def configure_client(client: mqtt.Client, config: dict | None = None) -> None:
    """Credentials and TLS from `config` (default settings.MQTT, parsed from MQTT_URL; the
    publisher's is settings.MQTT_PUBLISHER) and MQTT_CA_FILE: the broker's certificate is
    verified against that CA (or the system's), host name included."""
    config = config or settings.MQTT
    if config.get("username"):
        client.username_pw_set(config["username"], config.get("password") or None)
    if config.get("tls"):
        client.tls_set(ca_certs=settings.MQTT_CA_FILE, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
