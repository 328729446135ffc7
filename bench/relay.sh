#!/usr/bin/env bash
# Relay benchmark of issue 2: N = 10 and 50 publishers at 4 Mbit/s for 30 s, loopback, then the
# same publishers against nginx-rtmp (an edge nginx pushing to a core nginx) for the CPU ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg-query -W -f='${Status}' libnginx-mod-rtmp 2>/dev/null | grep -q "install ok installed"; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libnginx-mod-rtmp
  $SUDO systemctl disable --now nginx 2>/dev/null || true
fi
for n in 10 50; do
  cargo bench --bench relay -- --publishers "$n" --secs "${SECS:-30}" --peer-nginx
done
