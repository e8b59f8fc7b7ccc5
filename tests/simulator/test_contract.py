"""The firmware core (C++, host build) and the Python simulator must emit the same payloads and
keep the same local balance for the same input trace (firmware/trace/README.md), and on the
committed traces both must produce the reviewed golden output (trace/NAME.expected)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.sim.meter_core import ecdsa_p256_verify, ota_manifest

ROOT = Path(__file__).resolve().parents[2]
TRACES = sorted((ROOT / "firmware" / "trace").glob("*.jsonl"))
RUNNER = ROOT / "firmware" / "build" / "trace_runner"


@pytest.fixture(scope="module")
def cpp_runner():
    # Incremental: a no-op when firmware/build is up to date.
    proc = subprocess.run(
        ["bash", str(ROOT / "firmware" / "host-test.sh"), "--build-only"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return RUNNER


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    for line in lines:
        if "payload" in line:
            line["payload"] = json.loads(line["payload"])
    return lines


def _both(cpp_runner, trace: Path):
    cpp = _run([str(cpp_runner), str(trace)])
    py = _run([sys.executable, "-m", "devtools.sim.trace_runner", str(trace)])
    return cpp, py


def _assert_same(cpp, py):
    assert len(cpp) == len(py), f"{len(cpp)} lines from the firmware, {len(py)} from the simulator"
    for i, (a, b) in enumerate(zip(cpp, py, strict=True)):
        assert a == b, f"line {i} differs"
    assert cpp[-1]["event"] == "final"


def test_there_are_traces():
    names = {t.stem for t in TRACES}
    assert {"seed_and_reconcile", "offline_wrap_reboot", "power_cut_after_report", "state_wiped", "board_replaced",
            "sensor_reset", "reboot_between_reports", "outbox_long_outage", "ota_update_and_rollback",
            "ota_power_cut", "boot_loop_safe_mode"} <= names
    goldens = {p.stem for p in (ROOT / "firmware" / "trace").glob("*.expected")}
    assert goldens == names, "every trace has a golden file and every golden file a trace"


def _golden(trace: Path):
    lines = []
    for text in trace.with_suffix(".expected").read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        if "payload" in line:
            line["payload"] = json.loads(line["payload"])
        lines.append(line)
    return lines


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_firmware_and_simulator_agree(cpp_runner, trace):
    cpp, py = _both(cpp_runner, trace)
    _assert_same(cpp, py)
    _assert_same(_golden(trace), py)


def test_seed_trace_reproduces_the_seed_report(cpp_runner):
    cpp, _ = _both(cpp_runner, ROOT / "firmware" / "trace" / "seed_and_reconcile.jsonl")
    reports = [m["payload"] for m in cpp if m.get("topic", "").endswith("/consumption")]
    seed = {"meterNo": "METER001", "unitsConsumed": 0.0048, "remainingBalance": 10.4952,
            "totalConsumed": 0.0048, "timestamp": 1698765432000}
    assert {k: reports[0][k] for k in seed} == seed
    # Reconciliation: ledger at 20.5 up to energyTotal 0.0048, meter at 0.2548 -> 20.25.
    acks = [m["payload"] for m in cpp if m.get("topic", "").endswith("/balance")]
    assert {"balance": 20.25, "cmdId": "pay-0001"}.items() <= acks[1].items()
    seqs = [r["seq"] for r in reports]
    assert seqs == sorted(set(seqs)), "seq must strictly increase, across the reboot too"


# Payloads on which a lenient parser and a strict one would disagree.
TRICKY = [
    '{"balance": 01, "timestamp": 1}', '{"balance": 1., "timestamp": 1}', '{"balance": -0, "timestamp": 1}',
    '{"balance": 1e400}', '{"balance": true}', '{"balance": null}', '{"balance": [1]}', '{"balance": "1"}',
    '{"balance": 2, "balance": 3}', '{"bal\\u0000ance": 4}', '{"balance": 5, "cmdId": "a\\u0000b"}',
    '{"balance": 6, "cmdId": "\\ud800"}', '{"balance": 6.5, "cmdId": "\\ud83d\\ude00"}',
    '{"balance": 7}\x01', '{"balance": 7} {}', ' \t{"balance": 8}\r\n', '{"balance": NaN}',
    '{"balance": Infinity}', '{"balance": 1.' + "0" * 70 + "1}", '{"balance": 9, "x": ' + "[" * 70 + "]" * 70 + "}",
    '{"balance": 10, "x": ' + "[" * 60 + "]" * 60 + "}", '{"balance": 11, "energyTotal": 1e12}',
    '{"balance": 11, "energyTotal": 1000000000001}', '{"balance": -1000000000, "energyTotal": 0}',
    '{"balance": 12, "cmdId": "' + "é" * 32 + '"}', '{"balance": 12, "cmdId": "' + "é" * 33 + '"}',
    '{"balance": 13, "energyTotal": -0.0}', "[]", "", "{", '"balance"', '{"state": "on\\u0000x"}',
    '{"state": "off", "cmdId": 5}', '{"state": "AUTO"}', '{"balance": 14, "timestamp": 1' + "0" * 80 + "}",
]


VECTORS = json.loads((ROOT / "firmware" / "test" / "keys" / "test_ota_vectors.json").read_text())
OTA_IMAGES = {f"https://fw.example/{name}.bin": {"text": VECTORS["images"][name]["text"],
                                                   "crashes": name == "crashes", "invalid": name == "invalid"}
              for name in ("good", "crashes", "invalid", "silent")}


def _random_ota_command(rng: random.Random) -> dict:
    name = rng.choice(["good", "crashes", "invalid", "silent", "forged"])
    v = VECTORS["images"][name]
    payload = {"url": f"https://fw.example/{'good' if name == 'forged' else name}.bin", "version": v["version"],
               "sha256": v["sha256"], "signature": v["signature"], "cmdId": f"ota-{rng.randint(0, 99)}"}
    if rng.random() < 0.15:
        payload[rng.choice(["url", "sha256", "signature", "version"])] = rng.choice(["", "http://x/y", "zz", 5])
    return {"op": "ota_cmd", "payload": payload}


def _random_trace(rng: random.Random) -> list:
    steps = [{
        "op": "config", "meterNo": rng.choice(["METER001", "m-7", "KE_0001"]),
        "startMillis": rng.choice([0, 2**32 - 5000, 2**32 - 40000]),
        "reportIntervalMs": rng.choice([5000, 10000, 30000]), "statusIntervalMs": rng.choice([0, 20000]),
        "persistIntervalMs": rng.choice([10000, 60000]), "sensorFailTimeoutMs": rng.choice([3000, 8000]),
        "seqBlock": rng.choice([1, 2, 64]), "replayBatch": rng.choice([1, 3, 20]),
        "bufferCapacity": rng.choice([2, 5, 16]), "lowBalanceThreshold": rng.choice([0, 1.0, 2.5]),
        "rngSeed": rng.randint(1, 2**32 - 1), "ratedMaxKw": rng.choice([18.4, 100, 1e6]),
        "bootGapMs": rng.choice([0, 60000, 120000]), "maxInflight": rng.choice([1, 3, 8]),
        "maxOutboxBytes": rng.choice([300, 4096]), "outboxExpiryMs": rng.choice([5000, 30000]),
        "reportDeleted": rng.random() < 0.3, "msgIdSeed": rng.choice([0, 0, rng.randint(1, 2**32 - 1)]),
        "otaPublicKey": VECTORS["publicKey"], "otaImages": OTA_IMAGES, "otaFetchMs": rng.choice([1000, 5000]),
        "otaConfirmTimeoutMs": rng.choice([20000, 120000]), "maxFastBoots": rng.choice([1, 2, 5]),
        "stableAfterMs": rng.choice([10000, 60000]), "safeModeMs": rng.choice([20000, 100000]),
    }]
    register = rng.uniform(0, 5000)
    for _ in range(rng.randint(20, 60)):
        kind = rng.random()
        if kind < 0.3:
            register += rng.choice([0, 0.001, 0.0048, 0.013, 0.25, 1 / 3, -0.5])
            steps.append({"op": "energy", "kwh": round(register, 3) if rng.random() < 0.7 else register})
        elif kind < 0.55:
            steps.append({"op": "advance", "ms": rng.choice([500, 1000, 2500, 7000, 31000, 65000])})
        elif kind < 0.65:
            payload = {"balance": round(rng.uniform(-2, 30), rng.choice([0, 2, 6])), "timestamp": 1698765432000}
            if rng.random() < 0.6:
                payload["energyTotal"] = round(rng.uniform(0, 3), 4)
            if rng.random() < 0.5:
                payload["regId"] = rng.choice(["$regId", "$regId", "OtherHist", "x"])
            if rng.random() < 0.7:
                payload["cmdId"] = f"c-{rng.randint(0, 999)}"
            steps.append({"op": "balance_cmd", "payload": payload})
        elif kind < 0.7:
            steps.append({"op": rng.choice(["balance_cmd", "relay_cmd"]), "payload": rng.choice(TRICKY)})
        elif kind < 0.75:
            steps.append({"op": "relay_cmd", "payload": {"state": rng.choice(["on", "off", "auto"]),
                                                         "cmdId": f"r-{rng.randint(0, 99)}"}})
        elif kind < 0.79:
            steps.append({"op": rng.choice(["connect", "disconnect"])})
        elif kind < 0.82:
            steps.append({"op": rng.choice(["acks", "blackhole"]), "on": rng.random() < 0.5})
        elif kind < 0.86:
            steps.append({"op": "sensor_fail"})
        elif kind < 0.9:
            steps.append({"op": "time_sync", "unixMs": 1698765400000 + rng.randint(0, 10**6)})
        elif kind < 0.93:
            steps.append({"op": "rssi", "dbm": rng.randint(-95, -40)})
        elif kind < 0.94:
            steps.append({"op": "reboot", "reason": rng.choice(["poweron", "brownout", "task_wdt", "panic"]),
                          "startMillis": rng.choice([0, 2**32 - 3000])})
        elif kind < 0.95:
            steps += [{"op": "reboot", "reason": "panic"}] * rng.randint(2, 6)  # a boot loop
        elif kind < 0.97:
            steps += [_random_ota_command(rng), {"op": "advance", "ms": rng.choice([3000, 9000])},
                      {"op": "connect"}, {"op": "advance", "ms": rng.choice([12000, 31000])}]
        else:
            steps.append({"op": rng.choice(["wipe_nvs", "corrupt_state", "wipe_ring", "swap_board"])})
    return steps


@pytest.mark.parametrize("seed", range(40))
def test_random_traces_agree(cpp_runner, tmp_path, seed):
    trace = tmp_path / f"random-{seed}.jsonl"
    trace.write_text("\n".join(json.dumps(s) for s in _random_trace(random.Random(seed))) + "\n")
    cpp, py = _both(cpp_runner, trace)
    _assert_same(cpp, py)


def test_the_comparison_can_fail(cpp_runner, tmp_path):
    """The runners are not trivially equal: a different command changes the output."""
    base = ROOT / "firmware" / "trace" / "seed_and_reconcile.jsonl"
    changed = tmp_path / "changed.jsonl"
    changed.write_text(base.read_text().replace('"balance": 20.5', '"balance": 20.4', 1))
    a, _ = _both(cpp_runner, base)
    b, _ = _both(cpp_runner, changed)
    assert a != b


def test_the_python_ecdsa_agrees_with_the_vectors_and_openssl():
    """The simulator's pure-Python P-256 check accepts what the test key signed and nothing else
    (the vectors were signed by openssl; the firmware's mbedtls check runs on them in doctest)."""
    key = bytes.fromhex(VECTORS["publicKey"])
    for name, v in VECTORS["images"].items():
        sig = __import__("base64").b64decode(v["signature"])
        ok = ecdsa_p256_verify(key, ota_manifest(v["version"], v["sha256"]), sig)
        assert ok == (name != "forged"), name
        assert not ecdsa_p256_verify(key, ota_manifest(v["version"] + "x", v["sha256"]), sig)
        assert not ecdsa_p256_verify(key, ota_manifest(v["version"], v["sha256"]), sig + b"\x00")
