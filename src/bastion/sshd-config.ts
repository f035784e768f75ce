/**
 * The `Match User <tunnel user>` block a bastion needs (docs/facts.md): the keys' own options
 * restrict each device to its ports, and this block denies everything the options cannot —
 * local forwarding to arbitrary hosts (restrict,port-forwarding alone lets a key -L anywhere,
 * including the bastion's own sshd), Unix-socket forwards, TTYs, agent and X11 — and frees a
 * dead gateway's port quickly.
 */
import type { Bastion, Fleet } from "../config/fleet.js";

/** Destinations any device of this bastion may -L/-D to (the union of the fleet's forwards). */
function bastionPermitOpen(fleet: Fleet, bastion: string): string[] {
  const out = new Set<string>();
  for (const f of fleet.forwards) {
    if (f.type === "local" && f.bastion === bastion) out.add(f.to);
    if (f.type === "socks" && f.bastion === bastion) for (const a of f.allow) out.add(a);
  }
  return [...out];
}

export function renderMatchBlock(fleet: Fleet, b: Bastion, opts: { authorizedKeysFile?: string } = {}): string {
  const open = bastionPermitOpen(fleet, b.name);
  const lines = [
    `# mkoverlay: the tunnel user of bastion '${b.name}'. Put this at the END of sshd_config`,
    "# (a Match block lasts until the next Match or the end of the file), then: sshd -t && systemctl reload ssh",
    `Match User ${b.user}`,
    ...(opts.authorizedKeysFile ? [`    AuthorizedKeysFile ${opts.authorizedKeysFile}`] : []),
    "    # Keys only; the account has no password and a nologin shell.",
    "    PasswordAuthentication no",
    "    KbdInteractiveAuthentication no",
    "    AuthenticationMethods publickey",
    open.length === 0
      ? "    # Gateways publish ports here (-R); they may not open connections from here (-L/-D)."
      : "    # Gateways publish ports here (-R); -L/-D only to the fleet's declared destinations.",
    `    AllowTcpForwarding ${open.length === 0 ? "remote" : "yes"}`,
    `    PermitOpen ${open.length === 0 ? "none" : open.join(" ")}`,
    // sshd grants a -R only if the key's permitlisten AND this line allow it (channels.c,
    // check_rfwd_permission), so each key's own ports stay the limit. A fixed line: listing the
    // fleet's ports here cost every login (+130 ms at 2,000 ports, 16-31 s at 20,000, and
    // seconds of CPU before authentication), and sshd has no port ranges, only a port or '*'.
    "    # -R only as 'localhost' (what ssh -R PORT:… sends), never 0.0.0.0 or an address;",
    "    # each key's permitlisten narrows it to that device's own ports.",
    "    PermitListen localhost:*",
    "    # Forwarded ports listen on the bastion's loopback only.",
    "    GatewayPorts no",
    "    # permitlisten does not cover Unix-socket forwards: deny them here.",
    "    AllowStreamLocalForwarding no",
    "    AllowAgentForwarding no",
    "    X11Forwarding no",
    "    PermitTTY no",
    "    PermitTunnel no",
    "    PermitUserRC no",
    "    ForceCommand /sbin/nologin",
    "    # A dead gateway's session (and its port) is dropped after ~45 s, so its reconnect can bind again.",
    "    ClientAliveInterval 15",
    "    ClientAliveCountMax 3",
    "    # For gateways whose tunnel opens a session and sends it (mkoverlay's ssh -N does not).",
    "    AcceptEnv SELF_REMOTE_HOST",
  ];
  return lines.join("\n") + "\n";
}
