#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, postgres) are installed for the registry tests
# and prints their directory. As root it installs Debian's `postgresql` package, without the
# package's own "main" cluster (the tests start a throwaway server of their own); otherwise it
# says what to install and fails.
set -euo pipefail

find_bindir() {
  local d
  # Newest Debian/Ubuntu layout first, then whatever pg_config reports.
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4,4 -rn); do
    if [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  done
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  fi
  return 1
}

if find_bindir; then exit 0; fi

if [ "$(id -u)" -ne 0 ]; then
  echo "PostgreSQL server binaries (initdb, postgres) are missing; install them with: sudo apt-get install postgresql" >&2
  exit 1
fi

echo "installing postgresql from Debian's packages (no default cluster)" >&2
# postgresql-common reads createcluster.d: no "main" cluster is created or started on 5432.
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/50-mkoverlay-tests.conf
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
find_bindir || { echo "postgresql installed, but no initdb/postgres found under /usr/lib/postgresql/*/bin" >&2; exit 1; }
