#!/usr/bin/env bash
# Origin fan-out benchmark of issue 3: 10,000 blocked playlist requests on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench origin_fanout -- --clients "${CLIENTS:-10000}" --parts "${PARTS:-40}"
