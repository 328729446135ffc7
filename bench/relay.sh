#!/usr/bin/env bash
# Relay benchmark of issue 2: N = 10 and 50 publishers at 4 Mbit/s for 30 s, loopback.
# Prints a table row per run for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for n in 10 50; do
  cargo bench --bench relay -- --publishers "$n" --secs "${SECS:-30}"
done
