#!/usr/bin/env bash
# Transcoding benchmark of issue 5: the livepop ladder vs the ffmpeg CLI on the same file, and
# the live frame-arrival-to-part delay per rendition.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
cargo bench --bench transcode -- --preset "${PRESET:-veryfast}" --secs "${SECS:-20}"
