/**
 * Operator keys are written exactly as they were validated: the canonical `type base64
 * [comment]`. Keys pasted with odd (but valid) spacing still log in on a real sshd that reads
 * the overlay's file; a key with an invisible character sshd does not skip (a no-break space,
 * a byte order mark) is refused in the config, naming the character, instead of being written
 * and silently ignored on the device.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startSshd, type Sshd } from "./helpers/sshd.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-opkeys-");
let sshd: Sshd | undefined;
const keys: Record<string, string> = {};

// YAML double-quoted strings, so the odd spacing survives the YAML parser.
const VARIANTS: Record<string, (pub: string) => string> = {
  leadingTab: (p) => `\t${p}`,
  leadingSpaces: (p) => `   ${p}`,
  tabSeparated: (p) => p.replace(/ /g, "\t"),
  doubleSpaces: (p) => p.replace(/ /g, "  "),
  trailingSpaces: (p) => `${p}   `,
  commentWithNbsp: (p) => `${p} ops\u00a0team`,
};

function config(operatorKeys: string[]): string {
  return [
    "registry: ./registry.db",
    "bastions:",
    "  eu:",
    "    host: bastion-eu.example.com",
    `    hostKeys: [${JSON.stringify(readPub(join(dir, "bastion")))}]`,
    "operators:",
    "  authorizedKeys:",
    ...operatorKeys.map((k) => `    - ${JSON.stringify(k)}`),
    "",
  ].join("\n");
}

beforeAll(() => {
  sshKeygen(dir, "bastion");
  for (const [i, name] of Object.keys(VARIANTS).entries()) keys[name] = sshKeygen(dir, name, i % 2 ? "ecdsa" : "ed25519");
});

afterAll(async () => {
  await sshd?.stop();
  removeDir(dir);
});

describe("operator keys are written as validated", () => {
  it("odd but valid spacing is written canonically, and a real sshd accepts every key", async () => {
    const ws = join(dir, "ok");
    mkdirSync(ws);
    writeFileSync(join(ws, "mkoverlay.yaml"), config(Object.entries(VARIANTS).map(([name, f]) => f(readPub(keys[name]!)))));
    const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: ws });
    expect(b.code, b.stderr).toBe(0);
    const root = join(ws, "root");
    mkdirSync(root);
    extract((JSON.parse(b.stdout) as { overlay: string }).overlay, root);
    const written = readFileSync(join(root, "etc/ssh/mkoverlay/authorized_keys/root"), "utf8");
    const lines = written.split("\n").filter((l) => l && !l.startsWith("#"));
    expect(lines).toEqual(Object.keys(VARIANTS).map((name) => readPub(keys[name]!) + (name === "commentWithNbsp" ? " ops\u00a0team" : "")));
    // ssh-keygen reads every line of the written file as a key.
    const l = run("ssh-keygen", ["-l", "-f", join(root, "etc/ssh/mkoverlay/authorized_keys/root")]);
    expect(l.stdout.trim().split("\n")).toHaveLength(lines.length);
    // And a real sshd with exactly that file lets each key in.
    sshd = await startSshd({ dir: join(ws, "sshd"), authorizedKeys: { root: written } });
    for (const name of Object.keys(VARIANTS)) {
      const r = run("ssh", [
        "-F", "none", "-p", String(sshd.port), "-i", keys[name]!, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1", "echo", `in-${name}`,
      ]);
      expect(r.stdout.trim(), `${name}: ${r.stderr}`).toBe(`in-${name}`);
    }
  });

  it.each([
    ["a leading no-break space", "\u00a0", "", /starts with U\+00A0 \(no-break space\), which sshd does not skip/],
    ["a leading byte order mark", "\ufeff", "", /starts with U\+FEFF \(byte order mark\)/],
    ["a trailing no-break space", "", "\u00a0", /ends with U\+00A0 \(no-break space\)/],
  ])("a key with %s is refused in the config, naming the character", (_n, head, tail, message) => {
    const ws = join(dir, `bad-${head.length}-${tail.length}`);
    mkdirSync(ws, { recursive: true });
    writeFileSync(join(ws, "mkoverlay.yaml"), config([`${head}${readPub(keys.leadingTab!)}${tail}`]));
    const r = runCli(["--board", "rpi4", "--bastion", "eu"], { cwd: ws });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/mkoverlay\.yaml:8:7 operators\.authorizedKeys\[0\]: is not a public key: it /);
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });
});
