#!/usr/bin/env bash
# Edge cache benchmark of issue 4: livepop's edge against nginx (proxy_cache + proxy_cache_lock)
# and Varnish, each caching the same core origin, in one run: cached-hit throughput for a part
# (~20 KB) and a media playlist (~1.8 KB), and coalesced fan-out to N = 1,000 and 10,000 blocked
# viewers with the core's origin requests per part (from its access log). Installs nginx and
# Varnish if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peer-deps.sh
cargo bench --bench edge_cache -- \
  --conns "${CONNS:-64}" --secs "${SECS:-10}" --parts "${PARTS:-20}" --fanout "${FANOUT:-1000,10000}"
