/**
 * `mkoverlay batch`: a factory shift. Config, profiles and the registry are opened once;
 * each device is reserved, written and activated on its own, so a failing device reserves
 * nothing and the others stand. Devices stream through: nothing of the batch is kept in memory
 * but counts and failures.
 */
import { setFlagsFromString } from "node:v8";
import { configPath, loadFleet } from "../config/load.js";
import { loadOrGenerateKey, resolveBastions } from "../device.js";
import { isUserError, UserError } from "../errors.js";
import { readHostsFile } from "../hosts-file.js";
import { out, stderrLog } from "../output.js";
import { archiveEpoch } from "../overlay/archive.js";
import { loadProfiles, resolveBoardOs } from "../profiles.js";
import { openRegistry } from "../registry/open.js";
import { hostnameProblem } from "../validate.js";
import { writeFilesAtomic } from "../fsutil.js";
import { pendingFiles, renderDevice, type Rendered } from "../pipeline.js";
import type { DeviceRecord, Registry } from "../registry/types.js";
import { buildDevice, buildResult, reserveRequest, withOutDir, type BuildResult, type DeviceRequest, type OutputOptions, type Station } from "./build.js";

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

/** Devices reserved, written and activated together: one sync of each kind per chunk. */
const CHUNK = 64;

type ChunkedRegistry = Registry & Required<Pick<Registry, "reserveMany" | "activateMany">>;

function checkName(wanted: string | undefined): void {
  if (wanted === undefined) return;
  const p = hostnameProblem(wanted);
  if (p) throw new UserError(`hostname ${JSON.stringify(wanted)} ${p}`);
}

/**
 * One chunk of a tar-form batch: reserve all (one transaction, a savepoint each), render all,
 * write all archives (synced together, then renamed), activate all. A device that fails at any
 * step gives its reservation back and is reported; the others stand. Killed midway, the
 * pending devices are finished or reclaimed by `registry doctor`.
 */
async function chunked(
  st: Station,
  registry: ChunkedRegistry,
  chunk: { wanted: string | undefined; label: string }[],
  common: Pick<DeviceRequest, "board" | "os" | "bastions">,
  succeed: (r: BuildResult) => void,
  fail: (label: string, wanted: string | undefined, e: UserError) => void,
): Promise<void> {
  const outcome: (BuildResult | UserError)[] = new Array(chunk.length);
  const asked: { i: number; req: DeviceRequest }[] = [];
  chunk.forEach(({ wanted }, i) => {
    try {
      checkName(wanted);
      asked.push({ i, req: { ...common, hostname: wanted, dk: loadOrGenerateKey(undefined) } });
    } catch (e) {
      if (!isUserError(e)) throw e;
      outcome[i] = e;
    }
  });
  const reserved = await registry.reserveMany(asked.map((a) => reserveRequest(st, a.req)));
  const ready: { i: number; device: DeviceRecord; req: DeviceRequest; r: Rendered }[] = [];
  for (const [k, res] of reserved.entries()) {
    const { i, req } = asked[k]!;
    if (res instanceof UserError) {
      outcome[i] = res;
      continue;
    }
    try {
      ready.push({ i, device: res, req, r: await renderDevice(st.emit, res, req.dk.key, req.board, req.os, req.bastions, st.fleet) });
    } catch (e) {
      await registry.abandon(res.hostname);
      if (!isUserError(e)) throw e;
      outcome[i] = e;
    }
  }
  try {
    writeFilesAtomic(ready.flatMap((x) => pendingFiles(x.r)));
  } catch (e) {
    for (const x of ready) await registry.abandon(x.device.hostname);
    throw e;
  }
  await registry.activateMany(ready.map((x) => x.device.hostname));
  for (const x of ready) outcome[x.i] = buildResult(x.device, x.req.dk, x.r, false);
  outcome.forEach((o, i) => (o instanceof UserError ? fail(chunk[i]!.label, chunk[i]!.wanted, o) : succeed(o)));
}

export async function batchCommand(opts: BatchOptions): Promise<void> {
  // A batch streams thousands of short-lived trees and buffers. Left alone, V8 grows its young
  // generation to the maximum and peak memory with it (measured: ~155 MB for 10,000 devices);
  // not growing it keeps a batch near 90 MB at no measurable cost in time. Set here, not as a
  // node flag, because any flag on the command line costs every single build ~9 ms of start-up.
  setFlagsFromString("--semi-space-growth-factor=1");
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
  const progress = new Progress(names.length, Boolean(opts.quiet));
  const failures: string[] = [];
  let built = 0;
  let done = 0;
  const succeed = (r: BuildResult) => {
    built++;
    const { authorizedKeysText, ...json } = r;
    out(opts.json ? JSON.stringify(json) : authorizedKeysText);
    progress.step(++done, `${r.hostname} port ${r.port}`);
  };
  const fail = (label: string, wanted: string | undefined, e: UserError) => {
    const msg = `${label}: ${e.message}`;
    failures.push(msg);
    if (opts.json) out(JSON.stringify({ hostname: wanted ?? null, error: e.message }));
    process.stderr.write(`${process.stderr.isTTY ? "\n" : ""}mkoverlay: error: ${msg}\n`);
    progress.step(++done, `${label} FAILED`);
  };
  await withOutDir(opts, async (outDir, form) => {
    const registry = await openRegistry(fleet.registry);
    const st: Station = { fleet, emit: { outDir, form, epoch }, log: stderrLog(true), now };
    try {
      for (let start = 0; start < names.length; start += CHUNK) {
        const chunk = names.slice(start, start + CHUNK).map((wanted, j) => ({ wanted, label: wanted ?? `device ${start + j + 1}` }));
        if (form.kind === "tar" && registry.reserveMany && registry.activateMany) {
          await chunked(st, registry as ChunkedRegistry, chunk, { board, os, bastions }, succeed, fail);
          continue;
        }
        for (const { wanted, label } of chunk) {
          try {
            checkName(wanted);
            succeed(await buildDevice(st, registry, { board, os, bastions, hostname: wanted, dk: loadOrGenerateKey(undefined) }));
          } catch (e) {
            if (!isUserError(e)) throw e;
            fail(label, wanted, e);
          }
        }
      }
    } finally {
      await registry.close();
    }
  });
  if (!opts.quiet) process.stderr.write(`mkoverlay: batch done: ${built} built, ${failures.length} failed\n`);
  if (failures.length > 0) throw new UserError(`${failures.length} of ${names.length} device(s) failed (see above); the others are built and registered`, { exitCode: 1 });
}
