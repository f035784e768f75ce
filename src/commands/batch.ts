/**
 * `mkoverlay batch`: a factory shift. Config, profiles and the registry are opened once;
 * each device is reserved, written and activated on its own, so a failing device reserves
 * nothing and the others stand. Devices stream through: nothing of the batch is kept in memory
 * but counts and failures.
 */
import { readFileSync } from "node:fs";
import { configPath, loadFleet } from "../config/load.js";
import { loadOrGenerateKey, resolveBastions } from "../device.js";
import { errnoCode, isUserError, UserError } from "../errors.js";
import { out, stderrLog } from "../output.js";
import { archiveEpoch } from "../overlay/archive.js";
import { loadProfiles, resolveBoardOs } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import { hostnameProblem } from "../validate.js";
import { buildDevice, withOutDir, type OutputOptions } from "./build.js";

export interface BatchOptions extends OutputOptions {
  board: string;
  bastion?: string;
  os?: string;
  count?: string;
  hosts?: string;
  config?: string;
  json?: boolean;
  quiet?: boolean;
}

/** One hostname a line (# comments), or CSV whose header has a `hostname` column. */
export function readHostsFile(file: string): string[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw new UserError(`--hosts ${file}: ${errnoCode(e) === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
  const lines = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  const header = lines[0]?.split(",").map((h) => h.trim().toLowerCase());
  if (header && header.length > 1) {
    const col = header.indexOf("hostname");
    if (col < 0) throw new UserError(`--hosts ${file}: CSV header has no 'hostname' column`, { hint: `columns: ${header.join(", ")}` });
    return lines.slice(1).map((l) => (l.split(",")[col] ?? "").trim().replace(/^"|"$/g, ""));
  }
  return lines;
}

class Progress {
  private readonly tty = Boolean(process.stderr.isTTY) && !process.env.NO_COLOR;
  constructor(private readonly total: number, private readonly quiet: boolean) {}
  step(done: number, label: string): void {
    if (this.quiet) return;
    if (this.tty) {
      const width = 30;
      const filled = Math.round((done / this.total) * width);
      process.stderr.write(`\r[${"#".repeat(filled)}${" ".repeat(width - filled)}] ${done}/${this.total} ${label.padEnd(24)}`);
      if (done === this.total) process.stderr.write("\n");
    } else {
      process.stderr.write(`mkoverlay: [${done}/${this.total}] ${label}\n`);
    }
  }
}

export async function batchCommand(opts: BatchOptions): Promise<void> {
  if ((opts.count === undefined) === (opts.hosts === undefined)) throw new UserError("batch needs exactly one of --count N or --hosts FILE");
  const now = new Date();
  const fleet = await loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion);
  let names: (string | undefined)[];
  if (opts.count !== undefined) {
    const n = Number(opts.count);
    if (!/^\d+$/.test(opts.count) || n < 1 || n > 100_000) throw new UserError(`--count ${opts.count}: a whole number from 1 to 100000`);
    names = Array.from({ length: n }, () => undefined);
  } else {
    names = readHostsFile(opts.hosts!);
    if (names.length === 0) throw new UserError(`--hosts ${opts.hosts}: no hostnames in it`);
  }
  const epoch = archiveEpoch();
  const quietLog = stderrLog(true);
  const progress = new Progress(names.length, Boolean(opts.quiet));
  const failures: string[] = [];
  let built = 0;
  await withOutDir(opts, async (outDir, form) => {
    const registry = await openRegistry(fleet.registry);
    try {
      for (let i = 0; i < names.length; i++) {
        const wanted = names[i];
        const label = wanted ?? `device ${i + 1}`;
        try {
          if (wanted !== undefined) {
            const p = hostnameProblem(wanted);
            if (p) throw new UserError(`hostname ${JSON.stringify(wanted)} ${p}`);
          }
          const r = await buildDevice({ fleet, emit: { outDir, form, epoch }, log: quietLog, now }, registry, {
            board,
            os,
            bastions,
            hostname: wanted,
            dk: loadOrGenerateKey(undefined),
          });
          built++;
          const { authorizedKeysText, ...json } = r;
          out(opts.json ? JSON.stringify(json) : authorizedKeysText);
          progress.step(i + 1, `${r.hostname} port ${r.port}`);
        } catch (e) {
          if (!isUserError(e)) throw e;
          const msg = `${label}: ${e.message}`;
          failures.push(msg);
          if (opts.json) out(JSON.stringify({ hostname: wanted ?? null, error: e.message }));
          process.stderr.write(`${process.stderr.isTTY ? "\n" : ""}mkoverlay: error: ${msg}\n`);
          progress.step(i + 1, `${label} FAILED`);
        }
      }
    } finally {
      await registry.close();
    }
  });
  if (!opts.quiet) process.stderr.write(`mkoverlay: batch done: ${built} built, ${failures.length} failed\n`);
  if (failures.length > 0) throw new UserError(`${failures.length} of ${names.length} device(s) failed (see above); the others are built and registered`, { exitCode: 1 });
}
