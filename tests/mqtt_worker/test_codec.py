"""The codec alone (no Django): PROTOCOL.md's examples, every rejection, and command encoding."""

from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_worker import codec
from mqtt_worker.codec import BalanceReport, CodecError, ConsumptionReport, StatusUpdate

SEED_CONSUMPTION = (b'{"meterNo": "METER001", "unitsConsumed": 0.0048, "remainingBalance": 10.4952, '
                    b'"totalConsumed": 0.0048, "timestamp": 1698765432000}')
SEED_STATUS = (b'{"meterNo": "METER001", "status": "online", "message": "Device operating normally", '
               b'"balance": 10.4952, "wifi_rssi": -65, "timestamp": 1698765432000}')
SEED_BALANCE = b'{"meterNo": "METER001", "balance": 10.5, "timestamp": 1698765432000}'


def test_seed_consumption_report_decodes_exactly():
    report = codec.decode("smartmeter/METER001/consumption", SEED_CONSUMPTION)
    assert report == ConsumptionReport("METER001", Decimal("0.0048"), Decimal("10.4952"), Decimal("0.0048"), 1698765432000)
    assert report.time_trusted and report.dedup_key == "t:1698765432000:0.004800"


def test_seed_status_and_balance_reports_decode():
    status = codec.decode("smartmeter/METER001/status", SEED_STATUS)
    assert status == StatusUpdate("METER001", "online", "Device operating normally", Decimal("10.4952"), -65, 1698765432000)
    balance = codec.decode("smartmeter/METER001/balance", SEED_BALANCE)
    assert balance == BalanceReport("METER001", Decimal("10.5"), 1698765432000)


def test_ext_fields_are_read_and_unknown_fields_ignored():
    payload = orjson.dumps({"meterNo": "M-1", "unitsConsumed": 0.25, "remainingBalance": -0.5, "totalConsumed": 3,
                            "timestamp": 5000, "seq": 7, "energyTotal": 1234.567891, "extra": [1, 2]})
    report = codec.decode("smartmeter/M-1/consumption", payload)
    assert report.seq == 7 and report.energy_total_kwh == Decimal("1234.567891")
    assert report.remaining_balance_kwh == Decimal("-0.5") and not report.time_trusted
    assert report.dedup_key == "s:7"
    status = codec.decode("smartmeter/M-1/status", b'{"meterNo":"M-1","status":"offline","relay":"off","fw":"1.2.0",'
                                                   b'"uptime":360,"resetReason":"brownout"}')
    assert (status.status, status.relay, status.firmware, status.uptime_s, status.reset_reason) == (
        "offline", "off", "1.2.0", 360, "brownout")
    balance = codec.decode("smartmeter/M-1/balance", b'{"meterNo":"M-1","balance":2,"cmdId":"abc"}')
    assert balance.cmd_id == "abc" and balance.balance_kwh == Decimal("2")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("smartmeter/M1/consumption", b"{not json", "invalid JSON"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":"\xff"}', "invalid JSON"),
        ("smartmeter/M1/consumption", b"[1, 2]", "must be a JSON object"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":NaN,"remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1}', "invalid JSON"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":-0.1,"remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1}', "unitsConsumed must be"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":"0.1","remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1}', "unitsConsumed must be a number"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":true,"remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1}', "unitsConsumed must be a number"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":1e400,"remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1}', "infinity"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":0.1,"remainingBalance":1,"totalConsumed":1}',
         "timestamp is required"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","unitsConsumed":0.1,"remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1,"seq":1.5}', "seq must be an integer"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M2","unitsConsumed":0.1,"remainingBalance":1,"totalConsumed":1,'
                                      b'"timestamp":1}', "differs from the topic"),
        ("smartmeter/M1/consumption", b'{"unitsConsumed":0.1}', "meterNo is required"),
        ("smartmeter/M1/consumption", b'{"meterNo":"M1","pad":"' + b"x" * 1100 + b'"}', "more than 1024"),
        ("smartmeter/M1/status", b'{"meterNo":"M1","status":"sleeping"}', "status must be one of"),
        ("smartmeter/M1/status", b'{"meterNo":"M1","status":"error","message":"a\\u0000b"}', "NUL"),
        ("smartmeter/M1/balance", b'{"meterNo":"M1"}', "balance is required"),
        ("smartmeter/M1/other", b"{}", "not a report topic"),
        ("smartmeter/M 1/status", b"{}", "invalid meterNo"),
        ("smartmeter/M1/consumption/x", b"{}", "not a report topic"),
    ],
)
def test_bad_input_is_refused_with_its_reason(topic, payload, reason):
    with pytest.raises(CodecError, match=reason):
        codec.decode(topic, payload)


def test_seed_only_balance_command_equals_the_seed_schema():
    payload = codec.encode_balance_command(balance_kwh=Decimal("10.500000"), timestamp_ms=1698765432000)
    assert payload == b'{"balance":10.5,"timestamp":1698765432000}'
    assert orjson.loads(payload) == {"balance": 10.5, "timestamp": 1698765432000}


def test_balance_command_ext_fields_are_exact_number_text():
    payload = codec.encode_balance_command(balance_kwh=Decimal("-0.000001"), timestamp_ms=1, energy_total_kwh=Decimal("1E+3"),
                                           cmd_id="c1", reason="resync")
    assert payload == b'{"balance":-0.000001,"timestamp":1,"energyTotal":1000,"cmdId":"c1","reason":"resync"}'


def test_relay_command_and_topics():
    assert orjson.loads(codec.encode_relay_command(state="off", timestamp_ms=5, cmd_id="x", reason="maintenance")) == {
        "state": "off", "reason": "maintenance", "cmdId": "x", "timestamp": 5}
    with pytest.raises(CodecError):
        codec.encode_relay_command(state="dim", timestamp_ms=5)
    assert codec.command_topic("METER001", "balance") == "smartmeter/METER001/command/balance"
    assert codec.parse_command_topic("smartmeter/METER001/command/relay") == ("METER001", "relay")
    assert codec.report_subscriptions("ingest") == [
        "$share/ingest/smartmeter/+/consumption", "$share/ingest/smartmeter/+/status", "$share/ingest/smartmeter/+/balance"]
    assert codec.report_subscriptions("") == [
        "smartmeter/+/consumption", "smartmeter/+/status", "smartmeter/+/balance"]
    for bad in ("a/b", "a+", "#", "$share", "a b"):
        with pytest.raises(CodecError):
            codec.report_subscriptions(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200) | st.builds(lambda d: orjson.dumps(d), st.dictionaries(
    st.sampled_from(["meterNo", "unitsConsumed", "remainingBalance", "totalConsumed", "timestamp", "seq", "energyTotal",
                     "status", "balance", "cmdId"]),
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) | st.just("M1"))))
def test_codec_never_fails_otherwise_than_with_a_codec_error(payload):
    for kind in ("consumption", "status", "balance"):
        try:
            report = codec.decode(f"smartmeter/M1/{kind}", payload)
        except CodecError as error:
            assert str(error)
        else:
            assert report.meter_no == "M1"


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value=Decimal("-1000000"), max_value=Decimal("1000000"), places=6, allow_nan=False))
def test_decimals_survive_the_wire_both_ways(value):
    """Command text → JSON → (a meter's double) → report → Decimal is the same Decimal."""
    text = codec.encode_balance_command(balance_kwh=value, timestamp_ms=1)
    report = codec.decode("smartmeter/M1/balance", b'{"meterNo":"M1","balance":' + codec.decimal_text(value).encode() + b"}")
    assert report.balance_kwh == value
    assert Decimal(repr(orjson.loads(text)["balance"])) == value
