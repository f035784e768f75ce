/**
 * Every shell recipe in README.md and docs/*.md is run by a test, as written. Each fenced block
 * is found here: a block in a shell language (sh, bash, shell, console) must follow a
 * `<!-- tested: NAME -->` marker whose NAME is in RECIPES below, which says which test runs it
 * (this file, or another named test that reads the block by its marker); a block that is not
 * meant to run (example output) says so with its language (`text`), and a bare fence is refused.
 * A new shell block without a marker, a marker missing from the table, or a table entry whose
 * block is gone fails here. There is no "to do" row: a recipe no test runs fails here.
 *
 * Run here: docs/bastion.md §9 end to end, in a sandbox — an operator account with its own
 * home on this machine (ssh reads ~/.ssh from the password database, not $HOME), the CLI on its
 * PATH as `mkoverlay`, the fleet config and registry in ~/fleet, a real sshd on 127.0.0.1 as the
 * bastion `eu` (its host key pinned in the config) and a real sshd holding a gateway's overlay
 * host key on that gateway's tunnel port on the bastion's loopback. The bastion's administrator
 * runs the account recipe as root; the operator runs theirs and reaches the gateway through
 * the bastion with strict host key checking, knowing nothing but what the recipe did.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { requires, root } from "./helpers/capability.js";
import { tunnelArgv } from "./helpers/device.js";
import { makeDisk, makeRootTree } from "./helpers/disk.js";
import { postgresForTests } from "./helpers/postgres.js";
import { freePort, startSshd, type Sshd } from "./helpers/sshd.js";
import { CLI, extract, readPub, REPO, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

interface Block {
  file: string;
  line: number;
  lang: string;
  name?: string;
  text: string;
}

const SHELL = new Set(["sh", "bash", "shell", "console", "zsh"]);
const FILES = ["README.md", ...readdirSync(join(REPO, "docs")).filter((f) => f.endsWith(".md")).sort().map((f) => `docs/${f}`)];

function blocks(): Block[] {
  const out: Block[] = [];
  for (const file of FILES) {
    const lines = readFileSync(join(REPO, file), "utf8").split("\n");
    for (let i = 0; i < lines.length; i++) {
      const open = /^(\s*)```(.*)$/.exec(lines[i]!);
      if (!open) continue;
      const end = lines.findIndex((l, j) => j > i && l.trim() === "```");
      if (end < 0) throw new Error(`${file}:${i + 1}: a fence that is never closed`);
      let prev = i - 1;
      while (prev >= 0 && lines[prev]!.trim() === "") prev--;
      const marker = prev >= 0 ? /^<!-- tested: (.+?) -->$/.exec(lines[prev]!.trim()) : null;
      out.push({ file, line: i + 1, lang: open[2]!.trim(), ...(marker ? { name: marker[1]! } : {}), text: lines.slice(i + 1, end).join("\n") + "\n" });
      i = end;
    }
  }
  return out;
}

/**
 * Every shell recipe, by its marker: where it is, and which test runs it. `here` names a test
 * in this file; `by` a test in another file that reads the block by its marker.
 */
const RECIPES: Record<string, { file: string } & ({ here: string } | { by: string; test: string; reads?: string })> = {
  "build one overlay": { file: "README.md", here: "README: one overlay built in a fleet folder, as written" },
  "operator certificates": { file: "README.md", here: "README: an operator certificate, issued as written, logs in to a device built with the userCA" },
  "registry migrate": { file: "README.md", here: "README: the registry moves to PostgreSQL at db.factory.lan, as written" },
  "image and flash": { file: "README.md", here: "README: an image from a Raspberry Pi OS base, flashed with bmaptool onto /dev/sdX, as written" },
  "lay over a mounted card": { file: "README.md", here: "README: the archive laid over a card's root mounted from /dev/sdX2, as written" },
  "batch and write": { file: "README.md", here: "README: 50 images from BASE.img, then the archive written onto /dev/sdX and into card.img, as written" },
  "factory shift": { file: "README.md", here: "README: a factory shift of five rows flashed onto /dev/sdb … /dev/sde, then found complete by batch, as written" },
  "file export": { file: "docs/bastion.md", here: "§8: the recipe, as root on a fresh bastion, lets a device's tunnel in" },
  "bastion operator account": { file: "docs/bastion.md", here: "the bastion's administrator creates the operator's account, as written" },
  "operator ssh config": { file: "docs/bastion.md", here: "the operator reaches gw-0001 through the bastion with strict host key checking, as written" },
  "pi-gen 00-run.sh": { file: "docs/image-builders.md", by: "test/image-builders.test.ts", test: "pi-gen: the stage's 00-run.sh lays the archive over ROOTFS_DIR; verify passes" },
  "rpi-image-gen layer/mkoverlay.yaml": { file: "docs/image-builders.md", by: "test/image-builders.test.ts", test: "rpi-image-gen: the layer's customize hook lays the archive over $1; verify passes" },
  "rootfs-mounted hook": { file: "README.md", by: "test/provisioner.test.ts", test: "a new serial: a device is built into the image's root, recorded with its serial; the image verifies" },
  "example base.img": { file: "docs/image-builders.md", by: "test/example-base.test.ts", test: "runs as written, as an ordinary user, and makes a Raspberry Pi OS-shaped disk" },
  "next host key": { file: "docs/bastion.md", by: "test/rollover.test.ts", test: "switched to the next key: the device built with it reconnects unchanged; the pinned one is refused" },
  "host certificate": { file: "docs/bastion.md", by: "test/rollover.test.ts", test: "switched to a new key certified by the host CA: the device reconnects unchanged; the pinned one is refused" },
  // The boot test finds this block by its --registry argument, not by the marker.
  "bastion install, SQLite": {
    file: "docs/bastion.md",
    by: "test/boot/bastion-boot.test.ts",
    test: "installs as docs/bastion.md says, on the running system: agent active, sshd reloaded",
    reads: "--registry /var/lib/mkoverlay/fleet.db",
  },
  // The lockout test finds this block as the first sh block of §13, checked by its command.
  "rotate old settings": {
    file: "docs/bastion.md",
    by: "test/lockout.test.ts",
    test: "rotates every device that still dials an old setting, and only those",
    reads: "registry list --old-settings",
  },
  "buildroot mkoverlay-fakeroot.sh": {
    file: "docs/image-builders.md",
    by: "test/image-builders.test.ts",
    test: "the post-fakeroot script, then mke2fs -d in the same session: the image's root holds the overlay as root:root; verify passes",
  },
  // Recipes that act on a whole machine: run in sandboxes of their own (mount and network namespaces).
  "quick start": { file: "README.md", by: "test/recipes-live.test.ts", test: "README.md: from a fresh clone to a verified overlay, the bastion's key pinned from its sshd" },
  "bastion install, README": { file: "README.md", by: "test/recipes-live.test.ts", test: "README.md: installs from ./mkoverlay.yaml with the agent's PostgreSQL role; a device's tunnel logs in" },
  "bastion install": { file: "docs/bastion.md", by: "test/recipes-live.test.ts", test: "docs/bastion.md: installs from fleet.yaml with the agent's PostgreSQL role; a device's tunnel logs in" },
  "troubleshooting": { file: "docs/bastion.md", by: "test/recipes-live.test.ts", test: "docs/bastion.md troubleshooting: the tunnel's port, the registry, the keys command for gw-0001's key, sshd's settings" },
  "prometheus textfile": { file: "docs/bastion.md", by: "test/recipes-live.test.ts", test: "docs/bastion.md: the status of every device, written whole into node_exporter's textfile folder" },
};

const ALL = blocks();
const shellBlocks = ALL.filter((b) => SHELL.has(b.lang));
const byName = (name: string): Block => {
  const b = ALL.find((x) => x.name === name);
  if (!b) throw new Error(`no block marked <!-- tested: ${name} -->`);
  return b;
};

describe("every fenced block in README.md and docs/ is accounted for", () => {
  it("every fence names its language (example output is `text`, never a bare fence)", () => {
    expect(ALL.filter((b) => b.lang === "").map((b) => `${b.file}:${b.line}`)).toEqual([]);
  });

  it("every shell block is marked <!-- tested: NAME --> and NAME is in the table", () => {
    const unmarked = shellBlocks.filter((b) => b.name === undefined || !(b.name in RECIPES)).map((b) => `${b.file}:${b.line} (${b.name ?? "no marker"})`);
    expect(unmarked, "add <!-- tested: NAME --> before the block and a row in RECIPES naming the test that runs it").toEqual([]);
  });

  it("every table row has its block, in the file it names", () => {
    for (const [name, r] of Object.entries(RECIPES)) expect(byName(name).file, name).toBe(r.file);
    const names = ALL.flatMap((b) => (b.name ? [b.name] : []));
    expect(names.filter((n, i) => names.indexOf(n) !== i), "a marker names one block").toEqual([]);
  });

  it("every shell block passes shellcheck (warnings; a person types a failing cd and sees it)", () => {
    for (const b of shellBlocks) {
      const r = run("shellcheck", ["-S", "warning", "-s", "bash", "-e", "SC2164", "-"], { input: b.text });
      expect(r.code, `${b.file}:${b.line} (${b.name ?? "no marker"}): ${r.stdout}${r.stderr}`).toBe(0);
    }
  });

  it("a block run by another test: that test exists and reads the block by its marker", () => {
    for (const [name, r] of Object.entries(RECIPES)) {
      if (!("by" in r)) continue;
      const src = readFileSync(join(REPO, r.by), "utf8");
      expect(src, `${r.by} has the test "${r.test}"`).toContain(JSON.stringify(r.test));
      expect(src, `${r.by} reads ${r.file}`).toContain(r.file);
      const key = r.reads ?? name;
      expect(src, `${r.by} finds the block "${name}" by ${JSON.stringify(key)}`).toContain(r.reads !== undefined ? key : JSON.stringify(key));
      if (r.reads !== undefined) expect(byName(name).text, `the block "${name}" holds ${JSON.stringify(key)}`).toContain(key);
    }
  });
});

describe("README: the build", () => {
  it("README: one overlay built in a fleet folder, as written", () => {
    const dir = tempDir("mko-recipe-build-");
    try {
      const bin = join(dir, "bin");
      mkdirSync(bin);
      symlinkSync(CLI, join(bin, "mkoverlay"));
      writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
      const r = spawnSync("bash", ["-e", "-c", byName("build one overlay").text], {
        cwd: dir,
        encoding: "utf8",
        env: { PATH: `${bin}:${dirname(process.execPath)}:/usr/sbin:/usr/bin:/sbin:/bin`, HOME: dir, LANG: "C.UTF-8" },
      });
      expect(r.status, r.stderr).toBe(0);
      expect(statSync(join(dir, "out/gw-0001.overlay.tar.gz")).mode & 0o777).toBe(0o600);
      expect(runCli(["registry", "list"], { cwd: dir }).stdout).toMatch(/gw-0001/);
    } finally {
      removeDir(dir);
    }
  });
});

describe("README: operator certificates", () => {
  it("README: an operator certificate, issued as written, logs in to a device built with the userCA", async () => {
    const t = tempDir("mko-recipe-cert-");
    let sshd: Sshd | undefined;
    try {
      const home = join(t, "home");
      const work = join(t, "work");
      mkdirSync(join(home, ".ssh"), { recursive: true });
      mkdirSync(work);
      const opKey = sshKeygen(join(home, ".ssh"), "id_ed25519");
      // The person typing the passphrases: ssh-keygen asks SSH_ASKPASS when stdin is no terminal.
      const askpass = join(t, "askpass");
      writeFileSync(askpass, "#!/bin/sh\necho 'correct horse battery staple'\n", { mode: 0o755 });
      const r = spawnSync("bash", ["-e", "-c", byName("operator certificates").text], {
        cwd: work,
        encoding: "utf8",
        stdio: ["ignore", "pipe", "pipe"],
        env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", HOME: home, SSH_ASKPASS: askpass, SSH_ASKPASS_REQUIRE: "force", DISPLAY: ":0" },
      });
      expect(r.status, r.stderr).toBe(0);
      const cert = `${opKey}-cert.pub`;
      const info = run("ssh-keygen", ["-L", "-f", cert]).stdout;
      expect(info).toMatch(/Key ID: "alice@example\.com"/);
      expect(info).toMatch(/Principals: *\n\s+fleet-ops\n/);
      // The CA is kept with a passphrase (it asked): without it, it cannot sign.
      expect(run("ssh-keygen", ["-y", "-P", "", "-f", join(work, "fleet_ca")]).code).not.toBe(0);
      // A device built with the CA and the principal lets the certificate in, as root.
      writeFleet(work, { eu: { hostKeys: [readPub(sshKeygen(t, "bastion"))] } }, { operators: { user: "root", userCA: readFileSync(join(work, "fleet_ca.pub"), "utf8").trim(), principals: ["fleet-ops"] } });
      const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: work });
      expect(b.code, b.stderr).toBe(0);
      const root = join(t, "root");
      mkdirSync(root);
      extract((JSON.parse(b.stdout) as { overlay: string }).overlay, root);
      const dropins = readdirSync(join(root, "etc/ssh/sshd_config.d"))
        .map((f) => readFileSync(join(root, "etc/ssh/sshd_config.d", f), "utf8").replace(/\/etc\/ssh\/mkoverlay\//g, `${root}/etc/ssh/mkoverlay/`))
        .join("\n");
      sshd = await startSshd({ dir: join(t, "device"), authorizedKeys: {}, extraConfig: dropins.replace(/^HostKey .*$/gm, "") });
      const login = run("ssh", ["-F", "none", "-p", String(sshd.port), "-i", opKey, "-o", `CertificateFile=${cert}`, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "root@127.0.0.1", "echo", "logged-in"]);
      expect(login.code, login.stderr).toBe(0);
      expect(login.stdout.trim()).toBe("logged-in");
    } finally {
      await sshd?.stop();
      removeDir(t);
    }
  });
});

/** The operator's account on this machine (their workstation) and on the bastion, as the recipe names it. */
const WORKSTATION_USER = "mko-recipe-op";
const BASTION_USER = "alice";
const exists = (user: string): boolean => spawnSync("id", [user]).status === 0;

// Root: the recipes create accounts (the bastion's administrator's part) and run as another
// user (the operator's). In CI a machine without root fails here rather than skipping.
requires(root)("docs/bastion.md §9, end to end on real sshds", () => {
  const dir = tempDir("mko-recipes-");
  const home = join(dir, "home");
  const fleet = join(home, "fleet");
  const bin = join(dir, "bin");
  const sshds: Sshd[] = [];
  let device = { hostname: "", port: 0, overlay: "" };
  let uid = 0;
  let made: string[] = [];

  /** Runs `script` with bash -e as written: as root (the bastion's administrator) or as the operator. */
  function sh(script: string, as: "root" | "operator", cwd: string): { code: number; stdout: string; stderr: string } {
    const env = { PATH: `${bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, HOME: as === "root" ? dir : home, LANG: "C.UTF-8" };
    const argv = ["bash", "-e", "-c", script];
    const cmd = as === "root" ? argv : ["setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", ...argv];
    const r = spawnSync(cmd[0]!, cmd.slice(1), { cwd, env, encoding: "utf8", timeout: 60_000, stdio: ["ignore", "pipe", "pipe"] });
    return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }

  beforeAll(async () => {
    for (const u of [WORKSTATION_USER, BASTION_USER]) if (exists(u)) throw new Error(`user ${u} exists on this machine: the recipe test would take it over; remove it or run elsewhere`);
    // The operator's workstation account: a home of its own, an ed25519 key, nothing else.
    mkdirSync(join(home, ".ssh"), { recursive: true });
    for (let d = dir; d !== dirname(d); d = dirname(d)) chmodSync(d, (statSync(d).mode & 0o7777) | 0o001);
    chmodSync(dir, 0o755);
    const u = run("useradd", ["--no-create-home", "--home-dir", home, "--shell", "/bin/sh", WORKSTATION_USER]);
    if (u.code !== 0) throw new Error(`useradd: ${u.stderr}`);
    made.push(WORKSTATION_USER);
    uid = Number(run("id", ["-u", WORKSTATION_USER]).stdout.trim());
    const opKey = sshKeygen(join(home, ".ssh"), "id_ed25519");
    // `mkoverlay` on the PATH, as npm link puts it; the checkout readable by the operator.
    mkdirSync(bin);
    symlinkSync(CLI, join(bin, "mkoverlay"));
    symlinkSync(process.execPath, join(bin, "node"));
    for (let d = REPO; d !== dirname(d); d = dirname(d)) chmodSync(d, (statSync(d).mode & 0o7777) | 0o001);
    // The bastion: a real sshd whose host key the fleet config pins; its accounts use
    // ~/.ssh/authorized_keys as a stock sshd does.
    const bastion = await startSshd({ dir: join(dir, "bastion"), authorizedKeys: {}, extraConfig: "Match User *\n    AuthorizedKeysFile .ssh/authorized_keys\n" });
    sshds.push(bastion);
    const [sshPort, svcPort] = [await freePort(), await freePort()];
    mkdirSync(fleet);
    writeFleet(fleet, { eu: { host: "127.0.0.1", port: bastion.port, hostKeys: [bastion.hostKeyPub], jumpUser: BASTION_USER } }, {
      ports: { ssh: `${sshPort}-${sshPort}`, services: `${svcPort}-${svcPort}` },
      operators: { user: "root", authorizedKeys: [readPub(opKey)] },
    });
    const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: fleet });
    expect(b.code, b.stderr).toBe(0);
    device = JSON.parse(b.stdout);
    expect(device.hostname).toBe("gw-0001");
    // The gateway: its overlay's host key, on its tunnel port on the bastion's loopback (where
    // its reverse tunnel publishes it), letting in the fleet's operator key for root.
    const root = join(dir, "gw-root");
    mkdirSync(root);
    extract(device.overlay, root);
    sshds.push(await startSshd({ dir: join(dir, "gw"), port: device.port, hostKey: join(root, "etc/ssh/mkoverlay/ssh_host_ed25519_key"), authorizedKeys: { root: readPub(opKey) + "\n" } }));
    // The operator's files are theirs; the public key goes to the bastion's administrator.
    writeFileSync(join(dir, "alice.pub"), readFileSync(`${opKey}.pub`));
    run("chown", ["-R", `${WORKSTATION_USER}:`, home]);
  });

  afterAll(async () => {
    for (const s of sshds) await s.stop();
    // Only what this test made: the accounts (and alice's home) and the sandbox.
    if (made.includes(BASTION_USER) || exists(BASTION_USER)) run("userdel", ["-r", BASTION_USER]);
    if (made.includes(WORKSTATION_USER)) run("userdel", [WORKSTATION_USER]);
    made = [];
    removeDir(dir);
  });

  it("before the recipe the operator cannot reach gw-0001 (nothing is configured by accident)", () => {
    const r = sh("ssh -o BatchMode=yes gw-0001 hostname", "operator", home);
    expect(r.code).toBe(255);
  });

  it("the bastion's administrator creates the operator's account, as written", () => {
    const r = sh(byName("bastion operator account").text, "root", dir);
    made.push(BASTION_USER);
    expect(r.code, r.stderr).toBe(0);
    // No shell, no password, the operator's key: a jump account only.
    expect(run("getent", ["passwd", BASTION_USER]).stdout).toMatch(/:\/usr\/sbin\/nologin\n$/);
    expect(readFileSync(`/home/${BASTION_USER}/.ssh/authorized_keys`, "utf8")).toBe(readFileSync(join(dir, "alice.pub"), "utf8"));
  });

  it("the operator reaches gw-0001 through the bastion with strict host key checking, as written", () => {
    const recipe = byName("operator ssh config").text;
    const r = sh(recipe, "operator", fleet);
    expect(r.code, r.stderr).toBe(0);
    // `ssh gw-0001 hostname` ran on the gateway's sshd: its host key was verified (no prompt, no
    // "Permanently added"), through alice@ the bastion.
    expect(r.stdout.trim()).toBe(run("hostname", []).stdout.trim());
    expect(r.stderr).not.toMatch(/Permanently added|Warning/);
    const log = readFileSync(sshds[1]!.logFile, "utf8");
    expect(log).toMatch(/Accepted publickey for root from 127\.0\.0\.1/);
    expect(readFileSync(sshds[0]!.logFile, "utf8")).toMatch(new RegExp(`Accepted publickey for ${BASTION_USER} from 127\\.0\\.0\\.1`));
    // Again (after a build, say): the Include is there once, and it still works.
    const again = sh(recipe, "operator", fleet);
    expect(again.code, again.stderr).toBe(0);
    expect(readFileSync(join(home, ".ssh/config"), "utf8").match(/^Include config\.d\/gateways$/gm)).toHaveLength(1);
  });

  it("strictly: a gateway whose key is not the pinned one is refused, with the operator's files as the recipe left them", () => {
    const kh = join(home, ".ssh/mkoverlay_known_hosts");
    const good = readFileSync(kh, "utf8");
    const other = readPub(sshKeygen(dir, "impostor")).split(" ").slice(0, 2).join(" ");
    try {
      writeFileSync(kh, good.replace(/^gw-0001 .*$/m, `gw-0001 ${other}`));
      const r = sh("ssh gw-0001 hostname", "operator", fleet);
      expect(r.code).toBe(255);
      expect(r.stderr).toMatch(/REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed/);
    } finally {
      writeFileSync(kh, good);
    }
  });
});

/**
 * The driver for §8: a private mount namespace in which /etc (and /var/log) are copies, so the
 * recipe's useradd, install and sshd_config.d write into the copy and nothing on this machine
 * changes; the machine's own sshd_config (its Include of sshd_config.d, UsePAM) as a bastion's
 * is, with a fresh host key; `systemctl reload ssh` is this sshd's SIGHUP (the sandbox's init).
 */
const DRIVER = String.raw`set -eu
cp -a /etc "$T/etc"; mount --bind "$T/etc" /etc
mkdir "$T/log"; mount --bind "$T/log" /var/log
# A fresh bastion: no tunnel user, nothing of mkoverlay's, its own host key.
if id reverse-ssh >/dev/null 2>&1; then userdel reverse-ssh; fi
rm -rf /etc/ssh/authorized_keys.d /etc/ssh/sshd_config.d/60-mkoverlay-bastion-eu.conf /etc/ssh/ssh_host_*
install -m 0600 "$T/hk" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$T/hk.pub" /etc/ssh/ssh_host_ed25519_key.pub
mkdir -p /run/sshd
/usr/sbin/sshd -D -o Port="$P" -o ListenAddress=127.0.0.1 -o PidFile="$T/sshd.pid" -E "$T/sshd.log" &
spid=$!
tpid=
stop() { [ -z "$tpid" ] || kill "$tpid" 2>/dev/null || true; pkill -KILL -P "$spid" 2>/dev/null || true; kill "$spid" 2>/dev/null || true; }
trap stop EXIT
up() { for _ in $(seq 100); do if (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi; sleep 0.1; done; echo "nothing listens on $1" >&2; return 1; }
up "$P"
echo "$spid" > "$T/sshd.pid"
# The recipe, as written, from the fleet folder.
(cd "$FLEET" && PATH="$T/bin:$PATH" bash -e "$T/recipe.sh")
sleep 1; up "$P"
# The device's tunnel, as its unit runs it: up when its port listens on the bastion.
bash "$T/tunnel.sh" 2>"$T/tunnel.err" & tpid=$!
up "$DEVPORT"
echo TUNNEL-UP
`;

requires(root)("docs/bastion.md §8 in a private copy of /etc, on the machine's own sshd_config", () => {
  it("§8: the recipe, as root on a fresh bastion, lets a device's tunnel in", async () => {
    const t = tempDir("mko-recipe-export-");
    try {
      const fleet = join(t, "fleet");
      mkdirSync(fleet);
      const hk = sshKeygen(t, "hk");
      const [p, sshPort, svcPort] = [await freePort(), await freePort(), await freePort()];
      writeFleet(fleet, { eu: { host: "127.0.0.1", port: p, hostKeys: [readPub(hk)] } }, { ports: { ssh: `${sshPort}-${sshPort}`, services: `${svcPort}-${svcPort}` } });
      const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: fleet });
      expect(b.code, b.stderr).toBe(0);
      const dev = JSON.parse(b.stdout) as { hostname: string; port: number; overlay: string };
      const root = join(t, "gw-root");
      mkdirSync(root);
      extract(dev.overlay, root);
      const q = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;
      writeFileSync(join(t, "tunnel.sh"), `exec ${tunnelArgv(root, "eu", dev.hostname).map(q).join(" ")}\n`);
      writeFileSync(join(t, "recipe.sh"), byName("file export").text);
      const bin = join(t, "bin");
      mkdirSync(bin);
      symlinkSync(CLI, join(bin, "mkoverlay"));
      symlinkSync(process.execPath, join(bin, "node"));
      writeFileSync(join(bin, "systemctl"), `#!/bin/sh\n# The sandbox's init: reload ssh is SIGHUP to its sshd.\n[ "$*" = "reload ssh" ] || { echo "systemctl $*: not in this sandbox" >&2; exit 1; }\nkill -HUP "$(cat ${q(join(t, "sshd.pid"))})"\n`, { mode: 0o755 });
      const r = spawnSync("unshare", ["--mount", "--propagation", "private", "bash", "-c", DRIVER], {
        encoding: "utf8",
        timeout: 90_000,
        env: { ...process.env, T: t, P: String(p), FLEET: fleet, DEVPORT: String(dev.port) },
      });
      const log = (f: string) => (existsSync(join(t, f)) ? readFileSync(join(t, f), "utf8") : "");
      expect(r.status, `${r.stderr}\n${log("tunnel.err")}\n${log("sshd.log")}`).toBe(0);
      expect(r.stdout).toContain("TUNNEL-UP");
      expect(log("sshd.log")).toMatch(/Accepted publickey for reverse-ssh from 127\.0\.0\.1/);
    } finally {
      removeDir(t);
    }
  });
});

// The recipe names db.factory.lan on PostgreSQL's port: a private /etc/hosts (mount namespace)
// points the name at 127.0.0.1 and PGPORT at the test server's port (the URL names none).
requires(root)("README: registry migrate to PostgreSQL", () => {
  it("README: the registry moves to PostgreSQL at db.factory.lan, as written", async () => {
    const { server } = await postgresForTests();
    if (!server) throw new Error("PostgreSQL could not be started (see above)");
    const t = tempDir("mko-recipe-migrate-");
    try {
      await server.sql("postgres", "CREATE ROLE mkoverlay LOGIN");
      await server.sql("postgres", "CREATE DATABASE fleet OWNER mkoverlay");
      const fleet = join(t, "fleet");
      mkdirSync(fleet);
      writeFleet(fleet, { eu: { hostKeys: [readPub(sshKeygen(t, "bastion"))] } });
      for (let i = 0; i < 2; i++) expect(runCli(["--board", "rpi4", "--bastion", "eu"], { cwd: fleet }).code).toBe(0);
      const bin = join(t, "bin");
      mkdirSync(bin);
      symlinkSync(CLI, join(bin, "mkoverlay"));
      writeFileSync(join(t, "hosts"), `${readFileSync("/etc/hosts", "utf8")}\n127.0.0.1 db.factory.lan\n`);
      writeFileSync(join(t, "recipe.sh"), byName("registry migrate").text);
      const driver = `set -eu\nmount --bind "$T/hosts" /etc/hosts\ncd "$FLEET"\nbash -e "$T/recipe.sh"\n`;
      const r = spawnSync("unshare", ["--mount", "--propagation", "private", "bash", "-c", driver], {
        encoding: "utf8",
        timeout: 60_000,
        env: { PATH: `${bin}:${dirname(process.execPath)}:/usr/sbin:/usr/bin:/sbin:/bin`, HOME: t, T: t, FLEET: fleet, PGPORT: String(server.port) },
      });
      expect(r.status, r.stderr).toBe(0);
      const list = runCli(["registry", "list", "--json"], { cwd: fleet, env: { MKOVERLAY_REGISTRY: server.url("fleet", "mkoverlay") } });
      expect(list.code, list.stderr).toBe(0);
      expect(list.stdout).toMatch(/gw-0001[\s\S]*gw-0002/);
    } finally {
      await server.stop();
      removeDir(t);
    }
  });
});

/**
 * Cards: a private /dev (mount namespace; a tmpfs with null, zero, random, urandom, full and the
 * card's node, made over a loop device of a file) and a private /mnt, so /dev/sdX and
 * /dev/sdX2 are real block devices that exist only for the recipe. `sudo` is the identity (the
 * test runs as root); nothing else is stood in for.
 */
requires(root)("README: images and cards, on loop devices behind a private /dev", () => {
  let t = "";
  const loops: string[] = [];
  beforeAll(() => {
    t = tempDir("mko-recipe-card-");
    const bin = join(t, "bin");
    mkdirSync(bin);
    symlinkSync(CLI, join(bin, "mkoverlay"));
    writeFileSync(join(bin, "sudo"), '#!/bin/sh\n# The test runs as root: sudo runs the command.\nexec "$@"\n', { mode: 0o755 });
  });
  afterAll(() => {
    for (const l of loops) run("losetup", ["-d", l]);
    removeDir(t);
  });

  /** A loop device over `file` (from `offset`, `size` bytes): its path and "major minor". */
  function loop(file: string, offset = 0, size?: number): { dev: string; mm: string } {
    const r = run("losetup", ["-f", "--show", "-o", String(offset), ...(size ? ["--sizelimit", String(size)] : []), file]);
    if (r.code !== 0) throw new Error(`losetup: ${r.stderr}`);
    const dev = r.stdout.trim();
    loops.push(dev);
    const st = statSync(dev);
    return { dev, mm: `${Math.floor(st.rdev / 256) & 0xfff} ${(st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00)}` };
  }

  /** A fleet folder of its own: each recipe starts from gw-0001. */
  function newFleet(name: string): string {
    const fleet = join(t, name);
    mkdirSync(fleet);
    writeFleet(fleet, { eu: { hostKeys: [readPub(sshKeygen(fleet, "bastion"))] } });
    return fleet;
  }

  /**
   * Runs the recipe with `nodes` as /dev/NAME; /sys/class/block is a private copy of links too,
   * NAME linked to its loop device's own sysfs folder (what the kernel would show for a card).
   */
  function recipe(name: string, fleet: string, nodes: Record<string, { dev: string; mm: string }>): void {
    writeFileSync(join(t, "recipe.sh"), byName(name).text);
    const mk = Object.entries(nodes)
      .map(([n, { dev, mm }]) => `mknod "$T/dev/${n}" b ${mm}\nln -s "$(readlink -f /sys/class/block/${basename(dev)})" "$T/sysblock/${n}"`)
      .join("\n");
    const driver = `set -eu
rm -rf "$T/dev"; mkdir "$T/dev"; mount -t tmpfs -o mode=0755 tmpfs "$T/dev"
cp -a /dev/null /dev/zero /dev/random /dev/urandom /dev/full "$T/dev/"
rm -rf "$T/sysblock"; mkdir "$T/sysblock"; mount -t tmpfs tmpfs "$T/sysblock"
for e in /sys/class/block/*; do ln -s "$(readlink -f "$e")" "$T/sysblock/"; done
ln -s /proc/self/fd "$T/dev/fd"; ln -s /proc/self/fd/0 "$T/dev/stdin"; ln -s /proc/self/fd/1 "$T/dev/stdout"; ln -s /proc/self/fd/2 "$T/dev/stderr"
${mk}
mount --bind "$T/dev" /dev
mount --bind "$T/sysblock" /sys/class/block
mount -t tmpfs tmpfs /mnt; mkdir /mnt/rootfs
cd "$FLEET"; bash -e "$T/recipe.sh"
`;
    const r = spawnSync("unshare", ["--mount", "--propagation", "private", "bash", "-c", driver], {
      encoding: "utf8",
      timeout: 120_000,
      env: { PATH: `${join(t, "bin")}:${dirname(process.execPath)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, HOME: t, T: t, FLEET: fleet, LANG: "C.UTF-8" },
    });
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
  }

  it("README: an image from a Raspberry Pi OS base, flashed with bmaptool onto /dev/sdX, as written", () => {
    const fleet = newFleet("fleet-image");
    const tree = join(t, "rootfs");
    makeRootTree(tree);
    const base = makeDisk(join(fleet, "2025-05-13-raspios-bookworm-arm64-lite.img"), tree);
    const card = join(t, "card.raw");
    run("truncate", ["-s", String(statSync(base.path).size), card]);
    recipe("image and flash", fleet, { sdX: loop(card) });
    // The card holds what was flashed: the image, key and registry included.
    const v = runCli(["verify", card], { cwd: fleet });
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it("README: 50 images from BASE.img, then the archive written onto /dev/sdX and into card.img, as written", () => {
    const fleet = newFleet("fleet-batch");
    const tree = join(t, "rootfs3");
    makeRootTree(tree);
    const base = makeDisk(join(fleet, "BASE.img"), tree);
    // A card flashed with the base earlier, and an image of one.
    const card = join(t, "card3.raw");
    copyFileSync(base.path, card);
    copyFileSync(base.path, join(fleet, "card.img"));
    recipe("batch and write", fleet, { sdX: loop(card) });
    expect(readdirSync(join(fleet, "out")).filter((f) => f.endsWith(".img"))).toHaveLength(50);
    for (const written of [card, join(fleet, "card.img")]) {
      const v = runCli(["verify", written], { cwd: fleet });
      expect(v.code, `${written}: ${v.stdout}${v.stderr}`).toBe(0);
      expect(v.stdout).toMatch(/the key is registered to gw-0051/);
    }
  }, 240_000);

  it("README: a factory shift of five rows flashed onto /dev/sdb … /dev/sde, then found complete by batch, as written", () => {
    const fleet = newFleet("fleet-shift");
    const tree = join(t, "rootfs4");
    makeRootTree(tree);
    const base = makeDisk(join(fleet, "BASE.img"), tree);
    const cards = ["sdb", "sdc", "sdd", "sde"].map((n) => {
      const f = join(t, `shift-${n}.raw`);
      run("truncate", ["-s", String(statSync(base.path).size + (1 << 20)), f]);
      return [n, f] as const;
    });
    recipe("factory shift", fleet, Object.fromEntries(cards.map(([n, f]) => [n, loop(f)])));
    const list = runCli(["registry", "list", "--json"], { cwd: fleet });
    const devices = JSON.parse(list.stdout) as { hostname: string; status: string; attributes: Record<string, string> }[];
    expect(devices.map((d) => [d.hostname, d.status, d.attributes.serial])).toEqual(["1", "2", "3", "4", "5"].map((k) => [`pj-000${k}`, "active", `SN000${k}`]));
    // Each card holds its device: sdb the last one written (pj-0005), sdc … sde pj-0002 … pj-0004.
    for (const [k, [, f]] of cards.entries()) {
      const v = runCli(["verify", f], { cwd: fleet });
      expect(v.code, `${f}: ${v.stdout}${v.stderr}`).toBe(0);
      expect(v.stdout).toMatch(new RegExp(`the key is registered to pj-000${k === 0 ? 5 : k + 1}`));
    }
  }, 240_000);

  it("README: the archive laid over a card's root mounted from /dev/sdX2, as written", () => {
    const fleet = newFleet("fleet-card");
    const tree = join(t, "rootfs2");
    makeRootTree(tree);
    const disk = makeDisk(join(t, "card2.img"), tree);
    const b = runCli(["--board", "rpi4", "--bastion", "eu", "--json"], { cwd: fleet });
    expect(b.code, b.stderr).toBe(0);
    expect((JSON.parse(b.stdout) as { overlay: string }).overlay).toBe(join(fleet, "out/gw-0001.overlay.tar.gz"));
    recipe("lay over a mounted card", fleet, { sdX2: loop(disk.path, disk.rootOffset, disk.rootSize) });
    const v = runCli(["verify", disk.path], { cwd: fleet });
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });
});
