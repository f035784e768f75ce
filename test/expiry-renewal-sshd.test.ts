/**
 * An extension served without touching the device (issue 20), end to end with the real programs:
 * a bastion set up by `bastion install --root`, the system's sshd on 127.0.0.1, the real agent
 * as its unit runs it, devices running their tunnel unit's exact ssh command. With `expiry:
 * 365d` and `expiryRenewal: 90d`, a device the agent saw connected gets a renewed expiry-time in
 * its key file at the agent's next full re-read (no restart, no change to its row), and sshd
 * still accepts it after its build-time expiry has passed; a device never seen is refused by
 * sshd once its key expires. Run on every sshd version the bastions run (the system's 9.2 and
 * 10.x: helpers/sshd10.ts).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, beforeAll, expect, it } from "vitest";
import { fileNameFor } from "../src/bastion/keystore.js";
import { openRegistry } from "../src/registry/open.js";
import { requires, root } from "./helpers/capability.js";
import { buildDevice, cleanup, isRoot, prepareRoot, secureRoot, startAgent, startBastion, tryLogin, tunnelUp, type AgentProc, type Bastion, type Device } from "./helpers/bastion.js";
import { portBlock } from "./helpers/net.js";
import { ensureUser, freePort, waitFor } from "./helpers/sshd.js";
import { expectSshdVersion, sshdVersions, systemSshd } from "./helpers/sshd10.js";
import { readPub, runCli, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-bastion-t";
// A port block of this run's own (the agent ends tunnel-user listeners no key allows in its ranges).
const block = await portBlock(100);
const PORTS = { ssh: block.range(0, 49), services: block.range(50, 99) };
const DAY = 86_400_000;

afterAll(() => block.release());

/** The instant of a line's expiry-time="YYYYMMDDHHMM" (UTC). */
function expiryOf(line: string): number {
  const m = /expiry-time="(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)"/.exec(line);
  if (!m) throw new Error(`no expiry-time in ${line}`);
  return Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!);
}

const versions = isRoot ? sshdVersions() : [systemSshd()];
requires(root).each(versions.map((b) => [b.version, b] as const))("expiry renewal served by the agent to a real sshd (OpenSSH %s)", (version, bin) => {
  let ws: string;
  let root: string;
  let cfg: string;
  let reg: string;
  let bastion: Bastion;
  let agent: AgentProc;
  const dirs: string[] = [];

  beforeAll(async () => {
    ensureUser(TUNNEL_USER);
    ensureUser("mkoverlay-keys");
    ws = tempDir(`mko-renew-ws-${version}-`);
    root = secureRoot();
    dirs.push(ws, root);
    const port = await freePort();
    prepareRoot(root, port);
    reg = join(ws, "registry.db");
    const lo = { host: "127.0.0.1", port, user: TUNNEL_USER, hostKeys: [readPub(join(root, "etc/ssh/ssh_host_ed25519_key"))], expiry: "365d", expirySpread: 0, expiryRenewal: "90d" };
    cfg = writeFleet(ws, { lo: lo as never }, { registry: reg, ports: PORTS });
    const first = buildDevice(ws, cfg, ["--hostname", "gw-first"]);
    dirs.push(first.root);
    const inst = runCli(["bastion", "install", "--bastion", "lo", "--root", root, "--registry", reg, "--mkoverlay", "/usr/local/bin/mkoverlay", "--config", cfg], { cwd: ws });
    if (inst.code !== 0) throw new Error(`install failed: ${inst.stderr}`);
    bastion = await startBastion(root, "lo", ws, bin);
    await expectSshdVersion(port, bin);
    // A full re-read every 2 s, a look at the tunnels every second.
    agent = startAgent(root, "lo", { authLog: bastion.logFile, resync: 2, args: ["--interval", "1"] });
    await agent.waitLog(/in sync: \d+ key/);
  }, 120_000);

  afterAll(async () => {
    if (process.env.SHOW_AGENT) process.stderr.write(agent?.lines.join("\n") + "\n");
    await agent?.stop();
    await bastion?.stop();
    cleanup(dirs);
  });

  const keyFile = (d: Device) => join(root, "var/lib/mkoverlay/bastion/lo/keys", fileNameFor(d.fingerprint));
  const keyExpiry = (d: Device) => {
    try {
      return expiryOf(readFileSync(keyFile(d), "utf8"));
    } catch {
      return NaN;
    }
  };
  const buildAgo = (days: number, ...ds: Device[]) => {
    const db = new Database(reg);
    try {
      for (const d of ds) db.prepare("UPDATE devices SET created = ? WHERE hostname = ?").run(new Date(Date.now() - days * DAY).toISOString(), d.hostname);
    } finally {
      db.close();
    }
  };

  it("a device seen connected keeps working past its build-time expiry; one never seen is refused by sshd", async () => {
    const seen = buildDevice(ws, cfg);
    const unseen = buildDevice(ws, cfg);
    dirs.push(seen.root, unseen.root);
    // Built 300 days ago: both keys still work, 65 days to go.
    buildAgo(300, seen, unseen);
    const built = Date.now() - 300 * DAY + 365 * DAY;
    await waitFor("both key files to carry the build-time expiry", () => [seen, unseen].every((d) => Math.abs(keyExpiry(d) - built) < 2 * DAY), 30_000);
    const untouched = readFileSync(keyFile(unseen), "utf8");

    // The device connects; the agent records it, and at its next full re-read renews its key
    // (90 days from the day it was seen) — nothing on the device, nothing in its row changed.
    const { tunnel } = await tunnelUp(seen, 30_000);
    await waitFor("the agent to renew the seen device's key", () => keyExpiry(seen) > Date.now() + 85 * DAY, 40_000);
    await tunnel.stop();
    expect(keyExpiry(seen)).toBeLessThanOrEqual(Date.now() + 91 * DAY);
    expect(readFileSync(keyFile(unseen), "utf8")).toBe(untouched);

    // A year and more after the build: the build-time expiry has passed for both.
    buildAgo(400, seen, unseen);
    const expired = Date.now() - 400 * DAY + 365 * DAY;
    await waitFor("the unseen device's key to carry its passed expiry", () => Math.abs(keyExpiry(unseen) - expired) < 2 * DAY, 30_000);
    await new Promise((r) => setTimeout(r, 2500)); // a full re-read after the change
    expect(keyExpiry(seen)).toBeGreaterThan(Date.now() + 85 * DAY);

    // The real sshd: the renewed key logs in, the expired one is refused.
    const ok = await tryLogin(seen);
    expect(ok.ok, ok.stderr).toBe(true);
    const refused = await tryLogin(unseen);
    expect(refused.ok).toBe(false);
    expect(refused.stderr).toMatch(/Permission denied \(publickey\)/);
    expect(readFileSync(bastion.logFile, "utf8")).toMatch(/Refused by key options/); // sshd: expiry-time passed

    // status and the export agree with what the agent serves.
    const st = runCli(["status", "--json", "--config", cfg], { cwd: ws });
    const j = JSON.parse(st.stdout) as { devices: { hostname: string; expires: { bastion: string; at: string }[] }[]; alarms: { kind: string; hostname?: string }[] };
    const at = (d: Device) => Date.parse(j.devices.find((x) => x.hostname === d.hostname)!.expires[0]!.at);
    expect(at(seen)).toBe(keyExpiry(seen));
    expect(at(unseen)).toBe(keyExpiry(unseen));
    expect(j.alarms.filter((a) => a.kind === "expired").map((a) => a.hostname)).toEqual([unseen.hostname]);
    const exported = runCli(["bastion", "authorized-keys", "--bastion", "lo", "--config", cfg], { cwd: ws });
    expect(exported.code, exported.stderr).toBe(0);
    expect(exported.stdout).toContain(readFileSync(keyFile(seen), "utf8"));

    // The registry says why: the agent's own sighting of the device.
    const r = await openRegistry(reg);
    try {
      expect((await r.observations()).history.map((h) => h.hostname)).toContain(seen.hostname);
    } finally {
      await r.close();
    }
  }, 240_000);
});
