"""The firmware image carries no meter identity: the example configuration defines none, the glue
refuses to build with one, and an image built with the development identity is never signed."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
TEST_KEY = FIRMWARE / "test" / "keys" / "test_ota_key.pem"


def _sign_firmware():
    spec = importlib.util.spec_from_file_location("sign_firmware", FIRMWARE / "tools" / "sign_firmware.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sign_firmware = _sign_firmware()
IDENTITY_MACROS = ("METER_NO", "MQTT_USERNAME", "MQTT_PASSWORD", "MQTT_URI")


def test_the_example_configuration_defines_no_meter_identity():
    text = (FIRMWARE / "esp32" / "include" / "meter_config.example.h").read_text()
    defined = re.findall(r"^\s*#\s*define\s+(\w+)", text, flags=re.MULTILINE)
    assert [m for m in defined if m in IDENTITY_MACROS] == []
    assert "DEV_METER_NO" in defined  # the bench identity is there, under its own names


def test_the_glue_refuses_a_configuration_with_a_meter_identity():
    glue = (FIRMWARE / "esp32" / "src" / "main.cpp").read_text()
    guard = re.search(r"#if (defined\(\w+\)(?: \|\| defined\(\w+\))*)\n#error", glue)
    assert guard, "no #error for an identity in meter_config.h"
    assert sorted(re.findall(r"defined\((\w+)\)", guard.group(1))) == sorted(IDENTITY_MACROS)
    # and nothing uses them any more
    code = glue[glue.index("#endif", guard.end()):]
    for macro in IDENTITY_MACROS:
        assert not re.search(rf"\b{macro}\b", code), macro


def test_the_development_marker_is_the_one_the_signing_tool_looks_for():
    glue = (FIRMWARE / "esp32" / "src" / "main.cpp").read_text()
    m = re.search(r'const char kDevImageMarker\[\] = "([^"]+)";', glue)
    assert m and m.group(1).encode() == sign_firmware.DEV_IMAGE_MARKER
    # only inside the METER_DEV_IDENTITY branch
    before = glue[: m.start()]
    assert before.rfind("#if METER_DEV_IDENTITY") > before.rfind("#endif")


def test_an_image_with_the_development_identity_is_not_signed(tmp_path):
    image = tmp_path / "firmware.bin"
    image.write_bytes(b"\xe9" + b"\0" * 100 + sign_firmware.DEV_IMAGE_MARKER + b"\0DEV001\0" + b"\xff" * 100)
    with pytest.raises(ValueError, match="METER_DEV_IDENTITY"):
        sign_firmware.sign(TEST_KEY, "1.1.0", image.read_bytes())
    proc = subprocess.run([sys.executable, str(FIRMWARE / "tools" / "sign_firmware.py"), "sign", "--key", str(TEST_KEY),
                           "--version", "1.1.0", str(image)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "not signed" in proc.stderr

    clean = tmp_path / "release.bin"
    clean.write_bytes(b"\xe9" + b"\0" * 100 + b"meter image 1.1.0\n")
    proc = subprocess.run([sys.executable, str(FIRMWARE / "tools" / "sign_firmware.py"), "sign", "--key", str(TEST_KEY),
                           "--version", "1.1.0", str(clean)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"signature"' in proc.stdout
