/**
 * No expiry cliff, after the build (issue 20): `status` and the metrics raise `expiring` before
 * an active device's key expires on a bastion and `expired` after, from the same instant the
 * bastion's line carries (spread included); `expiryRenewal` moves a duration expiry on from the
 * day a bastion last saw the device connected, never shortens it, and leaves date expiries and
 * devices never seen alone. The pure computation, then the real CLI on a real registry whose
 * device's `created` is moved back with SQL.
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, describe, expect, it } from "vitest";
import { authorizedKeysLine } from "../src/bastion/line.js";
import { deviceExpiry, keyExpiry, renewalAnchor } from "../src/config/expiry.js";
import { planTunnel } from "../src/config/forwards.js";
import { fingerprint, generateEd25519, publicKeyLine } from "../src/keys/ed25519.js";
import { prometheusText } from "../src/fleet/metrics.js";
import { openRegistry } from "../src/registry/open.js";
import type { DeviceRecord, Observations } from "../src/registry/types.js";
import { fleetStatus, lastSightings } from "../src/fleet/status.js";
import { expiryTimeOption, parseExpiry } from "../src/util/validate.js";
import type { Bastion } from "../src/config/fleet.js";
import { bastionRecord as bastion, fleetRecord as fleetOf, PIN } from "./helpers/records.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const DAY = 86_400_000;
const NOW = new Date("2027-12-07T12:00:00.000Z");
const ago = (days: number) => new Date(NOW.getTime() - days * DAY);
const keys = Array.from({ length: 40 }, () => generateEd25519());

function device(i: number, created: Date, over: Partial<DeviceRecord> = {}): DeviceRecord {
  return {
    hostname: `gw-${i}`,
    board: "rpi4",
    os: "raspios",
    bastions: ["eu"],
    port: 21000 + i,
    services: {},
    publicKey: publicKeyLine(keys[i]!.pub, `gw-${i}`),
    fingerprint: fingerprint(keys[i]!.pub),
    status: "active",
    overlay: null,
    station: "s",
    created: created.toISOString(),
    updated: created.toISOString(),
    attributes: {},
    ...over,
  };
}

/** The expiry-time= the bastion's line carries, as an instant. */
function lineExpiry(b: Bastion, d: DeviceRecord, seen?: Date): number {
  const pub = keys[Number(d.hostname.slice(3))]!.pub;
  const line = authorizedKeysLine({ hostname: d.hostname, pub, tunnel: planTunnel(fleetOf(b), b, d.port, {}), now: new Date(d.created), seen: seen ?? null });
  const m = /expiry-time="(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)"/.exec(line)!;
  return Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!);
}

describe("key expiry with renewal (pure)", () => {
  const built = ago(400);

  it("a device seen connected gets the renewal from the day it was last seen, spread included; the line says the same", () => {
    const b = bastion({ expiry: "365d", expiryRenewal: "90d" });
    const seen = ago(10);
    for (const i of [0, 1, 2]) {
      const t = keyExpiry(b, built, keys[i]!.pub, seen) as Date;
      expect(t).toEqual(deviceExpiry("90d", undefined, renewalAnchor(seen), keys[i]!.pub));
      expect(t.getTime()).toBeGreaterThanOrEqual(renewalAnchor(seen).getTime() + 90 * DAY);
      expect(t.getTime()).toBeLessThanOrEqual(renewalAnchor(seen).getTime() + 99 * DAY);
      expect(lineExpiry(b, device(i, built), seen)).toBe(t.getTime());
    }
  });

  it("renewed instants of devices seen at the same minute are spread too", () => {
    const b = bastion({ expiry: "365d", expiryRenewal: "90d" });
    const times = keys.map((k) => (keyExpiry(b, built, k.pub, ago(1)) as Date).getTime());
    expect(new Set(times).size).toBeGreaterThanOrEqual(39);
  });

  it("a device never seen keeps its build-time expiry (a lost device still dies); the renewal never shortens", () => {
    const b = bastion({ expiry: "365d", expiryRenewal: "90d" });
    const base = deviceExpiry("365d", undefined, built, keys[0]!.pub);
    expect(keyExpiry(b, built, keys[0]!.pub)).toEqual(base);
    expect(keyExpiry(b, built, keys[0]!.pub, null)).toEqual(base);
    // Seen the day after its build: 90 days from then is earlier than 365 from the build.
    expect(keyExpiry(b, built, keys[0]!.pub, new Date(built.getTime() + DAY))).toEqual(base);
    // Seen before it was built (a port's earlier holder): not a sighting of this key.
    expect(keyExpiry(b, built, keys[0]!.pub, new Date(built.getTime() - 30 * DAY))).toEqual(base);
  });

  it("a date expiry is unaffected by sightings, and without expiryRenewal nothing is renewed", () => {
    const date = bastion({ expiry: "2027-12-31", expiryRenewal: "90d" });
    expect(keyExpiry(date, built, keys[0]!.pub, ago(1))).toEqual(parseExpiry("2027-12-31", built));
    const plain = bastion({ expiry: "365d" });
    expect(keyExpiry(plain, built, keys[0]!.pub, ago(1))).toEqual(deviceExpiry("365d", undefined, built, keys[0]!.pub));
    expect(keyExpiry(bastion({}), built, keys[0]!.pub, ago(1))).toBeUndefined();
  });

  it("lastSightings: a tunnel up now counts at its bastion's last look, a closed one at its history; a squatter or another key does not count", () => {
    const devices = [device(0, built), device(1, built), device(2, built), device(3, built)];
    const obs: Observations = {
      sightings: [
        { bastion: "eu", port: 21000, hostname: "gw-0", fingerprint: null, since: ago(50).toISOString(), lastSeen: ago(50).toISOString(), connected: true },
        { bastion: "eu", port: 21002, hostname: "gw-2", fingerprint: null, tunnel: false, uid: 1000, since: ago(1).toISOString(), lastSeen: ago(1).toISOString(), connected: true },
        { bastion: "eu", port: 21003, hostname: "gw-3", fingerprint: "SHA256:intruder", since: ago(1).toISOString(), lastSeen: ago(1).toISOString(), connected: true },
      ],
      history: [
        { hostname: "gw-0", bastion: "eu", firstSeen: ago(50).toISOString(), lastSeen: ago(50).toISOString() },
        { hostname: "gw-1", bastion: "eu", firstSeen: ago(300).toISOString(), lastSeen: ago(20).toISOString() },
      ],
      heartbeats: [{ bastion: "eu", at: ago(0.01).toISOString(), intervalS: 15, agent: "a" }],
    };
    const seen = lastSightings(devices, obs);
    expect(seen.get("gw-0")).toEqual(ago(0.01));
    expect(seen.get("gw-1")).toEqual(ago(20));
    expect(seen.has("gw-2")).toBe(false);
    expect(seen.has("gw-3")).toBe(false);
  });
});

describe("expiring and expired alarms (pure)", () => {
  const b = bastion({ expiry: "365d", expirySpread: 0 });
  const devices = [device(0, ago(355)), device(1, ago(400)), device(2, ago(100)), device(3, ago(400), { status: "revoked" })];
  const none: Observations = { sightings: [], history: [], heartbeats: [{ bastion: "eu", at: NOW.toISOString(), intervalS: 15, agent: "a" }] };
  const status = (o: Partial<Parameters<typeof fleetStatus>[2]> = {}, obs = none, bb = b) => fleetStatus(devices, obs, { now: NOW, neverSeenAfterMs: Infinity, knownBastions: ["eu"], expiry: new Map([["eu", bb]]), ...o });

  it("10 days left is expiring, past is expired, per device and bastion; a revoked device is no alarm", () => {
    const s = status();
    expect(s.alarms.map((a) => [a.kind, a.hostname, a.bastion])).toEqual([
      ["expiring", "gw-0", "eu"],
      ["expired", "gw-1", "eu"],
    ]);
    expect(s.alarms[0]!.message).toBe(`gw-0: its key expires on eu at ${(parseExpiry("365d", ago(355)) as Date).toISOString()} (in 10d)`);
    expect(s.bastions[0]).toMatchObject({ expiring: 1, expired: 1 });
    expect(s.devices.find((d) => d.hostname === "gw-2")!.expires).toEqual([{ bastion: "eu", at: (parseExpiry("365d", ago(100)) as Date).toISOString() }]);
    expect(s.devices.find((d) => d.hostname === "gw-3")!.expires).toEqual([]);
  });

  it("the window is the caller's (--expiring-within); 0 leaves only expired", () => {
    expect(status({ expiringWithinMs: 5 * DAY }).alarms.map((a) => a.kind)).toEqual(["expired"]);
    expect(status({ expiringWithinMs: 0 }).alarms.map((a) => a.kind)).toEqual(["expired"]);
    expect(status({ expiringWithinMs: 300 * DAY }).alarms.map((a) => a.kind)).toEqual(["expiring", "expired", "expiring"]);
  });

  it("status uses the line's instant: the default spread moves the alarm exactly as it moves expiry-time", () => {
    const spread = bastion({ expiry: "365d" });
    const s = status({ expiringWithinMs: 400 * DAY }, none, spread);
    for (const d of devices.filter((x) => x.status === "active")) {
      expect(Date.parse(s.devices.find((v) => v.hostname === d.hostname)!.expires[0]!.at)).toBe(lineExpiry(spread, d));
    }
  });

  it("a device seen recently under expiryRenewal is renewed: no alarm, the metrics carry the renewed instant", async () => {
    const renew = bastion({ expiry: "365d", expirySpread: 0, expiryRenewal: "90d" });
    const seen: Observations = { ...none, history: [{ hostname: "gw-1", bastion: "eu", firstSeen: ago(399).toISOString(), lastSeen: ago(2).toISOString() }] };
    const s = status({}, seen, renew);
    expect(s.alarms.map((a) => [a.kind, a.hostname])).toEqual([["expiring", "gw-0"]]);
    const at = renewalAnchor(ago(2)).getTime() + 90 * DAY;
    expect(s.devices.find((d) => d.hostname === "gw-1")!.expires).toEqual([{ bastion: "eu", at: new Date(at).toISOString() }]);
    const prom = await prometheusText(status({}, none));
    expect(prom).toMatch(/^mkoverlay_alarms\{kind="expiring"\} 1$/m);
    expect(prom).toMatch(/^mkoverlay_alarms\{kind="expired"\} 1$/m);
    expect(await prometheusText(s)).toContain(`mkoverlay_device_key_expiry_timestamp_seconds{hostname="gw-1",bastion="eu"} ${at / 1000}`);
  });
});

describe("mkoverlay status: expiring, expired, renewed (real registry)", () => {
  const dir = tempDir("mko-expiry-alarms-");
  afterAll(() => removeDir(dir));
  const cli = (args: string[]) => runCli(args, { cwd: dir });
  const setCreated = (hostname: string, when: Date) => {
    const db = new Database(join(dir, "registry.db"));
    try {
      db.prepare("UPDATE devices SET created = ? WHERE hostname = ?").run(when.toISOString(), hostname);
    } finally {
      db.close();
    }
  };

  it("a key 10 days from its expiry is expiring (--check exits 1), past it expired; a sighting under expiryRenewal renews it", async () => {
    const pin = readPub(sshKeygen(dir, "bastion"));
    writeFleet(dir, { eu: { hostKeys: [pin], expiry: "365d", expirySpread: 0 } as never });
    const a = JSON.parse(cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet"]).stdout) as { hostname: string; port: number };
    const heartbeat = await openRegistry(join(dir, "registry.db"));
    try {
      await heartbeat.observe({ bastion: "eu", at: new Date(), intervalS: 15, agent: "test", listeners: [] });
    } finally {
      await heartbeat.close();
    }
    const fresh = cli(["status", "--check", "--never-seen-after", "0"]);
    expect(fresh.code, fresh.stdout).toBe(0);

    setCreated(a.hostname, new Date(Date.now() - 355 * DAY));
    const check = cli(["status", "--check", "--never-seen-after", "0"]);
    expect(check.code, check.stderr).toBe(1);
    expect(check.stdout).toMatch(new RegExp(`^ALARM expiring: ${a.hostname}: its key expires on eu at \\S+ \\(in (9|10)d\\)$`, "m"));
    expect(check.stdout).toMatch(/^bastion eu: 0 of 1 connected; keys: 1 expiring, 0 expired;/m);
    expect(check.stderr).toMatch(/^mkoverlay: error: 1 alarm\(s\): expiring$/m);
    // A narrower window: no alarm.
    expect(cli(["status", "--check", "--never-seen-after", "0", "--expiring-within", "7d"]).code).toBe(0);
    const bad = cli(["status", "--expiring-within", "soon"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--expiring-within "soon": not a duration\nmkoverlay: hint: use e\.g\. 30d, 6w, 72h/);

    setCreated(a.hostname, new Date(Date.now() - 400 * DAY));
    const j = JSON.parse(cli(["status", "--json", "--never-seen-after", "0"]).stdout) as { alarms: { kind: string; hostname: string; bastion: string }[]; devices: { expires: { bastion: string; at: string }[] }[] };
    expect(j.alarms).toMatchObject([{ kind: "expired", hostname: a.hostname, bastion: "eu" }]);
    expect(Date.parse(j.devices[0]!.expires[0]!.at)).toBeLessThan(Date.now() - 30 * DAY);
    const prom = cli(["status", "--format", "prometheus", "--never-seen-after", "0"]);
    expect(prom.stdout).toMatch(/^mkoverlay_alarms\{kind="expired"\} 1$/m);
    expect(spawnSync("promtool", ["check", "metrics"], { input: prom.stdout, encoding: "utf8" }).status).toBe(0);

    // The bastion's agent saw it connected 40 days ago (before the build-time expiry passed),
    // and the fleet renews for 90 days: no alarm, and the export carries the renewed instant.
    const r = await openRegistry(join(dir, "registry.db"));
    try {
      await r.observe({ bastion: "eu", at: new Date(Date.now() - 41 * DAY), intervalS: 15, agent: "test", listeners: [{ port: a.port }] });
      await r.observe({ bastion: "eu", at: new Date(Date.now() - 40 * DAY), intervalS: 15, agent: "test", listeners: [] });
      await r.observe({ bastion: "eu", at: new Date(), intervalS: 15, agent: "test", listeners: [] });
    } finally {
      await r.close();
    }
    expect(cli(["status", "--check", "--never-seen-after", "0"]).code).toBe(1); // no renewal configured
    writeFleet(dir, { eu: { hostKeys: [pin], expiry: "365d", expirySpread: 0, expiryRenewal: "90d" } as never });
    const renewed = cli(["status", "--check", "--never-seen-after", "0", "--json"]);
    expect(renewed.code, renewed.stdout).toBe(0);
    const at = renewalAnchor(new Date(Date.now() - 41 * DAY)).getTime() + 90 * DAY;
    expect((JSON.parse(renewed.stdout) as { devices: { expires: { at: string }[] }[] }).devices[0]!.expires).toEqual([{ bastion: "eu", at: new Date(at).toISOString() }]);
    const keysFile = cli(["bastion", "authorized-keys", "--bastion", "eu"]);
    expect(keysFile.code, keysFile.stderr).toBe(0);
    expect(keysFile.stdout).toContain(`expiry-time="${expiryTimeOption(new Date(at))}"`);
  });

  it.each([
    [{ expiry: "2030-01-01", expiryRenewal: "90d" }, /bastions\.eu\.expiryRenewal: only renews a duration expiry; "2030-01-01" is a date/],
    [{ expiryRenewal: "90d" }, /bastions\.eu\.expiryRenewal: needs a duration `expiry`/],
    [{ expiry: "365d", expiryRenewal: "2030-01-01" }, /bastions\.eu\.expiryRenewal: "2030-01-01" is not a duration/],
    [{ expiry: "365d", expiryRenewal: "0d" }, /bastions\.eu\.expiryRenewal: "0d" is not a positive duration/],
  ])("%j is refused with the key and the fix, nothing built", (b, message) => {
    const d = tempDir("mko-renewal-cfg-");
    try {
      writeFleet(d, { eu: { hostKeys: [PIN], ...b } as never });
      const r = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: d });
      expect(r.code).not.toBe(0);
      // With --json the error is one JSON object on stderr (docs/json.md, Errors).
      expect((JSON.parse(r.stderr) as { error: string }).error).toMatch(message);
      expect(r.stderr).toMatch(/mkoverlay\.yaml/);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      expect(r.stdout).toBe("");
    } finally {
      removeDir(d);
    }
  });
});
