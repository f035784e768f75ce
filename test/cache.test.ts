/**
 * The config cache is keyed on the code as well as the text: an entry written by one build is
 * never trusted by another (a newer mkoverlay may refuse what an older one accepted). Old
 * entries are pruned on a miss, at most once a day. And the tests themselves never touch the
 * developer's ~/.cache/mkoverlay.
 */
import { appendFileSync, cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { pruneCache } from "../src/util/cache.js";
import { readPub, REPO, removeDir, run, runCli, sshKeygen, tempDir, TEST_CACHE, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-cache-test-");
afterAll(() => removeDir(dir));
const DAY = 24 * 3600 * 1000;

const entries = (d: string) => (existsSync(d) ? readdirSync(d).filter((n) => n.endsWith(".json")) : []);

describe("tests and the developer's cache", () => {
  it("runCli gives the CLI a per-run cache folder, never ~/.cache/mkoverlay", () => {
    const home = join(dir, "home");
    const ws = join(dir, "ws-home");
    mkdirSync(home);
    mkdirSync(ws);
    writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(ws, "bastion"))] } });
    const r = runCli(["--board", "rpi4", "--bastion", "eu", "--quiet"], { cwd: ws, env: { HOME: home, XDG_CACHE_HOME: "" } });
    expect(r.code, r.stderr).toBe(0);
    expect(existsSync(join(home, ".cache"))).toBe(false);
    expect(TEST_CACHE).not.toBe("off");
    expect(entries(TEST_CACHE).some((n) => n.startsWith("fleet-"))).toBe(true);
  });
});

describe("the cache is keyed on the build", () => {
  it("an entry written by one build is not trusted by the next", () => {
    // A copy of this checkout, bundled: "build A".
    const inst = join(dir, "install");
    for (const d of ["bin", "src", "scripts", "boards", "overlays", "schema", "package.json", "package-lock.json"]) cpSync(join(REPO, d), join(inst, d), { recursive: true });
    symlinkSync(join(REPO, "node_modules"), join(inst, "node_modules"));
    const bundle = () => expect(run(process.execPath, ["scripts/bundle.mjs"], { cwd: inst }).code).toBe(0);
    bundle();
    const ws = join(dir, "ws-build");
    const cache = join(dir, "cache-build");
    mkdirSync(ws);
    writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(ws, "bastion"))], from: ["198.51.100.0/24"] } });
    // A registry of its own per build: a changed `from:` would otherwise be refused as a lockout
    // of the devices built before (config/compat.ts), which is not what this test is about.
    let builds = 0;
    const build = () => {
      const r = run(process.execPath, [join(inst, "bin/mkoverlay"), "--board", "rpi4", "--bastion", "eu", "--json", "--out", join(ws, "out")], {
        cwd: ws,
        env: { MKOVERLAY_CACHE: cache, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: join(ws, `registry-${++builds}.db`) },
      });
      expect(r.code, r.stderr).toBe(0);
      return (JSON.parse(r.stdout) as { authorizedKeys: Record<string, string> }).authorizedKeys.eu!;
    };
    expect(build()).toContain('from="198.51.100.0/24"');
    // What an older, laxer build might have stored for the same text (today's rules refuse it).
    const [entry] = entries(cache).filter((n) => n.startsWith("fleet-"));
    // The entry is the validated config and its warnings.
    const data = JSON.parse(readFileSync(join(cache, entry!), "utf8")) as { raw: { bastions: { eu: { from: string[] } } }; warnings: string[] };
    data.raw.bastions.eu.from = ["127.0.0.1/8"];
    writeFileSync(join(cache, entry!), JSON.stringify(data));
    expect(build()).toContain('from="127.0.0.1/8"'); // the same build trusts its own entry
    // "Build B": the validators' source changed.
    appendFileSync(join(inst, "src/util/validate.ts"), "\n// a change in the validators\n");
    bundle();
    expect(build()).toContain('from="198.51.100.0/24"');
  });
});

describe("pruning", () => {
  function fill(d: string, now: number, ages: number[]): string[] {
    mkdirSync(d, { recursive: true });
    return ages.map((age, i) => {
      const f = join(d, `fleet-${String(i).padStart(32, "0")}.json`);
      writeFileSync(f, "{}");
      utimesSync(f, (now - age) / 1000, (now - age) / 1000);
      return f;
    });
  }

  it("drops entries older than 30 days, keeps the newest 100, removes stale temp files", () => {
    const d = join(dir, "prune");
    const now = Date.now();
    // 120 recent entries (minutes apart), 10 of 40 days.
    fill(d, now, [...Array.from({ length: 120 }, (_, i) => i * 60_000), ...Array.from({ length: 10 }, () => 40 * DAY)]);
    writeFileSync(join(d, "fleet-x.json.1.aa.tmp"), "");
    utimesSync(join(d, "fleet-x.json.1.aa.tmp"), (now - 2 * 3600_000) / 1000, (now - 2 * 3600_000) / 1000);
    writeFileSync(join(d, "fleet-y.json.2.bb.tmp"), "");
    pruneCache(d, now);
    const left = readdirSync(d);
    expect(left.filter((n) => n.endsWith(".json"))).toHaveLength(100);
    // The newest 100 are the ones left.
    expect(left).toContain(`fleet-${"0".repeat(32)}.json`);
    expect(left).not.toContain(`fleet-${String(100).padStart(32, "0")}.json`);
    expect(left).not.toContain("fleet-x.json.1.aa.tmp");
    expect(left).toContain("fleet-y.json.2.bb.tmp");
  });

  it("runs at most once a day", () => {
    const d = join(dir, "prune-daily");
    const now = Date.now();
    mkdirSync(d);
    pruneCache(d, now - 1); // the first run (an empty folder) sets the stamp
    fill(d, now, Array.from({ length: 5 }, () => 40 * DAY));
    pruneCache(d, now + 3600_000);
    expect(entries(d)).toHaveLength(5);
    pruneCache(d, now + DAY + 1);
    expect(entries(d)).toHaveLength(0);
  });

  it("a run that misses the cache prunes it (and one that hits does not list it)", () => {
    const d = join(dir, "prune-cli");
    const ws = join(dir, "ws-prune");
    mkdirSync(ws);
    writeFleet(ws, { eu: { hostKeys: [readPub(sshKeygen(ws, "bastion"))] } });
    const now = Date.now();
    fill(d, now, Array.from({ length: 30 }, () => 60 * DAY));
    const r = runCli(["registry", "list"], { cwd: ws, env: { MKOVERLAY_CACHE: d } });
    expect(r.code, r.stderr).toBe(0);
    // Only what this run wrote is left.
    expect(entries(d).map((n) => n.split("-")[0])).toEqual(["fleet"]);
    // A hit does not prune, even when the day has passed.
    rmSync(join(d, ".pruned"));
    fill(join(d), now, [60 * DAY]);
    expect(runCli(["registry", "list"], { cwd: ws, env: { MKOVERLAY_CACHE: d } }).code).toBe(0);
    expect(entries(d)).toHaveLength(2);
  });
});
