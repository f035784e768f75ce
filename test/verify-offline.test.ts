/**
 * `verify` over several overlays, `-q`, and the offline checks (no fleet config, or
 * --offline): the device an overlay describes is read from it, built again and compared, so
 * an overlay passes only when it is whole and consistent; what needs the registry is listed as
 * not checked. Tampered copies are repacked with GNU tar as a user would.
 */
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-verify-");
const elsewhere = tempDir("mko-verify-noconfig-");
afterAll(() => {
  removeDir(dir);
  removeDir(elsewhere);
});
const cli = (args: string[], cwd = dir) => runCli(args, { cwd });
const overlays: Record<string, string> = {};

function build(name: string, extra: string[]): string {
  const r = cli(["--board", "rpi4", "--bastion", "eu,us", "--hostname", name, "--json", ...extra]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout).overlay as string;
}

/** A copy of `archive` with `edit` applied to its unpacked tree, repacked as root:root. */
function tampered(archive: string, name: string, edit: (root: string) => void): string {
  const root = join(dir, `t-${name}`);
  mkdirSync(root);
  extract(archive, root);
  edit(root);
  const out = join(dir, `${name}.overlay.tar.gz`);
  // The top-level names, not ".": mkoverlay's archives have no entry for the root itself.
  const r = run("tar", ["--owner=0", "--group=0", "--numeric-owner", "-czf", out, "-C", root, ...readdirSync(root)]);
  expect(r.code, r.stderr).toBe(0);
  return out;
}

beforeAll(() => {
  const key = readPub(sshKeygen(dir, "bastion"));
  writeFleet(dir, { eu: { hostKeys: [key] }, us: { hostKeys: [`@cert-authority ${key}`], host: "bastion-us.example.com", port: 2222, user: "tunnel" } }, {
    forwards: [{ name: "http", local: 80 }],
    operators: { user: "admin", authorizedKeys: [readPub(sshKeygen(dir, "op"))], userCA: readPub(sshKeygen(dir, "ca")), principals: ["fleet-ops"] },
  });
  for (const os of ["raspios", "ubuntu", "armbian", "debian"]) overlays[os] = build(`gw-${os}`, ["--os", os]);
});

describe("offline: the overlay against itself", () => {
  it.each(["raspios", "ubuntu", "armbian", "debian"])("a whole %s overlay passes, its OS read from it; what needs the registry is listed", (os) => {
    const r = cli(["verify", "--offline", overlays[os]!]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`^ok {3}read from the overlay: gw-${os} \\(key SHA256:\\S+\\), OS ${os}, port 21\\d{3}, tunnel\\(s\\) to eu reverse-ssh@bastion-eu.example.com, us tunnel@bastion-us.example.com:2222, operators admin \\(1 key\\(s\\), a CA\\)\\n`));
    expect(r.stdout).toMatch(/\nok {3}nothing else in the overlay\n/);
    expect(r.stdout).not.toMatch(/FAIL/);
    expect(r.stdout).toMatch(/\nskip the key is registered to this hostname and the device is active \(needs the fleet config and the registry\)\n/);
  });

  it("with no fleet config anywhere, verify runs offline by itself and says so", () => {
    const r = cli(["verify", overlays.raspios!], elsewhere);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stderr).toBe("mkoverlay: no fleet config (./mkoverlay.yaml): offline checks only; the registry checks need --config FILE\n");
    const j = JSON.parse(cli(["verify", "--json", overlays.raspios!], elsewhere).stdout);
    expect(j).toMatchObject({ mode: "offline", ok: true, hostname: "gw-raspios" });
    expect(j.notChecked.length).toBe(4);
  });

  it("with a config, the registry checks run", () => {
    const j = JSON.parse(cli(["verify", "--json", overlays.raspios!]).stdout);
    expect(j).toMatchObject({ mode: "registry", ok: true, notChecked: [] });
    expect(j.checks.map((c: { what: string }) => c.what)).toContain("gw-raspios is active in the registry");
  });

  it.each([
    [
      "the tunnels disagree on the port",
      (root: string) => {
        const f = join(root, "etc/mkoverlay/tunnels/us.env");
        writeFileSync(f, readFileSync(f, "utf8").replace(/TUNNEL_PORT=\d+/, "TUNNEL_PORT=29999"));
      },
      /FAIL one tunnel port for every bastion: the env files say \d+, 29999/,
    ],
    [
      "a bastion lost its pinned key",
      (root: string) => {
        const f = join(root, "etc/ssh/mkoverlay/known_hosts");
        writeFileSync(f, readFileSync(f, "utf8").split("\n").filter((l) => !l.includes("2222")).join("\n"));
      },
      /FAIL bastion 'us' \(\[bastion-us.example.com\]:2222\) has a pinned host key in \/etc\/ssh\/mkoverlay\/known_hosts: none/,
    ],
    [
      "the hostname was edited after the build",
      (root: string) => writeFileSync(join(root, "etc/hostname"), "gw-other\n"),
      /FAIL host key: \/etc\/ssh\/mkoverlay\/ssh_host_ed25519_key differs \(a private key: its content is not shown\): it holds key SHA256:\S+ \(comment "root@gw-raspios"\), mkoverlay builds key SHA256:\S+ \(comment "root@gw-other"\)/,
    ],
    [
      "a file was added",
      (root: string) => writeFileSync(join(root, "etc/motd"), "hi\n"),
      /FAIL entries mkoverlay did not build: \/etc\/motd/,
    ],
    [
      "the monitor is gone",
      (root: string) => run("rm", [join(root, "usr/local/sbin/reverse-ssh-monitor")]),
      /FAIL common files: \/usr\/local\/sbin\/reverse-ssh-monitor is missing/,
    ],
    [
      "a forward nobody writes",
      (root: string) => {
        const f = join(root, "etc/mkoverlay/tunnels/eu.env");
        writeFileSync(f, readFileSync(f, "utf8").replace(/EXTRA_FORWARDS=.*/, "EXTRA_FORWARDS=-R 0.0.0.0:9999:localhost:22"));
      },
      /FAIL \/etc\/mkoverlay\/tunnels\/eu.env: EXTRA_FORWARDS has "-R 0.0.0.0:9999:localhost:22", which mkoverlay does not write/,
    ],
  ])("fails when %s", (name, edit, message) => {
    const bad = tampered(overlays.raspios!, name.replace(/\W+/g, "-"), edit);
    const r = cli(["verify", "--offline", bad]);
    expect(r.code, r.stdout + r.stderr).toBe(1);
    expect(r.stdout).toMatch(message);
    expect(r.stderr).toMatch(/ check\(s\) failed\n$/);
  });

  it("a root file system cannot be checked offline (which files are the overlay's?)", () => {
    const root = join(dir, "rootfs");
    mkdirSync(root);
    extract(overlays.raspios!, root);
    const r = cli(["verify", "--offline", root]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/offline checks need an overlay archive or folder/);
    expect(r.stderr).toMatch(/hint: give the fleet config \(--config FILE\) for the registry checks/);
  });
});

describe("several overlays, -q", () => {
  it("all good: exit 0; -q prints nothing", () => {
    const all = Object.values(overlays);
    const r = cli(["verify", ...all]);
    expect(r.code, r.stderr).toBe(0);
    for (const o of all) expect(r.stdout).toContain(`# ${o}\n`);
    expect(r.stderr).toBe(`mkoverlay: verified 4 overlay(s): 4 passed, 0 failed, 0 unreadable\n`);
    const q = cli(["verify", "-q", ...all]);
    expect(q.code).toBe(0);
    expect(q.stdout + q.stderr).toBe("");
  });

  it("-q prints only the failures, each with its overlay; the exit code says it", () => {
    const bad = tampered(overlays.ubuntu!, "q-bad", (root) => writeFileSync(join(root, "etc/motd"), "x\n"));
    const q = cli(["verify", "-q", "--offline", overlays.raspios!, bad, overlays.debian!]);
    expect(q.code).toBe(1);
    expect(q.stdout).toBe(`${bad}: FAIL entries mkoverlay did not build: /etc/motd\n`);
    expect(q.stderr).toBe("mkoverlay: error: 1 of 3 overlay(s) failed verification\n");
  });

  it("an unreadable one does not hide the others' verdicts; exit 2", () => {
    writeFileSync(join(dir, "junk.tar.gz"), "not gzip");
    const r = cli(["verify", "--json", overlays.raspios!, join(dir, "junk.tar.gz")]);
    expect(r.code).toBe(2);
    const [a, b] = r.stdout.trim().split("\n").map((l) => JSON.parse(l));
    expect(a).toMatchObject({ ok: true, hostname: "gw-raspios" });
    expect(b).toMatchObject({ ok: false, hostname: null, error: expect.stringMatching(/not an mkoverlay overlay \(not a gzip-compressed archive\)/) });
    // With --json the closing error is JSON too (docs/json.md).
    expect(JSON.parse(r.stderr)).toEqual({ error: "1 of 2 overlay(s) could not be read (see above)", hint: null, exitCode: 2 });
  });
});
