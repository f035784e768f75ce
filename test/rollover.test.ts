/**
 * Bastion host key rollover without re-flashing, on a real sshd on 127.0.0.1: a device built
 * with `nextHostKeys` and `hostCA` keeps reconnecting, overlay untouched, while the bastion
 * switches to its next key and then to a new key certified by the CA — each made with the
 * recipe docs/bastion.md gives, run as written. A device pinned to the old key alone is refused
 * (the control). `known-hosts` and `verify` carry the same keys. The rollover runs on every sshd
 * version the bastions run (the system's 9.2 and 10.x: helpers/sshd10.ts).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tunnelArgv } from "./helpers/device.js";
import { portBlock, type PortBlock } from "./helpers/net.js";
import { ensureUser, startSshd, type Sshd } from "./helpers/sshd.js";
import { expectSshdVersion, sshdVersions, type SshdBinary } from "./helpers/sshd10.js";
import { extract, readPub, removeDir, REPO, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-tunnel";
const HOST = "127.0.0.1";
const DOC = readFileSync(join(REPO, "docs/bastion.md"), "utf8");
const dir = tempDir("mko-rollover-");
let ports: PortBlock;
let current = "";
let next = "";
let ca = "";
interface Built {
  hostname: string;
  port: number;
  overlay: string;
  authorizedKeys: Record<string, string>;
}
/** Built with the rollover in place (next key + host CA), and pinned to the current key alone. */
const dev: Record<"rolling" | "pinned", { ws: string; root: string; build: Built; knownHosts: string }> = {} as never;
let bastion: Sshd | undefined;

/** The fenced block right after `<!-- tested: NAME -->` in docs/bastion.md. */
function block(name: string): string {
  const at = DOC.indexOf(`<!-- tested: ${name} -->`);
  if (at < 0) throw new Error(`docs/bastion.md has no block marked ${name}`);
  const m = /```[a-z]*\n([\s\S]*?)```/.exec(DOC.slice(at));
  if (!m) throw new Error(`no fenced block after ${name}`);
  return m[1]!;
}

/** Runs a docs recipe with sh -e, as written, with `env` set. */
function recipe(name: string, env: Record<string, string>): string {
  const r = run("sh", ["-e", "-c", block(name)], { env, cwd: dir });
  expect(r.code, r.stderr).toBe(0);
  return r.stdout;
}

beforeAll(async () => {
  ensureUser(TUNNEL_USER);
  // 0 bastion, 2-3 and 4-5 the two fleets' ranges.
  ports = await portBlock(8);
  current = sshKeygen(dir, "bastion_current");
  next = join(dir, "bastion_next");
  const printed = recipe("next host key", { BASTION_NAME: HOST, NEXT: next });
  expect(printed.trim()).toBe(readPub(next));
  ca = sshKeygen(dir, "host_ca");
  const fleets = {
    rolling: { hostKeys: [readPub(current)], nextHostKeys: [printed.trim()], hostCA: readPub(ca) },
    pinned: { hostKeys: [readPub(current)] },
  };
  for (const [i, [name, keys]] of Object.entries(fleets).entries()) {
    const ws = join(dir, name);
    const root = join(ws, "root");
    run("mkdir", ["-p", root]);
    writeFleet(ws, { lo: { host: HOST, port: ports.port(0), user: TUNNEL_USER, ...keys } as never }, { ports: { ssh: ports.range(2 + 2 * i, 2 + 2 * i), services: ports.range(3 + 2 * i, 3 + 2 * i) } });
    const r = runCli(["--board", "rpi4", "--bastion", "lo", "--json"], { cwd: ws });
    expect(r.code, r.stderr).toBe(0);
    const build = JSON.parse(r.stdout) as Built;
    extract(build.overlay, root);
    dev[name as "rolling" | "pinned"] = { ws, root, build, knownHosts: readFileSync(join(root, "etc/ssh/mkoverlay/known_hosts"), "utf8") };
  }
}, 60_000);

afterAll(async () => {
  await bastion?.stop();
  ports?.release();
  if (!process.env.KEEP) removeDir(dir);
});

/** (Re)starts the bastion on its port with this sshd, this host key (and extra config). */
async function serve(bin: SshdBinary, hostKey: string, extraConfig = ""): Promise<void> {
  await bastion?.stop();
  const lines = Object.values(dev).map((d) => d.build.authorizedKeys.lo).join("\n") + "\n";
  bastion = await startSshd({ dir: join(dir, `bastion-${bin.version}-${Date.now()}`), hostKey, port: ports.port(0), authorizedKeys: { [TUNNEL_USER]: lines }, extraConfig, sshd: bin });
  await expectSshdVersion(ports.port(0), bin);
}

/** One round trip of the device's own tunnel command (its key, its known_hosts), then exit. */
function connect(name: "rolling" | "pinned"): { ok: boolean; stderr: string } {
  const d = dev[name];
  const argv = tunnelArgv(d.root, "lo", d.build.hostname).filter((a) => a !== "-N");
  const r = run(argv[0]!, [...argv.slice(1), "true"]);
  // Authenticated: the forced command answers (the session itself is refused by nologin).
  return { ok: /This account is currently not available/.test(r.stdout + r.stderr), stderr: r.stderr };
}

function untouched(): void {
  for (const d of Object.values(dev)) expect(readFileSync(join(d.root, "etc/ssh/mkoverlay/known_hosts"), "utf8")).toBe(d.knownHosts);
}

describe.each(sshdVersions().map((b) => [b.version, b] as const))("bastion host key rollover on a real sshd (OpenSSH %s)", (version, bin) => {
  afterAll(async () => {
    await bastion?.stop();
    bastion = undefined;
  });

  it("the device's known_hosts pins the current key, the next key and the host CA for the bastion", () => {
    const pattern = `[${HOST}]:${ports.port(0)}`;
    const lines = dev.rolling.knownHosts.split("\n").filter((l) => l && !l.startsWith("#"));
    expect(lines).toEqual([
      `${pattern} ${readPub(current).split(" ").slice(0, 2).join(" ")}`,
      `${pattern} ${readPub(next).split(" ").slice(0, 2).join(" ")}`,
      `@cert-authority ${pattern} ${readPub(ca).split(" ").slice(0, 2).join(" ")}`,
    ]);
  });

  it("on the current key both devices connect", async () => {
    await serve(bin, current);
    expect(connect("rolling")).toMatchObject({ ok: true });
    expect(connect("pinned")).toMatchObject({ ok: true });
  }, 30_000);

  it("switched to the next key: the device built with it reconnects unchanged; the pinned one is refused", async () => {
    await serve(bin, next);
    expect(connect("rolling")).toMatchObject({ ok: true });
    const p = connect("pinned");
    expect(p.ok).toBe(false);
    expect(p.stderr).toContain("Host key verification failed");
    untouched();
  }, 30_000);

  it("switched to a new key certified by the host CA: the device reconnects unchanged; the pinned one is refused", async () => {
    const fresh = sshKeygen(dir, `bastion_fresh-${version}`);
    recipe("host certificate", { CA: ca, KEY: fresh, BASTION_NAME: HOST });
    const cert = `${fresh}-cert.pub`;
    expect(run("ssh-keygen", ["-L", "-f", cert]).stdout).toMatch(/host certificate/);
    await serve(bin, fresh, `HostCertificate ${cert}`);
    expect(connect("rolling")).toMatchObject({ ok: true });
    const p = connect("pinned");
    expect(p.ok).toBe(false);
    expect(p.stderr).toContain("Host key verification failed");
    untouched();
  }, 30_000);

  it("a certificate for another name is refused: the CA vouches for the bastion's host name only", async () => {
    const other = sshKeygen(dir, `bastion_other-${version}`);
    recipe("host certificate", { CA: ca, KEY: other, BASTION_NAME: "bastion-elsewhere.example.com" });
    await serve(bin, other, `HostCertificate ${other}-cert.pub`);
    const r = connect("rolling");
    expect(r.ok).toBe(false);
    expect(r.stderr).toContain("Host key verification failed");
  }, 30_000);
});

describe("operators and verify see the same keys", () => {
  it("`mkoverlay known-hosts` lists the next key and the host CA for the bastion", () => {
    const r = runCli(["known-hosts"], { cwd: dev.rolling.ws });
    expect(r.code, r.stderr).toBe(0);
    const pattern = `[${HOST}]:${ports.port(0)}`;
    expect(r.stdout).toContain(`${pattern} ${readPub(next).split(" ").slice(0, 2).join(" ")}`);
    expect(r.stdout).toContain(`@cert-authority ${pattern} ${readPub(ca).split(" ").slice(0, 2).join(" ")}`);
  });

  it("`mkoverlay verify` passes the rolling overlay, and fails it against a config without the next key", () => {
    const ok = runCli(["verify", dev.rolling.build.overlay], { cwd: dev.rolling.ws });
    expect(ok.code, ok.stdout + ok.stderr).toBe(0);
    const cfg = join(dev.rolling.ws, "mkoverlay.yaml");
    const text = readFileSync(cfg, "utf8");
    const parsed = JSON.parse(text) as { bastions: { lo: { nextHostKeys?: string[] } } };
    delete parsed.bastions.lo.nextHostKeys;
    writeFileSync(cfg, JSON.stringify(parsed, null, 2));
    try {
      const bad = runCli(["verify", dev.rolling.build.overlay], { cwd: dev.rolling.ws });
      expect(bad.code).not.toBe(0);
      expect(bad.stdout + bad.stderr).toMatch(/bastion known_hosts: \/etc\/ssh\/mkoverlay\/known_hosts: line \d+ ".*" is not built by mkoverlay/);
    } finally {
      writeFileSync(cfg, text);
    }
  });
});

describe("the config refuses a key pinned twice", () => {
  it("a next key that is already the current one names both places", () => {
    const ws = join(dir, "dup");
    run("mkdir", ["-p", ws]);
    writeFleet(ws, { lo: { host: HOST, port: ports.port(0), user: TUNNEL_USER, hostKeys: [readPub(current)], nextHostKeys: [readPub(current)] } as never });
    const r = runCli(["--board", "rpi4", "--bastion", "lo", "--json"], { cwd: ws });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/bastions\.lo\.nextHostKeys\[0\]: is the same key as hostKeys\[0\]: pin each key once/);
    expect(r.stdout).toBe("");
  });
});
