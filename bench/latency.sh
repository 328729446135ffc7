#!/usr/bin/env bash
# Player latency benchmark of issue 6: arrival at the edge → display in Chromium (hls.js), from
# PROGRAM-DATE-TIME, p50/p95 over SECS (default 60) at the demo defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
LIVEPOP_TEST_DEPS=1 source deploy/install-deps.sh
install_web
cargo bench --bench player_latency -- --secs "${SECS:-60}"
