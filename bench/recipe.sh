#!/usr/bin/env bash
# The reference recipe, scripted: what a factory does per device without mkoverlay.
# Per device: ssh-keygen, units rendered with sed, tar czf, the authorized_keys line, a
# sqlite3 row for the port table. Usage: recipe.sh COUNT WORKDIR
set -euo pipefail
count=$1
work=$2
mkdir -p "$work/out" "$work/tpl"
db="$work/ports.db"
sqlite3 "$db" "CREATE TABLE IF NOT EXISTS ports (host TEXT PRIMARY KEY, port INTEGER UNIQUE, pubkey TEXT);"

cat > "$work/tpl/reverse-ssh@.service" <<'UNIT'
[Unit]
Description=Reverse SSH Tunnel to %i
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/bin/ssh -N -T -o ServerAliveInterval=60 -o ServerAliveCountMax=3 -o ExitOnForwardFailure=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/etc/ssh/known_hosts_bastion -i /etc/ssh/ssh_host_ed25519_key -R localhost:@PORT@:localhost:22 reverse-ssh@%i
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT
cat > "$work/tpl/reverse-ssh-monitor.service" <<'UNIT'
[Unit]
Description=Monitor and restart failed reverse SSH tunnels
[Service]
Type=oneshot
ExecStart=/usr/local/bin/reverse-ssh-monitor.sh
UNIT
cat > "$work/tpl/reverse-ssh-monitor.timer" <<'UNIT'
[Timer]
OnBootSec=2min
OnCalendar=*:0/10
[Install]
WantedBy=timers.target
UNIT

for i in $(seq 1 "$count"); do
  host=$(printf 'gw-%04d' "$i")
  port=$((21000 + i - 1))
  root="$work/root-$host"
  mkdir -p "$root/etc/ssh" "$root/etc/systemd/system/multi-user.target.wants" "$root/etc/systemd/system/timers.target.wants"
  ssh-keygen -q -t ed25519 -N "" -C "root@$host" -f "$root/etc/ssh/ssh_host_ed25519_key"
  sed "s/@PORT@/$port/" "$work/tpl/reverse-ssh@.service" > "$root/etc/systemd/system/reverse-ssh@.service"
  sed "s/%i/bastion-eu.example.com/" "$work/tpl/reverse-ssh-monitor.service" > "$root/etc/systemd/system/reverse-ssh-monitor.service"
  cp "$work/tpl/reverse-ssh-monitor.timer" "$root/etc/systemd/system/"
  ln -s /etc/systemd/system/reverse-ssh@.service "$root/etc/systemd/system/multi-user.target.wants/reverse-ssh@bastion-eu.example.com.service"
  ln -s /etc/systemd/system/reverse-ssh-monitor.timer "$root/etc/systemd/system/timers.target.wants/"
  echo "$host" > "$root/etc/hostname"
  tar czf "$work/out/$host.tar.gz" --owner=0 --group=0 -C "$root" .
  pub=$(cut -d' ' -f1,2 "$root/etc/ssh/ssh_host_ed25519_key.pub")
  echo "restrict,port-forwarding,command=\"/sbin/nologin\",permitlisten=\"localhost:$port\" $pub $host" >> "$work/out/authorized_keys"
  sqlite3 "$db" "INSERT INTO ports VALUES ('$host', $port, '$pub');"
  rm -rf "$root"
done
