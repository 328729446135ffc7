#!/usr/bin/env bash
# Installs what livepop needs to build and test on Debian 12, skipping what is present.
# Used by deploy/run.sh and deploy/test.sh; safe to run again.
set -euo pipefail

APT_PACKAGES=(
  ffmpeg                # the CLI: the demo's test source, and tests publish and probe with it
  fonts-dejavu-core     # the demo test source's burnt-in clock (ffmpeg drawtext)
  libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
  libswscale-dev libswresample-dev   # FFmpeg libraries for ffmpeg-next (transcoding)
  clang libclang-dev pkg-config      # bindgen for ffmpeg-sys
  cmake                              # zlib-ng, built by pingora's compression dependency
  build-essential ca-certificates curl
)

# Node.js and npm install the player page's hls.js (and the browser test's playwright-core);
# any Node.js 18 or newer will do, Debian's included.
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
# The test command also needs a browser: Debian's Chromium (tests/browser.rs).
if [ "${LIVEPOP_TEST_DEPS:-0}" = 1 ]; then
  APT_PACKAGES+=(chromium)
  APT_PACKAGES+=(iproute2) # ss: a unit test reads the listeners' backlog
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "error: no Rust toolchain. Install one with rustup (https://rustup.rs), Rust 1.85 or newer," >&2
    echo "       then run this command again. (Debian's own cargo package is too old.)" >&2
    exit 1
  fi
fi

# web/node_modules from web/package-lock.json: hls.js for the player page (compiled into the
# binary by build.rs), plus playwright-core for the browser test unless --omit=dev is given.
# Skipped when already installed from the current lock file, so cargo does not rebuild.
install_web() {
  local want=(web/node_modules/hls.js/dist/hls.min.js)
  [ "${1:-}" = "--omit=dev" ] || want+=(web/node_modules/playwright-core/package.json)
  local ok=1
  for f in "${want[@]}"; do [ -f "$f" ] || ok=0; done
  if [ ! -f web/node_modules/.package-lock.json ] ||
    [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then ok=0; fi
  if [ "$ok" = 0 ]; then
    echo "installing web/ packages (npm ci $*)"
    npm ci --prefix web --no-audit --no-fund "$@" >/dev/null
  fi
}

# cargo-fuzz for the test command's fuzz runs (fuzz/run.sh), built from crates.io with its own
# lock file. The version is the one fuzz/run.sh was checked with; any later one with
# `--sanitizer none` should do, so one already installed is kept.
CARGO_FUZZ_VERSION=0.13.2
install_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION (cargo install)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
  fi
}
