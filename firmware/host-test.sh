#!/usr/bin/env bash
# Builds the portable firmware core, its doctest suite and the trace runner on this machine
# (g++, CMake, AddressSanitizer + UBSan) and runs them through ctest.
#   bash firmware/host-test.sh               configure, build, run ctest
#   bash firmware/host-test.sh --build-only  configure and build (used by the contract test)
# Build output goes to firmware/build/ (git-ignored); the log of the build is build/build.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="$here/build"

missing=()
for pkg in doctest-dev libcjson-dev libmbedtls-dev cmake g++; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mkdir -p "$build"
if ! { cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Debug && cmake --build "$build" -j 2; } >"$build/build.log" 2>&1; then
  tail -n 40 "$build/build.log" >&2
  echo "firmware host build failed (full log: $build/build.log)" >&2
  exit 1
fi

if [ "${1:-}" = "--build-only" ]; then
  exit 0
fi
cd "$build"
ctest --output-on-failure -j 2
