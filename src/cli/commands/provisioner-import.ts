/**
 * `mkoverlay registry import-manufacturing DB`: rpi-sb-provisioner's manufacturing database
 * (SQLite, table `devices`, one row per provisioning, keyed by `serial`; docs/facts.md) → factory
 * data on the registered devices with that serial: `boardname`, `eth_mac`, `wifi_mac`, `bt_mac`.
 * The database is opened read-only; a device provisioned twice takes its latest row. Every value
 * is checked before anything is written; running it again changes nothing (idempotent).
 */
import { closeSync, openSync, readSync, statSync } from "node:fs";
import { attributeName, attributeNameProblem, attributeProblem } from "../../device/attributes.js";
import { configPath, loadFleet } from "../../config/load.js";
import { errnoCode, UserError } from "../../util/errors.js";
import { out, stderrLog } from "../../util/log.js";
import { openRegistry } from "../../registry/open.js";

/** The columns carried over, as named in the provisioner's `devices` table (and as factory data). */
export const MANUFACTURING_COLUMNS = ["boardname", "eth_mac", "wifi_mac", "bt_mac"] as const;

export interface ImportManufacturingOptions {
  serialAttr?: string;
  config?: string;
  json?: boolean;
}

export interface ImportResult {
  database: string;
  /** Distinct serials in the database. */
  serials: number;
  /** Serials some registered device has. */
  matched: number;
  /** Devices whose factory data changed. */
  updated: string[];
  /** Devices already up to date. */
  unchanged: number;
  /** Serials no registered device has (provisioned without the hook, or another fleet's). */
  unmatched: string[];
}

interface MfgRow {
  id: number;
  serial: string;
  boardname: string | null;
  eth_mac: string | null;
  wifi_mac: string | null;
  bt_mac: string | null;
}

function checkSqliteFile(db: string): void {
  try {
    if (statSync(db).isDirectory()) throw new UserError(`${db}: is a directory, not a manufacturing database`);
  } catch (e) {
    if (errnoCode(e) === "ENOENT") throw new UserError(`${db}: no such file`, { hint: "the provisioner's RPI_SB_PROVISIONER_MANUFACTURING_DB (e.g. /var/lib/rpi-sb-provisioner/manufacturing.db)" });
    throw e;
  }
  const head = Buffer.alloc(16);
  const fd = openSync(db, "r");
  try {
    readSync(fd, head, 0, 16, 0);
  } finally {
    closeSync(fd);
  }
  if (!head.equals(Buffer.from("SQLite format 3\0", "latin1"))) throw new UserError(`${db}: not a SQLite database; left untouched`);
}

/** The latest row of each serial, every value checked (nothing is written before this). */
export async function readManufacturing(db: string): Promise<Map<string, Record<string, string>>> {
  checkSqliteFile(db);
  const { default: Database } = await import("better-sqlite3");
  const conn = new Database(db, { readonly: true, fileMustExist: true });
  try {
    const table = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'devices'").get();
    if (!table) throw new UserError(`${db}: has no 'devices' table, not rpi-sb-provisioner's manufacturing database`);
    const have = new Set((conn.prepare("PRAGMA table_info(devices)").all() as { name: string }[]).map((c) => c.name));
    const missing = ["id", "serial", ...MANUFACTURING_COLUMNS].filter((c) => !have.has(c));
    if (missing.length) throw new UserError(`${db}: table 'devices' has no column ${missing.join(", ")}`, { hint: "is this rpi-sb-provisioner's manufacturing database?" });
    const rows = conn.prepare(`SELECT id, serial, ${MANUFACTURING_COLUMNS.join(", ")} FROM devices ORDER BY id`).all() as MfgRow[];
    const bySerial = new Map<string, Record<string, string>>();
    for (const r of rows) {
      const serial = typeof r.serial === "string" ? r.serial.trim() : "";
      const where = `${db}: devices row id ${r.id}`;
      if (serial === "") throw new UserError(`${where}: no serial`);
      const p = attributeProblem("serial", serial);
      if (p) throw new UserError(`${where}: ${p}`);
      const attrs: Record<string, string> = {};
      for (const c of MANUFACTURING_COLUMNS) {
        const v = r[c];
        if (v === null || v === undefined || String(v).trim() === "") continue;
        const value = String(v).trim();
        const bad = attributeProblem(c, value);
        if (bad) throw new UserError(`${where}: ${bad}`, { hint: "nothing was imported" });
        attrs[c] = value;
      }
      // Later rows (a device provisioned again) replace earlier ones.
      bySerial.set(serial, attrs);
    }
    return bySerial;
  } finally {
    conn.close();
  }
}

export async function importManufacturing(db: string, opts: ImportManufacturingOptions): Promise<ImportResult> {
  const key = attributeName(opts.serialAttr ?? "serial");
  const bad = attributeNameProblem(key);
  if (bad) throw new UserError(`--serial-attr ${JSON.stringify(opts.serialAttr)}: ${bad}`);
  const data = await readManufacturing(db);
  const fleet = await loadFleet(configPath(opts.config), new Date());
  const registry = await openRegistry(fleet.registry);
  try {
    const devices = new Map<string, { hostname: string; attributes: Record<string, string> }[]>();
    for (const d of await registry.list()) {
      const s = d.attributes[key];
      if (s !== undefined) devices.set(s, [...(devices.get(s) ?? []), d]);
    }
    const result: ImportResult = { database: db, serials: data.size, matched: 0, updated: [], unchanged: 0, unmatched: [] };
    for (const [serial, attrs] of data) {
      const ds = devices.get(serial);
      if (!ds) {
        result.unmatched.push(serial);
        continue;
      }
      result.matched++;
      for (const d of ds) {
        const changed = Object.fromEntries(Object.entries(attrs).filter(([k, v]) => d.attributes[k] !== v));
        if (Object.keys(changed).length === 0) {
          result.unchanged++;
          continue;
        }
        if (await registry.setAttributes(d.hostname, changed)) result.updated.push(d.hostname);
      }
    }
    return result;
  } finally {
    await registry.close();
  }
}

export async function importManufacturingCommand(db: string, opts: ImportManufacturingOptions): Promise<void> {
  const r = await importManufacturing(db, opts);
  if (opts.json) {
    out(JSON.stringify(r));
    return;
  }
  const un = r.unmatched.length;
  out(
    `${r.database}: ${r.serials} serial(s); ${r.matched} matched a registered device (${r.updated.length} device(s) updated, ${r.unchanged} already up to date), ` +
      `${un} unmatched${un ? `: ${r.unmatched.slice(0, 10).join(", ")}${un > 10 ? ", …" : ""}` : ""}`,
  );
  if (un) stderrLog(false).info("unmatched serials were provisioned without the mkoverlay hook, or belong to another registry");
}
