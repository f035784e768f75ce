#!/usr/bin/env bash
# Make sure the host tools the boot test needs are installed.
#
# As root: installs whatever is missing with apt-get (Debian/Ubuntu hosts).
# Not root: prints what is missing and exits 1.
# Exit 0 when everything is present.
set -euo pipefail

# command -> Debian package providing it
declare -A NEED=(
  [qemu-system-x86_64]=qemu-system-x86
  [debootstrap]=debootstrap
  [mke2fs]=e2fsprogs
  [debugfs]=e2fsprogs
  [socat]=socat
  [sshd]=openssh-server
  [ssh]=openssh-client
  [ssh-keygen]=openssh-client
  [tar]=tar
  [sha256sum]=coreutils
  [zstd]=zstd
)
# debootstrap needs a downloader and gpg keyring.
NEED_FILES=(
  "/usr/share/keyrings/debian-archive-keyring.gpg:debian-archive-keyring"
)

missing=()
PATH="$PATH:/usr/sbin:/sbin"
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
for spec in "${NEED_FILES[@]}"; do
  [ -e "${spec%%:*}" ] || missing+=("${spec##*:}")
done
if ! command -v wget >/dev/null 2>&1 && ! command -v curl >/dev/null 2>&1; then
  missing+=(wget)
fi

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
# de-duplicate
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-deps: missing packages: ${missing[*]}" >&2
  echo "ensure-deps: install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "ensure-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Refresh package lists when they are absent or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]; then
  apt-get update -qq >&2
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
# sshd is used as a throwaway bastion started by the tests, not as a system service.
exit 0
