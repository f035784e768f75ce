/**
 * Checks an overlay (any view: archive, folder, laid-over root, image) against what this
 * mkoverlay builds for the same device: walks the build steps, builds each one's entries from
 * the spec, and compares type, owner, mode, content and link target, then runs the step's own
 * checks. The key in the spec is the one found in the overlay, so the comparison covers every
 * byte; whether that key is the registered one is the caller's question.
 */
import { decodePrivateKey, type Ed25519Key } from "../keys/ed25519.js";
import { contentDifferences, describe, safe, type Difference } from "./diff.js";
import * as P from "./paths.js";
import { buildOverlay, STEPS, type DeviceSpec } from "./steps.js";
import type { Entry } from "./tree.js";
import { Tree } from "./tree.js";
import { getMany, type TreeView, type ViewEntry } from "./view.js";

export interface Check {
  ok: boolean;
  what: string;
  detail?: string;
  /** For an entry that is not as built: which file, what about it, and both values. */
  difference?: Difference;
}

const rel = (abs: string): string => abs.replace(/^\//, "");
const oct = (m: number): string => m.toString(8).padStart(4, "0");

/** The device key an overlay carries, or why there is none. */
export async function overlayKey(view: TreeView): Promise<{ key: Ed25519Key } | { problem: string; missing: boolean }> {
  const e = await view.get(rel(P.HOST_KEY));
  if (!e || e.type !== "file") return { problem: `${P.HOST_KEY} is missing`, missing: true };
  if (!e.content) return { problem: `${P.HOST_KEY} is not a key file`, missing: false };
  try {
    return { key: decodePrivateKey(e.content.toString("utf8"), P.HOST_KEY).key };
  } catch (err) {
    return { problem: (err as Error).message, missing: false };
  }
}

interface Problem {
  what: string;
  difference?: Difference;
}

/** What is wrong with `got` as the overlay's `want`, or nothing: each problem said, and structured. */
function differences(want: Entry, got: ViewEntry | undefined, isRoot: boolean): Problem[] {
  const at = `/${want.path}`;
  const one = (attribute: Difference["attribute"], what: string, expected: string, found: string): Problem => ({ what: `${at} ${what}`, difference: { path: at, attribute, expected, found } });
  if (!got) return [{ what: `${at} is missing`, difference: { path: at, attribute: "presence", expected: want.type } }];
  const wantType = want.type;
  if (got.type !== wantType) return [one("type", `is a ${got.type}, not a ${wantType}`, wantType, got.type)];
  const out: Problem[] = [];
  // On a root file system an existing directory keeps its owner and mode (the overlay adds to
  // the OS); everything the overlay itself writes is root:root.
  const ownDir = wantType !== "dir" || !isRoot;
  if (ownDir && (got.uid !== 0 || got.gid !== 0)) out.push(one("owner", `is owned by ${got.uid}:${got.gid}, not root:root`, "0:0", `${got.uid}:${got.gid}`));
  if (want.type === "file") {
    if (got.mode !== want.mode) out.push(one("mode", `is mode ${oct(got.mode)}, not ${oct(want.mode)}`, oct(want.mode), oct(got.mode)));
    const found = got.content ?? Buffer.alloc(0);
    const { differences: ds, more } = contentDifferences(at, want.content, found, { secret: at === P.HOST_KEY });
    for (const d of ds) out.push({ what: `${at}${describe(d)}`, difference: d });
    if (more > 0) out.push({ what: `${at}: ${more} more difference(s) from what mkoverlay builds for this device` });
  } else if (want.type === "dir") {
    if (ownDir && got.mode !== want.mode) out.push(one("mode", `is mode ${oct(got.mode)}, not ${oct(want.mode)}`, oct(want.mode), oct(got.mode)));
  } else if (got.target !== want.target) {
    out.push(one("target", `points to ${got.target === undefined ? "?" : safe(got.target)}, not ${want.target}`, want.target, got.target ?? ""));
  }
  return out;
}

/**
 * Compares `view` with the overlay built for `spec`, step by step: one `ok` per step that
 * matches, one failure per problem. Views that hold an overlay alone (archive, folder) must
 * also hold nothing else.
 */
export async function checkAgainstBuild(view: TreeView, spec: DeviceSpec): Promise<Check[]> {
  const checks: Check[] = [];
  const steps = STEPS.map((step) => {
    const tree = new Tree();
    step.build(tree, spec);
    return { step, tree, entries: tree.list() };
  });
  const built = new Set(steps.flatMap((s) => s.entries.map((e) => e.path)));
  // A step's own check looks at the whole overlay (what its OS deletes, whoever ships it).
  const whole = buildOverlay(spec);
  // One read for every path (an image answers them in one debugfs run).
  const got = await getMany(view, [...built]);
  for (const { step, entries } of steps) {
    const problems: Problem[] = [];
    for (const e of entries) problems.push(...differences(e, got.get(e.path), view.isRoot));
    problems.push(...(step.check?.(whole, spec) ?? []).map((what) => ({ what })));
    if (problems.length === 0) checks.push({ ok: true, what: `${step.name}: ${entries.length} entries as built` });
    const said = new Set<string>();
    for (const p of problems) {
      if (said.has(p.what)) continue;
      said.add(p.what);
      checks.push({ ok: false, what: `${step.name}: ${p.what}`, ...(p.difference ? { difference: p.difference } : {}) });
    }
  }
  if (view.list) {
    const extra = (await view.list()).filter((e) => !built.has(e.path)).map((e) => `/${e.path}`);
    checks.push(extra.length === 0 ? { ok: true, what: "nothing else in the overlay" } : { ok: false, what: "entries mkoverlay did not build", detail: extra.slice(0, 5).join(", ") + (extra.length > 5 ? ", …" : "") });
  }
  return checks;
}
