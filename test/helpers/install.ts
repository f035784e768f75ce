/**
 * `bastion install --root` test workspaces: an image root (helpers/bastion.ts prepareRoot), a
 * fleet config with one device built, mkoverlay and the registry where the bastion has them, and
 * snapshots of the root to prove what an install changed (or that a refused one changed nothing).
 */
import { createHash } from "node:crypto";
import { copyFileSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { expect } from "vitest";
import { buildDevice, prepareRoot, secureRoot, type Device } from "./bastion.js";
import { freePort } from "./sshd.js";
import { readPub, runCli, tempDir, writeFleet, type Run } from "./workspace.js";

/** Every entry under `root`: path, type, mode, owner, content hash or link target, mtime. */
export function snapshot(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string) => {
    for (const n of readdirSync(d).sort()) {
      const p = join(d, n);
      const st = lstatSync(p);
      const rel = relative(root, p);
      if (st.isDirectory()) {
        out.set(rel, `dir ${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid}`);
        walk(p);
      } else if (st.isSymbolicLink()) out.set(rel, `link -> ${readlinkSync(p)}`);
      else out.set(rel, `file ${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${createHash("sha256").update(readFileSync(p)).digest("hex")} ${st.mtimeMs}`);
    }
  };
  walk(root);
  return out;
}

export function changed(a: Map<string, string>, b: Map<string, string>): string[] {
  return [...new Set([...a.keys(), ...b.keys()])].filter((k) => a.get(k) !== b.get(k)).sort();
}

/** One error line (and at most a hint), no stack. */
export function expectOneError(r: Run, re: RegExp): void {
  expect(r.code, r.stderr).toBe(2);
  const lines = r.stderr.trim().split("\n").filter((l) => !l.startsWith("mkoverlay: warning: "));
  expect(lines[0]).toMatch(/^mkoverlay: error: /);
  expect(lines[0]).toMatch(re);
  expect(lines.slice(1).every((l) => l.startsWith("mkoverlay: hint: ")), r.stderr).toBe(true);
  expect(lines.length).toBeLessThanOrEqual(2);
}

export interface Ws {
  ws: string;
  root: string;
  cfg: string;
  port: number;
  device: Device;
}

/** The agent's executable and registry as the bastion sees them (--root requires both). */
const TARGET = ["--mkoverlay", "/usr/local/bin/mkoverlay", "--registry", "/var/lib/mkoverlay/registry.db"];

/** `user`: the tunnel user of bastion "lo"; `more`: other bastions (name → tunnel user) on the same sshd. */
/** `tunnelPort`: devices dial this port, not the admin sshd's (`port`): the install runs a tunnel sshd there. */
export async function installWorkspace(dirs: string[], user: string, opts: { extraMain?: string; more?: Record<string, string>; tunnelPort?: number } = {}): Promise<Ws> {
  const ws = tempDir("mko-install-");
  const root = secureRoot();
  dirs.push(ws, root);
  const port = await freePort();
  prepareRoot(root, port, opts.extraMain);
  const hostKeys = [readPub(join(root, "etc/ssh/ssh_host_ed25519_key"))];
  const users: Record<string, string> = { lo: user, ...opts.more };
  const cfg = writeFleet(ws, Object.fromEntries(Object.entries(users).map(([n, u]) => [n, { host: "127.0.0.1", port: opts.tunnelPort ?? port, user: u, hostKeys }])), { registry: "./registry.db", ports: { ssh: "33200-33299", services: "33300-33399" } });
  const device = buildDevice(ws, cfg);
  dirs.push(device.root);
  // mkoverlay as the bastion runs it (--mkoverlay /usr/local/bin/mkoverlay) ...
  mkdirSync(join(root, "usr/local/bin"), { recursive: true, mode: 0o755 });
  writeFileSync(join(root, "usr/local/bin/mkoverlay"), "#!/bin/sh\n", { mode: 0o755 });
  // ... and the registry where the bastion's agent reads it (--registry /var/lib/mkoverlay/registry.db).
  mkdirSync(join(root, "var/lib/mkoverlay"), { recursive: true, mode: 0o755 });
  copyFileSync(join(ws, "registry.db"), join(root, "var/lib/mkoverlay/registry.db"));
  return { ws, root, cfg, port, device };
}

export const installInto = (w: Ws, extra: string[] = [], bastion = "lo"): Run =>
  runCli(["bastion", "install", "--bastion", bastion, "--root", w.root, "--config", w.cfg, ...TARGET, ...extra], { cwd: w.ws });
