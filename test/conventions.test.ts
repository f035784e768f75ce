/**
 * Issue 22's command-line conventions that need a fleet: `status --state` shows only the devices
 * in the states asked for, and `registry list` fits an 80-column terminal by default, with
 * `--columns` to choose (fixed columns and factory data names, in every format).
 */
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openRegistry } from "../src/registry/open.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-conventions-");
afterAll(() => removeDir(dir));
const cli = (...args: string[]) => runCli(args, { cwd: dir });

interface Built {
  hostname: string;
  port: number;
}
let on: Built;
let off: Built;
let fresh: Built;

beforeAll(async () => {
  writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  const build = (serial: string): Built => {
    const r = cli("--board", "rpi4", "--bastion", "eu", "--attr", `serial_number=${serial}`, "--attr", `mac=dc:a6:32:00:00:${serial.slice(-2)}`, "--attr", "site=Berlin Halle 2", "--json");
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as Built;
  };
  [on, off, fresh] = [build("SN0001"), build("SN0002"), build("SN0003")];
  // What a bastion agent records: both were seen a minute ago, one is still connected now.
  const r = await openRegistry(join(dir, "registry.db"));
  try {
    await r.observe({ bastion: "eu", at: new Date(Date.now() - 60_000), intervalS: 15, agent: "test", listeners: [{ port: on.port }, { port: off.port }] });
    await r.observe({ bastion: "eu", at: new Date(), intervalS: 15, agent: "test", listeners: [{ port: on.port }] });
  } finally {
    await r.close();
  }
});

const hostnames = (table: string): string[] => table.split("\n").filter((l) => /^gw-\d+\s/.test(l)).map((l) => l.split(/\s+/)[0]!);

describe("status --state", () => {
  it("shows only the devices in that state (table and JSON)", () => {
    const all = JSON.parse(cli("status", "--json").stdout) as { devices: { hostname: string; state: string }[] };
    expect(all.devices.map((d) => [d.hostname, d.state])).toEqual([
      [on.hostname, "connected"],
      [off.hostname, "offline"],
      [fresh.hostname, "new"],
    ]);
    expect(hostnames(cli("status", "--state", "connected").stdout)).toEqual([on.hostname]);
    expect(hostnames(cli("status", "--state", "offline").stdout)).toEqual([off.hostname]);
    const j = JSON.parse(cli("status", "--state", "offline,new", "--json").stdout) as { devices: { hostname: string }[]; bastions: unknown[] };
    expect(j.devices.map((d) => d.hostname)).toEqual([off.hostname, fresh.hostname]);
    // The bastions' lines stay: they say whether the view is fresh.
    expect(j.bastions).toHaveLength(1);
    expect(hostnames(cli("status", "--state", "never-seen").stdout)).toEqual([]);
    // Built more than 1 s ago and never connected: never-seen (on a quick machine this test
    // reaches here within a second of the build, so wait for the second to pass).
    const created = Date.parse((all.devices.find((d) => d.hostname === fresh.hostname) as unknown as { created: string }).created);
    const wait = created + 1_100 - Date.now();
    if (wait > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, wait);
    expect(hostnames(cli("status", "--state", "never-seen", "--never-seen-after", "1s").stdout)).toEqual([fresh.hostname]);
  });

  it("an unknown state is an error naming the states, with the nearest one", () => {
    const r = cli("status", "--state", "ofline");
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`mkoverlay: error: --state "ofline": not a device state (did you mean 'offline'?)\nmkoverlay: hint: one or more of connected, offline, never-seen, new, unknown, comma-separated\n`);
    const p = cli("status", "--state", "offline", "--format", "prometheus");
    expect(p.code).toBe(2);
    expect(p.stderr).toMatch(/^mkoverlay: error: --state filters the table and JSON, not --format prometheus/);
  });
});

describe("registry list: a table that fits 80 columns, --columns", () => {
  it("the default table fits 80 columns: the fixed few, then each factory data column that still fits", () => {
    const r = cli("registry", "list");
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split("\n");
    expect(lines).toHaveLength(4);
    for (const l of lines) expect(l.length, l).toBeLessThanOrEqual(80);
    // mac (17 wide) would not fit; serial_number does; site would not.
    expect(lines[0]).toMatch(/^hostname\s+port\s+bastions\s+board\s+os\s+status\s+seen\s+serial_number$/);
    expect(lines[1]).toMatch(new RegExp(`^${on.hostname}\\s+${on.port}\\s+eu\\s+rpi4\\s+raspios\\s+active\\s+connected:eu\\s+SN0001$`));
    expect(lines[2]).toMatch(new RegExp(`^${off.hostname}\\s.*\\soffline\\s+SN0002$`));
  });

  it("--columns picks fixed columns and factory data, in every format", () => {
    const t = cli("registry", "list", "--columns", "hostname,serial_number,site,fingerprint");
    expect(t.code, t.stderr).toBe(0);
    const lines = t.stdout.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^hostname\s+serial_number\s+site\s+fingerprint$/);
    expect(lines[2]).toMatch(new RegExp(`^${off.hostname}\\s+SN0002\\s+Berlin Halle 2\\s+SHA256:\\S+$`));
    expect(cli("registry", "list", "--format", "csv", "--columns", "hostname,port,mac").stdout).toBe(
      `hostname,port,mac\n${on.hostname},${on.port},dc:a6:32:00:00:01\n${off.hostname},${off.port},dc:a6:32:00:00:02\n${fresh.hostname},${fresh.port},dc:a6:32:00:00:03\n`,
    );
    expect(cli("registry", "list", "--format", "markdown", "--columns", "hostname,seen").stdout.split("\n")[0]).toBe("| hostname | seen |");
    // CSV without --columns keeps every column: a spreadsheet gets everything back.
    expect(cli("registry", "list", "--format", "csv").stdout.split("\n")[0]).toBe("hostname,bastions,port,services,fingerprint,board,os,status,created,seen,first_seen,last_seen,seen_on,mac,serial_number,site");
  });

  it("an unknown column is an error with the nearest name and the list; --columns with --json is refused", () => {
    const r = cli("registry", "list", "--columns", "hostname,serial_numbr");
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^mkoverlay: error: --columns: no column "serial_numbr" \(did you mean 'serial_number'\?\)\nmkoverlay: hint: columns: hostname, bastions, port, .*, mac, serial_number, site\n$/);
    const j = cli("registry", "list", "--columns", "hostname", "--json");
    expect(j.code).toBe(2);
    expect(JSON.parse(j.stderr)).toMatchObject({ error: expect.stringMatching(/--columns chooses the columns/), exitCode: 2 });
  });
});
