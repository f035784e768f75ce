/**
 * One duration grammar everywhere (issue 23, src/util/duration.ts): the grammar as a table, then
 * every flag and config key that takes a length of time — each accepts 30min, 30m, 2h, 7d and 1w
 * (where a minute makes sense) and refuses garbage with a message naming the flag or the
 * file:line:col key. `m` is a minute; in `expiry:` (where it once meant a month) it is refused
 * with the fix.
 */
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bastionAgentCommand, seconds } from "../src/cli/commands/bastion-agent.js";
import { parseSpread } from "../src/config/expiry.js";
import { parseFleet } from "../src/config/load.js";
import { parseAfter, parseWithin } from "../src/fleet/status-options.js";
import { addDuration, durationMs, readDuration } from "../src/util/duration.js";
import { parseExpiry } from "../src/util/validate.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const S = 1000;
const MIN = 60 * S;
const H = 60 * MIN;
const D = 24 * H;

describe("the grammar", () => {
  it.each([
    ["90s", 90 * S],
    ["30min", 30 * MIN],
    ["30m", 30 * MIN],
    ["2h", 2 * H],
    ["7d", 7 * D],
    ["1w", 7 * D],
    ["36h", 36 * H],
  ])("%s is %d ms", (text, ms) => {
    expect(durationMs(text)).toBe(ms);
  });

  it.each([
    ["", /is not a duration/],
    ["soon", /is not a duration/],
    ["7", /is not a duration/],
    ["-1d", /is not a duration/],
    ["1.5h", /is not a duration/],
    ["7 d", /is not a duration/],
    ["7D", /is not a duration/],
    ["7x", /is not a duration/],
    ["d7", /is not a duration/],
    ["12months", /months and years count on a calendar.*360d/],
    ["1y", /months and years count on a calendar.*365d/],
    ["0d", /is not a positive duration/],
    ["0", /is not a duration/],
    ["36501d", /is longer than 100 years/],
  ])("%j is refused: %s", (text, why) => {
    expect(durationMs(text)).toMatch(why);
  });

  it("zero and bare seconds only where a setting allows them", () => {
    expect(durationMs("0", { zero: true })).toBe(0);
    expect(durationMs("0d", { zero: true })).toBe(0);
    expect(durationMs("60", { bareSeconds: true })).toBe(60 * S);
    expect(durationMs("0.5", { bareSeconds: true })).toBe(500);
    expect(durationMs("60")).toMatch(/is not a duration/);
  });

  it("calendar lengths count on the calendar (UTC), and `m` is refused there as ambiguous", () => {
    const leap = new Date("2028-02-29T12:00:00Z");
    expect(addDuration(leap, readDuration("1y", { calendar: true }) as never).toISOString()).toBe("2029-03-01T12:00:00.000Z");
    expect(addDuration(new Date("2027-01-31T00:00:00Z"), readDuration("1month", { calendar: true }) as never).toISOString()).toBe("2027-03-03T00:00:00.000Z");
    expect(addDuration(leap, readDuration("12months", { calendar: true }) as never).toISOString()).toBe("2029-03-01T12:00:00.000Z");
    expect(readDuration("12m", { calendar: true })).toMatch(/^is ambiguous: .*write 12months \(or 365d\)$/);
    expect(readDuration("6m", { calendar: true })).toMatch(/write 6months \(or 180d\)$/);
    expect(readDuration("30min", { calendar: true })).toEqual({ n: 30, unit: "min" });
  });

  it("expiry: a date, or a duration with calendar months and years", () => {
    const now = new Date("2027-01-01T00:00:00Z");
    expect((parseExpiry("30min", now) as Date).toISOString()).toBe("2027-01-01T00:30:00.000Z");
    expect((parseExpiry("2h", now) as Date).toISOString()).toBe("2027-01-01T02:00:00.000Z");
    expect((parseExpiry("1w", now) as Date).toISOString()).toBe("2027-01-08T00:00:00.000Z");
    expect((parseExpiry("12months", now) as Date).toISOString()).toBe("2028-01-01T00:00:00.000Z");
    expect((parseExpiry("1y", now) as Date).toISOString()).toBe("2028-01-01T00:00:00.000Z");
    expect(parseExpiry("12m", now)).toMatch(/ambiguous/);
    expect((parseExpiry("2027-12-31", now) as Date).toISOString()).toBe("2027-12-31T00:00:00.000Z");
    expect(parseExpiry("next tuesday", now)).toMatch(/is neither a date .* nor a duration/);
  });
});

describe("every flag reads it", () => {
  it.each(["30min", "30m", "2h", "7d", "1w"])("--never-seen-after, --expiring-within, the agent's --interval/--resync take %s", (v) => {
    const ms = durationMs(v) as number;
    expect(parseAfter(v)).toBe(ms);
    expect(parseWithin(v)).toBe(ms);
    expect(seconds("--interval", v)).toBe(ms / S);
  });

  it.each([
    ["--never-seen-after", (v: string) => parseAfter(v)],
    ["--expiring-within", (v: string) => parseWithin(v)],
    ["--interval", (v: string) => seconds("--interval", v)],
    ["--resync", (v: string) => seconds("--resync", v)],
  ] as const)("%s refuses garbage, naming the flag", (flag, parse) => {
    for (const bad of ["soon", "7x", "-1d", "1y"]) expect(() => parse(bad)).toThrow(new RegExp(`^${flag} "${bad}": not a duration`));
  });

  it("the agent's flags keep taking bare seconds, and only whole seconds", () => {
    expect(seconds("--interval", "15")).toBe(15);
    expect(() => seconds("--interval", "0")).toThrow(/--interval "0": not a positive duration/);
    expect(() => seconds("--interval", "1.5")).toThrow(/--interval "1.5": a whole number of seconds/);
    // The agent refuses a bad flag before it looks for the tunnel user.
    return expect(bastionAgentCommand({ bastion: "eu", config: "/nonexistent/fleet.yaml", interval: "soon" })).rejects.toThrow(/config file not found/);
  });
});

describe("the commands on a real registry", () => {
  let dir: string;
  const cli = (args: string[]) => runCli(args, { cwd: dir });
  beforeAll(() => {
    dir = tempDir("mko-duration-");
    writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  });
  afterAll(() => removeDir(dir));

  it("rotate --grace takes 30min, 30m, 2h, 7d, 1w (m: minutes) and refuses garbage naming --grace", () => {
    const built = JSON.parse(cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet"]).stdout) as { hostname: string };
    for (const [v, ms] of [["30min", 30 * MIN], ["30m", 30 * MIN], ["2h", 2 * H], ["7d", 7 * D], ["1w", 7 * D]] as const) {
      const before = Date.now();
      const r = cli(["rotate", built.hostname, "--grace", v, "--json", "--out", join(dir, `rot-${v}`)]);
      expect(r.code, r.stderr).toBe(0);
      const until = Date.parse((JSON.parse(r.stdout) as { graceUntil: string }).graceUntil);
      expect(until - before).toBeGreaterThanOrEqual(ms - 60_000);
      expect(until - Date.now()).toBeLessThanOrEqual(ms + 60_000);
    }
    for (const bad of ["soon", "7", "1y", "12months"]) {
      const r = cli(["rotate", built.hostname, "--grace", bad, "--out", join(dir, "never")]);
      expect(r.code, bad).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`^mkoverlay: error: --grace "${bad}": not a duration[^\\n]*\\nmkoverlay: hint: use e\\.g\\. 12h, 7d, 2w, or 0 `));
    }
  });

  it("status --never-seen-after / --expiring-within and registry doctor --grace take them; garbage names the flag", () => {
    for (const v of ["30min", "30m", "2h", "7d", "1w"]) {
      for (const args of [["status", "--never-seen-after", v], ["status", "--expiring-within", v], ["registry", "doctor", "--grace", v]]) {
        const r = cli([...args, "--json"]);
        expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(0);
      }
    }
    // doctor --grace has always taken seconds: a bare number still does.
    expect(cli(["registry", "doctor", "--grace", "86400"]).code).toBe(0);
    for (const [args, flag] of [[["status", "--never-seen-after"], "--never-seen-after"], [["status", "--expiring-within"], "--expiring-within"], [["registry", "doctor", "--grace"], "--grace"]] as const) {
      const r = cli([...args, "soon"]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`^mkoverlay: error: ${flag} "soon": not a duration\\nmkoverlay: hint: use e\\.g\\. .*README\\.md, Durations`));
    }
  });
});

describe("every config key reads it", () => {
  const PIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB bastion";
  const config = (lines: string[]) =>
    ["registry: ./r.db", "operators: none", "bastions:", "  eu:", "    host: bastion.example.com", `    hostKeys: ["${PIN}"]`, ...lines.map((l) => `    ${l}`), ""].join("\n");
  const load = (lines: string[]) => parseFleet(config(lines), "/etc/fleet.yaml", new Date("2027-01-01T00:00:00Z"));

  it.each(["30min", "2h", "7d", "1w", "12months", "1y"])("expiry: %s is accepted, and as expiryRenewal", async (v) => {
    const f = await load([`expiry: ${v}`, `expiryRenewal: ${v}`]);
    expect(f.bastions.get("eu")?.expiry).toBe(v);
  });

  it.each(["30min", "30m", "2h", "7d", "1w"])("expirySpread: %s is accepted (m: minutes)", async (v) => {
    await load(["expiry: 365d", `expirySpread: ${v}`]);
    expect(parseSpread(v)).toBe(durationMs(v));
  });

  it("expiry: 12m (months, once) is refused with file:line:col, the key and the fix; so in expiryRenewal", async () => {
    await expect(load(["expiry: 12m"])).rejects.toThrow(/^\/etc\/fleet\.yaml:7:13 bastions\.eu\.expiry: "12m" is ambiguous: `m` is a minute in mkoverlay, and here it used to mean a month: write 12months \(or 365d\)$/);
    await expect(load(["expiry: 365d", "expiryRenewal: 3m"])).rejects.toThrow(/^\/etc\/fleet\.yaml:8:20 bastions\.eu\.expiryRenewal: "3m" is ambiguous: .*write 3months \(or 90d\)$/);
  });

  it.each([
    ["expiry: soon", /:7:13 bastions\.eu\.expiry: "soon" is neither a date/],
    ["expiry: 7x", /:7:13 bastions\.eu\.expiry: "7x" is not a duration \(an integer and a unit/],
    ["expirySpread: 1y", /:8:19 bastions\.eu\.expirySpread: "1y" is not a spread: months and years count on a calendar/],
    ["expirySpread: soon", /:8:19 bastions\.eu\.expirySpread: "soon" is not a spread: write 0 \(none\) or a duration/],
    ["expiryRenewal: soon", /:8:20 bastions\.eu\.expiryRenewal: "soon" is not a duration/],
  ])("%s is refused naming the key", async (line, message) => {
    const lines = line.startsWith("expiry:") ? [line] : ["expiry: 365d", line];
    await expect(load(lines)).rejects.toThrow(message);
  });
});
