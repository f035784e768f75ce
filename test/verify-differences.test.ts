/**
 * `verify` names what differs, not only which file: for KEY=VALUE files, systemd units and
 * sshd configs the key and both values, for other text the line, for binary files the size and
 * the first byte, for modes, owners and link targets both values — in text and in `--json`
 * (`difference`). The private key is never shown: only which key each side holds.
 */
import { chmodSync, chownSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { decodePrivateKey } from "../src/keys/ed25519.js";
import { contentDifferences, describe as say } from "../src/overlay/diff.js";
import { removeDir, readPub, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const texts = (path: string, want: string, got: string) => contentDifferences(path, Buffer.from(want), Buffer.from(got)).differences.map((d) => `${path}${say(d)}`);

describe("what differs inside a file", () => {
  it("KEY=VALUE: the key and both values, a missing and an extra key", () => {
    expect(texts("/e.env", "A=1\nB=2\nC=3\n", "A=1\nB=5\nC=3\n")).toEqual(['/e.env: B is "5" (line 2), not "2"']);
    expect(texts("/e.env", "A=1\nB=2\n", "A=1\nD=4\n")).toEqual(['/e.env: B is missing; mkoverlay builds B "2"', '/e.env: D "4" (line 2) is not built by mkoverlay']);
  });

  it("a unit: the key with its section; sshd config: the keyword", () => {
    const unit = "[Unit]\nAfter=network.target\n\n[Service]\nExecStart=/usr/bin/ssh -N x\nRestart=always\n";
    expect(texts("/u.service", unit, unit.replace("Restart=always", "Restart=no"))).toEqual(['/u.service: [Service] Restart is "no" (line 6), not "always"']);
    expect(texts("/s.conf", "HostKey /a\nPort 22\n", "HostKey /a\nPort 2222\n")).toEqual(['/s.conf: Port is "2222" (line 2), not "22"']);
  });

  it("other text: the first line that differs; a lost final newline; binary: size and first byte", () => {
    expect(texts("/etc/hostname", "gw-0001\n", "gw-0002\n")).toEqual(['/etc/hostname: line 1 is "gw-0002", not "gw-0001"']);
    expect(texts("/etc/hostname", "gw-0001\n", "gw-0001")).toEqual(['/etc/hostname: end of file is "no final newline" (line 1), not "a final newline"']);
    const bin = contentDifferences("/b", Buffer.from([0, 1, 2, 3]), Buffer.from([0, 1, 9])).differences;
    expect(bin).toEqual([{ path: "/b", attribute: "content", byte: 2, expected: "4 bytes", found: "3 bytes" }]);
    expect(say(bin[0]!)).toBe(" differs from byte 2 on: it is 3 bytes, mkoverlay builds 4 bytes");
  });
});

describe("what a crafted file cannot do to the terminal", () => {
  it("control characters, C1 and bidi overrides in a value are escaped; a section name that is not plain is no section", () => {
    const [d] = texts("/e.env", "A=1\n", "A=\u001b[2J\u009b31m\u202eevil\n");
    expect(d).toBe('/e.env: A is "\\u001b[2J\\u009b31m\\u202eevil" (line 1), not "1"');
    expect([...d!].filter((c) => c.charCodeAt(0) < 0x20 || (c.charCodeAt(0) >= 0x7f && c.charCodeAt(0) <= 0x9f) || c === "\u202e")).toEqual([]);
    const [u] = texts("/u.service", "[Service]\nA=1\n", "[Ser\u001bvice]\nA=1\n");
    expect(u).toBe('/u.service: line 1 is "[Ser\\u001bvice]", not "[Service]"');
  });
});

describe("verify, end to end", () => {
  const dir = tempDir("mko-verify-diff-");
  let overlay = "";
  let cfg = "";
  let original = "";
  beforeAll(() => {
    writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
    const r = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: dir });
    expect(r.code, r.stderr).toBe(0);
    overlay = JSON.parse(r.stdout).overlay;
    cfg = join(dir, "mkoverlay.yaml");
    original = readFileSync(cfg, "utf8");
  });
  afterAll(() => removeDir(dir));

  it("a bastion's host changed in the config: eu.env's BASTION_HOST, both values, in text and --json", () => {
    writeFileSync(cfg, original.replace("bastion-eu.example.com", "bastion-eu2.example.com"));
    try {
      const v = runCli(["verify", overlay], { cwd: dir });
      expect(v.code, v.stderr).toBe(1);
      expect(v.stdout).toMatch(/^FAIL tunnel units: \/etc\/mkoverlay\/tunnels\/eu\.env: BASTION_HOST is "bastion-eu\.example\.com" \(line \d+\), not "bastion-eu2\.example\.com"$/m);
      const j = JSON.parse(runCli(["verify", "--json", overlay], { cwd: dir }).stdout);
      const failed = j.checks.filter((c: { ok: boolean }) => !c.ok);
      expect(failed.map((c: { difference?: unknown }) => c.difference)).toContainEqual({
        path: "/etc/mkoverlay/tunnels/eu.env", attribute: "content", key: "BASTION_HOST", line: expect.any(Number), expected: "bastion-eu2.example.com", found: "bastion-eu.example.com",
      });
    } finally {
      writeFileSync(cfg, original);
    }
  });

  it("mode, owner and link target: both values in text and in --json's difference", () => {
    const at = join(dir, "modes");
    const r0 = runCli(["--board", "rpi4", "--bastion", "eu", "--hostname", "gw-modes", "--format", "dir", "--out", at, "--json"], { cwd: dir });
    expect(r0.code, r0.stderr).toBe(0);
    const root = JSON.parse(r0.stdout).overlay as string;
    chmodSync(join(root, "etc/hostname"), 0o666);
    chownSync(join(root, "etc/hosts"), 1000, 0);
    const link = join(root, "etc/systemd/system/regenerate_ssh_host_keys.service");
    rmSync(link);
    symlinkSync("/lib/systemd/system/\u001b[31mx", link);
    const v = runCli(["verify", "--offline", root], { cwd: dir });
    expect(v.code).toBe(1);
    expect(v.stdout).toMatch(/^FAIL hostname: \/etc\/hostname is mode 0666, not 0644$/m);
    expect(v.stdout).toMatch(/^FAIL hostname: \/etc\/hosts is owned by 1000:0, not root:root$/m);
    expect(v.stdout).toContain('regenerate_ssh_host_keys.service points to "/lib/systemd/system/\\u001b[31mx", not /dev/null');
    expect(v.stdout).not.toContain("\u001b");
    const j = JSON.parse(runCli(["verify", "--offline", "--json", root], { cwd: dir }).stdout);
    const ds = j.checks.filter((c: { ok: boolean }) => !c.ok).map((c: { difference?: unknown }) => c.difference);
    expect(ds).toContainEqual({ path: "/etc/hostname", attribute: "mode", expected: "0644", found: "0666" });
    expect(ds).toContainEqual({ path: "/etc/hosts", attribute: "owner", expected: "0:0", found: "1000:0" });
    expect(ds).toContainEqual({ path: "/etc/systemd/system/regenerate_ssh_host_keys.service", attribute: "target", expected: "/dev/null", found: "/lib/systemd/system/\u001b[31mx" });
  });

  it("a private key that differs is named by fingerprint and comment, its material never printed", () => {
    // Offline, the device is read from the overlay: a hostname edited after the build makes the
    // key's comment differ from what mkoverlay builds for that hostname.
    const root = join(dir, "tree");
    const r0 = runCli(["--board", "rpi4", "--bastion", "eu", "--hostname", "gw-key", "--format", "dir", "--out", root, "--json"], { cwd: dir });
    expect(r0.code, r0.stderr).toBe(0);
    const at = JSON.parse(r0.stdout).overlay as string;
    writeFileSync(join(at, "etc/hostname"), "gw-other\n");
    const key = readFileSync(join(at, "etc/ssh/mkoverlay/ssh_host_ed25519_key"), "utf8");
    // The armour's last lines hold the private section; the seed in any encoding.
    const { key: k } = decodePrivateKey(key, "key");
    const secrets = [...key.split("\n").filter((l) => l && !l.startsWith("-----")).slice(-3), k.seed.toString("hex"), k.seed.toString("base64").slice(0, 40)];
    for (const args of [["verify", "--offline", at], ["verify", "--offline", "--json", at]]) {
      const v = runCli(args, { cwd: dir });
      expect(v.code).toBe(1);
      expect(v.stdout).toMatch(/ssh_host_ed25519_key differs \(a private key: its content is not shown\): it holds key SHA256:\S+ \(comment \\?"root@gw-key\\?"\), mkoverlay builds key SHA256:\S+ \(comment \\?"root@gw-other\\?"\)/);
      for (const secret of secrets) expect(v.stdout + v.stderr).not.toContain(secret);
    }
  });
});
