/** `mkoverlay init`'s config text: the answers rendered as a commented fleet config. */
import { resourceDir } from "../../util/resources.js";
import { keyFingerprint, type InitAnswers } from "./init-answers.js";

/** A YAML scalar: plain when that is safe, else double-quoted (JSON strings are YAML). */
function scalar(v: string): string {
  return /^[A-Za-z0-9_./][A-Za-z0-9_./@+= -]*$/.test(v) && !/^(true|false|yes|no|on|off|null|~|-?\d[\d.]*)$/i.test(v) && !/\s$/.test(v) ? v : JSON.stringify(v);
}

/** The config text: every section commented, optional keys shown commented out. */
export function renderConfig(a: InitAnswers, now: Date): string {
  const L: string[] = [
    `# yaml-language-server: $schema=${resourceDir("schema", "mkoverlay.schema.json")}`,
    `# mkoverlay fleet config, written by 'mkoverlay init' on ${now.toISOString().slice(0, 10)}.`,
    "# Every key is checked when mkoverlay loads this file (unknown keys are errors); the schema",
    "# line above lets editors complete and check it too. 'mkoverlay --help' lists the commands.",
    "",
    "# The port registry: an embedded SQLite file (relative to this file), or",
    "# postgres://user@host:5432/db shared by several stations. $MKOVERLAY_REGISTRY overrides it.",
    `registry: ${scalar(a.registry)}`,
    "",
    "# Names of devices built without --hostname: {seq} or {seq:0N} is the next number.",
    `hostname: ${scalar(a.hostname)}`,
    "",
    "ports:",
    `  ssh: ${scalar(a.sshPorts)}        # one tunnel port per device, forwarded to its sshd (-R)`,
    `  services: ${scalar(a.servicePorts)}   # ports for service tunnels (forwards:)`,
    "",
    "# The bastions the gateways keep a reverse tunnel to; --bastion picks them.",
    "bastions:",
  ];
  for (const b of a.bastions) {
    L.push(
      `  ${b.name}:`,
      `    host: ${scalar(b.host)}`,
      `    port: ${b.port}`,
      `    user: ${scalar(a.tunnelUser)}             # the tunnel user on the bastion`,
      "    # The gateways trust only these keys (StrictHostKeyChecking=yes). Fingerprints, to",
      "    # compare with 'ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' on the bastion:",
      ...b.hostKeys.map((k) => `    #   ${keyFingerprint(k)} (${k.split(/\s+/).slice(0, -1).join(" ")})`),
      "    hostKeys:",
      ...b.hostKeys.map((k) => `      - ${scalar(k)}`),
      "    # from: [198.51.100.0/24]       # optional: where gateways connect from (authorized_keys from=)",
      "    # expiry: 365d                  # optional: the device key stops working a year after the build",
      "    # jumpUser: alice               # optional: operators' own account here, for 'mkoverlay ssh-config'",
    );
  }
  L.push(
    "",
    "# Service tunnels besides sshd, e.g. the device's port 80 published on the bastion:",
    "#   - {name: http, local: 80}",
    "forwards: []",
    "",
    "# Who may log in to the gateways (through the tunnel): keys, and/or certificates from a CA.",
  );
  const o = a.operators;
  if (!o) L.push("# `none`: the OS image brings its own login access; mkoverlay adds none.", "operators: none");
  else {
    L.push("operators:", `  user: ${scalar(o.user)}`);
    if (o.authorizedKeys.length > 0) L.push("  authorizedKeys:", ...o.authorizedKeys.map((k) => `    - ${scalar(k)}`));
    else L.push("  # authorizedKeys: [ssh-ed25519 AAAA... alice]");
    if (o.userCA) L.push(`  userCA: ${scalar(o.userCA)}`, `  principals: [${o.principals.map(scalar).join(", ")}]`);
    else L.push("  # userCA: ssh-ed25519 AAAA... fleet-ca   # certificates it signs for `principals` get in", "  # principals: [fleet-ops]");
  }
  return L.join("\n") + "\n";
}
