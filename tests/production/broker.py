"""Clients for tests against a private broker running the project's generated config."""

import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.mqtt_worker.live import wait_until


class Client:
    """A paho client that records what happens to it: its CONNACK, disconnects, messages and
    the reason codes of its PUBACKs and SUBACKs."""

    def __init__(self, port: int, *, username: str | None, password: str | None, ca_file=None, tls: bool = True,
                 client_id: str = ""):
        self.connack: str | None = None
        self.disconnects: list[str] = []
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, str] = {}
        self.subacks: list[list[str]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(ca_file) if ca_file else None, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = lambda c, u, flags, code, props: setattr(self, "connack", str(code))
        self.client.on_disconnect = lambda c, u, flags, code, props: self.disconnects.append(str(code))
        self.client.on_message = lambda c, u, msg: self.messages.append((msg.topic, msg.payload))
        self.client.on_publish = lambda c, u, mid, code, props: self.pubacks.__setitem__(mid, str(code))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.append([str(x) for x in codes])
        self.port = port
        self.error: BaseException | None = None

    def connect(self) -> "Client":
        """Connect and wait for the CONNACK (or for the connection to fail)."""
        try:
            self.client.connect("localhost", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as error:
            self.error = error
            return self
        self.client.loop_start()
        wait_until(lambda: self.connack is not None or self.disconnects, "a CONNACK", timeout=30)
        return self

    @property
    def accepted(self) -> bool:
        return self.connack == "Success" and not self.disconnects

    def subscribe(self, *topics: str) -> None:
        count = len(self.subacks)
        self.client.subscribe([(topic, 1) for topic in topics])
        wait_until(lambda: len(self.subacks) > count, "a SUBACK", timeout=30)

    def publish(self, topic: str, payload: bytes) -> str:
        """QoS 1; returns the PUBACK's reason code (a denied publish still gets one: v5 says why)."""
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, f"the PUBACK of {topic}", timeout=30)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
