/**
 * The one capability gate. A test block that needs something this machine may lack (root, a
 * tool, PostgreSQL, OpenSSH 10.x) says so here, and this file alone decides what happens when it
 * is missing:
 *
 * - on a laptop: the block is skipped, and its name says why (`… — SKIPPED: needs root`);
 * - in CI (CI=true): the block fails: one test in its place, naming what is missing and how to
 *   get it (its body is not run: half a set-up as the wrong user explains nothing).
 *
 * CI is detected here and nowhere else (`inCI`): CI set to anything but "", "0" or "false".
 *
 *   requires(root, tools("sfdisk", "debugfs"))("images on loop devices", () => { … });
 *   itRequires(root)("bastion install", () => { … });
 */
import { spawnSync } from "node:child_process";
import { describe, it } from "vitest";

/** Is this run CI? The only place the tests read $CI. */
export const inCI: boolean = ((): boolean => {
  const v = (process.env.CI ?? "").toLowerCase();
  return v !== "" && v !== "0" && v !== "false";
})();

export const isRoot: boolean = process.getuid?.() === 0;

/** Something a block needs: whether it is here, and what to call it when it is not. */
export interface Need {
  ok: boolean;
  what: string;
}

/** The tools' folders: `make test` installs into /usr/sbin too, which a user's PATH may lack. */
export const SBIN_PATH = `${process.env.PATH ?? ""}:/usr/sbin:/sbin`;

const found = new Map<string, boolean>();
/** Is `cmd` on PATH (or in /usr/sbin, /sbin)? */
function has(cmd: string): boolean {
  let ok = found.get(cmd);
  if (ok === undefined) {
    ok = spawnSync("sh", ["-c", 'command -v "$1"', "sh", cmd], { env: { ...process.env, PATH: SBIN_PATH } }).status === 0;
    found.set(cmd, ok);
  }
  return ok;
}

export const root: Need = { ok: isRoot, what: "root" };

/** Every one of these commands (make test-deps installs them). */
export function tools(...cmds: string[]): Need {
  const missing = cmds.filter((c) => !has(c));
  return { ok: missing.length === 0, what: `${missing.join(", ")} (make test-deps installs ${missing.length === 1 ? "it" : "them"})` };
}

/** Anything else: a started server, a found binary, a value another helper computed. */
export function need(ok: unknown, what: string): Need {
  return { ok: Boolean(ok), what };
}

function missingOf(needs: Need[]): string | undefined {
  const m = needs.filter((n) => !n.ok).map((n) => n.what);
  return m.length === 0 ? undefined : m.join("; ");
}

function ciFailure(missing: string): Error {
  return new Error(`needs ${missing}: in CI (CI=${process.env.CI}) a test that cannot run is a failure, not a skip`);
}

type Describe = typeof describe;
type It = typeof it;
type Fn = (...args: unknown[]) => unknown;
/** describe, describe.skip and their .each, seen through one loose signature to wrap them. */
type Suite = (name: string, fn?: Fn, opts?: number) => unknown;
type SuiteEach = (table: readonly unknown[]) => Suite;

/** A describe-like function from `make(name, fn, opts)`, with an `.each` built from `each`. */
function describeLike(make: Suite, each: SuiteEach): Describe {
  return Object.assign(make, { each }) as unknown as Describe;
}

/** In CI: the block's body is not run; in its place one test fails, naming what is missing. */
function failingDescribe(missing: string): Describe {
  const err = ciFailure(missing);
  const failing = (name: string): void => {
    describe(name, () => {
      it(`CANNOT RUN: needs ${missing}`, () => {
        throw err;
      });
    });
  };
  const fmt = (name: string, row: unknown): string => {
    const args = Array.isArray(row) ? row : [row];
    let i = 0;
    return name.replace(/%[sdifjo]/g, () => String(args[i++]));
  };
  return describeLike(
    (name) => failing(name),
    (table) => (name) => {
      for (const row of table) failing(fmt(name, row));
    },
  );
}

/**
 * The gate for a describe block: `requires(...needs)(name, fn)`. With everything here, plain
 * `describe`; otherwise skipped with the reason (laptop) or failed with it (CI).
 */
export function requires(...needs: Need[]): Describe {
  const missing = missingOf(needs);
  if (missing === undefined) return describe;
  if (inCI) return failingDescribe(missing);
  const skip = describe.skip.bind(describe) as unknown as Suite;
  const skipEach = describe.skip.each.bind(describe.skip) as unknown as SuiteEach;
  const why = (name: string): string => `${name} — SKIPPED: needs ${missing}`;
  return describeLike(
    (name, fn, opts) => skip(why(name), fn, opts),
    (table) => (name, fn, opts) => skipEach(table)(why(name), fn, opts),
  );
}

/** The gate for one test: `itRequires(...needs)(name, fn, timeout)`. */
export function itRequires(...needs: Need[]): It {
  const missing = missingOf(needs);
  if (missing === undefined) return it;
  if (inCI) {
    const err = ciFailure(missing);
    return ((name: string, _fn?: Fn, opts?: number) =>
      it(
        name,
        () => {
          throw err;
        },
        opts,
      )) as unknown as It;
  }
  return ((name: string, fn?: Fn, opts?: number) => it.skip(`${name} — SKIPPED: needs ${missing}`, fn, opts)) as unknown as It;
}
