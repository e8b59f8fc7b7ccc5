"""The networked simulator (devtools/sim/fleet.py) and `python -m devtools.simulate_meters`."""

import json
import re
import threading
from decimal import Decimal

import paho.mqtt.client as mqtt
import pytest
from django.core.management import CommandError, call_command
from paho.mqtt.enums import CallbackAPIVersion

from devtools import simulate_meters
from devtools.sim.fleet import GARBAGE_KINDS, Broker, Fleet, FleetOptions, Resume, garbage_payload
from meters.models import LedgerEntry, LedgerKind, Meter, Reading
from mqtt_worker import codec
from tests.simulator.conftest import wait_until


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
def test_every_garbage_kind_is_refused_by_the_codec(kind):
    suffix, payload = garbage_payload(kind, "METER001", "n-1")
    with pytest.raises(codec.CodecError):
        codec.decode(f"smartmeter/METER001/{suffix}", payload)


def test_broker_url_parsing():
    assert Broker.from_url("mqtts://m%401:p%3Aw@broker.example:8884") == Broker(
        host="broker.example", port=8884, username="m@1", password="p:w", tls=True
    )
    assert Broker.from_url("mqtt://127.0.0.1").port == 1883
    for bad in ("http://x", "mqtt://:1883", "mqtt://h:99999"):
        with pytest.raises(ValueError):
            Broker.from_url(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"meter_nos": []}, "no meters"),
        ({"meter_nos": ["A/B"]}, "invalid meter numbers"),
        ({"meter_nos": ["A", "A"]}, "unique"),
        ({"drop_rate": 1.5}, "drop-rate"),
        ({"speed": 0}, "speed"),
        ({"interval_s": float("nan")}, "interval"),
        ({"connections": 0}, "connection"),
    ],
)
def test_fleet_options_refuse_bad_input(change, message):
    options = FleetOptions(meter_nos=["A"])
    for key, value in change.items():
        setattr(options, key, value)
    with pytest.raises(ValueError, match=message):
        Fleet(options)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--meters", "A,B", "--count", "2"], "either --meters or --count"),
        ([], "say which meters"),
        (["--meters", "OK1,bad meter"], "invalid meter number"),
        (["--meters", "A,A"], "unique"),
        (["--count", "0"], "between 1 and 100000"),
        (["--meters", "A", "--drop-rate", "2"], "probability"),
        (["--meters", "A", "--speed", "-1"], "positive"),
        (["--meters", "A", "--connections", "0"], "at least 1"),
        (["--meters", "A", "--mqtt-url", "http://x"], "mqtt://"),
    ],
)
@pytest.mark.django_db
def test_command_refuses_bad_arguments_and_creates_nothing(args, message):
    with pytest.raises(CommandError, match=message):
        call_command(simulate_meters.Command(), *args)
    assert not Meter.objects.exists()


class Spy:
    """Subscribes to everything the meters publish."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("smartmeter/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def reports(self, meter_no: str) -> list[dict]:
        with self.lock:
            items = list(self.messages)
        return [json.loads(p) for t, p, _ in items if t == f"smartmeter/{meter_no}/consumption"]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.services
def test_drops_buffer_and_replay_every_report_and_commands_reach_their_meter(private_mosquitto):
    """Without a worker: the broker-level behaviour. Dropped connections lose no report (each
    meter's seqs arrive without a gap, the register never decreases), a command reaches only its
    meter and is answered with its cmdId, and a clean stop leaves every meter `offline`."""
    spy = Spy(private_mosquitto.port)
    meters = ["SIMA", "SIMB", "SIMC", "SIMD"]
    fleet = Fleet(FleetOptions(
        meter_nos=meters, broker=Broker(port=private_mosquitto.port), interval_s=4, connections=2, speed=8,
        drop_rate=0.5, duplicate_rate=0.2, seed=3, client_id_prefix="sim-t",
        resume={m: Resume(energy_total=10.0, balance=50.0, next_seq=100) for m in meters},
    )).start()
    try:
        def enough():
            st = fleet.snapshot()["stats"]
            return st.drops >= 2 and st.duplicates_sent >= 1 and st.reports_acked >= 24

        wait_until(enough, "two drops, a duplicate and some reports")
        command = json.dumps({"balance": 7.5, "timestamp": 1698765432000, "energyTotal": 10.0, "cmdId": "cmd-42"})
        wait_until(lambda: fleet.connections[1].connected, "SIMB's connection")
        spy.client.publish("smartmeter/SIMB/command/balance", command, qos=1)
        wait_until(lambda: any(t == "smartmeter/SIMB/balance" for t, _, _ in spy.messages), "SIMB's balance report")
    finally:
        assert fleet.stop(flush_timeout=30)
    wait_until(lambda: all(
        spy.reports(m) and spy.reports(m)[-1]["energyTotal"] == float(fleet.meters[m].measured_kwh + 10) for m in meters
    ), "every final report at the spy")
    for meter_no in meters:
        reports = spy.reports(meter_no)
        seqs = sorted({r["seq"] for r in reports})
        assert seqs == list(range(100, 100 + len(seqs))), f"{meter_no}: a report was lost"
        by_seq = {}
        for report in reports:
            by_seq.setdefault(report["seq"], report)
        registers = [by_seq[s]["energyTotal"] for s in seqs]
        assert registers == sorted(registers) and registers[0] >= 10.0
    assert sum(len(spy.reports(m)) for m in meters) > sum(len({r["seq"] for r in spy.reports(m)}) for m in meters)
    acks = [json.loads(p) for t, p, _ in spy.messages if t == "smartmeter/SIMB/balance"]
    assert acks[0]["cmdId"] == "cmd-42"
    assert not any(t.endswith("/balance") for t, _, _ in spy.messages if not t.startswith("smartmeter/SIMB/"))
    assert fleet.snapshot()["stats"].commands_received == 1
    offline = [json.loads(p) for t, p, r in spy.messages if t.endswith("/status") and b'"offline"' in p]
    assert {o["meterNo"] for o in offline} == set(meters)
    spy.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.services
def test_command_provisions_then_resumes_where_the_ledger_left_off(worker, private_mosquitto, tariff, capsys):
    """`make run` restarts the simulator on the same meters: the second run must continue the
    register and seq the backend accounted (no anomaly, no report mistaken for a duplicate)."""
    args = ["--meters", "CMD001,CMD002", "--interval", "2", "--speed", "4", "--mqtt-url", private_mosquitto.url,
            "--seed", "9", "--progress", "1"]
    call_command(simulate_meters.Command(), *args, "--provision", "--credit", "5", "--duration", "4")
    out = capsys.readouterr().out
    assert "provisioned 2 meter(s)" in out and "meters connected" in out
    assert LedgerEntry.objects.filter(kind=LedgerKind.PAYMENT_CREDIT, units_kwh=Decimal("5")).count() == 2
    first = measured(out)
    assert first > 0  # the balance command came back through the worker and closed the relays
    wait_until(lambda: debited() == first, "the ledger to reach the first run's energy", process=worker)
    first_seqs = set(Reading.objects.values_list("seq", flat=True))

    call_command(simulate_meters.Command(), *args, "--duration", "4")
    out = capsys.readouterr().out
    assert "2 resuming from the ledger's register" in out
    second = measured(out)
    assert second > 0
    wait_until(lambda: debited() == first + second, "the ledger to reach both runs' energy", process=worker)
    assert Reading.objects.exclude(seq__in=first_seqs).filter(seq__lte=max(first_seqs)).count() == 0
    assert list(Meter.objects.exclude(anomaly="").values_list("meter_no", "anomaly")) == []
    assert not Reading.objects.filter(is_duplicate=True).exists()


def measured(out: str) -> Decimal:
    """The total the command's last progress line reports as measured by its meters."""
    return Decimal(re.findall(r"measured (\S+) kWh", out)[-1])


def debited() -> Decimal:
    return -sum(LedgerEntry.objects.filter(kind=LedgerKind.CONSUMPTION_DEBIT).values_list("units_kwh", flat=True))
