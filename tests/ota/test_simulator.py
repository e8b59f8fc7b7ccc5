"""The networked simulator's OTA (devtools/sim/fleet.py): one SimMeter driven without a broker,
its publishes recorded and acknowledged here as the broker would."""

import json
import random

import pytest
from django.core.management import CommandError, call_command

from devtools import simulate_meters
from devtools.sim.fleet import SIM_FW_VERSION, Fleet, FleetOptions, OtaOptions, SimMeter
from tests.ota.conftest import TEST_PUBLIC_KEY, TEST_PUBLIC_KEY_HEX, signed

URL = "http://127.0.0.1:8000/firmware/images/x/2.0.0.bin"


class Wire:
    """The meter's side of the broker: what it published, and PUBACKs for its QoS 1 messages."""

    def __init__(self):
        self.messages: list[tuple[str, str, int, bool]] = []
        self.unacked: list[int] = []
        self.next_id = 0

    def publish(self, meter, topic, payload, qos, retain):
        self.messages.append((topic, payload, qos, retain))
        if qos == 0:
            return 0
        self.next_id += 1
        self.unacked.append(self.next_id)
        return self.next_id

    def statuses(self) -> list[dict]:
        return [json.loads(p) for t, p, _, _ in self.messages if t.endswith("/status")]


def make_meter(image, *, fetch=None, fail=(), require_https=False, rate=0.0, seed=1, meter_no="M1"):
    wire = Wire()
    options = FleetOptions(meter_nos=[meter_no], interval_s=5, seed=seed, ota=OtaOptions(
        public_key=TEST_PUBLIC_KEY, fetch=fetch or (lambda url: image), require_https=require_https,
        fail_boot_meters=set(fail), fail_boot_rate=rate))
    options.validate()
    meter = SimMeter(meter_no, options, random.Random(seed), wire.publish)
    meter.core.on_connected()
    return meter, wire


def run(meter, wire, seconds, *, ack=True):
    for _ in range(seconds):
        meter.clock.advance(1000)
        meter.core.loop()
        meter.follow_platform(True)
        while ack and wire.unacked:
            meter.core.on_published(wire.unacked.pop(0))


def command(meter, wire, sig, url=URL, cmd_id="ota-1"):
    meter.core.on_message(f"smartmeter/{meter.meter_no}/command/ota", json.dumps({"url": url, **sig, "cmdId": cmd_id}))
    meter.follow_platform(True)


def test_an_update_is_fetched_checked_booted_and_confirmed_by_an_acknowledged_report():
    image, sig = signed("2.0.0")
    fetched = []
    meter, wire = make_meter(image, fetch=lambda url: fetched.append(url) or image)
    command(meter, wire, sig)
    run(meter, wire, 8, ack=False)  # no PUBACK yet: the new image runs, unconfirmed
    assert fetched == [URL] and meter.fw == "2.0.0"
    last = wire.statuses()[-1]
    assert (last["fw"], last["otaState"]) == ("2.0.0", "pending")
    run(meter, wire, 10)  # a report acknowledged: confirmed
    events = [(s["status"], s.get("message"), s["fw"], s["otaState"]) for s in wire.statuses() if s.get("cmdId")]
    assert [e[1] for e in events] == ["OTA 2.0.0: downloading", "OTA 2.0.0: verified, restarting",
                                      "OTA 2.0.0: running, waiting for an acknowledged report", "OTA 2.0.0: confirmed"]
    assert events[-1][2:] == ("2.0.0", "valid")
    # The reboot: the will first (offline), then the new image's online.
    kinds = [s["status"] for s in wire.statuses()]
    assert "offline" in kinds and kinds.index("offline") < len(kinds) - 1
    assert meter.stats.reboots == 1 and meter.stats.images_failed_boot == 0


def test_an_image_that_fails_to_boot_rolls_back_and_says_why():
    image, sig = signed("2.0.0")
    meter, wire = make_meter(image, fail={"M1"})
    command(meter, wire, sig)
    run(meter, wire, 20)
    assert meter.fw == SIM_FW_VERSION
    last = wire.statuses()[-1]
    assert (last["fw"], last["otaState"], last["otaVersion"], last["otaError"]) == (
        SIM_FW_VERSION, "rolledback", "2.0.0", "the new image crashed (panic)")
    assert any(s.get("message") == "OTA 2.0.0 rolled back: the new image crashed (panic)" and s["cmdId"] == "ota-1"
               for s in wire.statuses())
    assert meter.stats.images_failed_boot == 1 and meter.stats.reboots == 3  # into it, the crash, back
    # The same image again is refused; the meter keeps metering meanwhile.
    command(meter, wire, sig, cmd_id="ota-2")
    assert wire.statuses()[-1]["message"] == "OTA 2.0.0 refused: this image rolled back before"
    before = meter.core.next_seq
    run(meter, wire, 12)
    assert meter.core.next_seq > before


@pytest.mark.parametrize("case, error", [
    ("forged", "bad signature"), ("other image", "sha256 mismatch"), ("404", "download failed: HTTP 404"),
])
def test_an_update_that_does_not_check_out_fails_and_the_old_image_stays(case, error):
    image, sig = signed("2.0.0")
    fetched = []
    if case == "forged":
        sig = {**sig, "signature": signed("2.0.1")[1]["signature"]}
    fetch = {"other image": lambda url: fetched.append(url) or image + b"!", "404": lambda url: fetched.append(url)}.get(
        case, lambda url: fetched.append(url) or image)
    meter, wire = make_meter(image, fetch=fetch)
    command(meter, wire, sig)
    run(meter, wire, 10)
    assert meter.fw == SIM_FW_VERSION and meter.stats.reboots == 0
    last = wire.statuses()[-1]
    assert (last["otaState"], last["otaError"]) == ("failed", error)
    assert fetched == ([] if case == "forged" else [URL])  # the signature is checked before any download


def test_http_is_refused_as_the_firmware_does_unless_told():
    image, sig = signed("2.0.0")
    meter, wire = make_meter(image, require_https=True)
    command(meter, wire, sig)
    assert wire.statuses()[-1]["message"] == "OTA command rejected: bad url"
    assert meter.fw == SIM_FW_VERSION


def test_a_fail_rate_draws_per_meter_and_image_from_the_seed():
    image, _ = signed("2.0.0")

    def failing(seed):
        meters = (make_meter(image, rate=0.5, seed=seed, meter_no=f"M{i}")[0] for i in range(40))
        return {meter.meter_no for meter in meters if meter._fails_boot(image)}

    assert failing(3) == failing(3)
    assert 5 < len(failing(3)) < 35
    assert failing(3) != failing(4)


def test_fleet_ota_options_are_checked():
    with pytest.raises(ValueError, match="public key"):
        Fleet(FleetOptions(meter_nos=["A"], ota=OtaOptions(public_key=b"\x04" * 10)))
    with pytest.raises(ValueError, match="fail-boot-rate"):
        Fleet(FleetOptions(meter_nos=["A"], ota=OtaOptions(public_key=TEST_PUBLIC_KEY, fail_boot_rate=2)))
    with pytest.raises(ValueError, match="firmware version"):
        Fleet(FleetOptions(meter_nos=["A"], firmware={"A": "bad version"}))


@pytest.mark.django_db
def test_the_command_line_takes_the_key_from_settings(settings, monkeypatch):
    settings.OTA_PUBLIC_KEY = ""
    with pytest.raises(CommandError, match="need OTA"):
        call_command(simulate_meters.Command(), "--meters", "A", "--ota-fail-boot", "A")
    with pytest.raises(CommandError, match="needs OTA_PUBLIC_KEY"):
        call_command(simulate_meters.Command(), "--meters", "A", "--ota")
    settings.OTA_PUBLIC_KEY = TEST_PUBLIC_KEY_HEX
    seen = {}

    class Stop(Exception):
        pass

    def fake_fleet(options):
        seen["options"] = options
        raise Stop

    monkeypatch.setattr(simulate_meters, "Fleet", fake_fleet)
    with pytest.raises(Stop):
        call_command(simulate_meters.Command(), "--meters", "A,B", "--ota-fail-boot", "B", "--ota-fail-rate", "0.1")
    ota = seen["options"].ota
    assert (ota.public_key, ota.fail_boot_meters, ota.fail_boot_rate) == (TEST_PUBLIC_KEY, {"B"}, 0.1)
    with pytest.raises(Stop):
        call_command(simulate_meters.Command(), "--meters", "A", "--no-ota")
    assert seen["options"].ota is None
