#!/usr/bin/env bash
# Build (or reuse) the cached Debian bookworm base image (amd64 or arm64) for the boot tests.
#
# Output: a directory  $CACHE/base-<arch>-<recipe hash>/  holding
#   rootfs.ext4         raw ext4 image of the root filesystem (no partition table)
#   vmlinuz, initrd.img kernel and initramfs extracted from the image (boot with -kernel/-initrd)
#   cmdline             kernel command line to use
#   operator_ed25519    test-only operator key; its .pub is in the image's /root/.ssh/authorized_keys
#   operator_ed25519.pub
#   manifest            what was built, from which mirror, when, how long it took
# and prints that directory's path as the LAST line of stdout (all logging goes to stderr).
#
# CACHE = $MKOVERLAY_BOOT_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/mkoverlay-boot.
# The hash covers the architecture, this script and every file under test/boot/base/ (if any),
# so changing the recipe builds a new image; each architecture has its own image (and pruning
# only removes stale images of the same architecture). The build happens in a temporary
# directory that is renamed into place when complete (atomic); concurrent callers are
# serialised with flock.
#
# Env:
#   MKOVERLAY_BOOT_CACHE       cache dir (see above)
#   MKOVERLAY_DEBIAN_MIRROR    Debian mirror URL; default: read from this host's apt configuration
#   MKOVERLAY_BOOT_KEEP_OLD=1  keep base-<arch>-* directories of other recipe hashes (default: prune)
#   MKOVERLAY_BOOT_ARCH        guest architecture: amd64 (default) or arm64
#
# Needs root (debootstrap, chroot). Run test/boot/ensure-deps.sh first (with the same
# MKOVERLAY_BOOT_ARCH). arm64 on an amd64 host: debootstrap's second stage and the chroot steps
# run arm64 binaries through qemu-user-static, registered with binfmt_misc (fix-binary flag, so
# the interpreter need not exist inside the chroot); ensure-deps.sh sets that up.
set -euo pipefail
export LC_ALL=C
umask 022
PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SELF")"
SUITE=bookworm
ARCH="${MKOVERLAY_BOOT_ARCH:-amd64}"
IMAGE_SIZE=1536M

# Per-architecture parts of the recipe.
case "$ARCH" in
  amd64)
    KERNEL_PKG=linux-image-cloud-amd64
    CONSOLE=ttyS0,115200
    INITRAMFS_MODULES="virtio_pci virtio_blk virtio_net crc32c_generic ext4"
    ;;
  arm64)
    # qemu -M virt: PL011 UART (ttyAMA0), virtio devices on the generic PCIe host (virtio_pci);
    # virtio_mmio too, in case the VM is started with the -device variants of the devices.
    KERNEL_PKG=linux-image-cloud-arm64
    CONSOLE=ttyAMA0,115200
    INITRAMFS_MODULES="virtio_pci virtio_mmio virtio_blk virtio_net crc32c_generic ext4"
    ;;
  *)
    printf 'build-base: ERROR: unsupported MKOVERLAY_BOOT_ARCH=%s (amd64 or arm64)\n' "$ARCH" >&2
    exit 1
    ;;
esac

log() { printf 'build-base: %s\n' "$*" >&2; }
die() { printf 'build-base: ERROR: %s\n' "$*" >&2; exit 1; }

CACHE="${MKOVERLAY_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mkoverlay-boot}"

# ---- recipe hash -------------------------------------------------------------------------
recipe_hash() {
  {
    printf 'arch=%s suite=%s size=%s\n' "$ARCH" "$SUITE" "$IMAGE_SIZE"
    sha256sum "$SELF" | cut -d' ' -f1
    if [ -d "$HERE/base" ]; then
      (cd "$HERE/base" && find . -type f -print0 | sort -z | xargs -0r sha256sum)
    fi
  } | sha256sum | cut -c1-16
}
HASH="$(recipe_hash)"
OUT="$CACHE/base-$ARCH-$HASH"

is_complete() { [ -f "$1/manifest" ] && [ -f "$1/rootfs.ext4" ] && [ -f "$1/vmlinuz" ] && [ -f "$1/initrd.img" ]; }

if is_complete "$OUT"; then
  log "cached: $OUT"
  printf '%s\n' "$OUT"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building the base image needs root (debootstrap + chroot); cached image $OUT is missing"
for c in debootstrap mke2fs chroot ssh-keygen flock; do
  command -v "$c" >/dev/null 2>&1 || die "missing $c (run test/boot/ensure-deps.sh)"
done

# A foreign architecture needs the kernel to run its binaries via qemu-user-static (binfmt_misc).
HOST_ARCH="$(dpkg --print-architecture 2>/dev/null || true)"
if [ "$ARCH" != "$HOST_ARCH" ]; then
  case "$ARCH" in arm64) qarch=aarch64 ;; *) qarch="$ARCH" ;; esac
  entry=/proc/sys/fs/binfmt_misc/qemu-$qarch
  grep -qsx enabled "$entry" \
    || die "cannot run $ARCH binaries: binfmt_misc entry $entry missing or disabled (run MKOVERLAY_BOOT_ARCH=$ARCH test/boot/ensure-deps.sh as root; it needs qemu-user-static, binfmt-support and a mounted binfmt_misc)"
  grep -q '^flags:.*F' "$entry" \
    || die "binfmt_misc entry $entry lacks the fix-binary (F) flag: the qemu interpreter would have to exist inside the chroot (reinstall qemu-user-static, which registers with F)"
fi

mkdir -p "$CACHE"
LOCK="$CACHE/.build-$ARCH-$HASH.lock"
exec 9>"$LOCK"
log "waiting for build lock $LOCK"
flock 9
if is_complete "$OUT"; then # someone else built it while we waited
  log "cached: $OUT"
  printf '%s\n' "$OUT"
  exit 0
fi
# Leftovers of an interrupted build of this recipe (we hold its lock, so nobody is using them).
rm -rf "$CACHE/.tmp-$HASH".* "$OUT"

# ---- mirror: whatever this host's apt uses for Debian ------------------------------------
find_mirror() {
  if [ -n "${MKOVERLAY_DEBIAN_MIRROR:-}" ]; then
    printf '%s\n' "$MKOVERLAY_DEBIAN_MIRROR"; return 0
  fi
  local uri=""
  # 1. apt's own view (handles one-line and deb822 sources, and sources.list.d).
  if command -v apt-get >/dev/null 2>&1; then
    uri="$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' 2>/dev/null \
      | awk -v s="$SUITE" '$1 == s { print $2; exit }')"
    if [ -z "$uri" ]; then # host on another release: any plain Debian archive serves bookworm too
      uri="$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' 2>/dev/null \
        | awk '$1 !~ /security|updates|backports/ && $2 ~ /\/debian\/?$/ { print $2; exit }')"
    fi
  fi
  # 2. read the files directly (apt-get indextargets lists nothing before the first apt-get update
  #    on some setups).
  if [ -z "$uri" ]; then
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if ($i ~ /\/debian\/?$/) { print $i; exit } else break } }')"
  fi
  if [ -z "$uri" ]; then
    uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')"
  fi
  [ -n "$uri" ] || return 1
  printf '%s\n' "${uri%/}"
}
MIRROR="$(find_mirror)" || die "no Debian mirror found in /etc/apt/sources.list*; set MKOVERLAY_DEBIAN_MIRROR"
log "recipe $HASH, mirror $MIRROR"

# ---- build in a temp dir next to the final one ------------------------------------------
START=$(date +%s)
TMP="$(mktemp -d "$CACHE/.tmp-$HASH.XXXXXX")"
ROOT="$TMP/rootfs"
MOUNTED=()
unmount_all_under() { # deepest first; covers what debootstrap mounted too
  local m
  for m in $(awk -v r="$1/" 'index($2 "/", r) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}
cleanup() {
  local rc=$?
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTED[$i]}" 2>/dev/null || true; done
  unmount_all_under "$TMP"
  if [ "$rc" -ne 0 ]; then log "failed (rc=$rc); log: $TMP.log"; fi
  rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT
exec 3>&2 2> >(tee "$TMP.log" >&3) # keep a copy of the log next to the cache

PKGS=systemd-sysv,udev,dbus,openssh-server,openssh-client,iproute2,$KERNEL_PKG,initramfs-tools,kmod

log "debootstrap $SUITE ($ARCH) ..."
debootstrap --variant=minbase --arch="$ARCH" --include="$PKGS" \
  --exclude=libnss-systemd "$SUITE" "$ROOT" "$MIRROR" >&2 \
  || { tail -n 50 "$ROOT/debootstrap/debootstrap.log" >&2 2>/dev/null || true; die "debootstrap failed"; }

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C "$@"; }

# ---- initramfs with virtio drivers --------------------------------------------------------
mount -t proc proc "$ROOT/proc"; MOUNTED+=("$ROOT/proc")
mount -t sysfs sys "$ROOT/sys"; MOUNTED+=("$ROOT/sys")
read -r -a mods <<<"$INITRAMFS_MODULES"
printf '%s\n' "${mods[@]}" >>"$ROOT/etc/initramfs-tools/modules"
printf 'MODULES=list\nCOMPRESS=gzip\n' >"$ROOT/etc/initramfs-tools/conf.d/mkoverlay-boot.conf"
KVER="$(basename "$(ls -d "$ROOT"/lib/modules/* | sort -V | tail -n1)")"
log "update-initramfs for $KVER"
in_root update-initramfs -u -k "$KVER" >&2

# ---- system configuration -----------------------------------------------------------------
echo gateway >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tgateway\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' >"$ROOT/etc/fstab"
: >"$ROOT/etc/machine-id" # fresh machine id on first boot, as on a flashed device

mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/20-en.network" <<'EOF'
[Match]
Name=en*

[Network]
DHCP=yes
EOF
in_root systemctl enable systemd-networkd.service >&2
# Units that only cost boot time under TCG.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
  e2scrub_reap.service systemd-timesyncd.service >&2 2>&1 || true

# Root: no password login; the test-only operator key may log in.
in_root passwd -l root >&2
install -d -m 0700 "$ROOT/root/.ssh"
ssh-keygen -q -t ed25519 -N '' -C mkoverlay-boot-test-operator -f "$TMP/operator_ed25519"
install -m 0600 "$TMP/operator_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"

# SSH server: installed but disabled, as on Raspberry Pi OS; the overlay under test enables it.
in_root systemctl disable ssh.service >&2 2>&1 || true
rm -f "$ROOT/etc/systemd/system/sshd.service" "$ROOT/etc/systemd/system/multi-user.target.wants/ssh.service"
rm -f "$ROOT"/etc/ssh/ssh_host_*

# Stand-in for Raspberry Pi OS's regenerate_ssh_host_keys.service (raspberrypi-sys-mods):
# no condition on existing key files, runs before ssh, deletes and regenerates the host keys.
# The overlay masks it (/etc/systemd/system/regenerate_ssh_host_keys.service -> /dev/null).
cat >"$ROOT/lib/systemd/system/regenerate_ssh_host_keys.service" <<'EOF'
[Unit]
Description=Regenerate SSH host keys (stand-in for raspberrypi-sys-mods)
Before=ssh.service
ConditionFileIsExecutable=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStartPre=-/bin/dd if=/dev/hwrng of=/dev/urandom count=1 bs=4096
ExecStart=/bin/sh -c "rm -f -v /etc/ssh/ssh_host_*_key*"
ExecStart=/usr/bin/ssh-keygen -A -v
ExecStartPost=/bin/touch /run/regenerate_ssh_host_keys.ran

[Install]
WantedBy=multi-user.target
EOF
# Stand-in for the firstboot script (init=/usr/lib/raspberrypi-sys-mods/firstboot) that deletes
# the host keys before anything else. Never masked by the overlay: it always deletes
# /etc/ssh/ssh_host_*_key*, and records what it deleted so a test can show it ran.
cat >"$ROOT/lib/systemd/system/mkoverlay-test-firstboot-keys.service" <<'EOF'
[Unit]
Description=Delete SSH host keys like Raspberry Pi OS firstboot (boot-test stand-in)
DefaultDependencies=no
After=local-fs.target
Before=regenerate_ssh_host_keys.service ssh.service sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/mkoverlay-test-firstboot-keys

[Install]
WantedBy=sysinit.target
EOF
cat >"$ROOT/usr/local/sbin/mkoverlay-test-firstboot-keys" <<'EOS'
#!/bin/sh
# Boot-test stand-in for Raspberry Pi OS's firstboot host-key deletion (never masked).
ls -1 /etc/ssh >/run/firstboot-keys.before
rm -f -v /etc/ssh/ssh_host_*_key* >/run/firstboot-keys.deleted
echo "firstboot stand-in ran; deleted: $(tr '\n' ' ' </run/firstboot-keys.deleted)"
EOS
chmod 0755 "$ROOT/usr/local/sbin/mkoverlay-test-firstboot-keys"
in_root systemctl enable regenerate_ssh_host_keys.service mkoverlay-test-firstboot-keys.service >&2

# Make sure nothing pulled in libnss-systemd (the product must work without it).
if in_root dpkg-query -W -f='${Status}' libnss-systemd 2>/dev/null | grep -q 'install ok installed'; then
  die "libnss-systemd got installed; the image must not have it"
fi

# Extract kernel + initrd before trimming.
install -m 0644 "$ROOT/boot/vmlinuz-$KVER" "$TMP/vmlinuz"
install -m 0644 "$ROOT/boot/initrd.img-$KVER" "$TMP/initrd.img"
echo "console=$CONSOLE root=/dev/vda rw rootfstype=ext4 panic=-1 net.ifnames=1 systemd.journald.forward_to_console=1 systemd.show_status=false" >"$TMP/cmdline"

# ---- trim and make the ext4 image ---------------------------------------------------------
for m in "$ROOT/sys" "$ROOT/proc"; do umount -l "$m"; done
MOUNTED=()
in_root apt-get clean >&2 || true
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/*.log \
  "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* \
  "$ROOT"/usr/share/info/* "$ROOT"/tmp/* "$ROOT"/var/tmp/* "$ROOT/debootstrap"
[ -z "$(ls "$ROOT"/etc/ssh/ssh_host_* 2>/dev/null)" ] || die "host keys left in image"

log "mke2fs -d ($IMAGE_SIZE)"
mke2fs -q -t ext4 -L rootfs -d "$ROOT" "$TMP/rootfs.ext4" "$IMAGE_SIZE" >&2
rm -rf "$ROOT"

END=$(date +%s)
cat >"$TMP/manifest" <<EOF
recipe=$HASH
suite=$SUITE
arch=$ARCH
mirror=$MIRROR
kernel=$KVER
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((END - START))
image_du=$(du -h "$TMP/rootfs.ext4" | cut -f1)
EOF
cp "$TMP.log" "$TMP/build.log" 2>/dev/null || true
chmod 0755 "$TMP"
mv -T "$TMP" "$OUT"
rm -f "$TMP.log"
log "built $OUT in $((END - START)) s"

if [ "${MKOVERLAY_BOOT_KEEP_OLD:-0}" != 1 ]; then
  for d in "$CACHE"/base-"$ARCH"-*; do
    [ "$d" = "$OUT" ] || [ ! -d "$d" ] || { log "pruning old $d"; rm -rf "$d"; }
  done
  if [ "$ARCH" = amd64 ]; then # images from before the arch was part of the name were amd64
    for d in "$CACHE"/base-????????????????; do
      [ ! -d "$d" ] || { log "pruning old $d"; rm -rf "$d"; }
    done
  fi
  find "$CACHE" -maxdepth 1 -name ".build-$ARCH-*.lock" ! -name "${LOCK##*/}" -delete 2>/dev/null || true
  [ "$ARCH" != amd64 ] || find "$CACHE" -maxdepth 1 -name '.build-????????????????.lock' -delete 2>/dev/null || true
fi
printf '%s\n' "$OUT"
