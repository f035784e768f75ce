#!/usr/bin/env bash
# Make sure the host tools the boot tests (test/boot/) need are installed.
#
# As root: installs whatever is missing with apt-get (Debian/Ubuntu hosts).
# Not root: prints what is missing and how to install it, and exits 1.
# Exits 0 when everything is present. Quiet when nothing needs doing.
set -euo pipefail
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# command -> Debian package providing it
declare -A NEED=(
  [qemu-system-x86_64]=qemu-system-x86 # the VM (TCG; KVM is not needed)
  [debootstrap]=debootstrap            # base image
  [mke2fs]=e2fsprogs                   # base image (mke2fs -d)
  [debugfs]=e2fsprogs                  # laying the overlay into the image
  [e2fsck]=e2fsprogs                   # checking the image after that
  [socat]=socat                        # qemu guestfwd -> host bastion port
  [sshd]=openssh-server                # throwaway bastion on 127.0.0.1
  [ssh]=openssh-client                 # operator login through the tunnel
  [ssh-keygen]=openssh-client
  [tar]=tar
  [sha256sum]=coreutils
  [flock]=util-linux                   # one base-image build at a time
  [ps]=procps                          # PID guardian for qemu/sshd
)
# files -> package
declare -A NEED_FILES=(
  [/usr/share/keyrings/debian-archive-keyring.gpg]=debian-archive-keyring # debootstrap verification
  [/etc/pam.d/sshd]=openssh-server
)

missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
for f in "${!NEED_FILES[@]}"; do
  [ -e "$f" ] || missing+=("${NEED_FILES[$f]}")
done
# debootstrap downloads with wget (or curl)
if ! command -v wget >/dev/null 2>&1 && ! command -v curl >/dev/null 2>&1; then
  missing+=(wget)
fi

[ "${#missing[@]}" -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-deps: missing packages: ${missing[*]}" >&2
  echo "ensure-deps: install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "ensure-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp /tmp/mkoverlay-ensure-deps.XXXXXX.log)"
# Refresh package lists when they are absent or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]; then
  apt-get update >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "ensure-deps: apt-get update failed (log: $log)" >&2; exit 1; }
fi
if ! apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "ensure-deps: apt-get install failed (log: $log)" >&2
  exit 1
fi
rm -f "$log"
echo "ensure-deps: installed ${missing[*]}" >&2
