/**
 * The installed shape, as a user gets it: `npm pack`, `npm install -g --prefix DIR` of the
 * tarball, and from an empty folder outside the checkout `mkoverlay init`, a build and
 * `verify`; then a separate package that depends on the tarball and uses the programmatic API
 * (`import { build, batch, verify, UserError } from "mkoverlay"`), type-checked by tsc against
 * the published declarations and run.
 *
 * npm resolves the dependencies against a registry on 127.0.0.1 (helpers/npm-registry.ts) that
 * serves the locked versions from npm's cache. Install scripts are skipped: better-sqlite3's
 * would download a prebuilt addon or compile one (a minute); this station compiled it for
 * `npm ci` with the same Node, and that build is put in place instead. Everything else is what
 * npm installed from the tarball. In the slow tier (vitest.config.ts).
 */
import { spawn } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { localRegistry } from "./helpers/npm-registry.js";
import { readPub, REPO, removeDir, run, sshKeygen, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-packed-");
const pkg = JSON.parse(readFileSync(join(REPO, "package.json"), "utf8")) as { name: string; version: string };
const tarball = join(dir, `${pkg.name}-${pkg.version}.tgz`);
const prefix = join(dir, "prefix");
const installed = join(prefix, "lib/node_modules/mkoverlay");
let registry: Awaited<ReturnType<typeof localRegistry>>;
let env: Record<string, string>;

/**
 * npm with the local registry, quiet about audits, funding and updates. Asynchronous: the
 * registry answers from this process, which a synchronous spawn would block.
 */
async function npm(args: string[], cwd: string): Promise<void> {
  const child = spawn("npm", [...args, "--registry", registry.url, "--no-audit", "--no-fund", "--no-update-notifier", "--ignore-scripts"], {
    cwd,
    env: { ...process.env, npm_config_loglevel: "error" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (c: Buffer) => (err += c.toString()));
  child.stdout.resume();
  const code = await new Promise<number | null>((resolve) => child.on("exit", resolve));
  expect(code, `npm ${args.join(" ")}: ${err}`).toBe(0);
}

/** The addon `npm ci` built, where npm put better-sqlite3 for `root` (see the header). */
function placeAddon(root: string): void {
  const from = join(REPO, "node_modules/better-sqlite3");
  const to = join(root, "node_modules/better-sqlite3");
  expect(JSON.parse(readFileSync(join(to, "package.json"), "utf8")).version).toBe(JSON.parse(readFileSync(join(from, "package.json"), "utf8")).version);
  mkdirSync(join(to, "build/Release"), { recursive: true });
  copyFileSync(join(from, "build/Release/better_sqlite3.node"), join(to, "build/Release/better_sqlite3.node"));
}

beforeAll(async () => {
  expect(existsSync(join(REPO, "dist/api.d.ts")), "run 'make build' first").toBe(true);
  registry = await localRegistry(join(REPO, "package-lock.json"));
  // --ignore-scripts: the tarball of the dist/ that `make build` made (prepare would rebuild it
  // under the other tests' feet); `npm publish` runs prepare, which makes the same files.
  const r = run("npm", ["pack", "--ignore-scripts", "--pack-destination", dir], { cwd: REPO });
  expect(r.code, r.stderr).toBe(0);
  await npm(["install", "-g", "--prefix", prefix, tarball], dir);
  placeAddon(installed);
  env = { PATH: `${join(prefix, "bin")}:${dirname(process.execPath)}:/usr/bin:/bin`, HOME: dir, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "" };
}, 180_000);
afterAll(async () => {
  await registry?.close();
  removeDir(dir);
});

describe("the packed tarball", () => {
  it("holds the CLI, the API and its types, data, docs, examples and the licence; no sources or tests", () => {
    const files = run("tar", ["-tzf", tarball]).stdout.split("\n");
    for (const f of ["LICENSE", "README.md", "package.json", "bin/mkoverlay", "dist/cli.js", "dist/api.js", "dist/api.d.ts", "dist/util/errors.d.ts", "boards/rpi4.yaml", "boards/os/raspios.yaml", "overlays/common/etc/systemd/system/reverse-ssh@.service", "schema/mkoverlay.schema.json", "docs/json.md", "docs/ARCHITECTURE.md", "examples/fleet.yaml"]) {
      expect(files, f).toContain(`package/${f}`);
    }
    expect(files.filter((f) => /^package\/(src|test|bench|node_modules)\//.test(f))).toEqual([]);
    const meta = JSON.parse(run("tar", ["-xzOf", tarball, "package/package.json"]).stdout);
    expect(meta.license).toBe("MIT");
    expect(meta.repository.url).toMatch(/^git\+https:\/\//);
    expect(meta.exports["."]).toEqual({ types: "./dist/api.d.ts", default: "./dist/api.js" });
    expect(readFileSync(join(installed, "LICENSE"), "utf8")).toMatch(/^MIT License\n/);
  });

  it("installed on PATH: init, build and verify from an empty folder outside the checkout", () => {
    const work = join(dir, "station");
    mkdirSync(work);
    const mk = (args: string[], input?: string) => run("mkoverlay", args, { cwd: work, env, ...(input === undefined ? {} : { input }) });
    expect(mk(["--version"]).stdout.trim()).toBe(pkg.version);
    // No config yet: the hint names init and this installation's example, which is there.
    const none = mk(["--board", "rpi4", "--bastion", "eu"]);
    expect(none.code).toBe(2);
    const example = join(installed, "examples/fleet.yaml");
    expect(none.stderr).toContain(`hint: write one with 'mkoverlay init' (or copy ${example})`);
    expect(existsSync(example)).toBe(true);
    const op = `${sshKeygen(dir, "operator")}.pub`;
    const bastion = readPub(sshKeygen(dir, "bastion"));
    const init = mk(["init", "--bastion", "eu=bastion.example.com", "--host-keys", "-", "--operator-key", op], `bastion.example.com ${bastion}\n`);
    expect(init.code, init.stderr).toBe(0);
    const schema = /\$schema=(\S+)/.exec(readFileSync(join(work, "mkoverlay.yaml"), "utf8"))![1]!;
    expect(schema).toBe(join(installed, "schema/mkoverlay.schema.json"));
    expect(existsSync(schema)).toBe(true);
    const b = mk(["--board", "rpi4", "--bastion", "eu"]);
    expect(b.code, b.stderr).toBe(0);
    expect(b.stdout).toMatch(/^# gw-0001: tunnel port 21000\n/);
    const v = mk(["verify", "out/gw-0001.overlay.tar.gz"]);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(v.stdout).toMatch(/ok {3}the key is registered to gw-0001\n/);
    expect(mk(["verify", "--offline", "-q", "out/gw-0001.overlay.tar.gz"]).code).toBe(0);
    expect(mk(["completion", "bash"]).stdout).toMatch(/complete -F _mkoverlay mkoverlay/);
  });

  it("a separate package imports it: types check, the API builds, batches and verifies without printing", async () => {
    const app = join(dir, "factory-app");
    mkdirSync(app);
    writeFileSync(join(app, "package.json"), JSON.stringify({ name: "factory-app", version: "1.0.0", private: true, type: "module", dependencies: { mkoverlay: `file:${tarball}` } }));
    await npm(["install"], app);
    placeAddon(app);
    const key = readPub(join(dir, "bastion"));
    writeFileSync(join(app, "fleet.yaml"), JSON.stringify({ registry: "./fleet.db", bastions: { eu: { host: "bastion.example.com", hostKeys: [key] } }, operators: "none" }));
    writeFileSync(
      join(app, "app.ts"),
      `import { build, batch, verify, UserError, type BuildResult, type BatchResult, type VerifyResult } from "mkoverlay";
const config = "fleet.yaml";
const one: BuildResult = await build({ board: "rpi4", bastion: "eu", config, out: "out", attributes: { serial: "SN0042" } });
const many: BatchResult = await batch({ board: "rpi4", bastion: ["eu"], config, out: "out", count: 3 });
const checked: VerifyResult[] = await verify([one.overlay, ...many.built.map((d) => d.overlay)], { config });
let error: { name: string; message: string; hint: string | undefined; exitCode: number } | undefined;
try {
  await build({ board: "toaster", bastion: "eu", config });
} catch (e) {
  if (e instanceof UserError) error = { name: e.name, message: e.message, hint: e.hint, exitCode: e.exitCode };
}
const port: number = one.port;
console.log(JSON.stringify({ hostname: one.hostname, port, attributes: one.attributes, built: many.built.length, stopped: many.stopped, ok: checked.map((c) => c.ok), mode: checked[0]?.mode, error }));
`,
    );
    writeFileSync(join(app, "wrong.ts"), `import { build } from "mkoverlay";\nawait build({ bord: "rpi4", bastion: "eu" });\nconst n: string = (await build({ board: "rpi4", bastion: "eu" })).port;\nvoid n;\n`);
    const tsconfig = (files: string[], noEmit: boolean) =>
      JSON.stringify({
        compilerOptions: { target: "ES2022", module: "NodeNext", moduleResolution: "NodeNext", strict: true, skipLibCheck: false, types: ["node"], typeRoots: [join(REPO, "node_modules/@types")], noEmit, outDir: "js" },
        files,
      });
    const tsc = join(REPO, "node_modules/.bin/tsc");
    writeFileSync(join(app, "tsconfig.wrong.json"), tsconfig(["wrong.ts"], true));
    const wrong = run(tsc, ["-p", "tsconfig.wrong.json"], { cwd: app });
    // The declarations are real: a misspelt option and a wrong type are caught.
    expect(wrong.code).not.toBe(0);
    expect(wrong.stdout).toMatch(/wrong\.ts\(2,.*'bord' does not exist in type 'BuildOptions'/);
    expect(wrong.stdout).toMatch(/wrong\.ts\(3,.*Type 'number' is not assignable to type 'string'/);
    writeFileSync(join(app, "tsconfig.json"), tsconfig(["app.ts"], false));
    const ok = run(tsc, ["-p", "tsconfig.json"], { cwd: app });
    expect(ok.code, ok.stdout + ok.stderr).toBe(0);
    const r = run(process.execPath, ["js/app.js"], { cwd: app, env: { MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "", HOME: dir } });
    expect(r.code, r.stderr).toBe(0);
    // Nothing printed by mkoverlay itself: one line, the app's.
    expect(r.stderr).toBe("");
    expect(r.stdout.trim().split("\n")).toHaveLength(1);
    expect(JSON.parse(r.stdout)).toEqual({
      hostname: "gw-0001",
      port: 21000,
      attributes: { serial: "SN0042" },
      built: 3,
      stopped: null,
      ok: [true, true, true, true],
      mode: "registry",
      error: { name: "UserError", message: '--board "toaster": unknown board', hint: expect.stringMatching(/^known boards: .*rpi4/), exitCode: 2 },
    });
  }, 240_000); // npm install and two tsc runs: 30 s idle, 62-89 s on two busy cores
});
