/**
 * No expiry cliff at build time: devices built in the same minute with `expiry: 365d` get
 * different expiry-time instants (a deterministic per-key extra of up to `expirySpread`), never
 * earlier than the config says; `expirySpread: 0` and date expiries keep one instant; a bad
 * spread is refused with the file, line and key.
 */
import { describe, expect, it } from "vitest";
import { deviceLines } from "../src/bastion/line.js";
import { deviceExpiry, parseSpread } from "../src/config/expiry.js";
import { planTunnels } from "../src/config/forwards.js";
import { generateEd25519 } from "../src/keys/ed25519.js";
import { expiryTimeOption, LATEST_EXPIRY, parseExpiry } from "../src/util/validate.js";
import type { Bastion } from "../src/config/fleet.js";
import { bastionRecord as bastion, fleetRecord as fleet, PIN } from "./helpers/records.js";
import { removeDir, runCli, tempDir, writeFleet } from "./helpers/workspace.js";

const DAY = 86_400_000;
const BUILT = new Date("2026-12-07T09:30:00Z");
const keys = Array.from({ length: 40 }, () => generateEd25519());

/** The expiry-time= of each key's line, all built at BUILT (one shift, one minute). */
function expiryTimes(b: Bastion): string[] {
  return keys.map((k, i) => {
    const line = deviceLines(`gw-${i}`, k.pub, planTunnels(fleet(b), [b], 21000 + i, {}), BUILT).eu ?? "";
    const m = /expiry-time="(\d{12})"/.exec(line);
    expect(m, line).not.toBeNull();
    return m![1]!;
  });
}

const asDate = (t: string): number => Date.UTC(+t.slice(0, 4), +t.slice(4, 6) - 1, +t.slice(6, 8), +t.slice(8, 10), +t.slice(10, 12));

describe("expiry spread", () => {
  it("365d: one shift's devices do not all expire in the same minute; none earlier than 365d, none later than 30d more", () => {
    const times = expiryTimes(bastion({ expiry: "365d" }));
    const floor = asDate(expiryTimeOption(parseExpiry("365d", BUILT) as Date));
    // 40 draws over 30 days of minutes: a collision would be a bug, not bad luck (~1 in 50).
    expect(new Set(times).size).toBeGreaterThanOrEqual(39);
    for (const t of times) {
      expect(asDate(t)).toBeGreaterThanOrEqual(floor);
      expect(asDate(t)).toBeLessThanOrEqual(floor + 30 * DAY);
    }
    // Spread over the window, not bunched at one end.
    const span = Math.max(...times.map(asDate)) - Math.min(...times.map(asDate));
    expect(span).toBeGreaterThan(15 * DAY);
  });

  it("is deterministic per key: a rebuild or re-export of a device gives the same instant", () => {
    expect(expiryTimes(bastion({ expiry: "365d" }))).toEqual(expiryTimes(bastion({ expiry: "365d" })));
  });

  it("expirySpread sets the window; 0 turns it off", () => {
    const floor = asDate(expiryTimeOption(parseExpiry("365d", BUILT) as Date));
    const two = expiryTimes(bastion({ expiry: "365d", expirySpread: "2d" })).map(asDate);
    expect(Math.max(...two)).toBeLessThanOrEqual(floor + 2 * DAY);
    expect(Math.min(...two)).toBeGreaterThanOrEqual(floor);
    expect(new Set(two).size).toBeGreaterThan(30);
    expect(new Set(expiryTimes(bastion({ expiry: "365d", expirySpread: 0 })))).toEqual(new Set([expiryTimeOption(parseExpiry("365d", BUILT) as Date)]));
  });

  it("a short duration gets a tenth of itself by default (7d: under 17 hours more)", () => {
    const floor = asDate(expiryTimeOption(parseExpiry("7d", BUILT) as Date));
    const t = expiryTimes(bastion({ expiry: "7d" })).map(asDate);
    expect(Math.max(...t)).toBeLessThanOrEqual(floor + 0.7 * DAY);
    expect(new Set(t).size).toBeGreaterThan(30);
  });

  it("a date expiry is the same instant for every device", () => {
    expect(new Set(expiryTimes(bastion({ expiry: "2030-06-30" })))).toEqual(new Set(["203006300000"]));
  });

  it("never lands past the last instant expiry-time can hold", () => {
    const built = new Date("2026-01-01T00:00:00Z");
    const years = 9999 - 2026; // 9999-01-01: plus up to 30 days of spread stays inside 9999
    for (const k of keys.slice(0, 5)) {
      const t = deviceExpiry(`${years}y`, "3650d", built, k.pub);
      expect(t).toBeInstanceOf(Date);
      expect((t as Date).getTime()).toBeLessThanOrEqual(LATEST_EXPIRY.getTime());
    }
  });

  it.each([
    ["0", 0],
    [0, 0],
    ["36h", 1.5 * DAY],
    ["14d", 14 * DAY],
    ["2w", 14 * DAY],
  ] as const)("parses %s", (v, ms) => {
    expect(parseSpread(v)).toBe(ms);
  });

  it.each(["5", "1y", "6months", "-1d", "soon", "99999d"])("refuses %s with the reason", (v) => {
    expect(typeof parseSpread(v)).toBe("string");
  });
});

describe("expirySpread in the config", () => {
  function build(b: Record<string, unknown>): { code: number; stderr: string; stdout: string } {
    const dir = tempDir("mko-spread-");
    try {
      writeFleet(dir, { eu: { hostKeys: [PIN], ...b } as never });
      return runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: dir });
    } finally {
      removeDir(dir);
    }
  }

  it.each([
    [{ expiry: "2030-01-01", expirySpread: "14d" }, /bastions\.eu\.expirySpread: only spreads a duration expiry; "2030-01-01" is a date/],
    [{ expirySpread: "14d" }, /bastions\.eu\.expirySpread: needs a duration `expiry`/],
    [{ expiry: "365d", expirySpread: "1y" }, /bastions\.eu\.expirySpread: "1y" is not a spread/],
  ])("%j is refused with the key and the fix, nothing built", (b, message) => {
    const r = build(b);
    expect(r.code).not.toBe(0);
    // build runs with --json: the error is one JSON object on stderr (docs/json.md).
    const e = JSON.parse(r.stderr) as { error: string; exitCode: number; stack?: string };
    expect(e.exitCode).toBe(r.code);
    expect(e.error).toMatch(message);
    expect(e.error).toMatch(/mkoverlay\.yaml/);
    expect(e.stack).toBeUndefined();
    expect(r.stdout).toBe("");
  });

  it("a build with expiry: 365d and expirySpread: 14d emits a line inside the window", () => {
    const before = Date.now();
    const r = build({ expiry: "365d", expirySpread: "14d" });
    expect(r.code, r.stderr).toBe(0);
    const line = (JSON.parse(r.stdout) as { authorizedKeys: Record<string, string> }).authorizedKeys.eu ?? "";
    const t = asDate(/expiry-time="(\d{12})"/.exec(line)![1]!);
    expect(t).toBeGreaterThanOrEqual(asDate(expiryTimeOption(parseExpiry("365d", new Date(before)) as Date)));
    expect(t).toBeLessThanOrEqual(asDate(expiryTimeOption(parseExpiry("365d", new Date()) as Date)) + 14 * DAY);
  });
});
