"""The OTA command and status fields on the wire, and the release signature: what the backend
sends and accepts is exactly what the meter (its Python port, line by line the firmware's)
accepts."""

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidInput
from devtools.sim.meter_core import decode_ota_command, ecdsa_p256_verify, ota_manifest
from meters.ota import signing
from mqtt_worker import codec
from tests.ota.conftest import KEYS, TEST_PUBLIC_KEY, TEST_PUBLIC_KEY_HEX, signed

VECTORS = json.loads((KEYS / "test_ota_vectors.json").read_text())["images"]


def _command(**change) -> dict:
    _, sig = signed("1.2.3")
    fields = {"url": "https://fw.example.com/firmware/images/t/1.2.3.bin", **sig, "cmd_id": "ota-1"}
    fields.update(change)
    return fields


def test_the_ota_command_is_what_the_meter_decodes():
    fields = _command()
    payload = codec.encode_ota_command(**fields)
    assert codec.command_topic("METER001", "ota") == "smartmeter/METER001/command/ota"
    assert codec.parse_command_topic("smartmeter/METER001/command/ota") == ("METER001", "ota")
    command, error, cmd_id = decode_ota_command(payload)
    assert error == "" and cmd_id == "ota-1"
    assert (command.url, command.version, command.sha256) == (fields["url"], fields["version"], fields["sha256"])
    assert command.signature == base64.b64decode(fields["signature"])
    assert ecdsa_p256_verify(TEST_PUBLIC_KEY, ota_manifest(command.version, command.sha256), command.signature)
    assert json.loads(payload) == {"url": fields["url"], "version": "1.2.3", "sha256": fields["sha256"],
                                   "signature": fields["signature"], "cmdId": "ota-1"}


@pytest.mark.parametrize("change", [
    {"url": "ftp://x/y.bin"}, {"url": "https://x/a b.bin"}, {"url": "https://x/" + "a" * 250},
    {"version": "1 2"}, {"version": "v" * 32}, {"version": ""},
    {"sha256": "AB" * 32}, {"sha256": "ab" * 31},
    {"signature": "not base64!"}, {"signature": "TUVV"}, {"signature": base64.b64encode(b"x" * 73).decode()},
])
def test_a_command_the_meter_would_reject_is_never_encoded(change):
    with pytest.raises(codec.CodecError):
        codec.encode_ota_command(**_command(**change))


def test_status_ota_fields_are_decoded():
    payload = json.dumps({
        "meterNo": "METER001", "status": "error", "message": "OTA 1.2.0 rolled back: the new image crashed (panic)",
        "fw": "1.1.0", "otaState": "rolledback", "otaVersion": "1.2.0", "otaError": "the new image crashed (panic)",
        "cmdId": "ota-42", "balance": 3.5,
    }).encode()
    status = codec.decode("smartmeter/METER001/status", payload)
    assert (status.firmware, status.ota_state, status.ota_version, status.ota_error, status.cmd_id) == (
        "1.1.0", "rolledback", "1.2.0", "the new image crashed (panic)", "ota-42")
    # A meter without OTA sends none of them.
    plain = codec.decode("smartmeter/METER001/status", b'{"meterNo":"METER001","status":"online"}')
    assert (plain.ota_state, plain.ota_version, plain.ota_error, plain.cmd_id) == ("", "", "", "")
    with pytest.raises(codec.CodecError, match="otaState"):
        codec.decode("smartmeter/METER001/status", b'{"meterNo":"METER001","status":"online","otaState":"exploded"}')


def test_signatures_from_the_signing_script_verify_and_others_do_not():
    image, sig = signed("2.0.0")
    assert signing.signature_valid(point=TEST_PUBLIC_KEY, version="2.0.0", sha256_hex=sig["sha256"],
                                   signature_b64=sig["signature"])
    # The signature covers the version and the hash: another version or image is refused.
    assert not signing.signature_valid(point=TEST_PUBLIC_KEY, version="2.0.1", sha256_hex=sig["sha256"],
                                       signature_b64=sig["signature"])
    other = signed("2.0.0", b"another image")[1]["sha256"]
    assert not signing.signature_valid(point=TEST_PUBLIC_KEY, version="2.0.0", sha256_hex=other,
                                       signature_b64=sig["signature"])
    # The firmware's vectors: good verifies, forged does not.
    good, forged = VECTORS["good"], VECTORS["forged"]
    assert signing.signature_valid(point=TEST_PUBLIC_KEY, version=good["version"], sha256_hex=good["sha256"],
                                   signature_b64=good["signature"])
    assert not signing.signature_valid(point=TEST_PUBLIC_KEY, version=forged["version"], sha256_hex=forged["sha256"],
                                       signature_b64=forged["signature"])


@pytest.mark.parametrize("text", ["", "04", "05" + "00" * 64, "04" + "00" * 64, "zz" * 65])
def test_a_public_key_that_is_no_p256_point_is_refused(text):
    with pytest.raises(InvalidInput):
        signing.public_key_point(text)


def test_the_configured_key_is_read_in_the_keygen_form():
    assert signing.public_key_point(TEST_PUBLIC_KEY_HEX.upper()) == TEST_PUBLIC_KEY


@pytest.mark.parametrize("bad", ["MEUCIQ", "MEUCIQDD====", " " + VECTORS["good"]["signature"][1:]])
def test_signature_encodings_the_meter_refuses_are_refused(bad):
    with pytest.raises(InvalidInput):
        signing.signature_der(bad)


@settings(max_examples=25, deadline=None)
@given(position=st.integers(min_value=0, max_value=70), value=st.integers(min_value=0, max_value=255),
       extra=st.binary(max_size=2))
def test_whatever_the_backend_accepts_the_meter_accepts(position, value, extra):
    # A mutated signature (one byte changed, bytes appended): if the backend's check passes,
    # the meter's (mbedtls rules, in the port) must pass too, or a release would be rolled out
    # that every meter refuses.
    good = VECTORS["good"]
    der = bytearray(base64.b64decode(good["signature"]))
    der[position % len(der)] = value
    der = bytes(der) + extra
    text = base64.b64encode(der).decode()
    try:
        backend = signing.signature_valid(point=TEST_PUBLIC_KEY, version=good["version"], sha256_hex=good["sha256"],
                                          signature_b64=text)
    except InvalidInput:
        backend = False
    meter = ecdsa_p256_verify(TEST_PUBLIC_KEY, ota_manifest(good["version"], good["sha256"]), der)
    assert not backend or meter
