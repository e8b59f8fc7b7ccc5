"""Runs the firmware's host test suite (CMake + doctest + ctest, ASan/UBSan) from pytest."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_firmware_host_tests_pass_under_sanitizers():
    proc = subprocess.run(["bash", str(ROOT / "firmware" / "host-test.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "100% tests passed" in proc.stdout
