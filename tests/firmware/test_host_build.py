"""Runs the firmware's host test suite (CMake + doctest + ctest, ASan/UBSan) from pytest, and
checks that ctest really covers every doctest case."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "firmware" / "build"


def test_firmware_host_tests_pass_under_sanitizers():
    proc = subprocess.run(["bash", str(ROOT / "firmware" / "host-test.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "100% tests passed" in proc.stdout


def _ctest_names():
    proc = subprocess.run(["ctest", "-N"], cwd=BUILD, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # "  Test  #12: name of the case"
    return [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.strip().startswith("Test") and ": " in line]


def test_every_doctest_case_is_one_ctest_entry_and_the_whole_binary_is_another():
    build = subprocess.run(["bash", str(ROOT / "firmware" / "host-test.sh"), "--build-only"], capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    listed = subprocess.run([str(BUILD / "meter_tests"), "--list-test-cases", "--no-version"], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    cases = [line for line in listed.stdout.splitlines() if line and not line.startswith("[doctest]")
             and not line.startswith("=====")]
    assert len(cases) > 50
    names = _ctest_names()
    # A ';' in a case name makes doctest_discover_tests split it into entries that select no case.
    assert [c for c in cases if ";" in c] == []
    assert sorted(n for n in names if not n.startswith("trace_") and n != "meter_tests_all") == sorted(cases)
    assert "meter_tests_all" in names
    traces = sorted(p.stem for p in (ROOT / "firmware" / "trace").glob("*.jsonl"))
    assert sorted(n.removeprefix("trace_") for n in names if n.startswith("trace_")) == traces
