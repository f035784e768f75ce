/**
 * Hostile and broken input, table-driven. Every case must: exit non-zero, print one short
 * message naming the culprit (file:line:col for config), no stack trace, write nothing, reserve
 * nothing, and leave the registry byte-for-byte as it was.
 */
import { createHash } from "node:crypto";
import { cpSync, existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readPub, removeDir, run, runCli, runCliAsync, sshKeygen, tempDir } from "./helpers/workspace.js";

// Made at load time: the case table below is built from them.
const keys = tempDir("mko-hostile-keys-");
const bastionKey = readPub(sshKeygen(keys, "bastion"));
sshKeygen(keys, "rsa", "rsa", ["-b", "2048"]);
run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "passphrase", "-f", join(keys, "locked")]);
writeFileSync(join(keys, "garbage"), "not a key at all\n");
afterAll(() => removeDir(keys));

/** A valid config as text, so cases can break it at a known line. */
function configText(over: { bastion?: string; top?: string } = {}): string {
  return [
    "registry: ./registry.db",
    over.top ?? "hostname: gw-{seq:04}",
    "ports:",
    "  ssh: 21000-21002",
    "  services: 22000-22999",
    "bastions:",
    "  eu:",
    "    host: bastion-eu.example.com",
    "    hostKeys:",
    `      - ${bastionKey}`,
    over.bastion ?? "    user: reverse-ssh",
    "operators: none",
    "",
  ].join("\n");
}

interface Case {
  name: string;
  args?: string[];
  config?: string | null;
  env?: Record<string, string>;
  /** Prepare the workspace after the seeding build (e.g. fill the registry). */
  setup?: (ws: string) => void;
  message: RegExp;
}

const base = ["--board", "rpi4", "--bastion", "eu"];
const host = (h: string): Case["args"] => [...base, "--hostname", h];

const CASES: Case[] = [
  { name: "hostname with a quote", args: host('gw"1'), message: /--hostname "gw\\"1": may only use a-z/ },
  { name: "hostname with a newline", args: host("gw\n1"), message: /--hostname "gw\\n1": contains spaces, control/ },
  { name: "hostname with a space", args: host("gw 1"), message: /--hostname "gw 1": contains spaces/ },
  { name: "hostname with a comma", args: host("gw,1"), message: /--hostname "gw,1": may only use/ },
  { name: "hostname with a leading dash", args: host("-gw1"), message: /--hostname "-gw1": may only use/ },
  { name: "hostname with ..", args: host("../etc"), message: /--hostname "\.\.\/etc": has an empty label|may only use/ },
  { name: "hostname with a slash", args: host("gw/1"), message: /--hostname "gw\/1": may only use/ },
  { name: "hostname non-ASCII", args: host("gwé1"), message: /--hostname "gwé1": contains spaces, control or non-ASCII/ },
  { name: "hostname empty", args: host(""), message: /--hostname "": is empty/ },
  { name: "hostname label over 63", args: host("a".repeat(64)), message: /has a label of 64 characters/ },
  { name: "hostname over 253", args: host(Array.from({ length: 5 }, () => "a".repeat(60)).join(".")), message: /is 304 characters long/ },
  { name: "hostname upper case", args: host("GW-1"), message: /has upper-case letters/ },
  { name: "hostname with command injection", args: host('x",command="sh'), message: /--hostname .*may only use/ },
  { name: "unknown board", args: ["--board", "rpi9", "--bastion", "eu"], message: /--board "rpi9": unknown board \(did you mean 'rpi3'\?\)/ },
  { name: "unknown OS", args: [...base, "--os", "raspbian"], message: /--os "raspbian": unknown OS/ },
  { name: "unknown bastion", args: ["--board", "rpi4", "--bastion", "ue"], message: /--bastion "ue": no such bastion in .*mkoverlay\.yaml \(did you mean 'eu'\?\)/ },
  { name: "bastion missing", args: ["--board", "rpi4"], message: /--bastion is required/ },
  { name: "bastion named twice", args: ["--board", "rpi4", "--bastion", "eu,eu"], message: /'eu' is named twice/ },
  { name: "host key missing", args: [...base, "--host-key", "/nonexistent/key"], message: /--host-key \/nonexistent\/key: no such file/ },
  { name: "host key RSA", args: [...base, "--host-key", "@rsa"], message: /ssh-rsa key; mkoverlay needs an ed25519 key/ },
  { name: "host key with passphrase", args: [...base, "--host-key", "@locked"], message: /passphrase-protected/ },
  { name: "host key garbage", args: [...base, "--host-key", "@garbage"], message: /not an OpenSSH private key/ },
  { name: "config missing", config: null, message: /mkoverlay\.yaml: config file not found/ },
  { name: "config empty", config: "", message: /mkoverlay\.yaml: file is empty/ },
  { name: "YAML syntax error", config: "bastions:\n  eu: [unclosed\n", message: /mkoverlay\.yaml:\d+:\d+ YAML syntax error/ },
  { name: "misspelt key", config: configText({ bastion: "    hostkeys: []" }), message: /mkoverlay\.yaml:11:5 bastions\.eu\.hostkeys: unknown key \(did you mean 'hostKeys'\?\)/ },
  { name: "unknown top-level key", config: configText({ top: "hostnames: gw-{seq}" }), message: /mkoverlay\.yaml:2:1 hostnames: unknown key \(did you mean 'hostname'\?\)/ },
  { name: "CIDR /33", config: configText({ bastion: "    from: [192.0.2.0/24, 10.0.0.0/33]" }), message: /mkoverlay\.yaml:11:26 bastions\.eu\.from\[1\]: "10\.0\.0\.0\/33" is not a CIDR/ },
  { name: "from with a quote", config: configText({ bastion: "    from: ['10.0.0.1\"']" }), message: /bastions\.eu\.from\[0\]: .* is not an IP address or CIDR/ },
  { name: "from with an option injection", config: configText({ bastion: "    from: ['10.0.0.1\",command=\"/bin/sh']" }), message: /bastions\.eu\.from\[0\]/ },
  { name: "bastion host with a space", config: configText().replace("host: bastion-eu.example.com", "host: bastion eu"), message: /mkoverlay\.yaml:8:11 bastions\.eu\.host: "bastion eu" contains spaces/ },
  { name: "bastion host with ;", config: configText().replace("host: bastion-eu.example.com", "host: 'evil;reboot'"), message: /bastions\.eu\.host: "evil;reboot" may only use/ },
  { name: "port range reversed", config: configText().replace("ssh: 21000-21002", "ssh: 21999-21000"), message: /mkoverlay\.yaml:4:8 ports\.ssh: "21999-21000" is reversed/ },
  { name: "port range beyond 65535", config: configText().replace("ssh: 21000-21002", "ssh: 65000-70000"), message: /ports\.ssh: "65000-70000": ports must be 1-65535/ },
  { name: "tunnel ports below 1024", config: configText().replace("ssh: 21000-21002", "ssh: 500-600"), message: /mkoverlay\.yaml:4:8 ports\.ssh: 500-600 reaches below 1024: the tunnel user is not root and cannot bind those ports .*ports\.allowPrivileged/ },
  { name: "service ports below 1024", config: configText().replace("services: 22000-22999", "services: 1000-1099"), message: /mkoverlay\.yaml:5:13 ports\.services: 1000-1099 reaches below 1024/ },
  { name: "port ranges overlap", config: configText().replace("services: 22000-22999", "services: 21001-21500"), message: /ports\.services: 21001-21500 overlaps ports\.ssh/ },
  { name: "pinned key not a key", config: configText().replace(`- ${"ssh-ed25519"}`, "- ssh-ed25519 notbase64!"), message: /mkoverlay\.yaml:10:9 bastions\.eu\.hostKeys\[0\]: is not a public key/ },
  { name: "no pinned key", config: configText().replace(/ {4}hostKeys:\n.*\n/, ""), message: /bastions\.eu\.hostKeys: is required/ },
  { name: "expiry in the past", config: configText({ bastion: "    expiry: 2020-01-01" }), message: /mkoverlay\.yaml bastions\.eu\.expiry: "2020-01-01" has passed: a new device's key would be refused/ },
  { name: "expiry past year 9999", config: configText({ bastion: "    expiry: 8000y" }), message: /mkoverlay\.yaml:11:13 bastions\.eu\.expiry: "8000y" lands after 9999-12-31/ },
  { name: "from with host bits set", config: configText({ bastion: "    from: [127.0.0.1/8]" }), message: /mkoverlay\.yaml:11:12 bastions\.eu\.from\[0\]: "127\.0\.0\.1\/8" has host bits set .*write 127\.0\.0\.0\/8/ },
  { name: "hostname template overflowing at device 10", config: configText({ top: `hostname: ${"x".repeat(62)}{seq}` }), message: /mkoverlay\.yaml:2:11 hostname: renders "x{62}10" for device number 10, which has a label of 64/ },
  { name: "YAML alias bomb", config: ["a: &a [x, x, x, x, x, x, x, x, x]", ..."bcdef".split("").map((k, i) => `${k}: &${k} [${Array(9).fill(`*${"abcde"[i]}`).join(", ")}]`)].join("\n"), message: /mkoverlay\.yaml:2:8 YAML: aliases expand to more than 100 nodes/ },
  { name: "YAML unresolved alias", config: configText().replace("operators: none", "operators: *ops"), message: /mkoverlay\.yaml:12:12 YAML: alias \*ops has no anchor/ },
  { name: "expiry unparsable", config: configText({ bastion: "    expiry: next tuesday" }), message: /bastions\.eu\.expiry: "next tuesday" is neither a date/ },
  { name: "expiry impossible date", config: configText({ bastion: "    expiry: 2027-02-30" }), message: /bastions\.eu\.expiry: "2027-02-30" is not a real date/ },
  { name: "user with a space", config: configText({ bastion: "    user: reverse ssh" }), message: /bastions\.eu\.user: "reverse ssh" is not a valid user name/ },
  { name: "bastion port 0", config: configText({ bastion: "    port: 0" }), message: /mkoverlay\.yaml:11:11 bastions\.eu\.port: must be at least 1/ },
  { name: "bastion port as text", config: configText({ bastion: "    port: ssh" }), message: /bastions\.eu\.port: expected number, got string "ssh"/ },
  { name: "bad hostname template", config: configText({ top: "hostname: gw-{serial}" }), message: /mkoverlay\.yaml:2:11 hostname: unknown placeholder \{serial\}/ },
  { name: "bastion name with a slash", config: configText().replace("  eu:", "  'e/u':"), message: /bastions\.e\/u.*must be 1-32 of a-z/ },
  { name: "operators missing", config: configText().replace("operators: none\n", ""), message: /mkoverlay\.yaml:1:1 operators: is required/ },
  { name: "operators listing nobody", config: configText().replace("operators: none", "operators:\n  user: root"), message: /mkoverlay\.yaml:\d+:\d+ operators: lists nobody: add authorizedKeys or a userCA/ },
  { name: "operator key that is not a key", config: configText().replace("operators: none", "operators:\n  authorizedKeys: [ssh-ed25519 AAAA]"), message: /operators\.authorizedKeys\[0\]: is not a public key/ },
  { name: "operator CA without principals", config: configText().replace("operators: none", `operators:\n  userCA: ${bastionKey}`), message: /operators: a userCA needs `principals`/ },
  { name: "operators misspelt key", config: configText().replace("operators: none", "operators:\n  authorisedKeys: []"), message: /operators\.authorisedKeys: unknown key \(did you mean 'authorizedKeys'\?\)/ },
  { name: "SOURCE_DATE_EPOCH not a number", env: { SOURCE_DATE_EPOCH: "yesterday" }, message: /SOURCE_DATE_EPOCH="yesterday" is not a number of seconds/ },
  { name: "registry not a database", setup: (ws) => writeFileSync(join(ws, "registry.db"), "this is not sqlite\n".repeat(100)), message: /registry .*registry\.db: not an mkoverlay registry \(not a SQLite database\); left untouched/ },
  { name: "--out is a file", args: [...base, "--out", "@file"], message: /--out .*a-file: exists and is not a directory/ },
  { name: "hostname already registered", args: host("gw-0001"), message: /hostname gw-0001 is already registered/ },
  {
    name: "exhausted port range",
    setup: (ws) => {
      for (let i = 0; i < 2; i++) expect(runCli(["--config", join(ws, "mkoverlay.yaml"), ...base, "--out", join(ws, "seed")], { cwd: ws }).code).toBe(0);
    },
    message: /no free tunnel port left in ports\.ssh 21000-21002/,
  },
];

function snapshot(ws: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const n of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, n.name);
      if (n.isDirectory()) walk(p);
      else out[p.slice(ws.length)] = createHash("sha256").update(readFileSync(p)).digest("hex");
    }
  };
  walk(ws);
  return out;
}

describe("hostile and broken input", () => {
  it(`has at least 30 cases (${CASES.length})`, () => expect(CASES.length).toBeGreaterThanOrEqual(30));

  // Seeded once: a registry with one device, so "untouched" means something. Each case gets a
  // copy, and cases run a few at a time (each is its own CLI process).
  const seeded = tempDir("mko-hostile-seed-");
  beforeAll(() => {
    writeFileSync(join(seeded, "mkoverlay.yaml"), configText());
    const seed = runCli(["--config", join(seeded, "mkoverlay.yaml"), ...base, "--out", join(seeded, "seed")], { cwd: seeded });
    expect(seed.code, seed.stderr).toBe(0);
  });
  afterAll(() => removeDir(seeded));

  it.concurrent.each(CASES.map((c) => [c.name, c] as const))("%s", async (_name, c) => {
    const ws = tempDir("mko-hostile-");
    try {
      const cfg = join(ws, "mkoverlay.yaml");
      cpSync(seeded, ws, { recursive: true });
      if (c.config === null) removeDir(cfg);
      else if (c.config !== undefined) writeFileSync(cfg, c.config);
      writeFileSync(join(ws, "a-file"), "x");
      c.setup?.(ws);
      const args = (c.args ?? base).map((a) =>
        a === "@file" ? join(ws, "a-file") : a.startsWith("@") ? join(keys, a.slice(1)) : a,
      );
      const before = snapshot(ws);
      const r = await runCliAsync(["--config", cfg, ...args, "--out", args.includes("--out") ? args[args.indexOf("--out") + 1]! : join(ws, "out")], { cwd: ws, ...(c.env ? { env: c.env } : {}) });
      expect(r.code).not.toBe(0);
      expect(r.stdout).toBe("");
      expect(r.stderr, r.stderr).toMatch(c.message);
      expect(r.stderr).not.toMatch(/\n\s+at |internal error|Error:/);
      expect(r.stderr.split("\n").filter(Boolean).length).toBeLessThanOrEqual(3);
      // Nothing written, nothing reserved, the registry as it was.
      expect(snapshot(ws)).toEqual(before);
      expect(existsSync(join(ws, "out"))).toBe(false);
    } finally {
      removeDir(ws);
    }
  });
});
