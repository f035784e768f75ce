/** The key formats against the real ssh-keygen, both directions. */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { UserError } from "../src/util/errors.js";
import {
  decodePrivateKey,
  deterministicCheckInt,
  encodePrivateKey,
  fingerprint,
  generateEd25519,
  publicKeyLine,
} from "../src/keys/ed25519.js";
import { parsePublicKey } from "../src/keys/pubkey.js";
import { readPub, removeDir, run, sshKeygen, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-keys-");
afterAll(() => removeDir(dir));

function writeKey(name: string, text: string): string {
  const f = join(dir, name);
  writeFileSync(f, text, { mode: 0o600 });
  return f;
}

describe("ed25519 keys made with node:crypto", () => {
  it("ssh-keygen -y derives exactly our public key line from our private key file", () => {
    for (let i = 0; i < 5; i++) {
      const k = generateEd25519();
      const f = writeKey(`k${i}`, encodePrivateKey(k, `test${i}`));
      const r = run("ssh-keygen", ["-y", "-f", f]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout.trim().split(" ").slice(0, 2).join(" ")).toBe(publicKeyLine(k.pub));
    }
  });

  it("ssh-keygen -l prints our fingerprint", () => {
    const k = generateEd25519();
    const f = writeKey("fp", encodePrivateKey(k, "fp"));
    writeFileSync(`${f}.pub`, publicKeyLine(k.pub, "fp") + "\n");
    const r = run("ssh-keygen", ["-l", "-E", "sha256", "-f", `${f}.pub`]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.split(" ")[1]).toBe(fingerprint(k.pub));
    expect(fingerprint(k.pub)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
  });

  it("the file ends with a newline and wraps base64 at 70 columns", () => {
    const text = encodePrivateKey(generateEd25519(), "x");
    expect(text.endsWith("-----END OPENSSH PRIVATE KEY-----\n")).toBe(true);
    for (const line of text.split("\n").slice(1, -2)) expect(line.length).toBeLessThanOrEqual(70);
  });

  it("is reproducible with a derived check integer", () => {
    const k = generateEd25519();
    expect(encodePrivateKey(k, "c", deterministicCheckInt(k))).toBe(encodePrivateKey(k, "c", deterministicCheckInt(k)));
  });
});

describe("importing keys made by ssh-keygen (--host-key)", () => {
  it("reads an unencrypted ed25519 key and agrees with ssh-keygen on the public half", () => {
    const f = sshKeygen(dir, "imported");
    const { key, comment } = decodePrivateKey(readFileSync(f, "utf8"), f);
    expect(comment).toBe("imported");
    expect(publicKeyLine(key.pub)).toBe(readPub(f).split(" ").slice(0, 2).join(" "));
    // And our re-encoding is still a key ssh-keygen accepts.
    const again = writeKey("reencoded", encodePrivateKey(key, "imported"));
    expect(run("ssh-keygen", ["-y", "-f", again]).stdout.trim().split(" ").slice(0, 2).join(" ")).toBe(publicKeyLine(key.pub));
  });

  const refusals: [string, () => string, RegExp][] = [
    ["an RSA key", () => readFileSync(sshKeygen(dir, "rsa", "rsa", ["-b", "2048"]), "utf8"), /ssh-rsa key; mkoverlay needs an ed25519 key/],
    ["a passphrase-protected key", () => {
      const f = join(dir, "locked");
      expect(run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "secret-pass", "-f", f]).code).toBe(0);
      return readFileSync(f, "utf8");
    }, /passphrase-protected/],
    ["a PEM key", () => readFileSync(sshKeygen(dir, "pem", "ecdsa", ["-m", "PEM"]), "utf8"), /PEM format/],
    ["garbage", () => "hello world\n", /not an OpenSSH private key/],
    ["a truncated key", () => {
      const t = readFileSync(sshKeygen(dir, "trunc"), "utf8").split("\n");
      return [t[0], t[1], t[t.length - 2], ""].join("\n");
    }, /corrupt OpenSSH private key/],
    ["a public key", () => readPub(sshKeygen(dir, "pubonly")), /not an OpenSSH private key/],
  ];
  it.each(refusals)("refuses %s with a reason", (_name, make, message) => {
    const text = make();
    let err: unknown;
    try {
      decodePrivateKey(text, "key.file");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(UserError);
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).toContain("key.file");
  });
});

describe("public key lines from config", () => {
  it("accepts real keys of the usual types", () => {
    for (const t of ["ed25519", "ecdsa", "rsa"]) {
      const line = readPub(sshKeygen(dir, `pub-${t}`, t));
      expect(typeof parsePublicKey(line)).toBe("object");
    }
  });
  it.each([
    ["ssh-ed25519 AAAA", /decode|truncated/],
    ["ssh-ed25519", /not an OpenSSH public key line/],
    ["ssh-dss AAAAB3NzaC1kc3MAAACBAP", /unsupported key type/],
    ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB", /its key data is 'ssh-ed25519'/],
    ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB x\ny", /line break/],
  ])("refuses %j", (line, why) => {
    const r = parsePublicKey(line);
    expect(typeof r).toBe("string");
    expect(r).toMatch(why);
  });
});
