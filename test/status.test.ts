/**
 * Fleet status from what the bastions recorded: the pure computation (connected, offline with
 * its last-seen time, never seen, and the alarms), the registry's observation writes (only
 * changes plus a heartbeat, even for 10,000 tunnels), the Prometheus text checked by the real
 * `promtool check metrics`, and the `status` command with --check.
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { prometheusText } from "../src/fleet/metrics.js";
import { openRegistry } from "../src/registry/open.js";
import type { DeviceRecord, Observations } from "../src/registry/types.js";
import { fleetStatus } from "../src/fleet/status.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-status-");
afterAll(() => removeDir(dir));

const NOW = new Date("2026-11-30T12:00:00.000Z");
const t = (minutesAgo: number) => new Date(NOW.getTime() - minutesAgo * 60_000).toISOString();

function device(hostname: string, port: number, over: Partial<DeviceRecord> = {}): DeviceRecord {
  return {
    hostname,
    board: "rpi4",
    os: "raspios",
    bastions: ["eu"],
    port,
    services: {},
    publicKey: "ssh-ed25519 AAAA",
    fingerprint: `SHA256:${hostname}`,
    status: "active",
    overlay: null,
    station: "s",
    created: t(60 * 48),
    updated: t(60 * 48),
    attributes: {},
    ...over,
  };
}

describe("fleet status (pure)", () => {
  const devices = [
    device("gw-on", 21000),
    device("gw-off", 21001),
    device("gw-never", 21002),
    device("gw-new", 21003, { created: t(5) }),
    device("gw-revoked", 21004, { status: "revoked" }),
    device("gw-us", 21005, { bastions: ["us"] }),
  ];
  const obs: Observations = {
    sightings: [
      { bastion: "eu", port: 21000, hostname: "gw-on", fingerprint: null, since: t(30), lastSeen: t(30), connected: true },
      { bastion: "eu", port: 21001, hostname: "gw-off", fingerprint: null, since: t(90), lastSeen: t(20), connected: false },
      { bastion: "eu", port: 21004, hostname: "gw-revoked", fingerprint: null, since: t(10), lastSeen: t(10), connected: true },
      { bastion: "eu", port: 21999, hostname: null, fingerprint: null, since: t(3), lastSeen: t(3), connected: true },
      { bastion: "us", port: 21005, hostname: "gw-us", fingerprint: null, since: t(100), lastSeen: t(100), connected: true },
    ],
    history: [
      { hostname: "gw-on", bastion: "eu", firstSeen: t(300), lastSeen: t(30) },
      { hostname: "gw-off", bastion: "eu", firstSeen: t(400), lastSeen: t(20) },
      { hostname: "gw-revoked", bastion: "eu", firstSeen: t(10), lastSeen: t(10) },
      { hostname: "gw-us", bastion: "us", firstSeen: t(100), lastSeen: t(100) },
    ],
    heartbeats: [
      { bastion: "eu", at: t(0.1), intervalS: 15, agent: "a" },
      { bastion: "us", at: t(30), intervalS: 15, agent: "b" },
    ],
  };
  const s = fleetStatus(devices, obs, { now: NOW, neverSeenAfterMs: 24 * 3600_000, knownBastions: ["eu", "us"] });
  const of = (h: string) => s.devices.find((d) => d.hostname === h)!;

  it("connected on the right bastion since when; offline with its last-seen time; never seen vs new", () => {
    expect(of("gw-on")).toMatchObject({ state: "connected", connected: [{ bastion: "eu", since: t(30) }], lastSeen: t(0.1), firstSeen: t(300), seenOn: ["eu"] });
    expect(of("gw-off")).toMatchObject({ state: "offline", connected: [], lastSeen: t(20) });
    expect(of("gw-never")).toMatchObject({ state: "never-seen", lastSeen: null, firstSeen: null });
    expect(of("gw-new")).toMatchObject({ state: "new" });
    // us's agent has been silent for 30 minutes: what it said is not "now".
    expect(of("gw-us")).toMatchObject({ state: "unknown", connected: [] });
  });

  it("alarms: revoked but connected, an unknown listener, a silent bastion, a device never seen", () => {
    expect(s.alarms.map((a) => [a.kind, a.hostname ?? a.bastion, a.port ?? null])).toEqual([
      ["revoked-connected", "gw-revoked", 21004],
      ["unknown-listener", "eu", 21999],
      ["never-seen", "gw-never", null],
      ["bastion-silent", "us", null],
    ]);
    expect(s.bastions).toEqual([
      { name: "eu", heartbeat: t(0.1), fresh: true, connected: 2, expected: 4, expiring: 0, expired: 0 },
      { name: "us", heartbeat: t(30), fresh: false, connected: 0, expected: 1, expiring: 0, expired: 0 },
    ]);
  });

  it("a tunnel opened with another key than its device's is an alarm (sshd's log names the key)", () => {
    const withKey = (fp: string) => ({ ...obs, sightings: obs.sightings.map((x) => (x.port === 21000 ? { ...x, fingerprint: fp } : x)) });
    const opts = { now: NOW, neverSeenAfterMs: Infinity, knownBastions: ["eu"] };
    expect(fleetStatus(devices, withKey("SHA256:gw-on"), opts).alarms.filter((a) => a.kind === "key-mismatch")).toEqual([]);
    expect(fleetStatus(devices, withKey("SHA256:intruder"), opts).alarms.filter((a) => a.kind === "key-mismatch")).toEqual([
      { kind: "key-mismatch", bastion: "eu", hostname: "gw-on", port: 21000, message: "eu: port 21000 of gw-on was opened with key SHA256:intruder, not the device's" },
    ]);
    // That listener is not the device (issue 19).
    expect(fleetStatus(devices, withKey("SHA256:intruder"), opts).devices.find((d) => d.hostname === "gw-on")?.connected).toEqual([]);
  });

  it("a device's port held by anything but the tunnel user's sshd session is port-squatted, and the device is not connected (issue 19)", () => {
    const squat = { ...obs, sightings: obs.sightings.map((x) => (x.port === 21000 ? { ...x, tunnel: false, uid: 65534 } : x.port === 21999 ? { ...x, tunnel: false, uid: 1000 } : x)) };
    const st = fleetStatus(devices, squat, { now: NOW, neverSeenAfterMs: Infinity, knownBastions: ["eu"] });
    expect(st.devices.find((d) => d.hostname === "gw-on")).toMatchObject({ state: "offline", connected: [] });
    expect(st.alarms.filter((a) => a.kind === "port-squatted" || a.kind === "unknown-listener")).toEqual([
      { kind: "port-squatted", bastion: "eu", hostname: "gw-on", port: 21000, uid: 65534, message: `eu: port 21000 of gw-on is held by uid 65534 since ${t(30)}` },
      { kind: "unknown-listener", bastion: "eu", port: 21999, uid: 1000, message: `eu: port 21999 listens since ${t(3)} (held by uid 1000), and no registered device holds it` },
    ]);
    // The tunnel's own session (or one recorded by an agent that did not tell) counts.
    const own = { ...obs, sightings: obs.sightings.map((x) => (x.port === 21000 ? { ...x, tunnel: true, uid: null } : x)) };
    expect(fleetStatus(devices, own, { now: NOW, neverSeenAfterMs: Infinity }).devices.find((d) => d.hostname === "gw-on")?.state).toBe("connected");
  });

  it("--bastion narrows everything to one bastion", () => {
    const eu = fleetStatus(devices, obs, { now: NOW, neverSeenAfterMs: Infinity, bastion: "eu", knownBastions: ["eu", "us"] });
    expect(eu.devices.map((d) => d.hostname)).not.toContain("gw-us");
    expect(eu.bastions.map((b) => b.name)).toEqual(["eu"]);
    expect(eu.alarms.map((a) => a.kind)).toEqual(["revoked-connected", "unknown-listener"]);
  });

  it("Prometheus text passes promtool check metrics", async () => {
    const text = await prometheusText(s);
    expect(text).toMatch(/^mkoverlay_device_up\{hostname="gw-on",bastion="eu"\} 1$/m);
    expect(text).toMatch(/^mkoverlay_device_up\{hostname="gw-off",bastion="eu"\} 0$/m);
    expect(text).toMatch(/^mkoverlay_alarms\{kind="revoked-connected"\} 1$/m);
    expect(text).toMatch(/^mkoverlay_devices\{bastion="eu",state="connected"\} 2$/m);
    const r = spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" });
    expect(r.error).toBeUndefined();
    expect(r.status, r.stdout + r.stderr).toBe(0);
  });
});

describe("observations in the registry", () => {
  it("writes only what changed plus a heartbeat, even with 10,000 tunnels", async () => {
    const r = await openRegistry(join(dir, "obs.db"));
    try {
      const look = (ports: number[], minute: number) => r.observe({ bastion: "eu", at: new Date(NOW.getTime() + minute * 60_000), intervalS: 15, agent: "test", listeners: ports.map((port) => ({ port })) });
      const all = Array.from({ length: 10_000 }, (_, i) => 30_000 + i);
      expect(await look(all, 0)).toBe(10_000);
      expect(await look(all, 1)).toBe(0);
      expect(await look(all.slice(1), 2)).toBe(1);
      const o = await r.observations();
      expect(o.heartbeats).toEqual([{ bastion: "eu", at: new Date(NOW.getTime() + 120_000).toISOString(), intervalS: 15, agent: "test" }]);
      // The one that went away was last seen at the previous look.
      expect(o.sightings.find((x) => x.port === 30_000)).toMatchObject({ connected: false, lastSeen: new Date(NOW.getTime() + 60_000).toISOString(), hostname: null });
      expect(o.sightings.filter((x) => x.connected)).toHaveLength(9_999);
    } finally {
      await r.close();
    }
  });
});

describe("mkoverlay status", () => {
  it("shows the fleet, and --check fails on an alarm", async () => {
    writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
    const cli = (args: string[]) => runCli(args, { cwd: dir });
    const a = JSON.parse(cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet"]).stdout) as { hostname: string; port: number };
    const b = JSON.parse(cli(["--board", "rpi4", "--bastion", "eu", "--json", "--quiet"]).stdout) as { hostname: string; port: number };
    const r = await openRegistry(join(dir, "registry.db"));
    try {
      await r.observe({ bastion: "eu", at: new Date(), intervalS: 15, agent: "test", listeners: [{ port: a.port }] });
    } finally {
      await r.close();
    }
    const table = cli(["status"]);
    expect(table.code, table.stderr).toBe(0);
    expect(table.stdout).toMatch(new RegExp(`^${a.hostname}\\s+connected\\s+eu\\s`, "m"));
    expect(table.stdout).toMatch(new RegExp(`^${b.hostname}\\s+new\\s+-`, "m"));
    expect(table.stdout).toMatch(/^bastion eu: 1 of 2 connected/m);
    expect(cli(["status", "--check"]).code).toBe(0);
    const j = JSON.parse(cli(["status", "--json"]).stdout) as { devices: { hostname: string; state: string }[] };
    expect(j.devices.map((d) => [d.hostname, d.state])).toEqual([
      [a.hostname, "connected"],
      [b.hostname, "new"],
    ]);
    expect(cli(["revoke", a.hostname]).code).toBe(0);
    const check = cli(["status", "--check"]);
    expect(check.code).toBe(1);
    expect(check.stdout).toMatch(/^ALARM revoked-connected: /m);
    expect(check.stderr).toMatch(/^mkoverlay: error: 1 alarm\(s\): revoked-connected$/m);
    const prom = cli(["status", "--format", "prometheus"]);
    expect(spawnSync("promtool", ["check", "metrics"], { input: prom.stdout, encoding: "utf8" }).status).toBe(0);
  });
});
