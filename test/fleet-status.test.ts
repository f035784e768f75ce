/**
 * "See the fleet" end to end (issue 13): a real sshd configured by `bastion install`, real
 * `ssh -N -R` gateways with their own device keys, the agent recording what it sees every
 * second into a real PostgreSQL (as the role docs/bastion.md gives it) and into SQLite on the
 * same host; `mkoverlay status` reads it back.
 */
import { spawn, spawnSync } from "node:child_process";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { need, type Need, requires, root } from "./helpers/capability.js";
import { agentRole } from "./helpers/agent-role.js";
import { buildDevice, cleanup, isRoot, prepareRoot, secureRoot, startAgent, startBastion, tunnelUp, type AgentProc, type Bastion, type Device, type Tunnel } from "./helpers/bastion.js";
import { portBlock } from "./helpers/net.js";
import { postgresForTests } from "./helpers/postgres.js";
import { ensureUser, freePort, waitFor } from "./helpers/sshd.js";
import { readPub, removeDir, runCli, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-status-t";
const { server: pgServer } = isRoot ? await postgresForTests() : { server: undefined };
afterAll(async () => {
  await pgServer?.stop();
});

interface Setup {
  ws: string;
  cfg: string;
  agent: AgentProc;
  bastion: Bastion;
  dirs: string[];
  tunnels: Tunnel[];
  servers: Server[];
  ports: { lo: number; hi: number };
  metricsPort: number;
  revokeQuietly?: (hostname: string) => Promise<void>;
}

async function setUp(registry: (ws: string) => Promise<Registries>): Promise<Setup> {
  ensureUser(TUNNEL_USER);
  ensureUser("mkoverlay-keys");
  const ws = tempDir("mko-status-ws-");
  const root = secureRoot();
  const port = await freePort();
  prepareRoot(root, port);
  const block = await portBlock(32);
  const ports = { ssh: block.range(0, 15), services: block.range(16, 31) };
  const reg = await registry(ws);
  const cfg = writeFleet(ws, { lo: { host: "127.0.0.1", port, user: TUNNEL_USER, hostKeys: [readPub(join(root, "etc/ssh/ssh_host_ed25519_key"))] } }, { registry: reg.station, ports });
  const first = buildDevice(ws, cfg, ["--hostname", "gw-first"]);
  const inst = runCli(["bastion", "install", "--bastion", "lo", "--root", root, "--registry", reg.agent, "--mkoverlay", "/usr/local/bin/mkoverlay", "--config", cfg], { cwd: ws });
  if (inst.code !== 0) throw new Error(`install failed: ${inst.stderr}`);
  const bastion = await startBastion(root, "lo", ws);
  const metricsPort = await freePort();
  const agent = startAgent(root, "lo", { authLog: bastion.logFile, resync: 60, args: ["--interval", "1", "--metrics-listen", `127.0.0.1:${metricsPort}`] });
  await agent.waitLog(/in sync: \d+ key/);
  return { ws, cfg, agent, bastion, dirs: [ws, root, first.root], tunnels: [], servers: [], ports: { lo: block.lo, hi: block.hi }, metricsPort, ...(reg.revokeQuietly ? { revokeQuietly: reg.revokeQuietly } : {}) };
}

async function tearDown(s: Setup | undefined): Promise<void> {
  if (!s) return;
  if (process.env.SHOW_AGENT) process.stderr.write(s.agent.lines.join("\n") + "\n");
  for (const t of s.tunnels) await t.stop();
  for (const srv of s.servers) srv.close();
  await s.agent.stop();
  await s.bastion.stop();
  cleanup(s.dirs);
}

interface Status {
  devices: { hostname: string; state: string; connected: { bastion: string; since: string; fingerprint?: string }[]; lastSeen: string | null }[];
  alarms: { kind: string; hostname?: string; port?: number }[];
  bastions: { name: string; connected: number; fresh: boolean }[];
}

const status = (s: Setup, extra: string[] = []): Status => {
  const r = runCli(["status", "--json", "--never-seen-after", "1s", "--config", s.cfg, ...extra], { cwd: s.ws });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Status;
};
const of = (st: Status, h: string) => st.devices.find((d) => d.hostname === h);

interface Registries {
  station: string;
  agent: string;
  /** Revokes a device the way the agent does not hear of at once (not every backend can). */
  revokeQuietly?: (hostname: string) => Promise<void>;
}

function scenario(name: string, registry: (ws: string) => Promise<Registries>, ...needs: Need[]) {
  requires(root, ...needs)(name, () => {
    let s: Setup;
    let a: Device, b: Device, c: Device;
    beforeAll(async () => {
      s = await setUp(registry);
      [a, b, c] = [1, 2, 3].map(() => buildDevice(s.ws, s.cfg)) as [Device, Device, Device];
      s.dirs.push(a.root, b.root, c.root);
      for (const d of [a, b]) s.tunnels.push((await tunnelUp(d, 10_000)).tunnel);
    }, 120_000);
    afterAll(() => tearDown(s));

    it("3 built, 2 connected: exactly those 2 connected on the right bastion, the third never seen", async () => {
      await waitFor("both tunnels recorded", () => of(status(s), a.hostname)?.state === "connected" && of(status(s), b.hostname)?.state === "connected", 10_000, 200);
      await new Promise((r) => setTimeout(r, 1100)); // past --never-seen-after 1s
      const st = status(s);
      // The key each tunnel logged in with, from sshd's log, is the device's own.
      expect(of(st, a.hostname)).toMatchObject({ state: "connected", connected: [{ bastion: "lo", fingerprint: a.fingerprint }] });
      expect(of(st, b.hostname)).toMatchObject({ state: "connected", connected: [{ bastion: "lo", fingerprint: b.fingerprint }] });
      expect(st.alarms.filter((x) => x.kind === "key-mismatch")).toEqual([]);
      expect(of(st, c.hostname)).toMatchObject({ state: "never-seen", connected: [], lastSeen: null });
      expect(st.devices.filter((d) => d.state === "connected").map((d) => d.hostname).sort()).toEqual([a.hostname, b.hostname].sort());
      expect(st.alarms.map((x) => [x.kind, x.hostname])).toEqual(expect.arrayContaining([["never-seen", c.hostname]]));
      expect(st.bastions).toEqual([expect.objectContaining({ name: "lo", connected: 2, fresh: true })]);
      const table = runCli(["status", "--config", s.cfg], { cwd: s.ws }).stdout;
      expect(table).toMatch(new RegExp(`^${a.hostname}\\s+connected\\s+lo\\s`, "m"));
      // registry list carries the same, with the history.
      const list = JSON.parse(runCli(["registry", "list", "--json", "--config", s.cfg], { cwd: s.ws }).stdout) as { hostname: string; seen: { state: string; firstSeen: string | null; seenOn: string[] } | null }[];
      expect(list.find((d) => d.hostname === a.hostname)?.seen).toMatchObject({ state: "connected", seenOn: ["lo"], firstSeen: expect.any(String) });
      expect(list.find((d) => d.hostname === c.hostname)?.seen).toMatchObject({ state: "new", seenOn: [], firstSeen: null });
    });

    it("one disconnects: within two intervals it is not connected, with its last-seen time", async () => {
      const t = s.tunnels.shift()!;
      const stopped = Date.now();
      await t.stop();
      await waitFor(`${a.hostname} offline`, () => of(status(s), a.hostname)?.state === "offline", 2500, 100);
      const d = of(status(s), a.hostname)!;
      expect(d.connected).toEqual([]);
      expect(Math.abs(Date.parse(d.lastSeen!) - stopped)).toBeLessThan(2500);
      const row = runCli(["registry", "list", "--format", "csv", "--config", s.cfg], { cwd: s.ws }).stdout.split("\n").find((l) => l.startsWith(`${a.hostname},`))!;
      expect(row).toContain(`,offline,`);
      expect(row).toContain(d.lastSeen!);
    });

    it("a revoked device that is still connected is an alarm, and --check exits non-zero", async (ctx) => {
      if (!s.revokeQuietly) return ctx.skip();
      await s.revokeQuietly(b.hostname);
      await waitFor("the revoked-connected alarm", () => status(s).alarms.some((x) => x.kind === "revoked-connected" && x.hostname === b.hostname), 5000, 200);
      const check = runCli(["status", "--check", "--never-seen-after", "0", "--config", s.cfg], { cwd: s.ws });
      expect(check.code).toBe(1);
      expect(check.stdout).toMatch(new RegExp(`^ALARM revoked-connected: ${b.hostname} is revoked but connected to lo`, "m"));
    });

    it("a stray listener in the tunnel range is an alarm", async () => {
      const port = s.ports.hi;
      const srv = createServer();
      await new Promise<void>((r) => srv.listen(port, "127.0.0.1", r));
      s.servers.push(srv);
      await waitFor("the unknown-listener alarm", () => status(s).alarms.some((x) => x.kind === "unknown-listener" && x.port === port), 5000, 200);
    });

    it("another user listening on a device's port is port-squatted, not the device: no connected, an alarm, --check exits 1 (issue 19)", async () => {
      // `nobody` takes the port of the device that never connected.
      const squatter = spawn(process.execPath, ["-e", `require("net").createServer().listen(${c.port}, "127.0.0.1"); setTimeout(() => {}, 600000)`], { uid: 65534, gid: 65534, stdio: "ignore" });
      try {
        await waitFor("the port-squatted alarm", () => status(s).alarms.some((x) => x.kind === "port-squatted" && x.hostname === c.hostname), 5000, 200);
        const st = status(s);
        expect(of(st, c.hostname)).toMatchObject({ connected: [] });
        expect(of(st, c.hostname)?.state).not.toBe("connected");
        expect(st.alarms.find((x) => x.kind === "port-squatted")).toMatchObject({ hostname: c.hostname, port: c.port, uid: 65534 });
        const check = runCli(["status", "--check", "--never-seen-after", "0", "--config", s.cfg], { cwd: s.ws });
        expect(check.code).toBe(1);
        expect(check.stdout).toMatch(new RegExp(`^ALARM port-squatted: lo: port ${c.port} of ${c.hostname} is held by uid 65534 since `, "m"));
        // The real device's own tunnel is not an alarm.
        expect(st.alarms.filter((x) => x.kind === "port-squatted" && x.hostname !== c.hostname)).toEqual([]);
      } finally {
        squatter.kill("SIGKILL");
      }
    });

    it("the Prometheus output (status and the agent's endpoint) passes promtool check metrics", async () => {
      const text = runCli(["status", "--format", "prometheus", "--config", s.cfg], { cwd: s.ws }).stdout;
      expect(text).toMatch(new RegExp(`^mkoverlay_device_up\\{hostname="${b.hostname}",bastion="lo"\\} 1$`, "m"));
      expect(spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" }).status).toBe(0);
      const res = await fetch(`http://127.0.0.1:${s.metricsPort}/metrics`);
      expect(res.status).toBe(200);
      const served = await res.text();
      expect(served).toMatch(/^mkoverlay_alarms\{kind="unknown-listener"\} 1$/m);
      expect(spawnSync("promtool", ["check", "metrics"], { input: served, encoding: "utf8" }).status).toBe(0);
    });
  });
}

// PostgreSQL: a device revoked straight in the database, without NOTIFY, is one the agent has
// not heard of yet (its next full re-read would end the session): the moment the alarm is for.
scenario("fleet status on PostgreSQL (the agent's role writes only its observations)", async () => {
  const server = pgServer!;
  const url = await server.createDatabase();
  const boot = tempDir("mko-status-boot-");
  const k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB b";
  try {
    expect(runCli(["registry", "list", "--config", writeFleet(boot, { x: { hostKeys: [k] } }, { registry: url })], { cwd: boot }).code).toBe(0);
  } finally {
    removeDir(boot);
  }
  return {
    station: url,
    agent: await agentRole(server, url, "mkoverlay_status_agent"),
    revokeQuietly: async (hostname) => void (await server.sql(url, "UPDATE mkoverlay.devices SET status = 'revoked' WHERE hostname = $1", [hostname])),
  };
}, need(pgServer, "PostgreSQL (scripts/ensure-postgres.sh)"));

// SQLite on the bastion itself: the agent watches the file, so a revocation ends the session at
// once and the revoked-but-connected moment cannot be caught; the rest is the same.
scenario("fleet status on a SQLite registry on the bastion", async (ws) => {
  const file = join(ws, "registry.db");
  return { station: file, agent: file };
});
