/**
 * sshd's AuthorizedKeysCommand for the tunnel user: a tiny POSIX sh program, not Node (sshd may
 * run it twice per login, and starting Node would cost more than the whole login). It takes the
 * key directory and the offered key's fingerprint (`%f`), checks the fingerprint strictly, and
 * prints that key's file, or nothing. Only shell built-ins run: no scan, no other program.
 *
 * sshd runs it as AuthorizedKeysCommandUser and refuses it unless the file and every directory
 * above it are root-owned and not writable by group or others.
 */
export const KEYS_COMMAND_PATH = "/usr/local/lib/mkoverlay/authorized-keys";

export const KEYS_COMMAND = `#!/bin/sh
# Installed by mkoverlay (bastion install). sshd's AuthorizedKeysCommand for the tunnel user:
#   AuthorizedKeysCommand ${KEYS_COMMAND_PATH} KEYDIR %f
# Prints the authorized_keys line the mkoverlay bastion agent keeps for the offered key's
# fingerprint, or nothing. Anything unexpected prints nothing: sshd then refuses the key.
[ "$#" -eq 2 ] || exit 0
dir=$1
fp=$2
case $dir in /*) ;; *) exit 0 ;; esac
case $fp in SHA256:*) ;; *) exit 0 ;; esac
b=\${fp#SHA256:}
[ "\${#b}" -eq 43 ] || exit 0
case $b in *[!A-Za-z0-9+/]*) exit 0 ;; esac
# base64 → file name: '/' cannot be in a name, '+' becomes '-' (the agent names files the same way).
name=
while [ -n "$b" ]; do
  rest=\${b#?}
  c=\${b%"$rest"}
  b=$rest
  case $c in
    /) c=_ ;;
    +) c=- ;;
  esac
  name=$name$c
done
[ -f "$dir/$name" ] || exit 0
while IFS= read -r line || [ -n "$line" ]; do
  printf '%s\\n' "$line"
done <"$dir/$name"
exit 0
`;
