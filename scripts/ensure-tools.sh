#!/usr/bin/env bash
# Installs the Debian packages that provide missing tools: ensure-tools.sh CMD:PACKAGE ...
# As root it runs apt-get; otherwise it says what to install and fails.
set -euo pipefail
missing=()
for pair in "$@"; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "missing test tools; install them with: sudo apt-get install ${pkgs[*]}" >&2
  exit 1
fi
echo "installing ${pkgs[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
