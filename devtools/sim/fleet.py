"""The networked meter simulator: many MeterCores (devtools/sim/meter_core.py, the port of the
firmware) over a few paho-mqtt connections, with a household load model and switchable faults.

No Django here (the benchmarks can use it alone); `manage.py simulate_meters` wraps it.

How it is put together
- One `Connection` per MQTT client, each with its own thread that owns its meters: it advances
  every meter's clock in steps of `step_ms` simulated milliseconds, paced to `speed` simulated
  seconds per real second, and calls `loop()`. paho's network thread never touches a MeterCore:
  it only queues connects, disconnects and commands for the connection thread (the firmware's
  glue does the same with esp_mqtt's events), so each core is single-threaded like on a device.
- Each meter has its own MeterCore, ManualClock, MemoryKvStore (NVS) and ReportBuffer (flash ring).
- QoS 1: paho's in-memory outbox plays the part of esp_mqtt's outbox on the device. A publish the
  client took returns True to the core (as on the device); it counts as delivered only when the
  broker's PUBACK arrives, and one that is not acknowledged stays in the outbox and is sent again
  after the reconnect (with DUP), which is also how real duplicates arise.
- Offline status: MQTT allows one Last Will per connection, not one per meter. So the simulator
  itself publishes each meter's will payload (`MeterCore.will_message()`, status `offline`,
  retained) when it simulates a drop (just before cutting the socket) and when it stops cleanly.
  A simulator that is killed leaves its meters `online` until they report again.

Faults (rates are probabilities per meter, or per connection for drops, per report interval)
- drop: the connection's socket is cut without DISCONNECT; meters go offline, buffer their
  reports in the ring, and replay them oldest-first when paho has reconnected `outage_s` later.
- duplicate: a consumption report is published twice (the backend must flag the second copy).
- register reset: the PZEM's own energy register restarts from 0; the core ignores the
  negative delta and re-baselines (the meter's energyTotal never goes back, its regId stays).
- garbage: a malformed payload on one of the meter's report topics (the worker dead-letters it).

Firmware updates (FleetOptions.ota, firmware/PROTOCOL-ext.md "OTA ext")
- Meters subscribe to `command/ota` too and run the port's OtaManager on a SimOtaPlatform: the
  signature is checked with `OtaOptions.public_key` before the download; the image comes from
  `OtaOptions.fetch(url)` (default: an HTTP(S) GET) after `fetch_ms` simulated; its sha256 must
  match; the meter restarts into it (its `fw` becomes the command's version) and confirms it
  with the first report the broker acknowledges after connecting, as the firmware does.
- A meter in `fail_boot_meters` (read when it boots a new image), or one drawn with
  `fail_boot_rate` (per meter and image, from the fleet's seed), has a new image that panics
  right after boot: the next boot rolls back to the old image, which reports `rolledback`.
- A reboot publishes the meter's will (`offline`) first, as the broker would when the device's
  connection drops, then the new boot's `online`.
- These meters use the firmware's transport mode: a report leaves the ring only on its PUBACK
  (paho's message id), because that acknowledgement is what confirms a new image. paho, unlike
  esp_mqtt, never drops an unacknowledged message, so a report unacknowledged after the
  firmware's 31 s is sent once more from the ring (a duplicate the backend flags). Without
  `ota`, meters hand reports to paho's outbox and forget them, as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import random
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.rules import KWH_QUANTUM, METER_NO_HELP, parse_mqtt_url, valid_fw_version, valid_meter_no
from devtools.sim.meter_core import (
    KEY_SEQ,
    KEY_STATE,
    ManualClock,
    MemoryKvStore,
    MeterConfig,
    MeterCore,
    OtaConfig,
    OtaManager,
    ReportBuffer,
    SimOtaPlatform,
    StateRecord,
    encode_state,
    round6,
)

# A simulated meter's session lives this long on the broker after a drop, so that commands
# published while it is away are delivered when it returns (the firmware's persistent session).
SESSION_EXPIRY_S = 300


@dataclass(frozen=True)
class Broker:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def from_url(cls, url: str, ca_file: str | None = None) -> Broker:
        """mqtt://user:pass@host:port or mqtts://… (TLS); the same form as MQTT_URL."""
        parsed = parse_mqtt_url(url)
        return cls(parsed.host, parsed.port, parsed.username, parsed.password, parsed.tls, ca_file)


@dataclass(frozen=True)
class Resume:
    """Where a meter's flash left off (for meters the backend already knows): the register and
    balance in NVS, the first seq the next boot may use, and the register history they belong
    to. Without reg_id the flash is the layout of firmware before register histories: the meter
    keeps the register and draws a new regId (a new history for the backend)."""

    energy_total: float
    balance: float
    next_seq: int
    reg_id: str | None = None


# The version the simulated meters run until they are updated.
SIM_FW_VERSION = "sim-1.0.0"


def http_fetch(url: str, *, ca_file: str | None = None, timeout: float = 30.0) -> bytes | None:
    """An image over HTTP(S), as esp_https_ota fetches it; None for anything but a 200."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 (http(s) only)
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


@dataclass
class OtaOptions:
    """Meters that update over the air (see the module docstring)."""

    public_key: bytes  # the release key's public point, 04 || X || Y (sign_firmware.py keygen)
    fetch: Callable[[str], bytes | None] | None = None  # None: http_fetch (with ca_file for https)
    ca_file: str | None = None
    # The firmware refuses http:// URLs; the simulator accepts them only when told (tests, make run).
    require_https: bool = True
    fetch_ms: int = 5000  # simulated download time
    fail_boot_meters: set[str] = field(default_factory=set)
    fail_boot_rate: float = 0.0

    def validate(self) -> None:
        if not (isinstance(self.public_key, bytes) and len(self.public_key) == 65 and self.public_key[0] == 4):
            raise ValueError("the OTA public key must be the 65-byte uncompressed point (04…)")
        if not (0 <= self.fail_boot_rate <= 1):
            raise ValueError(f"fail-boot-rate must be between 0 and 1, got {self.fail_boot_rate}")
        if not (isinstance(self.fetch_ms, int) and self.fetch_ms >= 0):
            raise ValueError("the simulated download time must be a non-negative number of ms")


@dataclass
class FleetOptions:
    meter_nos: list[str]
    broker: Broker = field(default_factory=Broker)
    interval_s: float = 30.0  # report interval, simulated seconds
    connections: int = 2
    speed: float = 1.0  # simulated seconds per real second
    drop_rate: float = 0.0
    outage_s: float | None = None  # real seconds a dropped connection stays down; None: 2 intervals
    duplicate_rate: float = 0.0
    register_reset_rate: float = 0.0
    garbage_rate: float = 0.0
    seed: int | None = None
    buffer_capacity: int = 64
    client_id_prefix: str = ""
    resume: dict[str, Resume] = field(default_factory=dict)
    power_kw: tuple[float, float] = (0.3, 3.0)  # household load range
    ota: OtaOptions | None = None  # meters that update over the air (command/ota)
    firmware: dict[str, str] = field(default_factory=dict)  # the version a meter runs at start (else SIM_FW_VERSION)
    # Per-meter broker passwords (username = meterNo), as a broker with the project's ACL wants:
    # each meter then has a connection of its own, as a real one does.
    credentials: dict[str, str] | None = None

    def validate(self) -> None:
        if not self.meter_nos:
            raise ValueError("no meters to simulate")
        bad = [m for m in self.meter_nos if not valid_meter_no(m)]
        if bad:
            raise ValueError(f"invalid meter numbers ({METER_NO_HELP}): {', '.join(bad[:5])}")
        if len(set(self.meter_nos)) != len(self.meter_nos):
            raise ValueError("meter numbers must be unique")
        if not (self.interval_s > 0 and math.isfinite(self.interval_s)):
            raise ValueError("the report interval must be a positive number of seconds")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError("speed must be a positive number")
        if self.connections < 1:
            raise ValueError("at least one connection is needed")
        for name in ("drop_rate", "duplicate_rate", "register_reset_rate", "garbage_rate"):
            value = getattr(self, name)
            if not (0 <= value <= 1):
                raise ValueError(f"{name.replace('_', '-')} must be between 0 and 1, got {value}")
        if self.outage_s is not None and not (self.outage_s >= 0 and math.isfinite(self.outage_s)):
            raise ValueError("the outage must be a non-negative number of seconds")
        if self.buffer_capacity < 1:
            raise ValueError("the report buffer needs at least one slot")
        if self.ota is not None:
            self.ota.validate()
        bad = [m for m, version in self.firmware.items() if not valid_fw_version(version)]
        if bad:
            raise ValueError(f"invalid firmware version for {', '.join(bad[:5])}")
        if self.credentials is not None:
            missing = [m for m in self.meter_nos if not self.credentials.get(m)]
            if missing:
                raise ValueError(f"no broker password for {', '.join(missing[:5])}")


@dataclass
class Stats:
    """Counters of one connection, written only by its thread (read by the progress line)."""

    reports_sent: int = 0  # consumption reports the client took (first copies)
    reports_acked: int = 0  # of those, PUBACKed by the broker
    duplicates_sent: int = 0
    garbage_sent: int = 0
    garbage_acked: int = 0
    commands_received: int = 0
    drops: int = 0
    register_resets: int = 0
    ota_commands: int = 0  # command/ota messages received
    reboots: int = 0  # restarts into a new image, rollbacks and crashes
    images_failed_boot: int = 0  # new images that panicked at boot (then rolled back)

    def add(self, other: Stats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class SimMeter:
    """One meter: its core and hardware models (clock, NVS, flash ring, PZEM, household), and with
    OTA the platform (boot slots) that a restart, a crash or a rollback acts on."""

    def __init__(self, meter_no: str, options: FleetOptions, rng: random.Random, publish, stats: Stats | None = None) -> None:
        self.meter_no = meter_no
        self.rng = rng
        self.options = options
        self._publish = publish
        self.clock = ManualClock(rng.randrange(0, 2**32))  # devices boot at any millis()
        self.kv = MemoryKvStore()
        self.buffer = ReportBuffer(options.buffer_capacity)
        resume = options.resume.get(meter_no)
        if resume is not None:
            if resume.reg_id is None:
                self.kv.put(KEY_STATE, struct.pack("<dd", resume.energy_total, resume.balance))
            else:
                state = StateRecord(reg_id=resume.reg_id, energy_total=resume.energy_total, balance=resume.balance)
                self.kv.put(KEY_STATE, encode_state(state))
            self.kv.put(KEY_SEQ, struct.pack("<Q", resume.next_seq))
        self.relay_closed = False
        # The PZEM-004T's own register (Wh resolution) and the household behind the relay.
        self._exact_kwh = rng.uniform(0, 5000)
        self._power_kw = rng.uniform(*options.power_kw)
        self._power_range = options.power_kw
        self.sensor_live = True
        self._interval_ms = max(int(options.interval_s * 1000), 1)
        self._rssi = -rng.randint(45, 85)
        self.fw = options.firmware.get(meter_no, SIM_FW_VERSION)
        self.previous_fw = self.fw
        self.stats = stats if stats is not None else Stats()
        ota = options.ota
        self.platform: SimOtaPlatform | None = None
        if ota is not None:
            fetch = ota.fetch or (lambda url: http_fetch(url, ca_file=ota.ca_file))
            self.platform = SimOtaPlatform(self.clock.monotonic, fetch, fetch_ms=ota.fetch_ms, crashes=self._fails_boot)
        self.core = self._boot("poweron")
        self.start_energy_total = self.core.energy_total

    @property
    def reports_acked_by_id(self) -> bool:
        """The firmware's transport mode: reports leave the ring on their PUBACK (with OTA)."""
        return self.platform is not None

    def _boot(self, reason: str) -> MeterCore:
        if self.options.speed == 1:
            # Real time: SNTP-synced Unix ms. Accelerated time would date reports in the future,
            # so those meters stay unsynced and send ms since boot, which PROTOCOL.md tells the
            # backend to treat as "time unknown" (placed at the time of receipt).
            self.clock.sync(time.time_ns() // 1_000_000)
        ota = None
        if self.platform is not None:
            config = OtaConfig(require_https=self.options.ota.require_https)
            ota = OtaManager(config, self.kv, self.platform, self.options.ota.public_key)
        core = MeterCore(
            MeterConfig(
                meter_no=self.meter_no,
                fw_version=self.fw,
                report_interval_ms=self._interval_ms,
                sample_interval_ms=step_ms_for(self._interval_ms),
                status_interval_ms=0,
            ),
            self.clock,
            self.kv,
            self.buffer,
            lambda topic, payload, qos, retain: self._publish(self, topic, payload, qos, retain),
            self._set_relay,
            self.read_register,
            reset_reason=reason,
            random32=lambda: self.rng.getrandbits(32),
            ota=ota,
        )
        core.set_wifi_rssi(self._rssi)
        core.begin()
        return core

    def _fails_boot(self, image: bytes) -> bool:
        ota = self.options.ota
        if self.meter_no in ota.fail_boot_meters:
            return True
        if not ota.fail_boot_rate:
            return False
        draw = random.Random(f"{self.options.seed}:{self.meter_no}:{hashlib.sha256(image).hexdigest()}")
        return draw.random() < ota.fail_boot_rate

    def follow_platform(self, connected: bool) -> None:
        """After loop() or a command: a restart into the new image, or a rollback, the OTA state
        machine asked for (the core saved its state first)."""
        p = self.platform
        if p is None:
            return
        if p.restart_requested:
            self._reset("software", connected)
        elif p.rollback_requested:
            p.next_image = None
            self.fw = self.previous_fw
            self._reset("software", connected)

    def _reset(self, reason: str, connected: bool) -> None:
        """A reboot, as SimDevice._reset: an activated image boots whatever the reason; one that
        panics is reset again (reason panic) before it can connect, and that boot rolls back."""
        self.stats.reboots += 1
        if self.core.connected:
            will = self.core.will_message()  # the broker publishes it when the connection drops
            self._publish(self, will.topic, will.payload, will.qos, will.retain)
        p = self.platform
        image = None
        if p.next_image is not None:
            image, p.next_image = p.next_image, None
            self.previous_fw, self.fw = self.fw, self.core.ota.target_version
        p.reset()
        self.clock.restart(self.rng.randrange(0, 2**32))
        self.core = self._boot(reason)
        if image is not None and p.crashes(image):
            self.stats.images_failed_boot += 1
            self._reset("panic", connected=False)
            return
        if connected:
            self.core.on_connected()

    def _set_relay(self, closed: bool) -> None:
        self.relay_closed = closed

    def read_register(self) -> float:
        return math.floor(self._exact_kwh * 1000) / 1000  # the PZEM counts whole Wh

    def consume(self, ms: int) -> None:
        """The household draws power only while the relay is closed; its load wanders."""
        if not self.sensor_live:
            return
        low, high = self._power_range
        self._power_kw = min(max(self._power_kw * self.rng.uniform(0.9, 1.1), low), high)
        if self.relay_closed:
            self._exact_kwh += self._power_kw * ms / 3_600_000

    def reset_register(self) -> None:
        self._exact_kwh = 0.0

    @property
    def measured_kwh(self) -> Decimal:
        """The energy this meter billed during the run, as the backend reads the register off the
        wire (6 places): what the ledger must have debited once every report is in."""
        return _wire_decimal(self.core.energy_total) - _wire_decimal(self.start_energy_total)


def _wire_decimal(x: float) -> Decimal:
    # The payload carries round6(x) printed as the shortest repr; the backend parses that text.
    return Decimal(repr(round6(x))).quantize(KWH_QUANTUM)


def step_ms_for(interval_ms: int) -> int:
    """Simulated ms per loop() step: one second as on the device, coarser for long intervals so
    that a large fleet at high speed stays affordable (billing sums register deltas, so the
    sampling step changes no total)."""
    return max(1000, min(interval_ms // 10, 10_000))


GARBAGE_KINDS = (
    "not-json",
    "nan",
    "negative-units",
    "meter-mismatch",
    "wrong-type",
    "bad-status",
    "oversized",
)


def garbage_payload(kind: str, meter_no: str, nonce: str) -> tuple[str, bytes]:
    """(topic suffix, payload) of a malformed message; `nonce` makes each one identifiable."""
    if kind == "not-json":
        return "consumption", f"{{meterNo: {meter_no} garbage {nonce}".encode()
    if kind == "nan":
        return "consumption", (
            f'{{"meterNo":"{meter_no}","unitsConsumed":NaN,"remainingBalance":1,"totalConsumed":1,'
            f'"timestamp":1698765432000,"nonce":"{nonce}"}}'
        ).encode()
    if kind == "negative-units":
        return "consumption", json.dumps(
            {"meterNo": meter_no, "unitsConsumed": -1.5, "remainingBalance": 1, "totalConsumed": 1,
             "timestamp": 1698765432000, "nonce": nonce}
        ).encode()
    if kind == "meter-mismatch":
        return "consumption", json.dumps(
            {"meterNo": "NOT-" + meter_no[:27], "unitsConsumed": 0.1, "remainingBalance": 1, "totalConsumed": 1,
             "timestamp": 1698765432000, "nonce": nonce}
        ).encode()
    if kind == "wrong-type":
        return "balance", json.dumps({"meterNo": meter_no, "balance": "ten", "timestamp": 1, "nonce": nonce}).encode()
    if kind == "bad-status":
        return "status", json.dumps({"meterNo": meter_no, "status": "exploded", "timestamp": 1, "nonce": nonce}).encode()
    if kind == "oversized":
        return "consumption", json.dumps({"meterNo": meter_no, "pad": "x" * 1100, "nonce": nonce}).encode()
    raise ValueError(f"unknown garbage kind {kind!r}")


class Connection(threading.Thread):
    """One MQTT client and the meters it carries; the thread runs their loops."""

    def __init__(self, index: int, meter_nos: list[str], options: FleetOptions, stop: threading.Event) -> None:
        super().__init__(name=f"sim-conn-{index}", daemon=True)
        self.index = index
        self.options = options
        self._stop_event = stop
        self.rng = random.Random(None if options.seed is None else options.seed * 7919 + index)
        self.stats = Stats()
        self.error: BaseException | None = None
        self.connected = False
        self.finished = threading.Event()
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        # (kind, info, meter whose core learns of the PUBACK or None) awaiting PUBACK
        self._pending: list[tuple[str, mqtt.MQTTMessageInfo, SimMeter | None]] = []
        self.garbage: list[bytes] = []  # payloads PUBACKed by the broker
        self._garbage_pending: list[tuple[bytes, mqtt.MQTTMessageInfo]] = []
        self._cut_pending = False
        self.meters = {
            m: SimMeter(m, options, random.Random(self.rng.random()), self._publish, self.stats) for m in meter_nos
        }
        self.interval_ms = max(int(options.interval_s * 1000), 1)
        self.step_ms = step_ms_for(self.interval_ms)
        self.client_id = f"{options.client_id_prefix or 'sim'}-{index}"[:64]
        self.client = self._make_client()

    # --- the client (callbacks run on paho's network thread: they only queue events) ----------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        broker = self.options.broker
        if self.options.credentials is not None:
            (meter_no,) = self.meters
            client.username_pw_set(meter_no, self.options.credentials[meter_no])
        elif broker.username:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set(ca_certs=broker.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        client.max_inflight_messages_set(100)  # paho slows sharply with a large window
        client.reconnect_delay_set(1, 30)
        client.on_connect = lambda c, u, flags, code, props: self._events.put(("up", code.is_failure, str(code)))
        client.on_disconnect = lambda c, u, flags, code, props: self._events.put(("down",))
        client.on_message = lambda c, u, msg: self._events.put(("msg", msg.topic, msg.payload))
        return client

    def start_client(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        # Clean on the first connect only: paho resumes the session on its own reconnects, so a
        # command published during a simulated outage is still delivered.
        self.client.connect_async(
            self.options.broker.host, self.options.broker.port, keepalive=30,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties,
        )
        self.client.loop_start()

    def _publish(self, meter: SimMeter, topic: str, payload: str, qos: int, retain: bool) -> bool:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        # NO_CONN: paho keeps a QoS 1 message in its outbox and sends it after the reconnect.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return False  # refused (outbox full): the core keeps the report in its ring
        if topic.endswith("/consumption"):
            self.stats.reports_sent += 1
            by_id = meter.reports_acked_by_id
            self._pending.append(("report", info, meter if by_id else None))
            if self.options.duplicate_rate and self.rng.random() < self.options.duplicate_rate:
                copy = self.client.publish(topic, payload, qos=1, retain=False)
                if copy.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    self.stats.duplicates_sent += 1
                    self._pending.append(("duplicate", copy, None))
            if by_id:
                return info.mid  # the report leaves the meter's ring on this id's PUBACK
        return True

    # --- the connection thread ---------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # reported by Fleet.stop / the progress line
            self.error = error
        finally:
            self.finished.set()

    def _run(self) -> None:
        self.start_client()
        step_real = self.step_ms / 1000 / self.options.speed
        next_at = time.monotonic()
        since_interval = 0
        while not self._stop_event.is_set():
            self._handle_events()
            for meter in self.meters.values():
                meter.consume(self.step_ms)
                meter.clock.advance(self.step_ms)
                meter.core.loop()
                meter.follow_platform(self.connected)
            since_interval += self.step_ms
            if since_interval >= self.interval_ms:
                since_interval = 0
                self._faults()
            self._collect_acks()
            next_at += step_real
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop_event.wait(delay)
            else:
                next_at = time.monotonic()  # behind: simulated time slows down instead of bursting

    def _handle_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "up":
                if event[1]:
                    raise ConnectionError(f"broker refused {self.client_id}: {event[2]}")
                self.connected = True
                self._cut_pending = False
                kinds = ("balance", "relay", "ota") if self.options.ota is not None else ("balance", "relay")
                topics = [(f"smartmeter/{m}/command/{kind}", 1) for m in self.meters for kind in kinds]
                for start in range(0, len(topics), 200):
                    self.client.subscribe(topics[start:start + 200])
                for meter in self.meters.values():
                    meter.core.on_connected()  # ring replay first, then "online"
            elif event[0] == "down":
                if self.connected:
                    for meter in self.meters.values():
                        meter.core.on_disconnected()
                self.connected = False
            else:
                _, topic, payload = event
                meter = self.meters.get(topic.split("/")[1]) if topic.count("/") == 3 else None
                if meter is not None:
                    self.stats.commands_received += 1
                    self.stats.ota_commands += topic.endswith("/command/ota")
                    meter.core.on_message(topic, payload)
                    meter.follow_platform(self.connected)

    def _faults(self) -> None:
        o = self.options
        for meter in self.meters.values():
            if o.register_reset_rate and self.rng.random() < o.register_reset_rate:
                meter.reset_register()
                self.stats.register_resets += 1
            if o.garbage_rate and self.connected and self.rng.random() < o.garbage_rate:
                self._publish_garbage(meter)
        if o.drop_rate and self.connected and not self._cut_pending and self.rng.random() < o.drop_rate:
            self.drop()

    def _publish_garbage(self, meter: SimMeter) -> None:
        kind = self.rng.choice(GARBAGE_KINDS)
        nonce = f"{self.client_id}-{self.stats.garbage_sent}-{self.rng.randrange(10**9)}"
        suffix, payload = garbage_payload(kind, meter.meter_no, nonce)
        info = self.client.publish(f"smartmeter/{meter.meter_no}/{suffix}", payload, qos=1)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.stats.garbage_sent += 1
            self._garbage_pending.append((payload, info))

    def drop(self) -> None:
        """Cut the socket as a network failure would (no DISCONNECT packet). The meters' offline
        statuses go out first: they stand in for the per-meter Last Will MQTT cannot give."""
        for meter in self.meters.values():
            will = meter.core.will_message()
            info = self.client.publish(will.topic, will.payload, qos=will.qos, retain=will.retain)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                try:
                    info.wait_for_publish(2.0)  # QoS 0: written to the socket
                except (RuntimeError, ValueError):
                    pass
        outage = self.options.outage_s
        if outage is None:
            outage = 2 * self.options.interval_s / self.options.speed
        # paho reconnects on its own after this delay (its back-off starts at min_delay).
        self.client.reconnect_delay_set(min_delay=max(outage, 0.05), max_delay=max(outage, 0.05))
        sock = self.client.socket()
        self._cut_pending = True
        self.stats.drops += 1
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _collect_acks(self) -> None:
        still = []
        for kind, info, meter in self._pending:
            if info.is_published():
                if kind == "report":
                    self.stats.reports_acked += 1
                if meter is not None:
                    meter.core.on_published(info.mid)  # (a core booted since ignores an id it never sent)
            else:
                still.append((kind, info, meter))
        self._pending = still
        garbage = []
        for payload, info in self._garbage_pending:
            if info.is_published():
                self.garbage.append(payload)
                self.stats.garbage_acked += 1
            else:
                garbage.append((payload, info))
        self._garbage_pending = garbage

    # --- stopping (called from the fleet's thread once this thread has finished) --------------

    def flush(self, timeout: float) -> bool:
        """Final report of every meter (its register frozen), then wait until the rings are empty
        and every QoS 1 publish is acknowledged. True when everything was delivered in time."""
        deadline = time.monotonic() + timeout
        for meter in self.meters.values():
            meter.sensor_live = False  # the household stops: the final report covers everything
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=1)
        reported = False
        while time.monotonic() < deadline:
            self._handle_events()
            if not reported and self.connected:
                for meter in self.meters.values():
                    # One last interval: the sample picks up the remaining delta, the report
                    # carries the final energyTotal.
                    meter.clock.advance(self.interval_ms)
                    meter.core.loop()
                reported = True
            if self.connected:
                for meter in self.meters.values():
                    meter.core.loop()  # replays whatever the ring still holds
            self._collect_acks()
            if reported and not self._pending and not self._garbage_pending and all(
                meter.core.buffered == 0 for meter in self.meters.values()
            ):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        if self.connected:
            for meter in self.meters.values():
                will = meter.core.will_message()
                info = self.client.publish(will.topic, will.payload, qos=1, retain=True)
                try:
                    info.wait_for_publish(2.0)
                except (RuntimeError, ValueError):
                    pass
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """A running fleet: `start()`, watch `snapshot()`, then `stop()` (delivers everything)."""

    def __init__(self, options: FleetOptions) -> None:
        options.validate()
        self.options = options
        self._stop = threading.Event()
        count = len(options.meter_nos) if options.credentials is not None else min(options.connections, len(options.meter_nos))
        groups: list[list[str]] = [options.meter_nos[i::count] for i in range(count)]
        self.connections = [Connection(i, group, options, self._stop) for i, group in enumerate(groups)]
        self.started_at = 0.0

    @property
    def meters(self) -> dict[str, SimMeter]:
        return {m: meter for c in self.connections for m, meter in c.meters.items()}

    def start(self) -> Fleet:
        self.started_at = time.monotonic()
        for connection in self.connections:
            connection.start()
        return self

    def snapshot(self) -> dict:
        total = Stats()
        for connection in self.connections:
            total.add(connection.stats)
        meters = [m for c in self.connections for m in c.meters.values()]
        return {
            "meters": len(meters),
            "connected": sum(len(c.meters) for c in self.connections if c.connected),
            "stats": total,
            "buffered": sum(m.core.buffered for m in meters),
            "measured_kwh": sum((m.measured_kwh for m in meters), Decimal("0.000000")),
            "errors": [c.error for c in self.connections if c.error is not None],
            "elapsed_s": time.monotonic() - self.started_at,
        }

    def progress_line(self) -> str:
        s = self.snapshot()
        st: Stats = s["stats"]
        return (
            f"[sim] {s['connected']}/{s['meters']} meters connected | reports sent {st.reports_sent}, "
            f"acked {st.reports_acked}, buffered {s['buffered']} | commands received {st.commands_received} | "
            f"faults: drops {st.drops}, duplicates {st.duplicates_sent}, register resets {st.register_resets}, "
            f"garbage {st.garbage_sent} | measured {s['measured_kwh']} kWh | {s['elapsed_s']:.0f} s"
            + (f" | OTA: commands {st.ota_commands}, reboots {st.reboots}, images that failed to boot "
               f"{st.images_failed_boot}" if self.options.ota is not None else "")
        )

    def failed(self) -> BaseException | None:
        return next((c.error for c in self.connections if c.error is not None), None)

    def stop(self, *, flush_timeout: float = 60.0) -> bool:
        """Stop the meters, send every meter's final report and wait for all PUBACKs, publish
        `offline` for every meter, disconnect. True when everything was acknowledged."""
        self._stop.set()
        for connection in self.connections:
            connection.finished.wait()
        delivered = True
        for connection in self.connections:
            if connection.error is None:
                delivered = connection.flush(flush_timeout) and delivered
            else:
                delivered = False
        for connection in self.connections:
            connection.close()
        return delivered

    def run(self, *, duration_s: float | None, reports: int | None, progress_s: float,
            out: Callable[[str], None], stop_requested: threading.Event) -> None:
        """Foreground loop of the management command: progress lines until a limit is reached."""
        next_progress = time.monotonic() + progress_s
        while not stop_requested.wait(0.1):
            error = self.failed()
            if error is not None:
                raise error
            if duration_s is not None and time.monotonic() - self.started_at >= duration_s:
                break
            if reports is not None and self.snapshot()["stats"].reports_sent >= reports:
                break
            if time.monotonic() >= next_progress:
                out(self.progress_line())
                next_progress += progress_s
