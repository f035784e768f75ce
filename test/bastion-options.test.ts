/**
 * What the config now refuses in `from:` and `expiry:` is exactly what a real sshd refuses in
 * authorized_keys, and what it suggests or allows instead works: a CIDR with host bits set
 * makes sshd deny every connection (even next to a good entry), the network address it names
 * lets the key in; the last expiry it accepts (9999-12-31 23:59) still logs in, while the
 * five-digit year the old renderer produced is dropped.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { expiryTimeOption, LATEST_EXPIRY, cidrProblem, parseExpiry } from "../src/util/validate.js";
import { startSshd, type Sshd } from "./helpers/sshd.js";
import { readPub, removeDir, run, sshKeygen, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-options-");
let sshd: Sshd;
let key: string;

beforeAll(async () => {
  key = sshKeygen(dir, "client");
  sshd = await startSshd({ dir: join(dir, "sshd"), authorizedKeys: { root: "" } });
});

afterAll(async () => {
  await sshd?.stop();
  removeDir(dir);
});

/** Logs in as root with `options` in front of the key; true when sshd let it in. */
function loginWith(options: string): boolean {
  writeFileSync(join(dir, "sshd", "authorized_keys", "root"), `${options} ${readPub(key)}\n`);
  const r = run("ssh", [
    "-F", "none", "-p", String(sshd.port), "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1", "echo", "in",
  ]);
  return r.stdout.trim() === "in";
}

/** The network address cidrProblem tells the user to write instead. */
function suggested(cidr: string): string {
  const m = /write (\S+) \(the network\)/.exec(cidrProblem(cidr) ?? "");
  if (!m) throw new Error(`no suggestion for ${cidr}`);
  return m[1]!;
}

describe("from= on a real sshd", () => {
  it("a CIDR with host bits set is refused by sshd; the suggested network is accepted", () => {
    expect(loginWith('from="127.0.0.1/8"')).toBe(false);
    expect(loginWith(`from="${suggested("127.0.0.1/8")}"`)).toBe(true);
  });

  it("one bad IPv6 entry denies everything, even next to a matching address", () => {
    expect(loginWith('from="127.0.0.1,::1/64"')).toBe(false);
    expect(loginWith(`from="127.0.0.1,${suggested("::1/64")}"`)).toBe(true);
  });
});

describe("expiry-time= on a real sshd", () => {
  it("the latest expiry the config accepts logs in", () => {
    const t = parseExpiry("9999-12-31T23:59", new Date());
    expect(t).toBeInstanceOf(Date);
    expect(loginWith(`expiry-time="${expiryTimeOption(t as Date)}"`)).toBe(true);
    expect(loginWith(`expiry-time="${expiryTimeOption(LATEST_EXPIRY)}"`)).toBe(true);
  });

  it("a five-digit year (what 8000y rendered before) makes sshd drop the line", () => {
    expect(loginWith('expiry-time="1002506011200"')).toBe(false);
    expect(typeof parseExpiry("8000y", new Date("2025-06-01T12:00:00Z"))).toBe("string");
  });
});
