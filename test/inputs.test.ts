/**
 * Config values that used to be accepted and then made a device, a line or a command fail
 * later: CIDRs with host bits, expiry past year 9999, hostname templates that overflow a label
 * at device 10, YAML alias bombs and unresolved aliases, and a date expiry that has passed
 * (which must stop new devices for that bastion and nothing else). In-process against the
 * loader and rules, plus the CLI where the wiring matters.
 */
import Database from "better-sqlite3";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { authorizedKeysLine } from "../src/bastion/line.js";
import { parseFleet } from "../src/config/load.js";
import { MAX_SEQ, renderHostname } from "../src/config/rules.js";
import { UserError } from "../src/util/errors.js";
import { generateEd25519 } from "../src/keys/ed25519.js";
import { cidrProblem, expiryTimeOption, hostnameProblem, LATEST_EXPIRY, parseExpiry } from "../src/util/validate.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-inputs-");
afterAll(() => removeDir(dir));
const bastionKey = readPub(sshKeygen(dir, "bastion"));
const NOW = new Date("2025-06-01T12:00:00Z");

/** A valid config as text; `over` replaces or adds top-level and bastion lines. */
function configText(o: { hostname?: string; eu?: string[]; us?: string[]; extra?: string[] } = {}): string {
  return [
    "registry: ./registry.db",
    `hostname: ${JSON.stringify(o.hostname ?? "gw-{seq:04}")}`,
    "ports: {ssh: 21000-21099, services: 22000-22099}",
    "bastions:",
    "  eu:",
    "    host: bastion-eu.example.com",
    `    hostKeys: [${JSON.stringify(bastionKey)}]`,
    ...(o.eu ?? []),
    "  us:",
    "    host: bastion-us.example.com",
    `    hostKeys: [${JSON.stringify(bastionKey)}]`,
    ...(o.us ?? []),
    "operators: none",
    ...(o.extra ?? []),
    "",
  ].join("\n");
}

const parse = (text: string) => parseFleet(text, join(dir, "mkoverlay.yaml"), NOW);

describe("from: CIDRs with host bits set (item 10)", () => {
  it.each([
    ["127.0.0.1/8", "127.0.0.0/8"],
    ["!10.1.2.3/16", "!10.1.0.0/16"],
    ["192.0.2.1/0", "0.0.0.0/0"],
    ["::1/64", "::/64"],
    ["2001:db8::1/32", "2001:db8::/32"],
    ["2001:db8:0:0:1:0:0:1/127", "2001:db8:0:0:1::/127"],
    ["1:2:3:4:5:6:7:8/112", "1:2:3:4:5:6:7:0/112"],
    ["::ffff:10.1.2.3/120", "::ffff:10.1.2.0/120"],
  ])("%s is refused, naming %s", (cidr, network) => {
    const p = cidrProblem(cidr);
    expect(p).toContain(`write ${network} (the network), or ${cidr.split("/")[0]} alone`);
    // The suggested network is itself accepted.
    expect(cidrProblem(network)).toBeUndefined();
  });

  it.each(["127.0.0.0/8", "10.0.0.0/8", "198.51.100.0/24", "192.0.2.7/32", "0.0.0.0/0", "::/0", "2001:db8::/32", "::1/128", "fe80::/10", "192.0.2.7", "::1"])("%s is accepted", (cidr) => {
    expect(cidrProblem(cidr)).toBeUndefined();
  });

  it("the config names the entry and its position", async () => {
    await expect(parse(configText({ eu: ["    from: [198.51.100.0/24, 127.0.0.1/8]"] }))).rejects.toThrow(
      /mkoverlay\.yaml:8:29 bastions\.eu\.from\[1\]: "127\.0\.0\.1\/8" has host bits set after \/8, so sshd would refuse every connection: write 127\.0\.0\.0\/8/,
    );
  });
});

describe("expiry within what expiry-time can say (item 11)", () => {
  it.each(["8000y", "99999999999d", "9".repeat(400) + "d", "10000-01-01"])("%s is refused with the reason", (v) => {
    const t = parseExpiry(v, NOW);
    expect(typeof t).toBe("string");
    if (v !== "10000-01-01") expect(t).toMatch(/lands after 9999-12-31 23:59 UTC, the last time authorized_keys expiry-time can hold/);
  });

  it("the last minute of 9999 is accepted and renders twelve digits", () => {
    const t = parseExpiry("9999-12-31T23:59", NOW);
    expect(t).toEqual(new Date(Date.UTC(9999, 11, 31, 23, 59)));
    expect(expiryTimeOption(t as Date)).toBe("999912312359");
    expect(expiryTimeOption(LATEST_EXPIRY)).toBe("999912312359");
    expect(parseExpiry(`${9999 - 2025}y`, NOW)).toBeInstanceOf(Date);
    expect(typeof parseExpiry(`${9999 - 2025 + 1}y`, NOW)).toBe("string");
  });

  it("years below 100 are not read as 19xx, and dates before 1970 are refused", () => {
    expect(parseExpiry("0099-05-01", NOW)).toBe("is before 1970");
    expect(parseExpiry("1969-12-31", NOW)).toBe("is before 1970");
  });

  it("the renderer never prints a year that is not four digits", () => {
    expect(() => expiryTimeOption(new Date(Date.UTC(10000, 0, 1)))).toThrow(/outside 1970-9999/);
    expect(() => expiryTimeOption(new Date(NaN))).toThrow(/outside 1970-9999/);
  });

  it("the config refuses it at its position", async () => {
    await expect(parse(configText({ eu: ["    expiry: 8000y"] }))).rejects.toThrow(/mkoverlay\.yaml:8:13 bastions\.eu\.expiry: "8000y" lands after 9999-12-31/);
  });
});

describe("hostname templates that overflow (item 12)", () => {
  it(`the rule checks the longest name up to ${MAX_SEQ}, not only device 1`, async () => {
    await expect(parse(configText({ hostname: `${"x".repeat(62)}{seq}` }))).rejects.toThrow(
      /mkoverlay\.yaml:2:11 hostname: renders "x{62}10" for device number 10, which has a label of 64 characters \(at most 63\) \(a template must give valid names up to 9,999,999\)/,
    );
    await expect(parse(configText({ hostname: `${"x".repeat(57)}{seq}` }))).rejects.toThrow(/device number 10000000|up to 9,999,999/);
    const ok = await parse(configText({ hostname: `${"x".repeat(56)}{seq}` }));
    expect(ok.hostnameTemplate).toBe(`${"x".repeat(56)}{seq}`);
    await expect(parse(configText({ hostname: `${"a".repeat(60)}.{seq:0250}` }))).rejects.toThrow(/renders names like "a{60}\.0+1" that is 311 characters long \(at most 253\)/);
  });

  it("a name that renders invalid beyond the bound is a user error, never a name", () => {
    const t = `${"x".repeat(56)}{seq}`;
    expect(hostnameProblem(renderHostname(t, MAX_SEQ))).toBeUndefined();
    expect(() => renderHostname(t, MAX_SEQ + 1)).toThrow(UserError);
    expect(() => renderHostname(t, MAX_SEQ + 1)).toThrow(/gives device number 10000000 the name "x{56}10000000", which has a label of 64 characters/);
  });

  it("through the CLI: a registry counter past the bound is refused before anything is written", () => {
    const ws = tempDir("mko-inputs-seq-");
    try {
      writeFileSync(join(ws, "mkoverlay.yaml"), configText({ hostname: `${"x".repeat(56)}{seq}` }));
      const first = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: ws });
      expect(first.code, first.stderr).toBe(0);
      expect((JSON.parse(first.stdout) as { hostname: string }).hostname).toBe(`${"x".repeat(56)}1`);
      // As if ten million reservations had happened.
      const db = new Database(join(ws, "registry.db"));
      db.prepare("UPDATE meta SET value = ? WHERE key = 'seq'").run(String(MAX_SEQ));
      db.close();
      const before = readFileSync(join(ws, "registry.db"));
      const r = runCli(["--board", "rpi4", "--bastion", "eu", "--out", join(ws, "out2")], { cwd: ws });
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/^mkoverlay: error: hostname template "x{56}\{seq\}" gives device number 10000000 the name "x{56}10000000", which has a label of 64 characters/);
      expect(r.stderr).not.toMatch(/\n\s+at |internal error|bug/i);
      expect(existsSync(join(ws, "out2"))).toBe(false);
      expect(readFileSync(join(ws, "registry.db")).equals(before)).toBe(true);
    } finally {
      removeDir(ws);
    }
  });
});

describe("YAML aliases (item 18)", () => {
  const bomb = [
    "a: &a [x, x, x, x, x, x, x, x, x]",
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]",
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]",
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]",
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]",
    "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]",
    "",
  ].join("\n");

  it.each([
    ["an alias bomb", bomb, /mkoverlay\.yaml:2:8 YAML: aliases expand to more than 100 nodes \(an alias bomb\?\)/],
    ["an unresolved alias", configText().replace("operators: none", "operators: *ops"), /mkoverlay\.yaml:11:12 YAML: alias \*ops has no anchor &ops before it/],
    ["an alias used before its anchor", "x: *later\ny: &later 1\n", /mkoverlay\.yaml:1:4 YAML: alias \*later has no anchor/],
    ["an alias inside its own anchor", "bastions: &b\n  eu: *b\n", /mkoverlay\.yaml:2:7 YAML: alias \*b refers to a node that contains it/],
    ["a list as a key", "? [complex, key]\n: value\n", /mkoverlay\.yaml:1:3 YAML: a key must be a plain name, not a list or mapping/],
  ])("%s is a user error at its position", async (_n, text, message) => {
    const e = await parse(text).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(UserError);
    expect((e as Error).message).toMatch(message);
  });

  it("a shared key list through an alias still works", async () => {
    const text = configText().replace(`    hostKeys: [${JSON.stringify(bastionKey)}]\n  us:`, `    hostKeys: &keys [${JSON.stringify(bastionKey)}]\n  us:`).replace(/( {2}us:\n.*\n) {4}hostKeys: .*/, "$1    hostKeys: *keys");
    const f = await parse(text);
    expect(f.bastions.get("us")!.hostKeys).toEqual(f.bastions.get("eu")!.hostKeys);
  });

  it("through the CLI: exit 2, one message, no stack", () => {
    const ws = tempDir("mko-inputs-yaml-");
    try {
      writeFileSync(join(ws, "mkoverlay.yaml"), bomb);
      const r = runCli(["--board", "rpi4", "--bastion", "eu"], { cwd: ws });
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/^mkoverlay: error: .*mkoverlay\.yaml:2:8 YAML: aliases expand to more than 100 nodes/);
      expect(r.stderr).not.toMatch(/\n\s+at |internal error|bug/i);
    } finally {
      removeDir(ws);
    }
  });
});

describe("a date expiry that has passed (item 22)", () => {
  it("does not stop the config from loading", async () => {
    const f = await parse(configText({ us: ["    expiry: 2020-01-01"] }));
    expect(f.bastions.get("us")!.expiry).toBe("2020-01-01");
  });

  it("an existing device's line still renders, carrying its (past) expiry", () => {
    const f = { name: "us", host: "bastion-us.example.com", port: 22, user: "reverse-ssh", hostKeys: [], from: undefined, expiry: "2020-01-01", jumpUser: undefined };
    const line = authorizedKeysLine({ hostname: "gw-0001", pub: generateEd25519().pub, tunnel: { bastion: f, port: 21000, extraListen: [], permitOpen: [], sshArgs: [] } as never, now: NOW });
    expect(line).toContain('expiry-time="202001010000"');
  });

  it("through the CLI: only a new device for that bastion is refused; list, revoke and exports work", () => {
    const ws = tempDir("mko-inputs-expiry-");
    try {
      const cfg = join(ws, "mkoverlay.yaml");
      writeFileSync(cfg, configText({ us: ["    expiry: 2099-01-01"] }));
      const cli = (args: string[]) => runCli(args, { cwd: ws });
      for (const b of ["eu", "us", "eu,us"]) expect(cli(["--board", "rpi4", "--bastion", b, "--quiet"]).code).toBe(0);
      writeFileSync(cfg, configText({ us: ["    expiry: 2020-01-01"] }));
      const before = readFileSync(join(ws, "registry.db"));
      const outBefore = readdirSync(join(ws, "out")).sort();

      const build = cli(["--board", "rpi4", "--bastion", "eu,us"]);
      expect(build.code).toBe(2);
      expect(build.stderr).toMatch(/^mkoverlay: error: \S+mkoverlay\.yaml bastions\.us\.expiry: "2020-01-01" has passed: a new device's key would be refused by that bastion from the start\nmkoverlay: hint: set a later date/m);
      expect(readFileSync(join(ws, "registry.db")).equals(before)).toBe(true);
      expect(readdirSync(join(ws, "out")).sort()).toEqual(outBefore);

      const list = cli(["registry", "list", "--json"]);
      expect(list.code, list.stderr).toBe(0);
      expect(list.stdout).toContain("gw-0003");

      const eu = cli(["bastion", "authorized-keys", "--bastion", "eu"]);
      expect(eu.code, eu.stderr).toBe(0);
      expect(eu.stderr).toBe("");
      expect(eu.stdout.split("\n").filter((l) => l.startsWith("restrict"))).toHaveLength(2);

      const us = cli(["bastion", "authorized-keys", "--bastion", "us"]);
      expect(us.code, us.stderr).toBe(0);
      expect(us.stderr).toMatch(/^mkoverlay: warning: \S+ bastions\.us\.expiry: "2020-01-01" has passed: the lines of its devices are expired and sshd refuses them\n$/);
      expect(us.stdout.split("\n").filter((l) => l.includes('expiry-time="202001010000"'))).toHaveLength(2);

      const revoke = cli(["revoke", "gw-0002"]);
      expect(revoke.code, revoke.stderr).toBe(0);

      expect(cli(["--board", "rpi4", "--bastion", "eu", "--quiet"]).code).toBe(0);
    } finally {
      removeDir(ws);
    }
  });
});
