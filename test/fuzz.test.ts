/**
 * The fuzz tier: seeded mutations of examples/fleet.yaml and hostile command lines. Whatever
 * the input, mkoverlay must answer with a user error (or do its job): never an internal error
 * (exit 70), a stack trace, a hang or a signal.
 *
 * In-process (fast): every mutation goes through the loader and rules (parseFleet); an
 * accepted config is taken on through bastion selection, the tunnel plan, the overlay build,
 * the authorized_keys line and the hostname template. Through the real CLI (slower): a sample
 * of mutated configs with the commands that read them, and hostile flags.
 *
 *   FUZZ_COUNT=20000 FUZZ_CLI_COUNT=200 FUZZ_SEED=7 node_modules/.bin/vitest run test/fuzz.test.ts
 *
 * runs a bigger campaign once; the totals are printed at the end.
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { authorizedKeysLine } from "../src/bastion/line.js";
import type { Fleet } from "../src/config/fleet.js";
import { parseFleet } from "../src/config/load.js";
import { MAX_SEQ, renderHostname } from "../src/config/rules.js";
import { resolveBastions } from "../src/device/inputs.js";
import { isUserError } from "../src/util/errors.js";
import { generateEd25519 } from "../src/keys/ed25519.js";
import { parsePublicKey } from "../src/keys/pubkey.js";
import { planTunnels, serviceNames } from "../src/config/forwards.js";
import { tarball } from "../src/overlay/archive.js";
import { loadLayers } from "../src/overlay/layers.js";
import { buildOverlay } from "../src/overlay/steps.js";
import { checkAgainstBuild } from "../src/overlay/verify.js";
import { treeView } from "../src/overlay/view.js";
import { loadProfiles, resolveBoardOs, type Profiles } from "../src/config/profiles.js";
import { hostileArgv, mutateConfig, pick, rng } from "./helpers/fuzz.js";
import { CLI, REPO, removeDir, runCli, tempDir } from "./helpers/workspace.js";

const COUNT = Number(process.env.FUZZ_COUNT ?? 3000);
const CLI_COUNT = Number(process.env.FUZZ_CLI_COUNT ?? 8);
const SEED = Number(process.env.FUZZ_SEED ?? 11);
const BASE = readFileSync(join(REPO, "examples/fleet.yaml"), "utf8");
const NOW = new Date("2025-06-01T12:00:00Z");
/** Longer than this for one config (in-process) counts as a hang. */
const SLOW_MS = 2000;

const dir = tempDir("mko-fuzz-");
let profiles: Profiles;
const key = generateEd25519();
const stats = { mutations: 0, rejected: 0, accepted: 0, refusedLater: 0, devices: 0, cli: 0, cliByCode: {} as Record<string, number> };

beforeAll(async () => {
  profiles = await loadProfiles();
});

afterAll(() => {
  removeDir(dir);
  process.stderr.write(`fuzz (seed ${SEED}): ${JSON.stringify(stats)}\n`);
});

/** A stack frame in a message means a bug leaked into the user's view. */
const STACK = /\n\s+at |internal error|This is a bug/;

interface Crash {
  index: number;
  stage: string;
  error: string;
  input: string;
}

/** Takes an accepted config as far as a device: every step must succeed or say why. */
async function exercise(fleet: Fleet, r: () => number, sample: boolean): Promise<string | undefined> {
  const names = [...fleet.bastions.keys()];
  const flag = r() < 0.5 ? pick(r, names) : names.join(",");
  let stage = "resolveBastions";
  try {
    const bastions = resolveBastions(fleet, flag, NOW);
    stage = "renderHostname";
    // The rule promised valid names up to MAX_SEQ: any error there is a bug, even a UserError.
    let hostname = "";
    try {
      for (const seq of [9, 10, 99, 12345, MAX_SEQ]) renderHostname(fleet.hostnameTemplate, seq);
      hostname = renderHostname(fleet.hostnameTemplate, 1);
    } catch (e) {
      return `${stage}: the config rule let through a template that fails below ${MAX_SEQ}: ${(e as Error).message}`;
    }
    try {
      renderHostname(fleet.hostnameTemplate, MAX_SEQ + 1);
    } catch (e) {
      if (!isUserError(e)) throw e;
    }
    stage = "planTunnels";
    const services = Object.fromEntries(serviceNames(fleet).map((n, i) => [n, fleet.ports.services.lo + i]));
    const tunnels = planTunnels(fleet, bastions, fleet.ports.ssh.lo, services);
    stage = "authorizedKeysLine";
    for (const t of tunnels) {
      const line = authorizedKeysLine({ hostname, pub: key.pub, tunnel: t, now: NOW });
      if (/[\r\n\0]/.test(line)) return `${stage}: a line break or NUL in ${JSON.stringify(line)}`;
      const keyPart = line.slice(line.lastIndexOf(" ssh-ed25519 ") + 1);
      if (typeof parsePublicKey(keyPart) === "string") return `${stage}: the line does not end in a key: ${line}`;
    }
    stage = "buildOverlay";
    const { board, os } = resolveBoardOs(profiles, "rpi4", undefined);
    const spec = { hostname, board, os, tunnels, key, operators: fleet.operators, layers: loadLayers(os.firstBoot.layers) };
    const tree = buildOverlay(spec);
    stage = "verify";
    const failed = (await checkAgainstBuild(treeView(tree), spec)).filter((c) => !c.ok);
    if (failed.length > 0) return `${stage}: the built tree does not verify: ${JSON.stringify(failed)}`;
    if (sample) {
      stage = "tarball";
      await tarball(tree, 1_600_000_000);
    }
    stats.devices++;
    return undefined;
  } catch (e) {
    if (isUserError(e) && !STACK.test(e.message)) {
      stats.refusedLater++;
      return undefined;
    }
    return `${stage}: ${(e as Error).stack ?? String(e)}`;
  }
}

describe("fuzz: seeded mutations of examples/fleet.yaml, in-process", () => {
  it(`${COUNT} mutations: each is a clear user error or a working device (seed ${SEED})`, { timeout: Math.max(60_000, COUNT * 20) }, async () => {
    const r = rng(SEED);
    const crashes: Crash[] = [];
    for (let i = 0; i < COUNT; i++) {
      const text = mutateConfig(BASE, r);
      stats.mutations++;
      const t0 = performance.now();
      let fleet: Fleet | undefined;
      try {
        fleet = await parseFleet(text, join(dir, "mkoverlay.yaml"), NOW);
      } catch (e) {
        if (!isUserError(e) || STACK.test(e.message) || e.message.trim() === "") {
          crashes.push({ index: i, stage: "parseFleet", error: (e as Error).stack ?? String(e), input: text });
        } else stats.rejected++;
      }
      const ms = performance.now() - t0;
      if (ms > SLOW_MS) crashes.push({ index: i, stage: "parseFleet", error: `took ${Math.round(ms)} ms`, input: text });
      if (!fleet) continue;
      stats.accepted++;
      const problem = await exercise(fleet, r, i % 50 === 0);
      if (problem) crashes.push({ index: i, stage: "device", error: problem, input: text });
    }
    if (crashes.length > 0) {
      const file = join(tmpdir(), `mkoverlay-fuzz-crashes-${SEED}.json`);
      writeFileSync(file, JSON.stringify(crashes, null, 2));
      process.stderr.write(`fuzz: ${crashes.length} crash(es), inputs in ${file}\n`);
    }
    expect(crashes.map((c) => `#${c.index} ${c.stage}: ${c.error.split("\n").slice(0, 3).join(" | ")}`)).toEqual([]);
    // The mutations reach both outcomes, so the run means something.
    expect(stats.rejected).toBeGreaterThan(COUNT / 10);
    expect(stats.accepted).toBeGreaterThan(COUNT / 20);
  });
});

describe("fuzz: the real CLI with mutated configs and hostile flags", () => {
  const r = rng(SEED ^ 0x5eed);
  const cases = Array.from({ length: CLI_COUNT }, (_, i) => {
    // Half: a mutated config with a command that reads it; half: the example config with hostile flags.
    if (i % 2 === 0) {
      const config = mutateConfig(BASE, r);
      const argv = pick(r, [
        ["--board", "rpi4", "--bastion", pick(r, ["eu", "us", "eu,us"])],
        ["batch", "--board", "rpi4", "--bastion", "eu", "--count", "2"],
        ["registry", "list", "--json"],
        ["bastion", "authorized-keys", "--bastion", "eu"],
        ["bastion", "sshd-config", "--bastion", "us"],
        ["ssh-config"],
      ]);
      return { i, config, argv };
    }
    return { i, config: BASE, argv: hostileArgv(r) };
  });

  it.each(cases)("case $i: $argv", ({ i, config, argv }) => {
    const ws = join(dir, `cli-${i}`);
    mkdirSync(ws, { recursive: true });
    writeFileSync(join(ws, "mkoverlay.yaml"), config);
    writeFileSync(join(ws, "a-file"), "not a key\n");
    writeFileSync(join(ws, "hosts.csv"), 'hostname,serial\ngw-a,1\n"gw-b,x",2\n');
    // A device in the registry first, so lifecycle commands have something to act on.
    if (config === BASE) runCli(["--board", "rpi4", "--bastion", "eu", "--quiet"], { cwd: ws, env: { MKOVERLAY_REGISTRY: join(ws, "registry.db") } });
    const res = spawnSync(process.execPath, [CLI, ...argv], {
      cwd: ws,
      encoding: "utf8",
      timeout: 30_000,
      input: "",
      // The registry stays in the workspace whatever the mutated config says (no network).
      env: { ...process.env, NO_COLOR: "1", MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: join(ws, "registry.db") },
    });
    stats.cli++;
    const code = res.status === null ? `signal ${res.signal}` : String(res.status);
    stats.cliByCode[code] = (stats.cliByCode[code] ?? 0) + 1;
    const detail = `argv ${JSON.stringify(argv)}\n--- config ---\n${config}\n--- stderr ---\n${res.stderr}`;
    expect(res.error?.message, detail).toBeUndefined(); // a timeout (hang) shows up here
    expect(res.signal, detail).toBeNull();
    expect([0, 1, 2], detail).toContain(res.status);
    if (!argv.includes("--debug")) expect(res.stderr, detail).not.toMatch(STACK);
    expect(res.stdout + res.stderr, detail).not.toMatch(/internal error|This is a bug/);
    removeDir(ws);
  });
});
