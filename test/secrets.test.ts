/**
 * Private keys: written 0600 in a 0700 folder, never printed, never logged, never in the
 * registry (which keeps public keys and fingerprints only).
 */
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { decodePrivateKey } from "../src/keys/ed25519.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-secrets-");
afterAll(() => removeDir(dir));

describe("secrets", () => {
  writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  const outputs: string[] = [];
  for (const args of [["--json"], [], ["--debug"]]) {
    const r = runCli(["--board", "rpi4", "--bastion", "eu", ...args], { cwd: dir });
    outputs.push(r.stdout, r.stderr);
  }
  const batch = runCli(["batch", "--board", "rpi4", "--bastion", "eu", "--count", "3", "--json"], { cwd: dir });
  outputs.push(batch.stdout, batch.stderr);
  for (const cmd of [["registry", "list", "--json"], ["known-hosts"], ["ssh-config"], ["bastion", "authorized-keys", "--bastion", "eu"], ["registry", "doctor"]]) {
    const r = runCli(cmd, { cwd: dir });
    outputs.push(r.stdout, r.stderr);
  }
  const archives = readdirSync(join(dir, "out")).filter((f) => f.endsWith(".tar.gz")).map((f) => join(dir, "out", f));
  const secrets = archives.map((a, i) => {
    const root = join(dir, `x${i}`);
    run("mkdir", ["-p", root]);
    extract(a, root);
    const text = readFileSync(join(root, "etc/ssh/mkoverlay/ssh_host_ed25519_key"), "utf8");
    const { key } = decodePrivateKey(text, "k");
    const body = text.split("\n").slice(1, -2).join("");
    return { seedHex: key.seed.toString("hex"), seedB64: key.seed.toString("base64"), body };
  });

  it("built 6 devices to check", () => {
    expect(archives).toHaveLength(6);
    expect(outputs.join("")).toContain("ssh-ed25519 AAAA");
  });

  it("no private key in anything printed", () => {
    const all = outputs.join("\n");
    expect(all).not.toContain("PRIVATE KEY");
    for (const s of secrets) {
      expect(all).not.toContain(s.seedHex);
      expect(all).not.toContain(s.seedB64.slice(0, 40));
      expect(all).not.toContain(s.body.slice(0, 60));
    }
  });

  it("no private key in the registry files (database, WAL, journal)", () => {
    const files = readdirSync(dir).filter((f) => f.startsWith("registry.db")).map((f) => join(dir, f));
    expect(files.length).toBeGreaterThan(0);
    for (const f of files) {
      const bytes = readFileSync(f);
      expect(bytes.includes(Buffer.from("PRIVATE KEY"))).toBe(false);
      for (const s of secrets) {
        expect(bytes.includes(Buffer.from(s.seedHex, "hex"))).toBe(false);
        expect(bytes.includes(Buffer.from(s.seedB64.slice(0, 40)))).toBe(false);
        expect(bytes.includes(Buffer.from(s.body.slice(0, 60)))).toBe(false);
      }
    }
    // It does hold the public keys (so the check above looked in the right place).
    const pub = readFileSync(join(dir, "registry.db"));
    expect(pub.includes(Buffer.from("ssh-ed25519 AAAA"))).toBe(true);
  });

  it("archives are 0600 in a 0700 folder", () => {
    expect(statSync(join(dir, "out")).mode & 0o777).toBe(0o700);
    for (const a of archives) expect(statSync(a).mode & 0o777).toBe(0o600);
  });
});
