#!/usr/bin/env bash
# Make sure the host tools the boot tests (test/boot/) need are installed.
#
# As root: installs whatever is missing with apt-get (Debian/Ubuntu hosts).
# Not root: prints what is missing and how to install it, and exits 1.
# Exits 0 when everything is present. Quiet when nothing needs doing.
#
# MKOVERLAY_BOOT_ARCH=arm64 (`make test-boot ARCH=arm64` passes it on through vitest): also
# qemu-system-aarch64 (the VM), qemu-user-static + binfmt-support (debootstrap's second stage
# and the chroot steps of build-base.sh run arm64 binaries), and, as root, a mounted
# binfmt_misc with the qemu-aarch64 handler enabled (not persistent: redone on every run).
set -euo pipefail
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
BOOT_ARCH="${MKOVERLAY_BOOT_ARCH:-amd64}"
case "$BOOT_ARCH" in
  amd64 | arm64) ;;
  *) echo "ensure-deps: unsupported MKOVERLAY_BOOT_ARCH=$BOOT_ARCH (amd64 or arm64)" >&2; exit 1 ;;
esac

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
  [sfdisk]=fdisk                       # the partitioned (Raspberry Pi OS-shaped) disk
  [mkfs.vfat]=dosfstools               # its FAT boot partition
  [mcopy]=mtools                       # cmdline.txt on it
)
if [ "$BOOT_ARCH" = arm64 ]; then
  NEED[qemu-system-aarch64]=qemu-system-arm  # the arm64 VM (-M virt -cpu cortex-a72, TCG)
  NEED[qemu-aarch64-static]=qemu-user-static # arm64 binaries in the chroot (binfmt_misc, F flag)
  NEED[update-binfmts]=binfmt-support        # registers qemu-user-static's handlers
fi
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

BINFMT=/proc/sys/fs/binfmt_misc
# arm64 on a non-arm64 host: the kernel must hand arm64 ELF binaries to qemu-aarch64-static.
binfmt_ok() {
  [ "$BOOT_ARCH" = arm64 ] || return 0
  [ "$(dpkg --print-architecture 2>/dev/null)" != arm64 ] || return 0
  grep -qsx enabled "$BINFMT/qemu-aarch64" && grep -qsx enabled "$BINFMT/status"
}
ensure_binfmt() {
  binfmt_ok && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-deps: arm64 binaries cannot run here (binfmt_misc handler qemu-aarch64 missing or disabled)" >&2
    echo "ensure-deps: as root: mount -t binfmt_misc binfmt_misc $BINFMT; update-binfmts --enable qemu-aarch64" >&2
    return 1
  fi
  if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
      || { echo "ensure-deps: cannot mount binfmt_misc on $BINFMT (container without the privilege?)" >&2; return 1; }
  fi
  if ! grep -qsx enabled "$BINFMT/status"; then echo 1 >"$BINFMT/status"; fi
  if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  fi
  if [ -e "$BINFMT/qemu-aarch64" ] && ! grep -qx enabled "$BINFMT/qemu-aarch64"; then echo 1 >"$BINFMT/qemu-aarch64"; fi
  binfmt_ok || { echo "ensure-deps: could not enable the qemu-aarch64 binfmt_misc handler (see $BINFMT)" >&2; return 1; }
  echo "ensure-deps: enabled binfmt_misc handler qemu-aarch64 ($(sed -n 's/^interpreter //p' "$BINFMT/qemu-aarch64"))" >&2
}

if [ "${#missing[@]}" -eq 0 ]; then
  ensure_binfmt
  exit $?
fi
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
ensure_binfmt
