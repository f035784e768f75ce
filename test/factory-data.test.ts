/**
 * Batches that carry factory data: the extra CSV columns (and --attr) are kept per device,
 * shown by `registry list` in every format, and a device is named by them wherever a command
 * takes one (`revoke serial=SN0042`, `--hostname serial=SN0042` for a re-flash): exactly one
 * device, or a clear error and nothing changed.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { extract, readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-factory-");
afterAll(() => removeDir(dir));
const cli = (...args: string[]) => runCli(args, { cwd: dir });

interface Device {
  hostname: string;
  status: string;
  port: number;
  overlay: string;
  attributes: Record<string, string>;
}
const list = (): Device[] => JSON.parse(cli("registry", "list", "--json").stdout) as Device[];
const byName = (h: string): Device => list().find((d) => d.hostname === h)!;
/** Overlays by hostname, from the batch's --json (the registry list leaves the path out). */
const overlays = new Map<string, string>();

beforeAll(() => {
  writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  writeFileSync(
    join(dir, "shift.csv"),
    ['Serial Number,hostname,MAC,site', 'SN0001,gw-a,dc:a6:32:00:00:01,"Berlin | Halle 2"', "SN0002,gw-b,dc:a6:32:00:00:02,Berlin", "SN0003,gw-c,dc:a6:32:00:00:03,Lyon"].join("\r\n") + "\r\n",
  );
  const r = cli("batch", "--board", "rpi4", "--bastion", "eu", "--hosts", "shift.csv", "--json");
  expect(r.code, r.stderr).toBe(0);
  for (const d of r.stdout.trim().split("\n").map((l) => JSON.parse(l) as Device)) overlays.set(d.hostname, d.overlay);
});

describe("registry list shows the factory data", () => {
  it("--json: attributes by normalised column name", () => {
    expect(byName("gw-a").attributes).toEqual({ serial_number: "SN0001", mac: "dc:a6:32:00:00:01", site: "Berlin | Halle 2" });
  });

  it("table: one column per name, after the fixed ones", () => {
    // The default table fits 80 columns (test/conventions.test.ts); every column is asked for here.
    const t = cli("registry", "list", "--columns", "hostname,bastions,port,services,fingerprint,board,os,status,created,seen,first_seen,last_seen,seen_on,mac,serial_number,site").stdout.split("\n");
    expect(t[0]).toMatch(/^hostname\s+bastions\s+port\s+services\s+fingerprint\s+board\s+os\s+status\s+created\s+seen\s+first_seen\s+last_seen\s+seen_on\s+mac\s+serial_number\s+site$/);
    expect(t.find((l) => l.startsWith("gw-c"))).toMatch(/\sdc:a6:32:00:00:03\s+SN0003\s+Lyon$/);
  });

  it("csv: a spreadsheet gets its columns back (quoted where needed)", () => {
    const rows = cli("registry", "list", "--format", "csv").stdout.trim().split("\n");
    expect(rows[0]).toBe("hostname,bastions,port,services,fingerprint,board,os,status,created,seen,first_seen,last_seen,seen_on,mac,serial_number,site");
    expect(rows.find((l) => l.startsWith("gw-a,"))).toMatch(/,dc:a6:32:00:00:01,SN0001,Berlin \| Halle 2$/);
  });

  it("markdown: a '|' in a value cannot open a column", () => {
    const md = cli("registry", "list", "--format", "markdown").stdout;
    const row = md.split("\n").find((l) => l.startsWith("| gw-a "))!;
    expect(row).toContain("Berlin \\| Halle 2");
    expect(row.split(/(?<!\\)\|/).length).toBe(md.split("\n")[0]!.split("|").length);
  });
});

describe("a device named by its factory data", () => {
  it("status shows it and narrows to a device named by it (in the column's own spelling too)", () => {
    const one = (arg: string) => (JSON.parse(cli("status", arg, "--json").stdout) as { devices: Device[] }).devices.map((d) => [d.hostname, d.attributes.serial_number]);
    expect(one("serial_number=SN0002")).toEqual([["gw-b", "SN0002"]]);
    expect(one("Serial Number=SN0003")).toEqual([["gw-c", "SN0003"]]);
    const table = cli("status").stdout.split("\n");
    expect(table[0]).toMatch(/^HOSTNAME\s+STATE\s+BASTION\s+CONNECTED SINCE\s+LAST SEEN\s+MAC\s+SERIAL_NUMBER\s+SITE$/);
    expect(table.find((l) => l.startsWith("gw-c "))).toMatch(/\sdc:a6:32:00:00:03\s+SN0003\s+Lyon$/);
    const narrowed = cli("status", "mac=dc:a6:32:00:00:01").stdout.split("\n").filter((l) => /^gw-/.test(l));
    expect(narrowed.map((l) => l.split(/\s+/)[0])).toEqual(["gw-a"]);
  });

  it("no device: one clear error naming what is recorded, nothing changed", () => {
    const before = list();
    const none = cli("revoke", "serial_number=SN9999");
    expect(none.code).toBe(2);
    expect(none.stderr).toBe('mkoverlay: error: revoke serial_number=SN9999: no device has serial_number = "SN9999"\nmkoverlay: hint: factory data recorded: mac, serial_number, site (see \'mkoverlay registry list\')\n');
    expect(list()).toEqual(before);
  });

  it("several devices with the value: named, and nothing changed", () => {
    const d = cli("--board", "rpi4", "--bastion", "eu", "--attr", "site=Lyon", "--json");
    expect(d.code, d.stderr).toBe(0);
    const before = list();
    const r = cli("revoke", "site=Lyon");
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("mkoverlay: error: revoke site=Lyon: 2 devices have it: gw-c (active), gw-0001 (active)\nmkoverlay: hint: name the device by its hostname\n");
    expect(list()).toEqual(before);
  });

  it("what cannot be a factory data name is taken as a hostname (and refused as one)", () => {
    const r = cli("revoke", "9x=1");
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("mkoverlay: error: revoke 9x=1: no such device in the registry\nmkoverlay: hint: see 'mkoverlay registry list'\n");
    const b = cli("--board", "rpi4", "--bastion", "eu", "--hostname", 'x",command="sh');
    expect(b.code).toBe(2);
    expect(b.stderr).toMatch(/^mkoverlay: error: --hostname "x\\",command=\\"sh": may only use a-z/);
  });

  it("revoke, rotate and release find the device by serial; release narrows to the revoked one", () => {
    const rot = JSON.parse(cli("rotate", "serial_number=SN0002", "--grace", "0", "--json").stdout);
    expect(rot.hostname).toBe("gw-b");
    const rev = JSON.parse(cli("revoke", "serial_number=SN0002", "--json").stdout);
    expect(rev).toMatchObject({ hostname: "gw-b", status: "revoked", attributes: { serial_number: "SN0002" } });
    // A replacement board gets the same serial: revoke would pick the live one, release the revoked one.
    const repl = cli("--board", "rpi4", "--bastion", "eu", "--hostname", "gw-b2", "--attr", "serial_number=SN0002", "--json");
    expect(repl.code, repl.stderr).toBe(0);
    const rel = JSON.parse(cli("registry", "release", "serial_number=SN0002", "--json").stdout);
    expect(rel).toMatchObject({ hostname: "gw-b", status: "released" });
    expect(list().map((d) => d.hostname)).not.toContain("gw-b");
    expect(byName("gw-b2").status).toBe("active");
  });

  it("--hostname serial=… re-flashes the registered device (with its key)", () => {
    const a = byName("gw-a");
    const unpacked = join(dir, "unpacked-a");
    mkdirSync(unpacked);
    extract(overlays.get("gw-a")!, unpacked);
    const key = join(dir, "gw-a.key");
    writeFileSync(key, readFileSync(join(unpacked, "etc/ssh/mkoverlay/ssh_host_ed25519_key")), { mode: 0o600 });
    const r = cli("--board", "rpi4", "--bastion", "eu", "--host-key", key, "--hostname", "serial_number=SN0001", "--json");
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ hostname: "gw-a", port: a.port, rebuilt: true, attributes: a.attributes });
    // Without the key it would be a new device with a taken name: refused, nothing reserved.
    const before = list();
    const n = cli("--board", "rpi4", "--bastion", "eu", "--hostname", "serial_number=SN0001");
    expect(n.code).toBe(2);
    expect(n.stderr).toMatch(/^mkoverlay: error: --hostname serial_number=SN0001: names a registered device/);
    expect(list()).toEqual(before);
  });
});

describe("--attr", () => {
  it("build records it; a name or value that cannot be stored is refused", () => {
    const r = cli("--board", "rpi4", "--bastion", "eu", "--hostname", "gw-attr", "--attr", "serial=SN7", "--attr", "Line-Shift=A 2", "--json");
    expect(r.code, r.stderr).toBe(0);
    expect(byName("gw-attr").attributes).toEqual({ serial: "SN7", line_shift: "A 2" });
    for (const [a, msg] of [
      ["hostname=x", "--attr hostname=…: the hostname is the device's name"],
      ["serial", '--attr "serial": write KEY=VALUE'],
      ["serial=", '--attr "serial=": no value after \'=\''],
      [`serial=${"x".repeat(300)}`, "the value is 300 characters long (at most 256)"],
    ]) {
      const b = cli("--board", "rpi4", "--bastion", "eu", "--attr", a!);
      expect(b.code, a).toBe(2);
      expect(b.stderr).toContain(msg!);
    }
  });

  it("batch --attr goes on every device; a clash with a CSV column is refused before anything is reserved", () => {
    writeFileSync(join(dir, "more.csv"), "hostname,site\ngw-m1,Lyon\ngw-m2,\n");
    const before = list();
    const clash = cli("batch", "--board", "rpi4", "--bastion", "eu", "--hosts", "more.csv", "--attr", "site=Berlin");
    expect(clash.code).toBe(2);
    expect(clash.stderr).toMatch(/--attr site=Berlin: more.csv:2 gives site = "Lyon"/);
    expect(list()).toEqual(before);
    const ok = cli("batch", "--board", "rpi4", "--bastion", "eu", "--count", "2", "--attr", "site=Porto", "--json");
    expect(ok.code, ok.stderr).toBe(0);
    const built = ok.stdout.trim().split("\n").map((l) => JSON.parse(l) as Device);
    for (const d of built) expect(byName(d.hostname).attributes).toEqual({ site: "Porto" });
  });
});
