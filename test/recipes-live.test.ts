/**
 * The shell recipes of README.md and docs/bastion.md that act on a whole machine, run as written
 * (docs-recipes.test.ts reads these rows of its table and checks that this file holds the tests
 * it names). Each runs in a sandbox that leaves this machine as it was: a private mount namespace
 * in which /etc and /var/log are copies and /var/lib, /usr/local/lib and /run are folders of the
 * sandbox (what was there still seen), /etc/hosts pointing the recipe's names (db.factory.lan,
 * bastion.example.com) at 127.0.0.1; the quick start runs in a network namespace of its own too,
 * so its bastion listens on port 22. Each sandbox is a PID namespace: nothing it started outlives it. The programs are the real ones: sshd, PostgreSQL, git, npm,
 * jq, ss, promtool; a stand-in only for `sudo`, which this machine does not have (setpriv as the
 * named user).
 *
 * Each recipe's test also runs a broken copy of it and sees its checks fail: a test that cannot
 * fail is no test.
 */
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { requires, root } from "./helpers/capability.js";
import { agentRole } from "./helpers/agent-role.js";
import { tunnelArgv } from "./helpers/device.js";
import { postgresForTests, type PgServer } from "./helpers/postgres.js";
import { CLI, extract, readPub, REPO, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";


/** The block after `<!-- tested: NAME -->` in `file`. */
export function recipe(file: string, name: string): string {
  const lines = readFileSync(join(REPO, file), "utf8").split("\n");
  const at = lines.findIndex((l) => l.trim() === `<!-- tested: ${name} -->`);
  if (at < 0) throw new Error(`${file}: no block marked <!-- tested: ${name} -->`);
  let open = at + 1;
  while (lines[open]!.trim() === "") open++;
  if (!/^```(sh|bash)$/.test(lines[open]!.trim())) throw new Error(`${file}:${open + 1}: no sh block after the marker ${name}`);
  const end = lines.findIndex((l, j) => j > open && l.trim() === "```");
  return lines.slice(open + 1, end).join("\n") + "\n";
}

const q = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;

/** A free TCP port on 127.0.0.1 within [lo, hi] (the recipes name the fleet's usual ranges). */
async function freePortIn(lo: number, hi: number): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const p = lo + Math.floor(Math.random() * (hi - lo + 1));
    const ok = await new Promise<boolean>((res) => {
      const s = createServer();
      s.once("error", () => res(false));
      s.listen(p, "127.0.0.1", () => s.close(() => res(true)));
    });
    if (ok) return p;
  }
  throw new Error(`no free port in ${lo}-${hi}`);
}

/**
 * Shell that makes the sandbox (run by `unshare --mount`): /etc and /var/log copies, /etc/hosts
 * naming the recipe's hosts, and private /var/lib, /usr/local/lib and /run whose existing
 * entries are still there (bound) while anything new is the sandbox's.
 */
const SANDBOX = String.raw`set -eu
cp -a /etc "$T/etc"; mount --bind "$T/etc" /etc
printf '127.0.0.1 db.factory.lan bastion.example.com\n' >> /etc/hosts
mkdir "$T/log"; mount --bind "$T/log" /var/log
private() {
  local d=$1 p="$T/private$1" e
  mkdir -p "$p"
  for e in "$d"/* "$d"/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    if [ -d "$e" ] && [ ! -L "$e" ]; then mkdir "$p/$(basename "$e")"; mount --rbind "$e" "$p/$(basename "$e")"; else cp -a "$e" "$p/"; fi
  done
  mount --bind "$p" "$d"
}
private /var/lib
private /usr/local/lib
mkdir -p /run/sshd
`;

/** `sudo -u USER CMD…` as setpriv (this machine has no sudo; the tests run as root). */
const SUDO = `#!/bin/sh
[ "$1" = "-u" ] || { echo "sudo: only -u USER here" >&2; exit 1; }
u=$2; shift 2
exec setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups "$@"
`;

function sandbox(script: string, env: Record<string, string>, opts: { net?: boolean; timeout?: number } = {}) {
  // A PID namespace too: whatever the recipe started (an agent that runs until stopped) ends with it, even on a timeout.
  const ns = ["--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc", ...(opts.net ? ["--net"] : [])];
  const r = spawnSync("unshare", [...ns, "bash", "-c", SANDBOX + script], {
    encoding: "utf8",
    timeout: opts.timeout ?? 120_000,
    // unshare --fork ignores SIGTERM while it waits; SIGKILL ends it, and --kill-child its namespace.
    killSignal: "SIGKILL",
    stdio: ["ignore", "pipe", "pipe"],
    env: { PATH: `${env.T}/bin:${dirname(process.execPath)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, LANG: "C.UTF-8", HOME: env.T!, ...env },
  });
  return { code: r.status ?? -1, stdout: r.stdout ?? "", stderr: (r.stderr ?? "") + (r.error ? `\n${r.error.message}` : "") };
}

/** A sandbox folder with bin/mkoverlay (as npm link puts it), node and the sudo stand-in. */
function workspace(prefix: string): string {
  const t = tempDir(prefix);
  mkdirSync(join(t, "bin"));
  symlinkSync(CLI, join(t, "bin/mkoverlay"));
  symlinkSync(process.execPath, join(t, "bin/node"));
  writeFileSync(join(t, "bin/sudo"), SUDO, { mode: 0o755 });
  return t;
}

const log = (t: string, f: string) => (existsSync(join(t, f)) ? readFileSync(join(t, f), "utf8") : "");

requires(root)("docs/bastion.md: the textfile collector's recipe, as written", () => {
  let t = "";
  beforeAll(() => {
    t = workspace("mko-recipe-prom-");
    const fleet = join(t, "fleet");
    mkdirSync(fleet);
    writeFleet(fleet, { eu: { hostKeys: [readPub(sshKeygen(t, "bastion"))] } });
    for (let i = 0; i < 2; i++) expect(runCli(["--board", "rpi4", "--bastion", "eu"], { cwd: fleet }).code).toBe(0);
  });
  afterAll(() => removeDir(t));

  /** The recipe in the fleet folder, /var/lib/node_exporter a folder of the sandbox; what it left there. */
  function textfile(script: string): { code: number; stderr: string; files: string[]; prom: string } {
    writeFileSync(join(t, "recipe.sh"), script);
    removeDir(join(t, "ne"));
    const r = sandbox(`mkdir /var/lib/node_exporter\ncd "$T/fleet"\nset +e; bash -e "$T/recipe.sh"; rc=$?; set -e\ncp -a /var/lib/node_exporter "$T/ne"\nexit $rc\n`, { T: t }, { timeout: 30_000 });
    const files = existsSync(join(t, "ne")) ? readdirSync(join(t, "ne")) : [];
    return { code: r.code, stderr: r.stderr, files, prom: files.includes("mkoverlay.prom") ? readFileSync(join(t, "ne/mkoverlay.prom"), "utf8") : "" };
  }

  /** What is wrong with what the recipe left: empty when the textfile is there, whole and valid. */
  function problems(r: ReturnType<typeof textfile>): string[] {
    const out: string[] = [];
    if (r.code !== 0) out.push(`exit ${r.code}: ${r.stderr}`);
    if (r.files.join(",") !== "mkoverlay.prom") out.push(`node_exporter's folder holds ${JSON.stringify(r.files)}, not mkoverlay.prom alone`);
    if (!/^mkoverlay_device_up\{[^}]*hostname="gw-0002"[^}]*\} 0$/m.test(r.prom)) out.push(`no mkoverlay_device_up for gw-0002 in ${JSON.stringify(r.prom.slice(0, 400))}`);
    const check = run("promtool", ["check", "metrics"], { input: r.prom });
    if (r.prom === "" || check.code !== 0) out.push(`promtool check metrics: ${check.stdout}${check.stderr}`);
    return out;
  }

  it("docs/bastion.md: the status of every device, written whole into node_exporter's textfile folder", () => {
    expect(problems(textfile(recipe("docs/bastion.md", "prometheus textfile")))).toEqual([]);
  });

  it("the check fails on a broken copy (a format status does not know, a temp file never moved)", () => {
    const block = recipe("docs/bastion.md", "prometheus textfile");
    expect(problems(textfile(block.replace("--format prometheus", "--format prom")))).not.toEqual([]);
    expect(problems(textfile(block.replace(/ && mv .*$/m, "")))).not.toEqual([]);
  });
});

/**
 * The bastion install recipes on this machine's own sshd_config, with the fleet's registry on a
 * real PostgreSQL at db.factory.lan (PGPORT: the URL names no port), then this sshd started as
 * the bastion and a device's tunnel logging in with the key the install filled from the
 * registry, then the troubleshooting recipe on that bastion.
 */
const BASTION = String.raw`
# A fresh bastion: no tunnel user, nothing of mkoverlay's, its own host key.
if id reverse-ssh >/dev/null 2>&1; then userdel reverse-ssh; fi
if id mkoverlay-keys >/dev/null 2>&1; then userdel mkoverlay-keys; fi
rm -rf /etc/ssh/authorized_keys.d /etc/ssh/sshd_config.d/60-mkoverlay-bastion-* /etc/ssh/ssh_host_* /etc/mkoverlay /etc/systemd/system/mkoverlay-bastion@*
install -m 0600 "$T/hk" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$T/hk.pub" /etc/ssh/ssh_host_ed25519_key.pub
spid= tpid=
stop() { [ -z "$tpid" ] || kill "$tpid" 2>/dev/null || true; if [ -n "$spid" ]; then pkill -KILL -P "$spid" 2>/dev/null || true; kill "$spid" 2>/dev/null || true; fi; }
trap stop EXIT
up() { for _ in $(seq 100); do if (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi; sleep 0.1; done; echo "nothing listens on $1" >&2; return 1; }
# The install recipe, as written, as root from the fleet folder.
(cd "$T/fleet" && bash -e "$T/install.sh") > "$T/install.out" 2> "$T/install.err"
# sshd as the bastion runs it, reading the drop-in the install left.
/usr/sbin/sshd -D -o Port="$P" -o ListenAddress=127.0.0.1 -o PidFile="$T/sshd.pid" -E "$T/sshd.log" &
spid=$!
up "$P"
# The device's tunnel, as its unit runs it: up when its port listens on the bastion.
bash "$T/tunnel.sh" 2>"$T/tunnel.err" & tpid=$!
up "$DEVPORT"
echo TUNNEL-UP
if [ -s "$T/troubleshooting.sh" ]; then (cd "$T/fleet" && bash -e "$T/troubleshooting.sh") > "$T/troubleshooting.out" 2> "$T/troubleshooting.err"; fi
`;

requires(root)("README.md and docs/bastion.md: bastion install with PostgreSQL, then troubleshooting, on this machine's sshd", () => {
  let server: PgServer | undefined;
  let t = "";
  let dev = { hostname: "", port: 0, publicKey: "" };
  let p = 0;

  beforeAll(async () => {
    ({ server } = await postgresForTests());
    if (!server) throw new Error("PostgreSQL could not be started (see above)");
    t = workspace("mko-recipe-install-");
    await server.sql("postgres", "CREATE ROLE mkoverlay LOGIN");
    await server.sql("postgres", "CREATE DATABASE fleet OWNER mkoverlay");
    const fleet = join(t, "fleet");
    mkdirSync(fleet);
    const hk = sshKeygen(t, "hk");
    p = await freePortIn(40000, 45000);
    const [sshPort, svcPort] = [await freePortIn(21000, 21999), await freePortIn(22000, 22999)];
    // The station's config: the registry as the station reaches it (the agent gets its own role).
    writeFleet(fleet, { eu: { host: "127.0.0.1", port: p, hostKeys: [readPub(hk)] } }, {
      registry: "postgres://mkoverlay@db.factory.lan/fleet",
      ports: { ssh: `${sshPort}-${sshPort}`, services: `${svcPort}-${svcPort}` },
    });
    copyFileSync(join(fleet, "mkoverlay.yaml"), join(fleet, "fleet.yaml"));
    const station = server.url("fleet", "mkoverlay");
    const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: fleet, env: { MKOVERLAY_REGISTRY: station } });
    expect(b.code, b.stderr).toBe(0);
    const built = JSON.parse(b.stdout) as { hostname: string; port: number; overlay: string };
    const root = join(t, "gw-root");
    mkdirSync(root);
    extract(built.overlay, root);
    const listed = runCli(["registry", "list", "--json"], { cwd: fleet, env: { MKOVERLAY_REGISTRY: station } });
    expect(listed.code, listed.stderr).toBe(0);
    const [row] = JSON.parse(listed.stdout) as { publicKey: string }[];
    dev = { hostname: built.hostname, port: built.port, publicKey: row!.publicKey };
    writeFileSync(join(t, "tunnel.sh"), `exec ${tunnelArgv(root, "eu", built.hostname).map(q).join(" ")}\n`);
    await agentRole(server, station, "mkoverlay_bastion");
  });

  afterAll(async () => {
    await server?.stop();
    if (t) removeDir(t);
  });

  /** The install recipe (and troubleshooting after it, if given) on the sandboxed bastion. */
  function bastion(install: string, troubleshooting = "") {
    for (const f of ["install.out", "install.err", "troubleshooting.out", "troubleshooting.err", "sshd.log", "tunnel.err"]) removeDir(join(t, f));
    removeDir(join(t, "etc"));
    removeDir(join(t, "log"));
    removeDir(join(t, "private"));
    writeFileSync(join(t, "install.sh"), install);
    writeFileSync(join(t, "troubleshooting.sh"), troubleshooting);
    const r = sandbox(BASTION, { T: t, P: String(p), DEVPORT: String(dev.port), PGPORT: String(server!.port) });
    return { ...r, install: log(t, "install.out") + log(t, "install.err"), sshd: log(t, "sshd.log"), troubleshooting: log(t, "troubleshooting.out"), troubleshootingErr: log(t, "troubleshooting.err") };
  }

  /** What is wrong after an install recipe: empty when the device's tunnel logged in through it. */
  function installProblems(r: ReturnType<typeof bastion>): string[] {
    const out: string[] = [];
    if (r.code !== 0 || !r.stdout.includes("TUNNEL-UP")) out.push(`exit ${r.code}: ${r.stderr}\n${r.install}\n${log(t, "tunnel.err")}`);
    if (!/key directory filled from the registry: 1 key/.test(r.install)) out.push(`the install did not fill the keys from PostgreSQL: ${r.install}`);
    // Without systemd here, the install prints the agent's command, with the agent's own role.
    if (!/systemd is not running here/.test(r.install) || !/bastion agent/.test(r.install)) out.push(`no agent command printed: ${r.install}`);
    if (!/Accepted publickey for reverse-ssh from 127\.0\.0\.1/.test(r.sshd)) out.push(`no tunnel login in sshd's log: ${r.sshd}`);
    return out;
  }

  it("docs/bastion.md: installs from fleet.yaml with the agent's PostgreSQL role; a device's tunnel logs in", () => {
    expect(installProblems(bastion(recipe("docs/bastion.md", "bastion install")))).toEqual([]);
  });

  it("README.md: installs from ./mkoverlay.yaml with the agent's PostgreSQL role; a device's tunnel logs in", () => {
    expect(installProblems(bastion(recipe("README.md", "bastion install, README")))).toEqual([]);
  });

  /** What is wrong with troubleshooting's answers: empty when each line told what it should. */
  function troubleshootingProblems(r: ReturnType<typeof bastion>): string[] {
    const out: string[] = [];
    if (r.code !== 0) out.push(`exit ${r.code}: ${r.stderr}\n${r.troubleshootingErr}`);
    const o = r.troubleshooting;
    if (!new RegExp(`LISTEN .*127\\.0\\.0\\.1:${dev.port} .*sshd`).test(o)) out.push(`ss did not show the tunnel's port ${dev.port} held by sshd`);
    if (!new RegExp(`^${dev.port} +${dev.hostname} +SHA256:`, "m").test(o)) out.push("registry list did not show the device's port, name and key");
    if (!new RegExp(`^restrict,.*permitlisten="localhost:${dev.port}".* ${dev.publicKey.replace(/[+/]/g, "\\$&")}`, "m").test(o)) out.push(`the keys command did not answer with the device's key line`);
    if (!/^authorizedkeyscommand \/usr\/local\/lib\/mkoverlay\/authorized-keys /m.test(o)) out.push("sshd -T did not show the keys command");
    return out;
  }

  it("docs/bastion.md troubleshooting: the tunnel's port, the registry, the keys command for gw-0001's key, sshd's settings", () => {
    const r = bastion(recipe("docs/bastion.md", "bastion install"), recipe("docs/bastion.md", "troubleshooting"));
    expect(installProblems(r)).toEqual([]);
    expect(troubleshootingProblems(r), r.troubleshooting + r.troubleshootingErr).toEqual([]);
  });

  it("the checks fail on broken copies (a bastion the config lacks; troubleshooting a device that is not there)", () => {
    const install = recipe("docs/bastion.md", "bastion install");
    expect(installProblems(bastion(install.replace("--bastion eu", "--bastion us")))).not.toEqual([]);
    expect(installProblems(bastion(install.replace("mkoverlay_bastion@", "nobody_here@")))).not.toEqual([]);
    const broken = bastion(install, recipe("docs/bastion.md", "troubleshooting").replace('"gw-0001"', '"gw-0999"'));
    expect(installProblems(broken)).toEqual([]);
    expect(troubleshootingProblems(broken)).not.toEqual([]);
  });
});

/**
 * The quick start, as written, in a network namespace of its own (nothing leaves it): a real sshd
 * is bastion.example.com on 127.0.0.1:22 there; `git clone https://github.com/…` clones this
 * checkout's committed HEAD (git's own url.<base>.insteadOf, from the environment); `make run`'s
 * `npm ci` installs from npm's cache on this machine, offline (npm_config_offline), with
 * better-sqlite3's prebuilt addon where prebuild-install looks first, its cache (the addon this
 * checkout's `npm ci` built from the same version: what it would download); `npm link` links
 * into a prefix of the sandbox whose bin is on the PATH (no mkoverlay on it before). The reader's
 * ~/.ssh/id_ed25519.pub is the sandbox's.
 */
requires(root)("README.md quick start: clone, make run, npm link, init against a real bastion, build, verify", () => {
  let t = "";
  let hostKey = "";
  beforeAll(() => {
    t = tempDir("mko-recipe-quick-");
    mkdirSync(join(t, "home/.ssh"), { recursive: true });
    sshKeygen(join(t, "home/.ssh"), "id_ed25519");
    hostKey = readPub(sshKeygen(t, "hk"));
    mkdirSync(join(t, "work"));
    mkdirSync(join(t, "prefix/bin"), { recursive: true });
    // npm's cache, shared; the prebuilt addon in the sandbox's view of it.
    const cache = join(t, "npm-cache");
    mkdirSync(join(cache, "_prebuilds"), { recursive: true });
    symlinkSync(join(spawnSync("npm", ["config", "get", "cache"], { encoding: "utf8" }).stdout.trim(), "_cacache"), join(cache, "_cacache"));
    const addonDir = join(REPO, "node_modules/better-sqlite3");
    const where = spawnSync(process.execPath, ["-e", 'const pkg=require("./package.json");const rc=require("prebuild-install/rc")(pkg);const u=require("prebuild-install/util");process.stdout.write(u.cachedPrebuild(u.getDownloadUrl(Object.assign(rc,{pkg}))))'], {
      cwd: addonDir,
      encoding: "utf8",
      env: { ...process.env, npm_config_cache: cache },
    });
    expect(where.status, where.stderr).toBe(0);
    expect(dirname(where.stdout)).toBe(join(cache, "_prebuilds"));
    const tar = run("tar", ["-czf", where.stdout, "-C", addonDir, "build/Release/better_sqlite3.node"]);
    expect(tar.code, tar.stderr).toBe(0);
  });
  afterAll(() => removeDir(t));

  const QUICK = String.raw`
ip link set lo up
# No name server in this network: a name the hosts file does not hold fails at once.
rm -f /etc/resolv.conf; echo 'nameserver 127.0.0.1' > /etc/resolv.conf
/usr/sbin/sshd -D -f /dev/null -o HostKey="$T/hk" -o ListenAddress=127.0.0.1 -o Port=22 -o PidFile="$T/sshd.pid" -E "$T/sshd.log" &
spid=$!
trap 'kill "$spid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do if (echo >/dev/tcp/127.0.0.1/22) 2>/dev/null; then break; fi; sleep 0.1; done
if command -v mkoverlay; then echo "mkoverlay is on the PATH before npm link" >&2; exit 99; fi
cd "$T/work"; bash -e "$T/recipe.sh"
`;

  function quickStart(script: string) {
    writeFileSync(join(t, "recipe.sh"), script);
    removeDir(join(t, "work/mkoverlay"));
    removeDir(join(t, "home/fleet"));
    for (const d of ["etc", "log", "private"]) removeDir(join(t, d));
    return sandbox(QUICK, {
      T: t,
      HOME: join(t, "home"),
      PATH: `${join(t, "prefix/bin")}:${dirname(process.execPath)}:/usr/sbin:/usr/bin:/sbin:/bin`,
      GIT_CONFIG_COUNT: "1",
      GIT_CONFIG_KEY_0: `url.${REPO}.insteadOf`,
      GIT_CONFIG_VALUE_0: "https://github.com/mkoverlay/mkoverlay.git",
      npm_config_prefix: join(t, "prefix"),
      npm_config_cache: join(t, "npm-cache"),
      npm_config_offline: "true",
      npm_config_update_notifier: "false",
    }, { net: true, timeout: 600_000 });
  }

  it("README.md: from a fresh clone to a verified overlay, the bastion's key pinned from its sshd", () => {
    const r = quickStart(recipe("README.md", "quick start"));
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
    const home = join(t, "home");
    expect(existsSync(join(home, "fleet/out/gw-0001.overlay.tar.gz"))).toBe(true);
    // init pinned the key bastion.example.com's sshd served (it was scanned, not made up) ...
    expect(readFileSync(join(home, "fleet/mkoverlay.yaml"), "utf8")).toContain(hostKey.split(" ")[1]);
    // ... and the mkoverlay that did it is the clone, linked onto the PATH.
    expect(run("readlink", ["-f", join(t, "prefix/bin/mkoverlay")]).stdout.trim().startsWith(join(t, "work/mkoverlay/"))).toBe(true);
    expect(existsSync(join(t, "work/mkoverlay/out/gw-0001.overlay.tar.gz")), "make run's demo overlay").toBe(true);
  }, 600_000);

  it("the check fails on a broken copy (a repository that is not mkoverlay's)", () => {
    const r = quickStart(recipe("README.md", "quick start").replace("mkoverlay/mkoverlay.git", "mkoverlay/mkoverlay-nothing.git"));
    expect(r.code).not.toBe(0);
  }, 120_000);
});
