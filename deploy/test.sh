#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, runs every test, then
# runs every fuzz target for a fixed short time (LIVEPOP_FUZZ_SECS seconds each, default 60; 0
# skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
LIVEPOP_TEST_DEPS=1 source deploy/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
install_web
FUZZ_SECS=${LIVEPOP_FUZZ_SECS:-60}
if ((FUZZ_SECS > 0)); then install_cargo_fuzz; fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The binaries end-to-end tests run, livepop-loadtest included (tests only build their own
# package's binaries).
cargo build --workspace --locked
tests=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast || tests=$?
else
  cargo test --workspace --locked --no-fail-fast || tests=$?
fi

# The fuzz targets (issue 14), also when a test failed (as --no-fail-fast): on the machine's
# default toolchain, stable, so without a sanitizer (ASan needs nightly; the longer nightly + ASan
# runs are fuzz/run.sh's default, for docs/benchmarks.md). A separate release build in
# fuzz/target (about 5-7 minutes cold on 2 cores), then FUZZ_SECS per target on a 2 MiB stack;
# fails if a target panics, aborts, overflows its stack or runs out of memory. Logs and the exec
# counts table in fuzz/artifacts/logs/, crashing inputs in fuzz/artifacts/<target>/.
fuzz=0
if ((FUZZ_SECS > 0)); then
  SECS=$FUZZ_SECS SANITIZER=none bash fuzz/run.sh || fuzz=$?
fi

if ((tests != 0)); then
  echo "error: tests failed (exit $tests)" >&2
  exit "$tests"
fi
if ((fuzz != 0)); then
  echo "error: fuzzing failed (exit $fuzz); see fuzz/artifacts/logs/" >&2
  exit "$fuzz"
fi
