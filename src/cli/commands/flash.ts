/**
 * `mkoverlay flash --base BASE.img --board B [--hosts shift.csv] [WHO@]/dev/sdX …`: many cards
 * at once, each a different device of the shift. Per card, through the one device flow of
 * station.ts (`buildDevice`): reserve the device, render its overlay, then — before its output
 * takes its name — write the card (image/flash.ts: the base's mapped blocks, read back against
 * the bmap, the overlay laid, read back), and only then place the archive and activate the
 * device. A card that fails (pulled, failing) gives its device back and fails alone.
 *
 * WHO names the card's device: a hostname or `KEY=VALUE` of its factory data (`serial=SN0042`,
 * device-arg.ts); with --hosts the row of the CSV so named, a bare card the next row not built
 * yet; without --hosts a new device of that name or factory data. Every refusal (a mounted
 * card, a partition, the station's own disk, a card or device given twice, a device already
 * built) comes before anything is reserved, naming the target.
 */
import { closeSync, openSync } from "node:fs";
import { configPath, loadFleet } from "../../config/load.js";
import { attributeQuery, parseAttrFlags } from "../../device/lookup.js";
import { loadOrGenerateKey, resolveBastions } from "../../device/inputs.js";
import { errnoCode, isUserError, UserError } from "../../util/errors.js";
import { readHostRows } from "../../device/hosts-file.js";
import { checkNotInUse } from "../../image/busy.js";
import { resolveDevice } from "../../image/device.js";
import { CardFailed, flashCard, mappedBytes, type CardPlan, type CardProgress, type CardResult } from "../../image/flash.js";
import { diskSize } from "../../image/partitions.js";
import { out, stderrLog } from "../../util/log.js";
import { archiveEpoch } from "../../overlay/archive.js";
import type { ImageForm } from "../../image/output.js";
import { loadProfiles, resolveBoardOs } from "../../config/profiles.js";
import { openRegistry } from "../../registry/open.js";
import { buildDevice, preflightImageForm, provisionalEntries } from "../../device/flow.js";
import { Interrupted, rootPartitionFlag, watchSignals, withOutDir, withStation, type Station } from "../../device/station.js";
import { hostnameProblem } from "../../util/validate.js";
import { CardLines } from "./flash-progress.js";

export interface FlashOptions {
  base: string;
  board: string;
  bastion?: string;
  os?: string;
  hosts?: string;
  attr?: string[];
  out?: string;
  rootPartition?: string;
  config?: string;
  forceConfigChange?: boolean;
  json?: boolean;
  quiet?: boolean;
  progress?: boolean;
}

/** A card of the command line: `/dev/sdX` or `WHO@/dev/sdX`. */
interface Target {
  arg: string;
  who: string | undefined;
  card: string;
  /** The block device, symbolic links followed. */
  real: string;
}

/** What a card gets: the device to build for it. */
interface Assigned extends Target {
  hostname: string | undefined;
  attributes: Record<string, string>;
}

const MAX_CARDS = 64;

export function parseTarget(arg: string): Omit<Target, "real"> {
  if (arg.startsWith("/")) return { arg, who: undefined, card: arg };
  const at = arg.lastIndexOf("@/");
  if (at <= 0) throw new UserError(`target ${JSON.stringify(arg)}: give a card as /dev/sdX, or the device for it as WHO@/dev/sdX`, { hint: "WHO is a hostname or KEY=VALUE of factory data, e.g. serial=SN0042@/dev/sdb" });
  return { arg, who: arg.slice(0, at), card: arg.slice(at + 1) };
}

/** The cards, checked before anything else: block devices, whole disks, not in use, not ours, not twice, big enough. */
function checkCards(args: string[], imageSize: number): Target[] {
  if (args.length === 0) throw new UserError("flash needs at least one card: mkoverlay flash --base BASE.img --board B /dev/sdX …");
  if (args.length > MAX_CARDS) throw new UserError(`${args.length} cards: at most ${MAX_CARDS} at once`);
  const seen = new Map<string, string>();
  return args.map((a) => {
    const t = parseTarget(a);
    let real: string;
    try {
      real = resolveDevice(t.card);
      checkNotInUse(real);
    } catch (e) {
      if (!(e instanceof UserError)) throw e;
      const msg = e.message.replace(/^--device /, "");
      throw new UserError(`card ${msg.startsWith(t.card) ? msg : `${t.card}: ${msg}`}`, { hint: e.hint, exitCode: e.exitCode });
    }
    const twice = seen.get(real);
    if (twice !== undefined) throw new UserError(`card ${t.card}: given twice (${twice === t.card ? "" : `as ${twice} and `}${t.card}${real === t.card ? "" : `, both ${real}`})`, { hint: "each card once; each card gets its own device" });
    seen.set(real, t.card);
    let fd: number;
    try {
      fd = openSync(real, "r");
    } catch (e) {
      const code = errnoCode(e);
      if (code === "EACCES" || code === "EPERM") throw new UserError(`card ${t.card}: permission denied`, { hint: "add yourself to group `disk` (then log in again), or run as root" });
      throw new UserError(`card ${t.card}: ${(e as Error).message}`);
    }
    try {
      const size = diskSize(fd, real);
      if (size < imageSize) throw new UserError(`card ${t.card}: ${size} bytes, but the base is ${imageSize}`, { hint: "use a larger card" });
    } finally {
      closeSync(fd);
    }
    return { ...t, real };
  });
}

/** Which device each card gets (registry open, nothing reserved): refusals name the target. */
async function assign(st: Station, targets: Target[], opts: FlashOptions, common: Record<string, string>): Promise<Assigned[]> {
  const named = new Map<string, string>();
  const once = (key: string, t: Target) => {
    const other = named.get(key);
    if (other !== undefined) throw new UserError(`target ${t.arg}: ${key} is named twice (also ${other})`, { hint: "each card gets a different device" });
    named.set(key, t.arg);
  };
  if (opts.hosts === undefined) {
    const res: Assigned[] = [];
    for (const t of targets) {
      if (t.who === undefined) {
        res.push({ ...t, hostname: undefined, attributes: common });
        continue;
      }
      const q = attributeQuery(t.who, `target ${t.arg}:`, true);
      if (!q || q.key === "hostname") {
        const name = q ? q.value : t.who;
        const p = hostnameProblem(name);
        if (p) throw new UserError(`target ${t.arg}: hostname ${JSON.stringify(name)} ${p}`);
        once(name, t);
        const d = await st.registry.get(name);
        if (d) throw alreadyBuilt(t, d.hostname, d.status);
        res.push({ ...t, hostname: name, attributes: common });
        continue;
      }
      once(`${q.key}=${q.value}`, t);
      const has = (await st.registry.findByAttribute(q.key, q.value)).filter((d) => d.status !== "revoked");
      if (has.length > 0) throw alreadyBuilt(t, has[0]!.hostname, has[0]!.status);
      if (q.key in common && common[q.key] !== q.value) throw new UserError(`target ${t.arg}: --attr gives ${q.key} = ${JSON.stringify(common[q.key])}`);
      res.push({ ...t, hostname: undefined, attributes: { ...common, [q.key]: q.value } });
    }
    return res;
  }
  const rows = readHostRows(opts.hosts);
  const states = await st.registry.states(rows.map((r) => r.hostname));
  const claimed = new Set<string>();
  const pick = new Map<Target, (typeof rows)[number]>();
  for (const t of targets) {
    if (t.who === undefined) continue;
    const q = attributeQuery(t.who, `target ${t.arg}:`, true);
    const key = !q || q.key === "hostname" ? "hostname" : q.key;
    const value = q ? q.value : t.who;
    const hits = rows.filter((r) => (key === "hostname" ? r.hostname : r.fields[key]) === value);
    if (hits.length === 0) throw new UserError(`target ${t.arg}: no row of ${opts.hosts} has ${key} = ${JSON.stringify(value)}`);
    if (hits.length > 1) throw new UserError(`target ${t.arg}: ${hits.length} rows of ${opts.hosts} have ${key} = ${JSON.stringify(value)} (lines ${hits.map((h) => h.line).join(", ")})`, { hint: "name the device by its hostname" });
    const row = hits[0]!;
    once(row.hostname, t);
    const s = states.get(row.hostname);
    if (s) throw alreadyBuilt(t, row.hostname, s.status);
    claimed.add(row.hostname);
    pick.set(t, row);
  }
  const free = rows.filter((r) => !states.has(r.hostname) && !claimed.has(r.hostname));
  const bare = targets.filter((t) => t.who === undefined);
  if (bare.length > free.length) throw new UserError(`--hosts ${opts.hosts}: ${free.length} row(s) left to build, for ${bare.length} card(s) without a device named`, { hint: free.length === 0 ? "the shift is complete" : "take fewer cards, or name their devices (WHO@/dev/sdX)" });
  bare.forEach((t, k) => pick.set(t, free[k]!));
  return targets.map((t) => {
    const row = pick.get(t)!;
    const clash = Object.keys(common).find((k) => k in row.fields && row.fields[k] !== common[k]);
    if (clash) throw new UserError(`--attr ${clash}=${common[clash]}: ${opts.hosts}:${row.line} gives ${clash} = ${JSON.stringify(row.fields[clash])}`);
    return { ...t, hostname: row.hostname, attributes: { ...common, ...row.fields } };
  });
}

function alreadyBuilt(t: Target, hostname: string, status: string): UserError {
  return new UserError(`target ${t.arg}: ${hostname} is already registered (${status})`, {
    hint: status === "active" ? `a re-flash of a built device is 'mkoverlay write <out>/${hostname}.overlay.tar.gz --device ${t.card} --base BASE.img'` : "see 'mkoverlay registry list'",
  });
}

export interface CardOutcome {
  card: string;
  realDevice: string;
  hostname: string | null;
  ok: boolean;
  port?: number;
  overlay?: string;
  fingerprint?: string;
  attributes?: Record<string, string>;
  baseBytes?: number;
  ms?: number;
  /** Milliseconds of each phase on the card: base written, read back, overlay laid, read back. */
  phases?: CardResult["ms"];
  /** Where it failed: base, check, overlay, verify (the card), or reserve/place (the registry). */
  phase?: string;
  error?: string;
}

// Long on purpose (~95 lines): the checks of every card before anything is reserved, then one
// station run whose per-card closure (flashOne) shares the plan, the progress lines and the outcomes.
export async function flashCommand(cards: string[], opts: FlashOptions): Promise<void> {
  const log = stderrLog(Boolean(opts.quiet));
  const now = new Date();
  const rootPartition = rootPartitionFlag(opts.rootPartition);
  if (opts.base === "") throw new UserError("--base: give the base image's path");
  const form: ImageForm = { kind: "image", base: opts.base, rootPartition, compress: undefined, force: false };
  const fleet = await loadFleet(configPath(opts.config), now);
  const { board, os } = resolveBoardOs(await loadProfiles(), opts.board, opts.os);
  const bastions = resolveBastions(fleet, opts.bastion, now);
  const common = parseAttrFlags(opts.attr);
  // The base first (its bmap computed once, cached), then the cards: nothing is reserved yet.
  await preflightImageForm(form, provisionalEntries(fleet, { board, os, bastions, hostname: undefined, dk: loadOrGenerateKey(undefined) }, now), undefined);
  const targets = checkCards(cards, form.baseMap!.imageSize);
  const plan: CardPlan = { base: form.base, map: form.baseMap!, epoch: archiveEpoch(), ...(form.baseListing ? { listed: form.baseListing } : {}), ...(rootPartition === undefined ? {} : { rootPartition }) };
  const lines = new CardLines({ tty: Boolean(process.stderr.isTTY) && opts.progress !== false, silent: Boolean(opts.quiet), color: !process.env.NO_COLOR });
  const signals = watchSignals((sig) => lines.note(`${sig}: stopping the cards not registered yet and giving their devices back (${sig === "SIGINT" ? "Ctrl-C" : sig} again stops at once)`));
  const outcomes: CardOutcome[] = [];
  const bugs: unknown[] = [];
  try {
    await withOutDir({ ...(opts.out === undefined ? {} : { out: opts.out }) }, (outDir, tarForm) =>
      withStation(
        {
          fleet,
          emit: { outDir, form: tarForm, epoch: plan.epoch },
          log: stderrLog(true),
          now,
          open: () => openRegistry(fleet.registry),
          stop: signals.signal,
          forceConfigChange: Boolean(opts.forceConfigChange),
        },
        async (st) => {
          const assigned = await assign(st, targets, opts, common);
          lines.start(assigned.map((a) => a.card), mappedBytes(plan.map));
          await Promise.all(assigned.map(async (a, k) => outcomes.push(await flashOne(st, a, k))));
        },
      ),
    );
  } finally {
    lines.stop();
    signals.dispose();
  }

  async function flashOne(st: Station, a: Assigned, k: number): Promise<CardOutcome> {
    const t0 = performance.now();
    let phase = "reserve";
    let hostname: string | null = a.hostname ?? null;
    let phases: CardResult["ms"] | undefined;
    const stoppedNow = () => {
      const why = st.stopRequested();
      return why ? new Interrupted(why, `interrupted by ${why}`) : undefined;
    };
    try {
      const r = await buildDevice(st, { board, os, bastions, hostname: a.hostname, dk: loadOrGenerateKey(undefined), attributes: a.attributes }, {
        beforePlace: async (rendered, device) => {
          hostname = device.hostname;
          lines.name(k, device.hostname);
          ({ ms: phases } = await flashCard(a.real, plan, rendered.tree.list(), (p: CardProgress) => {
            phase = p.phase;
            lines.update(k, p);
          }, stoppedNow));
          phase = "place";
        },
      });
      const o: CardOutcome = { card: a.card, realDevice: a.real, hostname: r.hostname, ok: true, port: r.port, overlay: r.overlay, fingerprint: r.fingerprint, attributes: r.attributes, baseBytes: mappedBytes(plan.map), ms: Math.round(performance.now() - t0), ...(phases ? { phases } : {}) };
      lines.finish(k, `verified, registered with port ${r.port} (${(o.ms! / 1000).toFixed(1)} s)`, true);
      if (opts.json) out(JSON.stringify(o));
      return o;
    } catch (e) {
      if (!isUserError(e)) {
        // A bug: the other cards are finished first (their devices registered or given back),
        // then it is reported as one (exit 70). This card's device was given back.
        bugs.push(e);
        lines.finish(k, `FAILED (${phase}): a bug in mkoverlay (reported below)${hostname ? `; ${hostname} given back` : ""}`, false);
        const o: CardOutcome = { card: a.card, realDevice: a.real, hostname, ok: false, phase, error: String((e as Error).message ?? e) };
        if (opts.json) out(JSON.stringify(o));
        return o;
      }
      const msg = e instanceof CardFailed ? e.message.slice(a.real.length + 2) : e.message;
      const o: CardOutcome = { card: a.card, realDevice: a.real, hostname, ok: false, phase, error: msg };
      lines.finish(k, `FAILED (${phase}): ${msg.split("\n")[0]}${hostname ? `; ${hostname} given back` : ""}`, false);
      if (opts.json) out(JSON.stringify(o));
      return o;
    }
  }

  if (bugs.length > 0) throw bugs[0];
  const ok = outcomes.filter((o) => o.ok);
  const failed = outcomes.filter((o) => !o.ok);
  const stopped = signals.signal.aborted ? String(signals.signal.reason) : undefined;
  const summary = `flash: ${ok.length} of ${outcomes.length} card(s) verified and registered${failed.length ? `, ${failed.length} failed (${failed.map((f) => f.card).join(", ")}; their devices given back, nothing registered)` : ""}`;
  if (stopped) throw new Interrupted(stopped, `interrupted by ${stopped}: ${summary.replace(/^flash: /, "")}`);
  if (failed.length > 0) throw new UserError(summary, { exitCode: 1, hint: "put new cards in the failed readers and run the same command for them (their devices are free again)" });
  log.info(summary);
}
