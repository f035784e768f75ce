/**
 * The bastion's two imports on a real sshd: `authorized-keys --write` onto a path that does not
 * exist yet (the README's one-line recipe) gives a file the tunnel user can read, so tunnels
 * open; and the Match block keeps every key to its own port on `localhost` with one fixed
 * PermitListen line, whatever the size of the fleet's port ranges.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tunnelArgv } from "./helpers/device.js";
import { portBlock, type PortBlock } from "./helpers/net.js";
import { ensureUser, startSshd, type Sshd } from "./helpers/sshd.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet, type BastionDef } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-tunnel";
const dir = tempDir("mko-bastion-");
const cli = (args: string[], cwd = dir) => runCli(args, { cwd });
/** 0 bastion sshd; 8-11 ssh range, 12-15 services; 16-31 free loopback ports for the stray key. */
let ports: PortBlock;
let bastionKey: string;
let bastion: Sshd;
let akFile: string;
let device: { hostname: string; port: number; overlay: string };
let root: string;
let stray: string;

function bastionDef(extra: Partial<BastionDef> = {}): BastionDef {
  return { host: "127.0.0.1", port: ports.port(0), user: TUNNEL_USER, hostKeys: [readPub(bastionKey)], ...extra };
}

/** The device's tunnel as its unit runs it, with the -R spec (and key) swapped; one round trip. */
function tryForward(spec: string, key?: string): { code: number; stderr: string; out: string } {
  const argv = tunnelArgv(root, "lo", device.hostname).filter((a) => a !== "-N");
  argv[argv.indexOf("-R") + 1] = spec;
  if (key) argv[argv.indexOf("-i") + 1] = key;
  const r = run(argv[0]!, [...argv.slice(1), "true"]);
  return { code: r.code, stderr: r.stderr, out: r.stdout + r.stderr };
}

const refused = (r: { code: number; stderr: string }) => r.code === 255 && /remote port forwarding failed/.test(r.stderr);
/** Authenticated, forward granted; the session then meets ForceCommand /sbin/nologin. */
const granted = (r: { stderr: string; out: string }) => !/Permission denied|remote port forwarding failed/.test(r.stderr) && /This account is currently not available/.test(r.out);

beforeAll(async () => {
  ensureUser(TUNNEL_USER);
  ports = await portBlock(32);
  bastionKey = sshKeygen(dir, "bastion_host_key");
  writeFleet(dir, { lo: bastionDef() }, { ports: { ssh: ports.range(8, 11), services: ports.range(12, 15) } });
  const b = cli(["--board", "rpi4", "--bastion", "lo", "--json"]);
  expect(b.code, b.stderr).toBe(0);
  device = JSON.parse(b.stdout);
  root = join(dir, "root");
  mkdirSync(root);
  extract(device.overlay, root);
  // sshd reads the file as the tunnel user: the folders on the way must be traversable.
  chmodSync(dir, 0o755);
  const bdir = join(dir, "bastion");
  mkdirSync(bdir, { mode: 0o755 });
  akFile = join(bdir, "tunnel_authorized_keys");
}, 60_000);

afterAll(async () => {
  await bastion?.stop();
  ports?.release();
  removeDir(dir);
});

describe("bastion authorized-keys --write", () => {
  it("onto a missing path: a file of the tunnel user's, 0600", () => {
    expect(existsSync(akFile)).toBe(false);
    const w = cli(["bastion", "authorized-keys", "--bastion", "lo", "--write", akFile]);
    expect(w.code, w.stderr).toBe(0);
    const st = statSync(akFile);
    const uid = Number(run("id", ["-u", TUNNEL_USER]).stdout.trim());
    const gid = Number(run("id", ["-g", TUNNEL_USER]).stdout.trim());
    expect([st.uid, st.gid, st.mode & 0o777]).toEqual([uid, gid, 0o600]);
    // The tunnel user itself can read it (what sshd does after dropping to that user).
    const r = spawnSync("setpriv", [`--reuid=${uid}`, `--regid=${gid}`, "--clear-groups", "cat", akFile], { encoding: "utf8" });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(device.hostname);
  });

  it("a real sshd reading that file opens the device's tunnel", async () => {
    const match = cli(["bastion", "sshd-config", "--bastion", "lo", "--authorized-keys-file", akFile]);
    expect(match.code, match.stderr).toBe(0);
    bastion = await startSshd({ dir: join(dir, "bastion"), hostKey: bastionKey, port: ports.port(0), authorizedKeys: {}, extraConfig: match.stdout });
    const r = tryForward(`localhost:${device.port}:localhost:22`);
    expect(granted(r), r.stderr).toBe(true);
  });

  it("rewrites a file the tunnel user owns, keeping it the user's", () => {
    const before = statSync(akFile);
    const w = cli(["bastion", "authorized-keys", "--bastion", "lo", "--write", akFile]);
    expect(w.code, w.stderr).toBe(0);
    const st = statSync(akFile);
    expect([st.uid, st.gid, st.mode & 0o777]).toEqual([before.uid, before.gid, 0o600]);
  });

  it("refuses a file the tunnel user could not read (root's), leaving it alone", () => {
    const f = join(dir, "bastion", "root_owned");
    writeFileSync(f, "# root's\n", { mode: 0o600 });
    const w = cli(["bastion", "authorized-keys", "--bastion", "lo", "--write", f]);
    expect(w.code).toBe(2);
    expect(w.stderr).toMatch(new RegExp(`--write ${f}: belongs to uid 0, not to the tunnel user '${TUNNEL_USER}'`));
    expect(w.stderr).toMatch(new RegExp(`hint: chown ${TUNNEL_USER} ${f}`));
    expect(readFileSync(f, "utf8")).toBe("# root's\n");
  });

  it("refuses when the tunnel user does not exist here, writing nothing", () => {
    const ws = join(dir, "nouser");
    mkdirSync(ws);
    writeFleet(ws, { lo: bastionDef({ user: "mko-nosuchuser" }) }, { ports: { ssh: ports.range(8, 11), services: ports.range(12, 15) } });
    const f = join(ws, "ak");
    const w = cli(["bastion", "authorized-keys", "--bastion", "lo", "--write", f], ws);
    expect(w.code).toBe(2);
    expect(w.stderr).toMatch(/--write .*ak: the tunnel user 'mko-nosuchuser' of bastion 'lo' does not exist on this machine/);
    expect(w.stderr).toMatch(/hint: create it first/);
    expect(existsSync(f)).toBe(false);
  });
});

describe("the Match block's PermitListen", () => {
  it("is one fixed line, the same for tiny and huge port ranges", () => {
    const texts = [
      ["21000-21001", "22000-22001"],
      ["1024-30000", "30001-65535"],
    ].map(([ssh, services], i) => {
      const ws = join(dir, `ranges-${i}`);
      mkdirSync(ws);
      writeFleet(ws, { lo: bastionDef() }, { ports: { ssh, services } });
      const r = cli(["bastion", "sshd-config", "--bastion", "lo"], ws);
      expect(r.code, r.stderr).toBe(0);
      return r.stdout;
    });
    expect(texts[1]).toBe(texts[0]);
    expect(texts[0]!.match(/^ {4}PermitListen .*$/gm)).toEqual(["    PermitListen localhost:*"]);
    expect(texts[0]!.length).toBeLessThan(4096);
  });

  it("sshd applies it to the tunnel user", () => {
    const t = run("/usr/sbin/sshd", ["-T", "-f", join(bastion.dir, "sshd_config"), "-C", `user=${TUNNEL_USER},host=gw,addr=127.0.0.1`]);
    expect(t.code, t.stderr).toBe(0);
    expect(t.stdout).toMatch(/^permitlisten localhost:\*$/m);
  });

  it("a key is still refused a port outside its permitlisten, and any bind but localhost", () => {
    for (const spec of [`localhost:${device.port + 1}:localhost:22`, `127.0.0.1:${device.port}:localhost:22`, `0.0.0.0:${device.port}:localhost:22`, `[::1]:${device.port}:localhost:22`]) {
      const r = tryForward(spec);
      expect(refused(r), `${spec}: ${r.stderr}`).toBe(true);
    }
    expect(granted(tryForward(`localhost:${device.port}:localhost:22`))).toBe(true);
  });

  it("even a key line without permitlisten (added by hand) gets localhost only", () => {
    stray = sshKeygen(dir, "stray");
    writeFileSync(akFile, `${readFileSync(akFile, "utf8")}restrict,port-forwarding,command="/sbin/nologin" ${readPub(stray)}\n`);
    const p = ports.port(20);
    for (const spec of [`0.0.0.0:${p}:localhost:22`, `127.0.0.1:${p}:localhost:22`]) {
      const r = tryForward(spec, stray);
      expect(refused(r), `${spec}: ${r.stderr}`).toBe(true);
    }
    expect(granted(tryForward(`localhost:${p}:localhost:22`, stray))).toBe(true);
  });
});
