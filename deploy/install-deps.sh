#!/usr/bin/env bash
# Installs what livepop needs to build and test on Debian 12, skipping what is present.
# Used by deploy/run.sh and deploy/test.sh; safe to run again.
set -euo pipefail

APT_PACKAGES=(
  ffmpeg                # the CLI: tests publish and probe with it
  libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
  libswscale-dev libswresample-dev   # FFmpeg libraries for ffmpeg-next (transcoding)
  clang libclang-dev pkg-config      # bindgen for ffmpeg-sys
  cmake                              # zlib-ng, built by pingora's compression dependency
  build-essential ca-certificates curl
)

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
