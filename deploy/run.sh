#!/usr/bin/env bash
# The run command: installs what is missing, builds, and runs a core and an edge with the
# example configs in edge-config/ (development certificates are created on first run).
# Publish with: ffmpeg -re -i INPUT -c:v libx264 -c:a aac -f flv rtmp://127.0.0.1:1935/live/demo-key
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked
BIN=target/release/livepop
"$BIN" dev-certs edge-config/dev-certs
"$BIN" check-config edge-config/core.toml
"$BIN" check-config edge-config/edge.toml

"$BIN" core --config edge-config/core.toml &
CORE=$!
trap 'kill $CORE 2>/dev/null || true' EXIT
cat <<MSG

  livepop is running (core and edge).
  Publish:  rtmp://127.0.0.1:1935/live/demo-key   (or rtmps://127.0.0.1:1936/live/demo-key)
  Play:     http://127.0.0.1:8080/live/demo/master.m3u8   (or https://localhost:8443/...)
  Metrics:  http://127.0.0.1:9090/metrics (edge), http://127.0.0.1:9091/metrics (core)
  Stop with Ctrl-C.

MSG
"$BIN" edge --config edge-config/edge.toml
