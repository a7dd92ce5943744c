#!/usr/bin/env bash
# Installs what tests/scale_out.rs runs duet's replicas with: Redis and nginx, from Debian's
# packages. Neither is started as a service: the tests start their own on free ports.
set -euo pipefail
missing=()
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing ${missing[*]} (Debian packages)..." >&2
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
# Packages must not start their services on install: the tests run their own.
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
  { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
