#!/bin/sh
# One device of the fleet benchmarks (bench/tunnel-storm.mjs): the cycle of the device's
# reverse-ssh@.service, forever: ExecStart= (reverse-ssh-backoff waits, then becomes ssh with
# the unit's options), ExecStopPost= (reverse-ssh-backoff --record), RestartSec=2.
# Environment: RUNTIME_DIRECTORY (this device's, as systemd sets it), BACKOFF (the script),
# DEVICE_KEY, BASTION_PORT, BASTION_USER, TUNNEL_PORT, KNOWN_HOSTS, and any BACKOFF_* knob.
# Each ended attempt appends one line to $RUNTIME_DIRECTORY/events:
#   STARTED ENDED EXIT-CODE CLASS   (seconds since the epoch; STARTED = when ssh began, 0 if never)
# CLASS, from ssh's own messages: refused (key refused), dropped (closed before the key exchange:
# a penalty or MaxStartups), closed (closed during the key exchange or authentication, e.g.
# LoginGraceTime on a loaded machine), down (connection refused), forward (the port still held),
# timeout, ended (anything else: the tunnel ran and ended).
set -u
rd=$RUNTIME_DIRECTORY
while :; do
    "$BACKOFF" /usr/bin/ssh -F none -N -T \
        -o BatchMode=yes \
        -o ExitOnForwardFailure=yes \
        -o ServerAliveInterval=30 \
        -o ServerAliveCountMax=3 \
        -o ConnectTimeout=30 \
        -o StrictHostKeyChecking=yes \
        -o UserKnownHostsFile="$KNOWN_HOSTS" \
        -o GlobalKnownHostsFile=/dev/null \
        -o UpdateHostKeys=no \
        -o CheckHostIP=no \
        -o IdentitiesOnly=yes \
        -i "$DEVICE_KEY" \
        -p "$BASTION_PORT" \
        -l "$BASTION_USER" \
        -R "localhost:$TUNNEL_PORT:localhost:22" \
        127.0.0.1 2>>"$rd/backoff.log" &
    echo $! >"$rd/pid"
    wait $!
    rc=$?
    started=0
    [ -r "$rd/started" ] && read -r started <"$rd/started"
    class=ended
    if [ -r "$rd/ssh.log" ]; then
        if grep -q 'Permission denied' "$rd/ssh.log"; then
            class=refused
        elif grep -q kex_exchange_identification "$rd/ssh.log"; then
            class=dropped
        elif grep -q -e 'Connection closed by 127.0.0.1' -e 'Connection reset by 127.0.0.1' "$rd/ssh.log"; then
            class=closed
        elif grep -q 'Connection refused' "$rd/ssh.log"; then
            class=down
        elif grep -q -i 'remote port forwarding failed' "$rd/ssh.log"; then
            class=forward
        elif grep -q -i 'timed out' "$rd/ssh.log"; then
            class=timeout
        fi
    fi
    "$BACKOFF" --record 2>/dev/null
    echo "$started $(date +%s) $rc $class" >>"$rd/events"
    sleep 2
done
