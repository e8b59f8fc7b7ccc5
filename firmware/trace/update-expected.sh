#!/usr/bin/env bash
# Rewrites every trace's golden file (trace/NAME.expected) from the C++ core's output.
# Run it after a deliberate change of behaviour, then read the diff: the golden files are what
# ctest and tests/simulator/test_contract.py hold both the C++ core and the Python port to.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/../host-test.sh" --build-only
for trace in "$here"/*.jsonl; do
  "$here/../build/trace_runner" "$trace" > "${trace%.jsonl}.expected"
done
git -C "$here" diff --stat -- '*.expected' || true
