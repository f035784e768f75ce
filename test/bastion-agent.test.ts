/**
 * The bastion following the registry live (issue 12), end to end with the real programs: a
 * bastion set up by `bastion install --root`, the system's sshd on 127.0.0.1 reading its
 * drop-in, the agent running as its unit runs it (with the documented read-only PostgreSQL
 * role), gateways running their tunnel unit's exact ssh command with their own keys. The stale
 * session test also runs on OpenSSH 10.x (helpers/sshd10.ts), on a SQLite registry.
 */
import { readdirSync, readFileSync, renameSync } from "node:fs";
import { connect } from "node:net";
import { spawn } from "node:child_process";
import { join } from "node:path";
import pg from "pg";
import { afterAll, beforeAll, expect, it } from "vitest";
import { fileNameFor } from "../src/bastion/keystore.js";
import { need, requires, root } from "./helpers/capability.js";
import { buildDevice, cleanup, isRoot, openTunnel, prepareRoot, secureRoot, startAgent, startBastion, tryLogin, tunnelUp, type AgentProc, type Bastion, type Device, type Tunnel } from "./helpers/bastion.js";
import { agentRole } from "./helpers/agent-role.js";
import { tunnelArgv } from "./helpers/device.js";
import { portBlock } from "./helpers/net.js";
import { postgresForTests, type PgServer } from "./helpers/postgres.js";
import { canConnect, ensureUser, freePort, waitFor } from "./helpers/sshd.js";
import { expectSshdVersion, openssh10, type SshdBinary } from "./helpers/sshd10.js";
import { extract, readPub, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-bastion-t";
// A port block of this run's own: the agent ends any tunnel-user listener in its ranges that no
// key allows, so two runs sharing a range (and the tunnel user) would end each other's tunnels.
const block = await portBlock(200);
const PORTS = { ssh: block.range(0, 99), services: block.range(100, 199) };
const AGENT_ROLE = "mkoverlay_bastion";

const { server: pgServer } = isRoot ? await postgresForTests() : { server: undefined };
afterAll(async () => {
  await pgServer?.stop();
  block.release();
});

const createAgentRole = (server: PgServer, url: string) => agentRole(server, url, AGENT_ROLE);

const re = (fp: string) => fp.replace(/[+/]/g, ".");
const authorized = (s: Setup, d: Device) => s.agent.waitLog(new RegExp(`${d.hostname}: key ${re(d.fingerprint)} authorized`));

const sessionGone = async (port: number) => !(await canConnect(port, "127.0.0.1", 300));

/**
 * A client that never authenticates: it speaks the SSH transport only as far as an
 * SSH_MSG_DISCONNECT (reason 11, "by application") carrying `text`, sent in the clear before the
 * key exchange, which OpenSSH 9.2 logs as "Received disconnect from ADDR port N:11: TEXT [preauth]".
 */
async function forgeDisconnect(port: number, text: string): Promise<void> {
  const reason = Buffer.from(text);
  const payload = Buffer.alloc(1 + 4 + 4 + reason.length + 4);
  payload[0] = 1; // SSH_MSG_DISCONNECT
  payload.writeUInt32BE(11, 1);
  payload.writeUInt32BE(reason.length, 5);
  reason.copy(payload, 9); // then an empty language tag
  let pad = 8 - ((5 + payload.length) % 8);
  if (pad < 4) pad += 8;
  const packet = Buffer.alloc(5 + payload.length + pad);
  packet.writeUInt32BE(1 + payload.length + pad, 0);
  packet[4] = pad;
  payload.copy(packet, 5);
  await new Promise<void>((resolve, reject) => {
    const sock = connect(port, "127.0.0.1", () => {
      sock.write("SSH-2.0-forger\r\n");
      sock.write(packet);
    });
    sock.on("data", () => undefined);
    sock.on("error", reject);
    sock.on("close", () => resolve());
    setTimeout(() => sock.destroy(), 2000);
  });
}

interface Setup {
  ws: string;
  root: string;
  cfg: string;
  bastion: Bastion;
  agent: AgentProc;
  dirs: string[];
  tunnels: Tunnel[];
  keysDir: string;
}

/** Fleet config + registry + install --root + sshd (the system's, or `sshd`) + agent. */
async function setUp(registry: string, agentRegistry: string, resync?: number, sshd?: SshdBinary): Promise<Setup> {
  ensureUser(TUNNEL_USER);
  ensureUser("mkoverlay-keys");
  const ws = tempDir("mko-bastion-ws-");
  const root = secureRoot();
  const port = await freePort();
  prepareRoot(root, port);
  const cfg = writeFleet(ws, { lo: { host: "127.0.0.1", port, user: TUNNEL_USER, hostKeys: [readPub(join(root, "etc/ssh/ssh_host_ed25519_key"))] } }, { registry, ports: PORTS });
  // The registry exists before the bastion is installed (a first build creates it).
  const first = buildDevice(ws, cfg, ["--hostname", "gw-first"]);
  const inst = runCli(["bastion", "install", "--bastion", "lo", "--root", root, "--registry", agentRegistry, "--mkoverlay", "/usr/local/bin/mkoverlay", "--config", cfg], { cwd: ws });
  if (inst.code !== 0) throw new Error(`install failed: ${inst.stderr}`);
  const bastion = await startBastion(root, "lo", ws, sshd);
  if (sshd) await expectSshdVersion(port, sshd);
  const agent = startAgent(root, "lo", { authLog: bastion.logFile, ...(resync ? { resync } : {}) });
  await agent.waitLog(/in sync: \d+ key/);
  return { ws, root, cfg, bastion, agent, dirs: [ws, root, first.root], tunnels: [], keysDir: join(root, "var/lib/mkoverlay/bastion/lo/keys") };
}

async function tearDown(s: Setup | undefined): Promise<void> {
  if (!s) return;
  if (process.env.SHOW_AGENT) process.stderr.write(s.agent.lines.join("\n") + "\n");
  for (const t of s.tunnels) await t.stop();
  await s.agent.stop();
  await s.bastion.stop();
  cleanup(s.dirs);
}

function cli(s: Setup, args: string[]) {
  const r = runCli([...args, "--config", s.cfg], { cwd: s.ws });
  expect(r.code, r.stderr).toBe(0);
  return r;
}

function device(s: Setup, extra: string[] = []): Device {
  const d = buildDevice(s.ws, s.cfg, extra);
  s.dirs.push(d.root);
  return d;
}

async function up(s: Setup, d: Device, timeoutMs = 5000, overlayRoot?: string): Promise<{ tunnel: Tunnel; ms: number }> {
  const r = await tunnelUp(d, timeoutMs, overlayRoot);
  s.tunnels.push(r.tunnel);
  return r;
}

/**
 * A stale session gives way (issue 20): the device reconnecting with the same key binds within
 * 5 s while its vanished old session still holds the port.
 */
async function staleSessionGivesWay(s: Setup): Promise<void> {
  const d = device(s);
  const stale = (await up(s, d)).tunnel;
  await waitFor("the login line", () => readFileSync(s.bastion.logFile, "utf8").includes(`ssh2: ED25519 ${d.fingerprint}`), 5000, 50);
  // The tunnel has been up a while (a session only seconds older than a login is not taken
  // for stale)…
  await new Promise((r) => setTimeout(r, 3000));
  // …when the device loses power: its ssh neither answers nor closes (the bastion's keepalive
  // would take 45 s to notice).
  stale.proc.kill("SIGSTOP");
  try {
    const t0 = Date.now();
    // Its reconnect logs in; the forward fails while the old session holds the port…
    const first = openTunnel(d);
    s.tunnels.push(first);
    // …and the agent ends the old session, which logged in with the same key.
    await s.agent.waitLog(new RegExp(`ended the session on port ${d.port} \\(pid \\d+, key ${re(d.fingerprint)}\\): ${d.hostname} logged in again with the same key`), 5000);
    const { tunnel } = await up(s, d, 5000);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(tunnel.exited(), tunnel.stderr()).toBe(false);
  } finally {
    stale.proc.kill("SIGCONT");
  }
}

requires(root, need(pgServer, "PostgreSQL (scripts/ensure-postgres.sh)"))("bastion agent on PostgreSQL (read-only role, LISTEN/NOTIFY)", () => {
  let s: Setup;
  let url: string;
  beforeAll(async () => {
    url = await pgServer!.createDatabase();
    // The schema must exist before the role can be granted on it: a first station creates it.
    const boot = tempDir("mko-bastion-boot-");
    const k = sshKeygen(boot, "k");
    writeFleet(boot, { lo: { hostKeys: [readPub(k)] } }, { registry: url, ports: PORTS });
    expect(runCli(["registry", "list"], { cwd: boot }).code).toBe(0);
    const agentUrl = await createAgentRole(pgServer!, url);
    s = await setUp(url, agentUrl, 60);
    s.dirs.push(boot);
  }, 120_000);
  afterAll(() => tearDown(s));

  it("a device built after the agent started opens its tunnel within 5 s of its build", async () => {
    const d = device(s);
    const { ms } = await up(s, d);
    expect(ms).toBeLessThan(5000);
    await authorized(s, d);
    expect(readdirSync(s.keysDir)).toContain(fileNameFor(d.fingerprint));
  });

  it("revoke ends the live tunnel and refuses the next login within 5 s; the other tunnels stay up", async () => {
    const a = device(s);
    const b = device(s);
    const ta = (await up(s, a)).tunnel;
    const tb = (await up(s, b)).tunnel;
    const t0 = Date.now();
    cli(s, ["revoke", a.hostname]);
    await waitFor(`revoked ${a.hostname}'s port ${a.port} to close`, () => sessionGone(a.port), 5000, 50);
    // The key went before the session was ended: from here on, its logins are refused.
    expect(readdirSync(s.keysDir)).not.toContain(fileNameFor(a.fingerprint));
    await waitFor("the revoked device's ssh to exit", () => ta.exited(), 5000, 50);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(ta.stderr()).toMatch(/closed by remote host|Connection closed|Broken pipe/);
    const again = await tryLogin(a);
    expect(again.ok).toBe(false);
    expect(again.stderr).toMatch(/Permission denied \(publickey\)/);
    // The other device never noticed.
    expect(tb.exited()).toBe(false);
    expect(await canConnect(b.port)).toBe(true);
  });

  it("a rotated device's old key works during the grace and stops when the new key is seen", async () => {
    const d = device(s);
    const oldRoot = d.root;
    const t1 = (await up(s, d)).tunnel;
    const rot = cli(s, ["rotate", d.hostname, "--grace", "7d", "--json", "--quiet", "--out", join(s.ws, "rotated")]);
    const r = JSON.parse(rot.stdout) as { fingerprint: string; overlay: string };
    const newRoot = tempDir("mko-dev-rot-");
    s.dirs.push(newRoot);
    extract(r.overlay, newRoot);
    await s.agent.waitLog(new RegExp(`${d.hostname}: key ${re(r.fingerprint)} authorized`));
    // The old session is untouched by the rotation, and the old key still logs in.
    expect(t1.exited()).toBe(false);
    await t1.stop();
    await waitFor("old session to end", () => sessionGone(d.port), 5000);
    expect((await tryLogin(d, oldRoot)).ok).toBe(true);
    await waitFor("old session to end", () => sessionGone(d.port), 5000);
    // The new key logs in; sshd's log shows it; the agent retires the old key at once.
    const t2 = (await up(s, d, 5000, newRoot)).tunnel;
    await s.agent.waitLog(new RegExp(`${d.hostname}: new key .* logged in; retiring its previous key ${re(d.fingerprint)}`), 5000);
    await waitFor("the old key file to go", () => !readdirSync(s.keysDir).includes(fileNameFor(d.fingerprint)), 5000);
    expect(t2.exited()).toBe(false); // retiring the old key leaves the new session alone
    await t2.stop();
    await waitFor("new session to end", () => sessionGone(d.port), 5000);
    const old = await tryLogin(d, oldRoot);
    expect(old.ok).toBe(false);
    expect(old.stderr).toMatch(/Permission denied \(publickey\)/);
    expect((await tryLogin(d, newRoot)).ok).toBe(true);
  });

  it("rotate --grace 0 ends the old key's live sessions within 5 s, one holding no port included; the new key then binds the port (issue 19)", async () => {
    const d = device(s);
    await authorized(s, d);
    // A session with the old key that holds no port (it could ask for one at any time)…
    const argv = tunnelArgv(d.root, "lo", d.hostname);
    argv.splice(argv.indexOf("-R"), 2);
    const idle = spawn(argv[0]!, argv.slice(1), { stdio: "ignore" });
    const idleGone = () => idle.exitCode !== null || idle.signalCode !== null;
    try {
      await waitFor("its login line", () => readFileSync(s.bastion.logFile, "utf8").includes(`ssh2: ED25519 ${d.fingerprint}`), 5000, 50);
      // …and then the tunnel (a later login of the same key: the idle session holds no port to give way).
      const old = (await up(s, d)).tunnel;
      // The agent knows which key each session logged in with (sshd's log) before the rotation.
      await waitFor("both login lines", () => readFileSync(s.bastion.logFile, "utf8").split(`ssh2: ED25519 ${d.fingerprint}`).length >= 3, 5000, 50);
      await new Promise((r) => setTimeout(r, 500));
      expect(old.exited()).toBe(false);
      expect(idleGone()).toBe(false);
      await rotateAway(d, old, idleGone);
    } finally {
      idle.kill("SIGKILL");
    }
  });

  async function rotateAway(d: Device, old: Tunnel, idleGone: () => boolean): Promise<void> {
    const t0 = Date.now();
    const rot = cli(s, ["rotate", d.hostname, "--grace", "0", "--json", "--quiet", "--out", join(s.ws, "rotated0")]);
    const r = JSON.parse(rot.stdout) as { fingerprint: string; overlay: string };
    await waitFor("the old key's sessions to end", () => old.exited() && idleGone(), 5000, 50);
    expect(Date.now() - t0).toBeLessThan(5000);
    await s.agent.waitLog(new RegExp(`ended the session holding no port \\(pid \\d+, key ${re(d.fingerprint)}\\): its key was removed`));
    await s.agent.waitLog(new RegExp(`ended the session on port ${d.port} \\(pid \\d+, key ${re(d.fingerprint)}\\): its key was removed`));
    const newRoot = tempDir("mko-dev-rot0-");
    s.dirs.push(newRoot);
    extract(r.overlay, newRoot);
    expect((await up(s, d, 5000, newRoot)).ms).toBeLessThan(5000);
  }

  it("when a rotation's grace period ends, the old key's live session ends within 5 s (issue 19)", async () => {
    const d = device(s);
    const old = (await up(s, d)).tunnel;
    await waitFor("the login line", () => readFileSync(s.bastion.logFile, "utf8").includes(`ssh2: ED25519 ${d.fingerprint}`), 5000, 50);
    const rot = cli(s, ["rotate", d.hostname, "--grace", "3s", "--json", "--quiet", "--out", join(s.ws, "rotated3s")]);
    const r = JSON.parse(rot.stdout) as { fingerprint: string };
    await s.agent.waitLog(new RegExp(`${d.hostname}: previous key ${re(d.fingerprint)} accepted until (\\S+)`));
    const until = Date.parse(/accepted until (\S+) /.exec(s.agent.lines.find((l) => l.includes(`${d.hostname}: previous key ${d.fingerprint} accepted until`))!)![1]!);
    await s.agent.waitLog(new RegExp(`${d.hostname}: key ${re(r.fingerprint)} authorized`));
    // During the grace the old key's tunnel stays up…
    expect(old.exited()).toBe(false);
    // …and when it ends, so does the session.
    await waitFor("the old key's session to end", () => old.exited(), Math.max(0, until - Date.now()) + 5000, 50);
    expect(Date.now() - until).toBeLessThan(5000);
    expect(Date.now()).toBeGreaterThanOrEqual(until);
  });

  it("a leaked old key's session gives way: the new key's login retires it and ends its session, and the device binds within 5 s (issue 19)", async () => {
    const d = device(s);
    const leaked = (await up(s, d)).tunnel;
    await waitFor("the login line", () => readFileSync(s.bastion.logFile, "utf8").includes(`ssh2: ED25519 ${d.fingerprint}`), 5000, 50);
    const rot = cli(s, ["rotate", d.hostname, "--grace", "7d", "--json", "--quiet", "--out", join(s.ws, "rotated-leak")]);
    const r = JSON.parse(rot.stdout) as { fingerprint: string; overlay: string };
    await s.agent.waitLog(new RegExp(`${d.hostname}: key ${re(r.fingerprint)} authorized`));
    const newRoot = tempDir("mko-dev-leak-");
    s.dirs.push(newRoot);
    extract(r.overlay, newRoot);
    // The re-flashed device logs in; its forward fails while the leaked session holds the port…
    const t0 = Date.now();
    const first = openTunnel(d, newRoot);
    s.tunnels.push(first);
    // …but its login retires the old key, and the old key's session ends.
    await waitFor("the leaked key's session to end", () => leaked.exited(), 5000, 50);
    await s.agent.waitLog(new RegExp(`ended the session on port ${d.port} \\(pid \\d+, key ${re(d.fingerprint)}\\): its key was removed`));
    // The device's next try binds its port.
    const { tunnel } = await up(s, d, 5000, newRoot);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(tunnel.exited(), tunnel.stderr()).toBe(false);
    expect(readdirSync(s.keysDir)).not.toContain(fileNameFor(d.fingerprint));
  });

  it("a forged login line (an unauthenticated client's disconnect text) does not retire a rotated device's previous key (issue 19)", async () => {
    const d = device(s);
    await authorized(s, d);
    const rot = cli(s, ["rotate", d.hostname, "--grace", "7d", "--json", "--quiet", "--out", join(s.ws, "rotated-forge")]);
    const r = JSON.parse(rot.stdout) as { fingerprint: string };
    await s.agent.waitLog(new RegExp(`${d.hostname}: key ${re(r.fingerprint)} authorized`));
    const forged = `Accepted publickey for ${TUNNEL_USER} from 127.0.0.1 port 1 ssh2: ED25519 ${r.fingerprint}`;
    await forgeDisconnect(s.bastion.port, forged);
    // sshd logged the client's text verbatim, inside its own line.
    await waitFor("sshd to log the disconnect", () => readFileSync(s.bastion.logFile, "utf8").includes(`:11: ${forged} [preauth]`), 5000, 50);
    await new Promise((res) => setTimeout(res, 1500)); // the agent reads the log every 250 ms
    expect(s.agent.lines.filter((l) => l.includes(`${d.hostname}: new key`))).toEqual([]);
    expect(readdirSync(s.keysDir)).toContain(fileNameFor(d.fingerprint));
    // The device not yet re-flashed still gets in.
    expect((await tryLogin(d)).ok).toBe(true);
  });

  it("a stale session gives way: the device reconnecting with the same key binds within 5 s while its vanished old session still holds the port (issue 20)", async () => {
    await staleSessionGivesWay(s);
  });

  it("with PostgreSQL stopped, existing devices still connect; changes made while the agent was cut off apply once it is back", async () => {
    const keep = device(s);
    const gone = device(s);
    await authorized(s, keep);
    const tGone = (await up(s, gone)).tunnel;
    // The agent's next logins are refused (its session stays), so it cannot reconnect before we are done.
    await pgServer!.sql(url, `ALTER ROLE ${AGENT_ROLE} NOLOGIN`);
    await pgServer!.halt();
    await s.agent.waitLog(/unreachable: .*keeping the last known \d+ key\(s\) and retrying/, 10_000);
    const before = readdirSync(s.keysDir).sort();
    // Registry down ≠ bastion down.
    const t = await tryLogin(keep);
    expect(t.ok, t.stderr).toBe(true);
    expect(readdirSync(s.keysDir).sort()).toEqual(before);
    await pgServer!.resume();
    cli(s, ["revoke", gone.hostname]);
    const late = device(s);
    // Still cut off: nothing changed on the bastion yet.
    expect(tGone.exited()).toBe(false);
    expect(readdirSync(s.keysDir)).not.toContain(fileNameFor(late.fingerprint));
    await pgServer!.sql(url, `ALTER ROLE ${AGENT_ROLE} LOGIN`);
    await s.agent.waitLog(/reachable again after \d+s; caught up/, 45_000);
    await waitFor("the device revoked during the outage to be cut off", () => tGone.exited(), 5000);
    expect(await sessionGone(gone.port)).toBe(true);
    await up(s, late);
    expect(s.agent.lines.filter((l) => /unreachable/.test(l))).toHaveLength(1); // logged once, not per retry
  }, 90_000);

  it("corrupt and hostile rows are skipped with a log line and never reach sshd", async () => {
    const ok = device(s);
    const victim = device(s, ["--hostname", "gw-victim"]);
    await authorized(s, ok);
    await authorized(s, victim);
    const good = readdirSync(s.keysDir).length;
    const rows: [string, string, string][] = [
      // [hostname, public_key, fingerprint]
      ["gw-badkey", "ssh-ed25519 AAAAnotakey", "SHA256:" + "A".repeat(43)],
      ["gw-inject\nssh-ed25519 AAAA", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKHPWLIPXfg+vUdZK1KmPkMqDMZInER4VviOhALCClYv", "SHA256:xx"],
      ["gw-fpmismatch", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEZmNLjiI/nOsQO43oGVSJWohaqnUKjNP0zxjG1G6ut5", "SHA256:" + "B".repeat(43)],
    ];
    let port = block.port(90);
    for (const [h, key, fp] of rows) {
      await pgServer!.sql(
        url,
        `INSERT INTO mkoverlay.devices (hostname, board, os, bastions, port, public_key, fingerprint, status, overlay, station, created, updated)
         VALUES ($1, 'rpi4', 'raspios', 'lo', $2, $3, $4, 'active', NULL, 'x', '2025-01-01T00:00:00Z', '2025-01-01T00:00:00Z')`,
        [h, port++, key, fp],
      );
      await pgServer!.sql(url, "SELECT pg_notify('mkoverlay_changes', $1)", [h]);
    }
    // A port outside the fleet's ranges and an option injection through a stored previous key.
    await pgServer!.sql(url, "UPDATE mkoverlay.devices SET port = 1022 WHERE hostname = $1", [ok.hostname]);
    await pgServer!.sql(url, "UPDATE mkoverlay.devices SET prev_public_key = $1, prev_fingerprint = $2, prev_until = '2999-01-01T00:00:00Z' WHERE hostname = 'gw-victim'", [
      'ssh-ed25519 AAAA",permitopen="*:*',
      "SHA256:" + "C".repeat(43),
    ]);
    for (const h of [ok.hostname, "gw-victim"]) await pgServer!.sql(url, "SELECT pg_notify('mkoverlay_changes', $1)", [h]);
    await s.agent.waitLog(/skipped "gw-badkey": key is not an ssh-ed25519 public key line/);
    await s.agent.waitLog(/skipped "gw-inject\\nssh-ed25519 AAAA": host name/);
    await s.agent.waitLog(/skipped "gw-fpmismatch": key does not match its stored fingerprint/);
    await s.agent.waitLog(new RegExp(`skipped "${ok.hostname}": port 1022 is not in ports.ssh`));
    await s.agent.waitLog(/skipped "gw-victim": previous key is not an ssh-ed25519 public key line/);
    // The hostile rows added nothing; the moved device lost its key; the victim kept its own.
    const files = readdirSync(s.keysDir);
    expect(files).not.toContain(fileNameFor(ok.fingerprint));
    expect(files).toContain(fileNameFor(victim.fingerprint));
    expect(files).toHaveLength(good - 1);
    const bad = ["A", "B", "C"].map((c) => fileNameFor("SHA256:" + c.repeat(43)));
    for (const b of bad) expect(files).not.toContain(b);
    await pgServer!.sql(url, "DELETE FROM mkoverlay.devices WHERE hostname IN ('gw-badkey', 'gw-fpmismatch') OR hostname LIKE 'gw-inject%'");
  });

  it("the agent's PostgreSQL role reads, writes only what it sees, and cannot change the fleet", async () => {
    const c = new pg.Client({ connectionString: pgServer!.url(decodeURIComponent(new URL(url).pathname.slice(1)), AGENT_ROLE) });
    await c.connect();
    try {
      expect((await c.query("SELECT count(*) AS n FROM mkoverlay.devices")).rows[0].n).not.toBe("0");
      await c.query("LISTEN mkoverlay_changes");
      const denied = async (sql: string) => {
        const e = (await c.query(sql).then(() => undefined, (err: unknown) => err)) as { code?: string } | undefined;
        expect(e?.code, sql).toBe("42501");
      };
      await denied("INSERT INTO mkoverlay.meta (key, value) VALUES ('x', 'y')");
      await denied("UPDATE mkoverlay.devices SET status = 'active'");
      await denied("DELETE FROM mkoverlay.ports");
      await denied("INSERT INTO mkoverlay.ports (port, hostname, purpose) VALUES (1, 'a', 'ssh')");
      await denied("UPDATE mkoverlay.meta SET value = '0' WHERE key = 'seq'");
      await denied("DELETE FROM mkoverlay.devices");
      await denied("CREATE TABLE mkoverlay.evil (x int)");
      await denied("TRUNCATE mkoverlay.devices");
      await denied("DELETE FROM mkoverlay.sightings");
      await denied("TRUNCATE mkoverlay.heartbeats");
      await denied("INSERT INTO mkoverlay.attributes (hostname, key, value) VALUES ('a', 'b', 'c')");
      // What it may write: its observations (issue 13), through the registry's own calls.
      await c.query("INSERT INTO mkoverlay.heartbeats (bastion, at, interval_s, agent) VALUES ('probe', '2026-01-01T00:00:00.000Z', 15, 'test') ON CONFLICT (bastion) DO UPDATE SET at = excluded.at");
      await c.query("UPDATE mkoverlay.heartbeats SET interval_s = 16 WHERE bastion = 'probe'");
    } finally {
      await c.end();
    }
  });

  it("a registry that suddenly holds no device at all is not applied: the keys stay (a wrong or new database)", async () => {
    const live = device(s);
    await authorized(s, live);
    const before = readdirSync(s.keysDir).sort();
    expect(before.length).toBeGreaterThan(1);
    await pgServer!.sql(url, "DELETE FROM mkoverlay.devices");
    await pgServer!.sql(url, "SELECT pg_notify('mkoverlay_changes', '*')");
    await s.agent.waitLog(/holds no device at all while \d+ key\(s\) are authorized: not applied/);
    expect(readdirSync(s.keysDir).sort()).toEqual(before);
    expect((await tryLogin(live)).ok).toBe(true);
  });
});

requires(root)("bastion agent on a SQLite registry on the same host (file watch)", () => {
  let s: Setup;
  let reg: string;
  beforeAll(async () => {
    const ws = tempDir("mko-bastion-sq-");
    reg = join(ws, "registry.db");
    s = await setUp(reg, reg);
    s.dirs.push(ws);
  }, 120_000);
  afterAll(() => tearDown(s));

  it("follows builds and revocations within 5 s", async () => {
    const a = device(s);
    const b = device(s);
    expect((await up(s, a)).ms).toBeLessThan(5000);
    const tb = (await up(s, b)).tunnel;
    const t0 = Date.now();
    cli(s, ["revoke", b.hostname]);
    await waitFor("revoked port to close", () => sessionGone(b.port), 5000, 50);
    expect(tb.exited() || (await sessionGone(b.port))).toBe(true);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(await canConnect(a.port)).toBe(true);
    expect((await tryLogin(b)).ok).toBe(false);
  });

  it("a registry file missing when the agent starts is an outage, not an empty fleet", async () => {
    const c = device(s);
    await authorized(s, c);
    await s.agent.stop();
    const before = readdirSync(s.keysDir).sort();
    renameSync(reg, `${reg}.away`);
    s.agent = startAgent(s.root, "lo", { authLog: s.bastion.logFile });
    await s.agent.waitLog(/registry .*registry\.db unreachable: .*registry\.db does not exist; keeping the last known \d+ key\(s\)/);
    expect(readdirSync(s.keysDir).sort()).toEqual(before);
    expect((await tryLogin(c)).ok).toBe(true);
    renameSync(`${reg}.away`, reg);
    await s.agent.waitLog(/reachable again after \d+s; caught up/, 20_000);
    expect(readdirSync(s.keysDir).sort()).toEqual(before);
  });
});

const ten = isRoot ? openssh10() : undefined;
requires(root, need(ten, "OpenSSH 10.x (scripts/ensure-openssh10.sh)"))(`bastion agent with the bastion on OpenSSH ${ten?.version ?? "10.x"} (SQLite registry)`, () => {
  let s: Setup;
  beforeAll(async () => {
    const ws = tempDir("mko-bastion-10-");
    const reg = join(ws, "registry.db");
    s = await setUp(reg, reg, undefined, ten);
    s.dirs.push(ws);
  }, 120_000);
  afterAll(() => tearDown(s));

  it("a stale session gives way: the device reconnecting with the same key binds within 5 s while its vanished old session still holds the port (issue 20)", async () => {
    await staleSessionGivesWay(s);
  });
});
