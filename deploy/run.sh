#!/usr/bin/env bash
# The run command: installs what is missing (Debian packages, the player page's hls.js from
# npm), builds, and runs `livepop demo --source testsrc`: a core and an edge in one process,
# publishing a test pattern. Open the printed player URL in a browser.
# Extra arguments go to `livepop demo` (see `livepop demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
install_web --omit=dev

cargo build --release --locked
exec target/release/livepop demo --source testsrc "$@"
