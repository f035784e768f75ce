#!/usr/bin/env bash
# Makes sure an OpenSSH 10.x sshd is unpacked for the tests (issue 20: bastions run 9.2 and 10.x)
# and prints its folder. It is bookworm-backports' `openssh-server`, fetched with Debian's own
# tools and unpacked with `dpkg -x` next to the system's sshd, which stays as it was:
#
#   DIR/usr/sbin/sshd  DIR/usr/lib/openssh/sshd-session  DIR/usr/lib/openssh/sshd-auth
#
# run as `DIR/usr/sbin/sshd -o SshdSessionPath=DIR/usr/lib/openssh/sshd-session
# -o SshdAuthPath=DIR/usr/lib/openssh/sshd-auth ...` (test/helpers/sshd10.ts does).
# Its other dependencies (libssl3, libpam0g, ...) are bookworm's own, already installed with 9.2.
#
# DIR: $MKOVERLAY_OPENSSH10_DIR, else /var/cache/mkoverlay-openssh10 as root, else
# ${XDG_CACHE_HOME:-~/.cache}/mkoverlay-openssh10. Idempotent: a DIR whose sshd says 10.x is kept.
# The system's apt configuration is not touched: a private sources list and lists folder
# (-o Dir::Etc::sourcelist=..., -o Dir::State::Lists=...) under a temporary folder.
set -euo pipefail

if [ -n "${MKOVERLAY_OPENSSH10_DIR:-}" ]; then dir=$MKOVERLAY_OPENSSH10_DIR
elif [ "$(id -u)" -eq 0 ]; then dir=/var/cache/mkoverlay-openssh10
else dir=${XDG_CACHE_HOME:-$HOME/.cache}/mkoverlay-openssh10
fi
suite=${MKOVERLAY_OPENSSH10_SUITE:-bookworm-backports}
mirror=${MKOVERLAY_OPENSSH10_MIRROR:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

is10() { [ -x "$1/usr/sbin/sshd" ] && "$1/usr/sbin/sshd" -V 2>&1 | grep -q '^OpenSSH_10\.'; }

if is10 "$dir"; then echo "$dir"; exit 0; fi

for t in apt-get dpkg; do
  command -v "$t" >/dev/null 2>&1 || { echo "ensure-openssh10: $t is missing (a Debian system is needed to fetch bookworm-backports' openssh-server)" >&2; exit 1; }
done
[ -r "$keyring" ] || { echo "ensure-openssh10: $keyring is missing; install it with: apt-get install debian-archive-keyring" >&2; exit 1; }

parent=$(dirname "$dir")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.mkoverlay-openssh10.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb" "$work/root"
echo "deb [signed-by=$keyring] $mirror $suite main" >"$work/sources.list"
apt=(-q -o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=$work/none"
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1
     -o "APT::Sandbox::User=$(id -un)")

echo "ensure-openssh10: fetching openssh-server from $suite into $dir" >&2
apt-get "${apt[@]}" update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; exit 1; }
(cd "$work/deb" && apt-get "${apt[@]}" download "openssh-server/$suite" >"$work/download.log" 2>&1) \
  || { cat "$work/download.log" >&2; exit 1; }
deb=$(find "$work/deb" -name 'openssh-server_*.deb' | head -n1)
[ -n "$deb" ] || { echo "ensure-openssh10: apt-get download left no openssh-server .deb" >&2; exit 1; }
dpkg -x "$deb" "$work/root"

for f in usr/sbin/sshd usr/lib/openssh/sshd-session usr/lib/openssh/sshd-auth; do
  [ -x "$work/root/$f" ] || { echo "ensure-openssh10: $(basename "$deb") has no $f" >&2; exit 1; }
done
if ! is10 "$work/root"; then
  echo "ensure-openssh10: $(basename "$deb") is not OpenSSH 10.x: $("$work/root/usr/sbin/sshd" -V 2>&1 | head -n1)" >&2
  exit 1
fi
# Libraries the new binaries need must all be on the system already.
for f in usr/sbin/sshd usr/lib/openssh/sshd-session usr/lib/openssh/sshd-auth; do
  if ldd "$work/root/$f" | grep -q 'not found'; then
    echo "ensure-openssh10: $f needs libraries this system lacks:" >&2
    ldd "$work/root/$f" | grep 'not found' >&2
    exit 1
  fi
done

# In place atomically: a half-unpacked DIR is never seen.
rm -rf "$dir.old"
[ -e "$dir" ] && mv "$dir" "$dir.old"
mv "$work/root" "$dir"
rm -rf "$dir.old"
chmod 755 "$dir"
echo "$dir"
