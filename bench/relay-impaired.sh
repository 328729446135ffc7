#!/usr/bin/env bash
# Relay on impaired paths (issue 13): one 4 Mbit/s stream through the user-space UDP impairment
# proxy at RTT 20/50/150 ms and 0/0.5/1/2/5 % loss each way, with BBR (the default) and then
# Cubic for comparison. Tables on stdout, plots in docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-20}"
cargo bench --bench relay_impaired -- --secs "$SECS" --svg docs/relay-impaired.svg
if [ "${CUBIC:-1}" = 1 ]; then
  cargo bench --bench relay_impaired -- --secs "$SECS" --congestion cubic --rtts 50 \
    --svg docs/relay-impaired-cubic.svg
fi
