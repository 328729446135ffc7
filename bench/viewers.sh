#!/usr/bin/env bash
# Viewer capacity benchmark of issue 7: the most LL-HLS viewers one livepop edge holds with p99
# part latency under 1 s and no stalls, and the same against nginx and Varnish in front of the
# same core, all measured with livepop-loadtest. Installs nginx and Varnish if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peer-deps.sh
cargo build --release --locked -p livepop-loadtest
cargo bench --bench viewers -- --start "${START:-250}" --max "${MAX:-8000}" \
  --ramp "${RAMP:-10}" --secs "${SECS:-30}"
