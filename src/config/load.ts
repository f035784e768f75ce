/**
 * Loads the fleet config: read → parse YAML (with positions) → validate against the schema →
 * cross-check with rules. Every problem is collected and reported as
 * `file:line:col key: what is wrong`, all at once.
 */
import { readFileSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { cached } from "../util/cache.js";
import { resourceDir } from "../util/resources.js";
import { errnoCode, UserError } from "../util/errors.js";
import { toFleet, type Fleet } from "./fleet.js";
import { configWarnings, crossCheck } from "./rules.js";
import type { FleetRaw } from "./schema.js";

export const DEFAULT_CONFIG = "mkoverlay.yaml";

/** --config FILE, else $MKOVERLAY_CONFIG, else ./mkoverlay.yaml */
export function configPath(flag: string | undefined): string {
  return resolve(flag || process.env.MKOVERLAY_CONFIG || DEFAULT_CONFIG);
}

function readConfigText(file: string): string {
  try {
    if (statSync(file).isDirectory()) throw new UserError(`${file}: is a directory, not a config file`);
    return readFileSync(file, "utf8");
  } catch (e) {
    if (e instanceof UserError) throw e;
    if (errnoCode(e) === "ENOENT") {
      // The example's path is where this installation keeps it (a global install, a checkout).
      throw new UserError(`${file}: config file not found`, {
        hint: `write one with 'mkoverlay init' (or copy ${resourceDir("examples", "fleet.yaml")}), or pass --config FILE or set MKOVERLAY_CONFIG`,
      });
    }
    throw new UserError(`${file}: cannot read config (${(e as Error).message})`);
  }
}

/** Full validation: YAML + schema + rules, with positions in every message. */
export async function parseFleet(text: string, file: string, now: Date = new Date()): Promise<Fleet> {
  const v = await validateFleet(text, file, now);
  return toFleet(v.raw, file, resolve(dirname(file)), v.warnings);
}

/** The validated config, and its warnings (`file:line:col key: …`: rules.ts configWarnings). */
interface Validated {
  raw: FleetRaw;
  warnings: string[];
}

async function validateFleet(text: string, file: string, now: Date): Promise<Validated> {
  const [{ parseYamlWith }, { FleetSchema }] = await Promise.all([import("./yaml-schema.js"), import("./schema.js")]);
  const warnings: string[] = [];
  const raw = parseYamlWith(FleetSchema, text, file, (data) => crossCheck(data, now), { rules: configWarnings, to: warnings });
  return { raw, warnings };
}

/**
 * The config as validated before, when the same text was checked by the same build (the
 * cache keys on both): a build then needs neither the YAML parser nor the schema library. The
 * rules that depend on the clock (expiry) run again every time; if one fails, the full path
 * runs so the message carries its position.
 */
export async function loadFleet(file: string, now: Date = new Date()): Promise<Fleet> {
  const text = readConfigText(file);
  let validatedNow = false;
  const v = await cached<Validated>("fleet", [file, text], async () => {
    validatedNow = true;
    return validateFleet(text, file, now);
  });
  if (!validatedNow && crossCheck(v.raw, now).length > 0) return parseFleet(text, file, now);
  return toFleet(v.raw, file, resolve(dirname(file)), v.warnings);
}
