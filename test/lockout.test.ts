/**
 * Issue 19, item 8: a config change that would lock out registered devices (a renamed tunnel
 * user, a moved bastion, a new host key, a narrowed `from:`, moved port ranges) is refused by
 * builds and `bastion install`, with the field and the count named and nothing changed, unless
 * `--force-config-change`; then the old and new settings are served side by side until the old
 * devices are rotated. On SQLite and on a real PostgreSQL; the side-by-side proof on a real sshd.
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { lstatSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import { requires, root } from "./helpers/capability.js";
import { buildDevice, cleanup, prepareRoot, secureRoot, startBastion, tunnelUp, type Bastion as SshBastion, type Tunnel } from "./helpers/bastion.js";
import { postgresForTests, type PgServer } from "./helpers/postgres.js";
import { ensureUser, freePort } from "./helpers/sshd.js";
import { CLI, readPub, REPO, removeDir, run, runCli, sshKeygen, tempDir, writeFleet, type BastionDef, type Run } from "./helpers/workspace.js";

const PORTS = { ssh: "26000-26999", services: "27000-27999" };
const FORWARDS = [{ name: "web", type: "remote", local: 80 }];

const keys = tempDir("mko-lockout-keys-");
const hostKey = readPub(sshKeygen(keys, "bastion"));
const otherHostKey = readPub(sshKeygen(keys, "bastion2"));
afterAll(() => removeDir(keys));

const { server: pg, reason: pgReason } = await postgresForTests();
afterAll(async () => {
  await pg?.stop();
});

interface Ws {
  dir: string;
  cfg: string;
  registry: string;
}

const BASE: BastionDef = { host: "eu.example.com", user: "mko-tunnel", hostKeys: [hostKey], from: ["10.0.0.0/8"] };

function writeCfg(ws: Ws, eu: Partial<BastionDef> = {}, ports: Partial<typeof PORTS> = {}): void {
  writeFleet(ws.dir, { eu: { ...BASE, ...eu } }, { registry: ws.registry, ports: { ...PORTS, ...ports }, forwards: FORWARDS });
}

const cli = (ws: Ws, args: string[]): Run => runCli([...args, "--config", ws.cfg], { cwd: ws.dir, env: { MKOVERLAY_REGISTRY: "" } });
const build = (ws: Ws, extra: string[] = []): Run => cli(ws, ["--board", "rpi4", "--bastion", "eu", "--quiet", "--json", "--out", join(ws.dir, "out"), ...extra]);

interface Listed {
  hostname: string;
  oldSettings: { field: string; from: string; to: string }[];
}

function listed(ws: Ws): Listed[] {
  const r = cli(ws, ["registry", "list", "--json"]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Listed[];
}

/** The registry's content as the registry itself reads it (what the config makes of it left out). */
function content(ws: Ws): string {
  return JSON.stringify(listed(ws).map(({ oldSettings: _o, ...d }) => d));
}

const BACKENDS: [string, (dir: string) => Promise<string>][] = [["sqlite", async (dir) => join(dir, "registry.db")]];
if (pg) BACKENDS.push(["postgres", (_dir) => (pg as PgServer).createDatabase()]);
if (!pg) {
  describe.skip(`postgres — SKIPPED, PostgreSQL unavailable: ${pgReason}`, () => {
    it("needs PostgreSQL (scripts/ensure-postgres.sh)", () => undefined);
  });
}

/** Three devices built with BASE. */
async function fleetOf3(backend: (dir: string) => Promise<string>): Promise<Ws> {
  const dir = tempDir("mko-lockout-");
  const ws: Ws = { dir, cfg: join(dir, "mkoverlay.yaml"), registry: await backend(dir) };
  writeCfg(ws);
  const r = cli(ws, ["batch", "--board", "rpi4", "--bastion", "eu", "--count", "3", "--quiet", "--out", join(dir, "out")]);
  expect(r.code, r.stderr).toBe(0);
  return ws;
}

/** Refused: exit 2, the field on its config line, the count, the way out; no stack. */
function expectRefused(r: Run, field: RegExp): void {
  expect(r.code, r.stderr).toBe(2);
  // With --json the error is one JSON object on stderr (docs/json.md, Errors): read it as text.
  const e = r.stderr.startsWith("{") ? (JSON.parse(r.stderr) as { error: string; hint: string | null }) : undefined;
  const text = e ? `${e.error.split("\n").map((l) => `mkoverlay: error: ${l}\n`).join("")}mkoverlay: hint: ${e.hint ?? ""}\n` : r.stderr;
  expect(text).toMatch(new RegExp(`mkoverlay: error: \\S*mkoverlay\\.yaml:\\d+: ${field.source}`));
  expect(text).toMatch(/--force-config-change/);
  expect(r.stderr).not.toMatch(/\n\s+at /);
}

describe.each(BACKENDS)("config changes that lock registered devices out (%s)", (_name, backend) => {
  const CHANGES: [string, Partial<BastionDef>, Partial<typeof PORTS>, RegExp][] = [
    ["tunnel user renamed", { user: "tunnel" }, {}, /bastions\.eu\.user changed from mko-tunnel to tunnel: 3 registered devices \(gw-0001, …\) dial mko-tunnel/],
    ["host moved", { host: "eu2.example.com" }, {}, /bastions\.eu\.host changed from eu\.example\.com to eu2\.example\.com: 3 registered devices .* dial eu\.example\.com; the bastion cannot serve both/],
    ["port moved", { port: 2222 }, {}, /bastions\.eu\.port changed from 22 to 2222: 3 registered devices .* dial 22; the bastion cannot serve both/],
    ["host key replaced", { hostKeys: [otherHostKey] }, {}, /bastions\.eu\.hostKeys changed from SHA256:\S+ to SHA256:\S+: 3 registered devices .* the bastion cannot serve both/],
    ["from: narrowed", { from: ["10.1.0.0/16"] }, {}, /bastions\.eu\.from narrowed from 10\.0\.0\.0\/8 to 10\.1\.0\.0\/16: 3 registered devices .* dial from 10\.0\.0\.0\/8/],
    ["ports.ssh moved", {}, { ssh: "28000-28999" }, /ports\.ssh changed from 26000-26999 to 28000-28999: 3 registered devices .* hold a port of 26000-26999 outside 28000-28999/],
    ["ports.services moved", {}, { services: "29000-29999" }, /ports\.services changed from 27000-27999 to 29000-29999: 3 registered devices .* hold a port of 27000-27999 outside 29000-29999/],
  ];

  it.each(CHANGES)("%s: build, batch and rotate refuse with the field and the count; nothing reserved, registry untouched", async (_what, eu, ports, message) => {
    const ws = await fleetOf3(backend);
    try {
      const before = content(ws);
      writeCfg(ws, eu, ports);
      expectRefused(build(ws), message);
      expectRefused(cli(ws, ["batch", "--board", "rpi4", "--bastion", "eu", "--count", "2", "--quiet", "--out", join(ws.dir, "out")]), message);
      expectRefused(cli(ws, ["rotate", "gw-0001", "--quiet", "--out", join(ws.dir, "out")]), message);
      expect(content(ws)).toBe(before);
      // `registry list --json` names what each device still dials the old value of.
      const field = /(bastions\.eu\.\w+|ports\.\w+)/.exec(message.source.replace(/\\/g, ""))![1]!;
      for (const d of listed(ws)) expect(d.oldSettings.map((o) => o.field), d.hostname).toEqual([field]);
      expect(readdirSync(join(ws.dir, "out")).filter((f) => !/^gw-000[123]\./.test(f))).toEqual([]);
    } finally {
      removeDir(ws.dir);
    }
  });

  it("changes that lock nobody out pass; forced: builds go on, the export serves old and new side by side; each rotation moves a device to the new settings and the count drops", async () => {
    const ws = await fleetOf3(backend);
    try {
      // A wider from:, one more host key, a wider range, a jump user: nobody is locked out.
      writeCfg(ws, { from: ["10.0.0.0/8", "192.168.0.0/16"], hostKeys: [hostKey, otherHostKey], jumpUser: "ops" }, { ssh: "25500-26999" });
      const passes = build(ws);
      expect(passes.code, passes.stderr).toBe(0);
      expect(passes.stderr).not.toMatch(/warning/);
      // (Revoked devices dial nothing: gw-0004 is out of the count from here on.)
      expect(cli(ws, ["revoke", "gw-0004"]).code).toBe(0);
      writeCfg(ws, { user: "tunnel", from: ["10.1.0.0/16"] }, { ssh: "28000-28999" });
      const forced = build(ws, ["--force-config-change"]);
      expect(forced.code, forced.stderr).toBe(0);
      expect(forced.stderr).toMatch(/warning: .*bastions\.eu\.user changed from mko-tunnel to tunnel: 3 registered devices/);
      const gw5 = JSON.parse(forced.stdout) as { hostname: string; port: number };
      expect(gw5).toMatchObject({ hostname: "gw-0005", port: 28000 });
      // The export keeps each old device's port (outside the new range) and its recorded from=.
      const exp = cli(ws, ["bastion", "authorized-keys", "--bastion", "eu"]);
      expect(exp.code, exp.stderr).toBe(0);
      const lines = exp.stdout.split("\n").filter((l) => l.startsWith("restrict"));
      expect(lines).toHaveLength(4);
      for (const [host, port, from] of [["gw-0001", 26000, "10.0.0.0/8"], ["gw-0002", 26001, "10.0.0.0/8"], ["gw-0003", 26002, "10.0.0.0/8"], ["gw-0005", 28000, "10.1.0.0/16"]] as const) {
        const line = lines.find((l) => l.endsWith(` ${host}`));
        expect(line, host).toContain(`from="${from}"`);
        expect(line, host).toContain(`permitlisten="localhost:${port}"`);
      }
      expect(exp.stderr).not.toMatch(/left out|skipp/);

      // Rotation moves a device (its port stays: it is the device's) to the new user and from:.
      const rot = cli(ws, ["rotate", "gw-0001", "--grace", "0", "--force-config-change", "--quiet", "--out", join(ws.dir, "out")]);
      expect(rot.code, rot.stderr).toBe(0);
      expectRefused(build(ws), /bastions\.eu\.user changed from mko-tunnel to tunnel: 2 registered devices \(gw-0002, …\) dial mko-tunnel/);
      const after = cli(ws, ["bastion", "authorized-keys", "--bastion", "eu"]).stdout;
      expect(after.split("\n").find((l) => l.endsWith(" gw-0001"))).toContain('from="10.1.0.0/16"');
      for (const h of ["gw-0002", "gw-0003"]) expect(cli(ws, ["rotate", h, "--grace", "0", "--force-config-change", "--quiet", "--out", join(ws.dir, "out")]).code).toBe(0);
      // The ports of the old range are still theirs (a rotation keeps ports): ports.ssh still counts them.
      expectRefused(build(ws), /ports\.ssh changed from 26000-26999 to 28000-28999: 3 registered devices/);
      expect(build(ws).stderr).not.toMatch(/bastions\.eu\.(user|from)/);
    } finally {
      removeDir(ws.dir);
    }
  });

  it("a rotation with a grace period still counts the old key's device until the grace ends", async () => {
    const ws = await fleetOf3(backend);
    try {
      writeCfg(ws, { user: "tunnel" });
      expect(cli(ws, ["rotate", "gw-0001", "--grace", "7d", "--force-config-change", "--quiet", "--out", join(ws.dir, "out")]).code).toBe(0);
      // gw-0001's old key (its old overlay, in the field until re-flashed) still dials mko-tunnel.
      expectRefused(build(ws), /bastions\.eu\.user changed from mko-tunnel to tunnel: 3 registered devices/);
    } finally {
      removeDir(ws.dir);
    }
  });
});

describe("docs/bastion.md, \"Changing a fleet's settings\": the recipe as written", () => {
  it("rotates every device that still dials an old setting, and only those", async () => {
    const text = readFileSync(join(REPO, "docs/bastion.md"), "utf8");
    const section = text.slice(text.indexOf("## 13. Changing a fleet's settings"));
    const recipe = /```sh\n([\s\S]*?)```/.exec(section)?.[1];
    expect(recipe).toMatch(/registry list --old-settings/);
    const ws = await fleetOf3(BACKENDS[0]![1]);
    try {
      writeCfg(ws, { user: "tunnel" });
      const gw4 = build(ws, ["--force-config-change"]);
      expect(gw4.code, gw4.stderr).toBe(0);
      const before = new Map(listed(ws).map((d) => [d.hostname, JSON.stringify(d)]));
      const bin = join(ws.dir, "bin");
      mkdirSync(bin);
      writeFileSync(join(bin, "mkoverlay"), `#!/bin/sh\nexec "${process.execPath}" "${CLI}" "$@"\n`, { mode: 0o755 });
      const r = run("bash", ["-euo", "pipefail", "-c", recipe!], { cwd: ws.dir, env: { PATH: `${bin}:${process.env.PATH}`, MKOVERLAY_CONFIG: ws.cfg, MKOVERLAY_REGISTRY: "" } });
      expect(r.code, r.stderr).toBe(0);
      const after = listed(ws);
      // The three old devices have new keys and dial the new user; gw-0004 was left alone.
      for (const d of after) expect(d.oldSettings, d.hostname).toEqual([]);
      expect(after.filter((d) => before.get(d.hostname) !== JSON.stringify(d)).map((d) => d.hostname)).toEqual(["gw-0001", "gw-0002", "gw-0003"]);
      expect(readdirSync(join(ws.dir, "out")).filter((f) => f.startsWith("gw-000")).length).toBeGreaterThanOrEqual(4);
      // Their old keys (the overlays still in the field) keep the old user until the grace ends.
      expectRefused(build(ws), /bastions\.eu\.user changed from mko-tunnel to tunnel: 3 registered devices/);
    } finally {
      removeDir(ws.dir);
    }
  });
});

describe("a registry from before schema 6", () => {
  it("records the config in use at its first build as what its devices dial; a change after that is refused", async () => {
    const dir = tempDir("mko-lockout-old-");
    const ws: Ws = { dir, cfg: join(dir, "mkoverlay.yaml"), registry: join(dir, "registry.db") };
    try {
      writeCfg(ws);
      expect(cli(ws, ["batch", "--board", "rpi4", "--bastion", "eu", "--count", "2", "--quiet", "--out", join(dir, "out")]).code).toBe(0);
      const db = new Database(ws.registry);
      db.prepare("UPDATE devices SET dials = NULL").run();
      db.close();
      const first = build(ws);
      expect(first.code, first.stderr).toBe(0);
      const db2 = new Database(ws.registry, { readonly: true });
      expect((db2.prepare("SELECT count(*) AS n FROM devices WHERE dials IS NULL").get() as { n: number }).n).toBe(0);
      db2.close();
      writeCfg(ws, { user: "tunnel" });
      expectRefused(build(ws), /bastions\.eu\.user changed from mko-tunnel to tunnel: 3 registered devices/);
    } finally {
      removeDir(dir);
    }
  });
});

// --- the bastion: a real sshd on 127.0.0.1 ---

const OLD_USER = "mko-lock-old";
const NEW_USER = "mko-lock-new";

function snapshot(root: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string) => {
    for (const n of readdirSync(d).sort()) {
      const p = join(d, n);
      const st = lstatSync(p);
      const rel = relative(root, p);
      if (st.isDirectory()) {
        out.set(rel, `dir ${(st.mode & 0o7777).toString(8)}`);
        walk(p);
      } else out.set(rel, `${st.isSymbolicLink() ? "link" : "file"} ${(st.mode & 0o7777).toString(8)} ${st.isFile() ? createHash("sha256").update(readFileSync(p)).digest("hex") : ""}`);
    }
  };
  walk(root);
  return out;
}

requires(root)("bastion install after a tunnel user rename (real sshd)", () => {
  const created: string[] = [];
  const dirs: string[] = [];
  const tunnels: Tunnel[] = [];
  let bastion: SshBastion | undefined;
  afterAll(async () => {
    for (const t of tunnels) await t.stop();
    await bastion?.stop();
    cleanup(dirs);
    for (const u of created) spawnSync("userdel", [u]);
  });

  it("refuses without --force-config-change (count and field named, nothing installed); forced, an old device (old user) and a new device (new user) both get their tunnel", async () => {
    for (const u of [OLD_USER, NEW_USER, "mkoverlay-keys"]) {
      if (spawnSync("id", [u]).status !== 0 && u !== "mkoverlay-keys") created.push(u);
      ensureUser(u);
    }
    const dir = tempDir("mko-lockout-sshd-");
    const root = secureRoot();
    dirs.push(dir, root);
    const port = await freePort();
    prepareRoot(root, port);
    const rootKey = readPub(join(root, "etc/ssh/ssh_host_ed25519_key"));
    const lo = (user: string): BastionDef => ({ host: "127.0.0.1", port, user, hostKeys: [rootKey] });
    // A SQLite registry on the bastion itself: inside the root, where `--registry` names it.
    mkdirSync(join(root, "srv"), { mode: 0o755 });
    const registry = join(root, "srv/registry.db");
    const cfg = writeFleet(dir, { lo: lo(OLD_USER) }, { registry, ports: { ssh: "26500-26599", services: "27500-27599" } });
    const old = buildDevice(dir, cfg);
    dirs.push(old.root);

    writeFleet(dir, { lo: lo(NEW_USER) }, { registry, ports: { ssh: "26500-26599", services: "27500-27599" } });
    const install = (extra: string[] = []) =>
      runCli(["bastion", "install", "--bastion", "lo", "--root", root, "--registry", "/srv/registry.db", "--mkoverlay", "/usr/local/bin/mkoverlay", "--config", cfg, ...extra], { cwd: dir });
    // What the install may change: everything but the registry it reads.
    const installed = () => new Map([...snapshot(root)].filter(([k]) => !k.startsWith("srv")));
    const before = installed();
    const refused = install();
    expect(refused.code, refused.stderr).toBe(2);
    expect(refused.stderr).toMatch(new RegExp(`mkoverlay\\.yaml:\\d+: bastions\\.lo\\.user changed from ${OLD_USER} to ${NEW_USER}: 1 registered device \\(${old.hostname}\\) dials ${OLD_USER}`));
    expect(installed()).toEqual(before);

    // A build for the new user is refused the same way, and goes on when forced.
    expect(runCli(["--board", "rpi4", "--bastion", "lo", "--quiet", "--out", join(dir, "out"), "--config", cfg], { cwd: dir }).code).toBe(2);
    const fresh = buildDevice(dir, cfg, ["--force-config-change"]);
    dirs.push(fresh.root);
    const forced = install(["--force-config-change"]);
    expect(forced.code, forced.stderr).toBe(0);
    expect(forced.stderr).toMatch(/warning: .*bastions\.lo\.user changed/);
    const dropin = readFileSync(join(root, "etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf"), "utf8");
    expect(dropin).toMatch(new RegExp(`^Match User ${NEW_USER}$`, "m"));
    expect(dropin).toMatch(new RegExp(`^Match User ${OLD_USER}$`, "m"));
    expect(readdirSync(join(root, "var/lib/mkoverlay/bastion/lo/keys"))).toHaveLength(2);

    bastion = await startBastion(root, "lo", dir);
    // Each overlay dials the user it was built with.
    expect(readFileSync(join(old.root, "etc/mkoverlay/tunnels/lo.env"), "utf8")).toContain(OLD_USER);
    expect(readFileSync(join(fresh.root, "etc/mkoverlay/tunnels/lo.env"), "utf8")).toContain(NEW_USER);
    tunnels.push((await tunnelUp(old, 10_000)).tunnel);
    tunnels.push((await tunnelUp(fresh, 10_000)).tunnel);
  });
});
