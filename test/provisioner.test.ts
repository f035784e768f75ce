/**
 * Raspberry Pi's factory provisioner (rpi-sb-provisioner): the README's rootfs-mounted hook run
 * as the provisioner runs it (docs/facts.md): a per-device copy of a Raspberry Pi OS–shaped
 * image, its boot (vfat) and root (ext4) partitions loop-mounted under a temp dir, the hook file
 * executed with those two mount points as $1 and $2, from `/`, with only the environment the
 * provisioner's service has (systemd's PATH, the variables it exports for hooks, its config's).
 * The one addition is where the fleet config lives (MKOVERLAY_CONFIG, which the hook file reads)
 * and mkoverlay on PATH. After unmounting, `mkoverlay verify` checks the image against the
 * registry and e2fsck checks the file system.
 *
 * And `registry import-manufacturing` against a SQLite file with the provisioner's `devices`
 * table, column for column.
 */
import Database from "better-sqlite3";
import { createHash } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { requires, root } from "./helpers/capability.js";
import { diskTools, fsck, makeDisk, makeRootTree, SBIN_PATH, type Fixture } from "./helpers/disk.js";
import { CLI, readPub, removeDir, REPO, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const haveVfat = /\svfat$/m.test(readFileSync("/proc/filesystems", "utf8"));
const README = readFileSync(join(REPO, "README.md"), "utf8");

function block(name: string): string {
  const at = README.indexOf(`<!-- tested: ${name} -->`);
  if (at < 0) throw new Error(`README.md has no block marked ${name}`);
  const m = /```[a-z]*\n([\s\S]*?)```/.exec(README.slice(at));
  if (!m) throw new Error(`no fenced block after ${name}`);
  return m[1]!;
}

const dir = tempDir("mko-prov-");
const ws = join(dir, "ws");
let fleet = "";
const cli = (args: string[]) => runCli(["--config", fleet, ...args], { cwd: ws });
type Dev = { hostname: string; port: number; fingerprint: string; status: string; overlay: string; attributes: Record<string, string> };
const devices = (): Dev[] => JSON.parse(cli(["registry", "list", "--json"]).stdout) as Dev[];
const bySerial = (s: string) => devices().filter((d) => d.attributes.serial === s);

beforeAll(() => {
  mkdirSync(ws, { recursive: true });
  fleet = writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(ws, "bastion"))] } }, { hostname: "cm-{seq:04}" });
});
afterAll(() => removeDir(dir));

requires(root, diskTools)("the rootfs-mounted hook, run as rpi-sb-provisioner runs it", () => {
  let base: Fixture;
  let hook = "";
  const bin = join(dir, "bin");
  const mounts: string[] = [];
  const loops: string[] = [];
  let n = 0;

  beforeAll(() => {
    const tree = join(dir, "rootfs");
    makeRootTree(tree);
    base = makeDisk(join(dir, "gold-master.img"), tree);
    // The README's hook file, byte for byte, where the provisioner looks for it (under a temp dir).
    const scripts = join(dir, "etc/rpi-sb-provisioner/scripts");
    mkdirSync(scripts, { recursive: true });
    hook = join(scripts, "naked-provisioner-rootfs-mounted.sh");
    writeFileSync(hook, block("rootfs-mounted hook"), { mode: 0o755 });
    chmodSync(hook, 0o755);
    mkdirSync(bin);
    symlinkSync(CLI, join(bin, "mkoverlay"));
  });

  afterAll(() => {
    for (const m of mounts.splice(0)) run("umount", ["-l", m]);
    for (const l of loops.splice(0)) run("losetup", ["-d", l], { env: { PATH: SBIN_PATH } });
  });

  function loop(img: string, offset: number, size: number): string {
    const r = run("losetup", ["--show", "-f", "-o", String(offset), "--sizelimit", String(size), img], { env: { PATH: SBIN_PATH } });
    if (r.code !== 0) throw new Error(`losetup: ${r.stderr}`);
    loops.push(r.stdout.trim());
    return r.stdout.trim();
  }
  function mount(dev: string, at: string, type: string, ro = false): void {
    mkdirSync(at, { recursive: true });
    const r = run("mount", ["-t", type, ...(ro ? ["-o", "ro"] : []), dev, at], { env: { PATH: SBIN_PATH } });
    if (r.code !== 0) throw new Error(`mount ${dev}: ${r.stderr}`);
    mounts.push(at);
  }
  function unmountAll(): void {
    for (const m of mounts.splice(0).reverse()) expect(run("umount", [m]).code).toBe(0);
    for (const l of loops.splice(0)) run("losetup", ["-d", l], { env: { PATH: SBIN_PATH } });
  }

  /**
   * One device through the provisioner's customisation step: copy the gold master, mount p1
   * and p2 under TMP_DIR, run the hook (args: boot, root; cwd /; the service's environment),
   * unmount. Returns the hook's exit status and output, and the per-device image.
   */
  function provision(env: Record<string, string>, opts: { readOnlyRoot?: boolean } = {}): { code: number; stdout: string; stderr: string; img: string } {
    const tmp = join(dir, `tmp.${++n}`);
    mkdirSync(tmp);
    const img = join(tmp, "gold-master-modified.img");
    expect(run("cp", ["--reflink=auto", "--sparse=always", base.path, img]).code).toBe(0);
    const bootMnt = join(tmp, "rpi-boot-img-mount");
    const rootMnt = join(tmp, "rpi-rootfs-img-mount");
    // The hook does not touch the boot partition; where this kernel has no vfat, its mount point
    // stays an empty folder.
    if (haveVfat) mount(loop(img, base.bootOffset, base.bootSize), bootMnt, "vfat");
    else mkdirSync(bootMnt);
    mount(loop(img, base.rootOffset, base.rootSize), rootMnt, "ext4", opts.readOnlyRoot);
    const r = run(hook, [bootMnt, rootMnt], {
      cwd: "/",
      env: {
        // systemd's default PATH for a system service, with mkoverlay installed.
        PATH: `${bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
        // export_customisation_env in service/rpi-sb-common.sh:
        TARGET_USB_PATH: "1-1.3",
        TARGET_DEVICE_PATH: "/dev/bus/usb/001/007",
        TARGET_DEVICE_FAMILY: "2711",
        FASTBOOT_DEVICE_SPECIFIER: "tcp:fe80::1",
        RPI_DEVICE_STORAGE_TYPE: "emmc",
        // the station's config, from the unit's EnvironmentFile=:
        PROVISIONING_STYLE: "naked",
        GOLD_MASTER_OS_FILE: base.path,
        // where this test keeps the fleet config (the hook file's default is /etc/mkoverlay/):
        MKOVERLAY_CONFIG: fleet,
        ...env,
      },
    });
    unmountAll();
    return { ...r, img };
  }

  const verify = (img: string) => runCli(["--config", fleet, "verify", img], { cwd: ws });

  it("a new serial: a device is built into the image's root, recorded with its serial; the image verifies", () => {
    const r = provision({ TARGET_DEVICE_SERIAL: "10000000aa000001" });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/10000000aa000001: built cm-\d{4} \(port \d+\)/);
    const [d, ...more] = bySerial("10000000aa000001");
    expect(more).toEqual([]);
    expect(d!.status).toBe("active");
    expect(r.stdout).toContain(`permitlisten="localhost:${d!.port}"`);
    const v = verify(r.img);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(v.stdout).toContain(`the key is registered to ${d!.hostname}`);
    expect(fsck({ path: r.img, rootOffset: base.rootOffset }).code).toBe(0);
    expect(JSON.parse(cli(["registry", "doctor", "--json"]).stdout)).toEqual([]);
  });

  it("the same serial again (a re-provision): same name and port, a new key; the old image no longer verifies", () => {
    const first = provision({ TARGET_DEVICE_SERIAL: "10000000aa000002" });
    expect(first.code, first.stderr).toBe(0);
    const [before] = bySerial("10000000aa000002");
    const again = provision({ TARGET_DEVICE_SERIAL: "10000000aa000002" });
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/was provisioned before; rotated it onto/);
    const after = bySerial("10000000aa000002");
    expect(after).toHaveLength(1);
    expect([after[0]!.hostname, after[0]!.port]).toEqual([before!.hostname, before!.port]);
    expect(after[0]!.fingerprint).not.toBe(before!.fingerprint);
    expect(verify(again.img).code).toBe(0);
    const old = verify(first.img);
    expect(old.code).toBe(1);
    expect(old.stdout).toMatch(/not registered|rotated|previous|no device/i);
  });

  it("a shift planned ahead (batch --hosts with a serial column): the device's archive is laid; the registry is untouched", () => {
    const csv = join(ws, "shift.csv");
    writeFileSync(csv, "hostname,serial\ncm-plan-1,10000000bb000001\ncm-plan-2,10000000bb000002\n");
    const b = runCli(["--config", fleet, "batch", "--board", "cm4", "--bastion", "eu", "--hosts", csv, "--out", join(ws, "planned"), "-q"], { cwd: ws });
    expect(b.code, b.stderr).toBe(0);
    const listed = JSON.stringify(devices());
    const r = provision({ TARGET_DEVICE_SERIAL: "10000000bb000002" });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain("laid cm-plan-2's overlay");
    expect(JSON.stringify(devices())).toBe(listed);
    const v = verify(r.img);
    expect(v.code, v.stdout).toBe(0);
    expect(v.stdout).toContain("the key is registered to cm-plan-2");
  });

  it("no TARGET_DEVICE_SERIAL: exit 2, one message, nothing reserved", () => {
    const listed = JSON.stringify(devices());
    const r = provision({});
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/^mkoverlay: error: provisioner-hook: TARGET_DEVICE_SERIAL is not set$/m);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    expect(JSON.stringify(devices())).toBe(listed);
  });

  it("a serial that is not one is refused, not escaped", () => {
    const listed = JSON.stringify(devices());
    const r = provision({ TARGET_DEVICE_SERIAL: "abc;rm -rf /" });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/TARGET_DEVICE_SERIAL "abc;rm -rf \/" is not a serial number/);
    expect(JSON.stringify(devices())).toBe(listed);
  });

  it("a root that cannot be written (read-only mount): non-zero, so the provisioner fails the device; nothing pending", () => {
    const listed = JSON.stringify(devices());
    const r = provision({ TARGET_DEVICE_SERIAL: "10000000cc000001" }, { readOnlyRoot: true });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/read-only file system/i);
    expect(bySerial("10000000cc000001")).toEqual([]);
    expect(JSON.stringify(devices())).toBe(listed);
    expect(JSON.parse(cli(["registry", "doctor", "--json"]).stdout)).toEqual([]);
  });

  it("the station's own / is refused", () => {
    const r = runCli(["--config", fleet, "provisioner-hook", "--board", "cm4", "--bastion", "eu", "/boot", "/"], { cwd: "/", env: { TARGET_DEVICE_SERIAL: "10000000dd000001" } });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("root is this station's own '/'");
  });
});

describe("provisioner-hook refusals (before anything is laid)", () => {
  const root = join(dir, "plain-root");
  const hook = (serial: string) =>
    runCli(["--config", fleet, "provisioner-hook", "--board", "cm4", "--bastion", "eu", join(dir, "plain-boot"), root], { cwd: "/", env: { TARGET_DEVICE_SERIAL: serial } });
  beforeAll(() => mkdirSync(join(root, "etc"), { recursive: true }));

  it("two live devices with the serial: refused, naming both", () => {
    for (const h of ["cm-twin-1", "cm-twin-2"]) expect(cli(["--board", "cm4", "--bastion", "eu", "--hostname", h, "--attr", "serial=a0000002", "--out", join(ws, "twins"), "-q"]).code).toBe(0);
    const listed = JSON.stringify(devices());
    const r = hook("a0000002");
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/serial=a0000002: 2 live devices have it: cm-twin-1, cm-twin-2/);
    expect(JSON.stringify(devices())).toBe(listed);
  });

  it("a killed build of the serial (pending): refused, pointing at registry doctor", () => {
    expect(cli(["--board", "cm4", "--bastion", "eu", "--hostname", "cm-killed", "--attr", "serial=a0000003", "--out", join(ws, "killed"), "-q"]).code).toBe(0);
    // What a station killed between reserve and commit leaves behind.
    const db = new Database(join(ws, "registry.db"));
    db.prepare("UPDATE devices SET status = 'pending' WHERE hostname = 'cm-killed'").run();
    db.close();
    const r = hook("a0000003");
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/serial=a0000003: cm-killed is pending/);
    expect(r.stderr).toContain("registry doctor --fix");
    expect(bySerial("a0000003").map((d) => d.status)).toEqual(["pending"]);
    const back = new Database(join(ws, "registry.db"));
    back.prepare("UPDATE devices SET status = 'active' WHERE hostname = 'cm-killed'").run();
    back.close();
  });

  it("a root with no etc/ (the arguments swapped): refused", () => {
    const r = runCli(["--config", fleet, "provisioner-hook", "--board", "cm4", "--bastion", "eu", root, join(dir, "plain-boot-empty")], { cwd: "/", env: { TARGET_DEVICE_SERIAL: "a0000004" } });
    mkdirSync(join(dir, "plain-boot-empty"), { recursive: true });
    const r2 = runCli(["--config", fleet, "provisioner-hook", "--board", "cm4", "--bastion", "eu", root, join(dir, "plain-boot-empty")], { cwd: "/", env: { TARGET_DEVICE_SERIAL: "a0000004" } });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/no such directory/);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toMatch(/has no etc\/, not a root file system/);
    expect(bySerial("a0000004")).toEqual([]);
  });
});

/** The provisioner's `devices` table (host-support/manufacturing-data), column for column. */
const MFG_SCHEMA = `CREATE TABLE devices(id integer primary key, boardname varchar(255) not null, serial char(8) not null,
  eth_mac char(17) not null, wifi_mac char(17) not null, bt_mac char(17) not null, mmc_size integer not null,
  mmc_cid char(32) not null, rpi_duid char(32) not null, board_revision varchar(255) not null,
  processor varchar(255) not null, memory varchar(255) not null, manufacturer varchar(255) not null,
  secure integer not null, jtag_locked integer DEFAULT NULL, eeprom_write_protected integer DEFAULT NULL,
  pubkey_programmed integer DEFAULT NULL, devkey_revoked integer DEFAULT NULL, signed_boot_enabled integer DEFAULT NULL,
  os_image_filename varchar(255) DEFAULT NULL, os_image_sha256 char(64) DEFAULT NULL, connect_registered integer DEFAULT NULL,
  connect_device_id varchar(255) DEFAULT NULL, eeprom_size integer DEFAULT NULL, eeprom_jedec char(6) DEFAULT NULL,
  eeprom_unique_id varchar(32) DEFAULT NULL, bootloader_build_timestamp integer DEFAULT NULL,
  customer_key_fingerprint char(64) DEFAULT NULL, customer_key_label varchar(255) DEFAULT NULL,
  provision_ts timestamp default current_timestamp)`;

function mfgDb(file: string, rows: [board: string, serial: string, eth: string, wifi: string, bt: string][]): string {
  const db = new Database(file);
  db.pragma("journal_mode = WAL");
  db.exec(MFG_SCHEMA);
  const ins = db.prepare(
    "INSERT INTO devices(boardname, serial, eth_mac, wifi_mac, bt_mac, mmc_size, mmc_cid, rpi_duid, board_revision, processor, memory, manufacturer, secure) VALUES (?, ?, ?, ?, ?, 33554432, '', '', '0x0', 'BCM2711', '4GB', 'Sony UK', 0)",
  );
  for (const r of rows) ins.run(...r);
  db.close();
  return file;
}

const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");

describe("registry import-manufacturing", () => {
  const imp = (db: string, extra: string[] = []) => cli(["registry", "import-manufacturing", db, ...extra]);

  beforeAll(() => {
    for (const [host, serial] of [["cm-imp-1", "e1000001"], ["cm-imp-2", "e1000002"]]) {
      const r = cli(["--board", "cm4", "--bastion", "eu", "--hostname", host!, "--attr", `serial=${serial}`, "--out", join(ws, "imp-out"), "-q"]);
      expect(r.code, r.stderr).toBe(0);
    }
  });

  it("attaches board and MACs to the devices with those serials (latest row wins); counts matched and unmatched; read-only; idempotent", () => {
    const db = mfgDb(join(dir, "manufacturing.db"), [
      ["CM4", "e1000001", "d8:3a:dd:00:00:01", "d8:3a:dd:00:00:02", "d8:3a:dd:00:00:03"],
      ["CM4", "e1000002", "d8:3a:dd:00:01:01", "d8:3a:dd:00:01:02", "d8:3a:dd:00:01:03"],
      // provisioned again later: its newer row wins
      ["CM4", "e1000001", "d8:3a:dd:00:00:11", "d8:3a:dd:00:00:12", "d8:3a:dd:00:00:13"],
      ["CM5", "f9999999", "d8:3a:dd:09:00:01", "d8:3a:dd:09:00:02", "d8:3a:dd:09:00:03"],
    ]);
    const before = sha(db);
    const r = imp(db, ["--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ serials: 3, matched: 2, updated: ["cm-imp-1", "cm-imp-2"], unchanged: 0, unmatched: ["f9999999"] });
    const one = devices().find((d) => d.hostname === "cm-imp-1")!;
    expect(one.attributes).toEqual({ serial: "e1000001", boardname: "CM4", eth_mac: "d8:3a:dd:00:00:11", wifi_mac: "d8:3a:dd:00:00:12", bt_mac: "d8:3a:dd:00:00:13" });
    expect(sha(db)).toBe(before);
    const again = imp(db);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toMatch(/3 serial\(s\); 2 matched a registered device \(0 device\(s\) updated, 2 already up to date\), 1 unmatched: f9999999/);
    // the device is still named by its factory data
    expect(cli(["registry", "list", "--format", "csv"]).stdout).toMatch(/eth_mac/);
  });

  it("a value with a control character: refused naming the row, nothing written", () => {
    const listed = JSON.stringify(devices());
    const db = mfgDb(join(dir, "bad-value.db"), [
      ["CM4", "e1000002", "aa:bb:cc:dd:ee:ff", "", ""],
      ["CM4\u001b[31m", "e1000001", "d8:3a:dd:00:00:11", "", ""],
    ]);
    const r = imp(db);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/bad-value\.db: devices row id 2: boardname: the value has a control character/);
    expect(JSON.stringify(devices())).toBe(listed);
  });

  it.each([
    ["not a database", (f: string) => writeFileSync(f, "serial,eth_mac\n"), /not a SQLite database; left untouched/],
    ["no devices table", (f: string) => new Database(f).exec("CREATE TABLE other(x)").close(), /has no 'devices' table/],
    ["a devices table without the columns", (f: string) => new Database(f).exec("CREATE TABLE devices(id integer primary key, serial text)").close(), /table 'devices' has no column boardname, eth_mac, wifi_mac, bt_mac/],
  ] as const)("%s: exit 2, one message naming the file", (name, make, msg) => {
    const f = join(dir, `${name.replace(/\W+/g, "-")}.db`);
    make(f);
    const before = sha(f);
    const r = imp(f);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(msg);
    expect(r.stderr).toContain(f);
    expect(sha(f)).toBe(before);
  });

  it("a missing file names the provisioner's setting", () => {
    const r = imp(join(dir, "nope.db"));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/nope\.db: no such file/);
    expect(r.stderr).toContain("RPI_SB_PROVISIONER_MANUFACTURING_DB");
  });
});
