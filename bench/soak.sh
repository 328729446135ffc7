#!/usr/bin/env bash
# Soak benchmark of issue 12: 10 minutes of two ffmpeg publishers, 1,000 LL-HLS viewers
# (livepop-loadtest) and the attacks of tests/attack.rs in loops against one edge and its core,
# with the RSS of both sampled every 10 s. Writes target/soak/rss.csv, rss.svg (copied to
# docs/soak-rss.svg), viewers.json and viewers.svg. Arguments go to the benchmark:
# --viewers N --secs S --sample S --warmup S --ramp S --kbps N.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/install-deps.sh
# 1,000 viewers and the attack sockets need more descriptors than the usual 1,024; the edge
# inherits this limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -p livepop-loadtest
cargo bench --bench soak -- "$@"
cp target/soak/rss.svg docs/soak-rss.svg
