#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
LIVEPOP_TEST_DEPS=1 source deploy/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
install_web

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The binaries end-to-end tests run, livepop-loadtest included (tests only build their own
# package's binaries).
cargo build --workspace --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
