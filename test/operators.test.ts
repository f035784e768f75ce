/**
 * Operator access on the device, proven with a real sshd running the overlay's own drop-ins
 * (paths pointed into the unpacked overlay): listed keys and CA certificates for listed
 * principals get in; everything else is refused; passwords are off.
 */
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { canConnect, freePort, waitFor } from "./helpers/sshd.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";
import { spawn, type ChildProcess } from "node:child_process";

const dir = tempDir("mko-operators-");
let port: number;
let sshd: ChildProcess;
const keys: Record<string, string> = {};

function sign(name: string, ca: string, principal: string, validity: string): string {
  const key = sshKeygen(dir, name);
  const r = run("ssh-keygen", ["-q", "-s", ca, "-I", `${name}-id`, "-n", principal, "-V", validity, `${key}.pub`]);
  expect(r.code, r.stderr).toBe(0);
  return key;
}

beforeAll(async () => {
  for (const k of ["alice", "mallory"]) keys[k] = sshKeygen(dir, k);
  const ca = sshKeygen(dir, "fleet_ca");
  const otherCa = sshKeygen(dir, "other_ca");
  keys.certOk = sign("cert_ok", ca, "fleet-ops", "-5m:+1h");
  keys.certOtherPrincipal = sign("cert_other_principal", ca, "intern", "-5m:+1h");
  keys.certExpired = sign("cert_expired", ca, "fleet-ops", "20200101:20200102");
  keys.certOtherCa = sign("cert_other_ca", otherCa, "fleet-ops", "-5m:+1h");
  writeFleet(
    dir,
    { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } },
    { operators: { user: "root", authorizedKeys: [readPub(keys.alice!)], userCA: readPub(ca), principals: ["fleet-ops", "oncall"] } },
  );
  const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: dir });
  expect(b.code, b.stderr).toBe(0);
  const root = join(dir, "root");
  mkdirSync(root);
  extract((JSON.parse(b.stdout) as { overlay: string }).overlay, root);
  // The device's sshd: Debian's layout (drop-ins included first, first value wins), with the
  // overlay's drop-ins pointed into the unpacked tree.
  const dropins = join(dir, "sshd_config.d");
  mkdirSync(dropins);
  for (const f of readdirSync(join(root, "etc/ssh/sshd_config.d"))) {
    const text = readFileSync(join(root, "etc/ssh/sshd_config.d", f), "utf8").replace(/\/etc\/ssh\/mkoverlay\//g, `${root}/etc/ssh/mkoverlay/`);
    writeFileSync(join(dropins, f), text);
  }
  port = await freePort();
  const cfg = join(dir, "sshd_config");
  writeFileSync(
    cfg,
    [
      `Include ${dropins}/*.conf`,
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `PidFile ${join(dir, "sshd.pid")}`,
      "UsePAM no",
      "StrictModes no",
      // What a stock main config might say after the Include: the drop-in must still win.
      "PasswordAuthentication yes",
      "",
    ].join("\n"),
  );
  const t = run("/usr/sbin/sshd", ["-t", "-f", cfg]);
  expect(t.code, t.stderr).toBe(0);
  mkdirSync("/run/sshd", { recursive: true });
  sshd = spawn("/usr/sbin/sshd", ["-D", "-e", "-f", cfg, "-E", join(dir, "sshd.log")], { stdio: "ignore" });
  await waitFor("device sshd", () => canConnect(port));
});

afterAll(() => {
  sshd?.kill("SIGTERM");
  removeDir(dir);
});

function login(key: string, extra: string[] = []): { code: number; stdout: string; stderr: string } {
  return run("ssh", [
    "-F", "none", "-p", String(port), "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", ...extra, "root@127.0.0.1", "echo", "logged-in",
  ]);
}

describe("operator access with the overlay's drop-ins", () => {
  it("an operator key from authorizedKeys logs in", () => {
    const r = login(keys.alice!);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe("logged-in");
  });

  it("a key that is not listed is refused", () => {
    const r = login(keys.mallory!);
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/Permission denied/);
  });

  it("a certificate from the userCA with a listed principal logs in", () => {
    const r = login(keys.certOk!, ["-o", `CertificateFile=${keys.certOk}-cert.pub`]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe("logged-in");
  });

  it.each([
    ["another principal", "certOtherPrincipal"],
    ["an expired certificate", "certExpired"],
    ["a certificate from another CA", "certOtherCa"],
  ])("%s is refused", (_n, k) => {
    const r = login(keys[k]!, ["-o", `CertificateFile=${keys[k]}-cert.pub`]);
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/Permission denied/);
  });

  it("password authentication is off, whatever the main config says later", () => {
    const t = run("/usr/sbin/sshd", ["-T", "-f", join(dir, "sshd_config")]);
    expect(t.stdout).toMatch(/^passwordauthentication no$/m);
    expect(t.stdout).toMatch(/^kbdinteractiveauthentication no$/m);
    expect(t.stdout).toMatch(/^permitrootlogin without-password$/m);
    const r = run("ssh", ["-F", "none", "-p", String(port), "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "BatchMode=yes",
      "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1", "true"]);
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
  });

  it("verify checks the operator access against the fleet config", () => {
    const overlay = readdirSync(join(dir, "out")).map((f) => join(dir, "out", f)).find((f) => f.endsWith(".tar.gz"))!;
    const v = runCli(["verify", overlay], { cwd: dir });
    expect(v.code, v.stdout).toBe(0);
    expect(v.stdout).toMatch(/^ok {3}operator access: \d+ entries as built/m);
    // The fleet config is what the overlay is checked against: drop a principal, and the
    // overlay no longer matches.
    const cfg = join(dir, "mkoverlay.yaml");
    const original = readFileSync(cfg, "utf8");
    try {
      writeFileSync(cfg, original.replace('"oncall"', '"oncall-2"'));
      const stale = runCli(["verify", overlay], { cwd: dir });
      expect(stale.code, stale.stdout).toBe(1);
      expect(stale.stdout).toMatch(/^FAIL operator access: \/etc\/ssh\/mkoverlay\/principals\/root: line \d+ is "oncall", not "oncall-2"$/m);
    } finally {
      writeFileSync(cfg, original);
    }
  });

  it("nothing is written under /root or /home", () => {
    const listing = run("tar", ["-tzf", readdirSync(join(dir, "out")).map((f) => join(dir, "out", f)).find((f) => f.endsWith(".tar.gz"))!]).stdout;
    expect(listing).not.toMatch(/^(root|home)\//m);
  });
});
