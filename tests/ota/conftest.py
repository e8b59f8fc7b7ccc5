"""Fixtures of the firmware-update tests: the test release key (firmware/test/keys/), images
signed with it by the project's own signing script, OTA settings, and provisioned meters."""

import importlib.util
import json
from pathlib import Path

import pytest

from meters import services
from meters.ota import services as ota

ROOT = Path(__file__).resolve().parents[2]
KEYS = ROOT / "firmware/test/keys"
TEST_KEY_PEM = KEYS / "test_ota_key.pem"
TEST_PUBLIC_KEY_HEX = json.loads((KEYS / "test_ota_vectors.json").read_text())["publicKey"]
TEST_PUBLIC_KEY = bytes.fromhex(TEST_PUBLIC_KEY_HEX)


def _load_sign_firmware():
    spec = importlib.util.spec_from_file_location("sign_firmware", ROOT / "firmware/tools/sign_firmware.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sign_firmware = _load_sign_firmware()


def image_for(version: str, size: int = 4096) -> bytes:
    """A stand-in image: its own bytes per version (the meter only hashes and signs it)."""
    line = f"meter image {version}\n".encode()
    return (line * (size // len(line) + 1))[:size]


def signed(version: str, image: bytes | None = None) -> tuple[bytes, dict]:
    """(image, {version, sha256, signature}) as `sign_firmware.py sign` prints it (openssl)."""
    image = image if image is not None else image_for(version)
    return image, sign_firmware.sign(TEST_KEY_PEM, version, image)


@pytest.fixture
def ota_settings(settings):
    settings.OTA_PUBLIC_KEY = TEST_PUBLIC_KEY_HEX
    settings.OTA_ALLOW_HTTP = True
    settings.OTA_IMAGE_BASE_URL = "http://testserver"
    settings.OTA_PAUSE_FAILURE_PERCENT = 20
    settings.OTA_SILENCE_TIMEOUT_S = 1800
    settings.OTA_MAX_IN_FLIGHT = 50
    return settings


@pytest.fixture(autouse=True)
def dispatched_commands(monkeypatch) -> list[int]:
    """Command ids handed to the outbox dispatchers after commit, recorded instead of sent to
    the shared Redis (the end-to-end test puts the real publisher back)."""
    from meters import outbox

    recorded: list[int] = []
    monkeypatch.setattr(outbox, "_command_dispatchers", [recorded.extend])
    return recorded


@pytest.fixture
def release(db, ota_settings):
    image, sig = signed("1.1.0")
    return ota.release_create(version="1.1.0", image=image, signature=sig["signature"], actor="sam")


@pytest.fixture
def fleet(db, tariff):
    """Ten meters F00-F09, online, on the simulator's firmware."""
    meters = [services.meter_provision(meter_no=f"F{i:02d}", owner=None, tariff=tariff) for i in range(10)]
    from meters.models import Meter

    Meter.objects.filter(id__in=[m.pk for m in meters]).update(online=True, firmware="1.0.0", ota_state="idle")
    return [m.meter_no for m in meters]

