#!/usr/bin/env bash
# The relay on an impaired path against nginx-rtmp (issue 13): network namespaces joined by a
# user-space delay line (bench/netdelay.py), iptables random loss both ways; livepop's QUIC relay
# and nginx-rtmp's TCP push over the same path. Needs root. Table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in iptables ethtool libnginx-mod-rtmp ffmpeg curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  $SUDO systemctl disable --now nginx 2>/dev/null || true
fi
cargo build --release --workspace
SVG="${SVG:-docs/relay-netns.svg}" JSON="${JSON:-}" python3 bench/relay_netns.py
