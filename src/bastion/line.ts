/**
 * The bastion's authorized_keys line for one device. sshd drops a line with any bad option
 * silently (docs/facts.md), so the line is valid by construction: options come in a fixed order,
 * every quoted value was validated (no quote, backslash or control character), there is no
 * permitopen="none", and expiry-time has no trailing Z (OpenSSH < 9.1 rejects it).
 */
import type { TunnelPlan } from "../config/forwards.js";
import { publicKeyLine } from "../keys/ed25519.js";
import { keyExpiry } from "../config/expiry.js";
import { expiryTimeOption, quotedValueProblem } from "../util/validate.js";

export interface LineInput {
  hostname: string;
  pub: Buffer;
  /** The tunnel: bastion, sshd port, extra listen ports, permitopen destinations. */
  tunnel: TunnelPlan;
  /** When the device was built: a duration expiry counts from here (stable across exports). */
  now: Date;
  /** The key stops working at this instant at the latest (a rotated-out key's grace end). */
  notAfter?: Date;
  /** When a bastion last saw the device connected: with `expiryRenewal`, the expiry counts on from here. */
  seen?: Date | null;
}

function quoted(name: string, value: string): string {
  const p = quotedValueProblem(value);
  if (p) throw new Error(`refusing to emit ${name}="${value}": it ${p}`);
  return `${name}="${value}"`;
}

export function authorizedKeysOptions(i: LineInput): string[] {
  // Order matters: restrict first, then port-forwarding re-enables forwarding (left to right).
  const b = i.tunnel.bastion;
  const opts = ["restrict", "port-forwarding", quoted("command", "/sbin/nologin")];
  if (b.from) opts.push(quoted("from", b.from.join(",")));
  let expiry = i.notAfter;
  // A duration gets this device's share of the spread (never earlier than the config says),
  // and with expiryRenewal is renewed from the last sighting (config/expiry.ts).
  const t = keyExpiry(b, i.now, i.pub, i.seen);
  if (typeof t === "string") throw new Error(`expiry ${b.expiry} ${t}`);
  if (t && (!expiry || t < expiry)) expiry = t;
  if (expiry) opts.push(quoted("expiry-time", expiryTimeOption(expiry)));
  // ssh sends "localhost" for `-R PORT:…` and `-R localhost:PORT:…`: only that bind matches,
  // so the device cannot bind 0.0.0.0 or 127.0.0.1 on the bastion.
  for (const port of [i.tunnel.port, ...i.tunnel.extraListen]) opts.push(quoted("permitlisten", `localhost:${port}`));
  // Only a tunnel that carries -L/-D gets permitopen; the bastion's Match block denies the rest.
  for (const dest of i.tunnel.permitOpen) opts.push(quoted("permitopen", dest));
  return opts;
}

export function authorizedKeysLine(i: LineInput): string {
  return `${authorizedKeysOptions(i).join(",")} ${publicKeyLine(i.pub, i.hostname)}`;
}

/** One line per tunnel, anchored at the device's build time (a re-export never moves expiry). */
export function deviceLines(hostname: string, pub: Buffer, tunnels: TunnelPlan[], created: Date): Record<string, string> {
  const lines: Record<string, string> = {};
  for (const t of tunnels) lines[t.bastion.name] = authorizedKeysLine({ hostname, pub, tunnel: t, now: created });
  return lines;
}

/** The lines as a paste-able authorized_keys fragment (comments say where each goes). */
export function renderLines(hostname: string, port: number, tunnels: TunnelPlan[], lines: Record<string, string>): string {
  const parts = [`# ${hostname}: tunnel port ${port}`];
  for (const { bastion: b } of tunnels) parts.push(`# bastion ${b.name}: authorized_keys of ${b.user}@${b.host}`, lines[b.name] ?? "");
  return parts.join("\n") + "\n";
}
