/**
 * What `bastion install` trusts (issue 19, items 2, 6, 7, 10, 12), each against the real sshd:
 * the account it is told to use, symlinks inside --root, sshd's access rules, the station's
 * paths, and how the agent is started without systemd.
 */
import { spawnSync } from "node:child_process";
import { appendFileSync, chmodSync, mkdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { accessProblems, accountGroups, loginReasons, readAccount } from "../src/bastion/account.js";
import { RootFs } from "../src/bastion/rootfs.js";
import { parseEffective } from "../src/bastion/sshd-check.js";
import { runningSshdLog } from "../src/bastion/sshd-log.js";
import { isRoot, need, requires, root } from "./helpers/capability.js";
import { cleanup, startBastion, tryLogin } from "./helpers/bastion.js";
import { changed, expectOneError, installInto, installWorkspace, snapshot, type Ws } from "./helpers/install.js";
import { postgresForTests, PW_ROLE } from "./helpers/postgres.js";
import { ensureUser, startSshd } from "./helpers/sshd.js";
import { REPO, run, runCli, tempDir } from "./helpers/workspace.js";

const T = "mko-trust-t";
const dirs: string[] = [];
/** Users this file made on the host, removed at the end. */
const madeUsers: string[] = [];
afterAll(() => {
  for (const u of madeUsers) run("userdel", [u]);
  cleanup(dirs);
});

function hostUser(name: string): void {
  if (spawnSync("id", [name]).status !== 0) madeUsers.push(name);
  ensureUser(name);
}

const ws = (user = T, opts: Parameters<typeof installWorkspace>[2] = {}): Promise<Ws> => installWorkspace(dirs, user, opts);

/** Adds an account to the image's users files. */
function imageAccount(root: string, name: string, o: { uid: number; shell: string; password: string; home?: string }): void {
  appendFileSync(join(root, "etc/passwd"), `${name}:x:${o.uid}:${o.uid}::${o.home ?? "/nonexistent"}:${o.shell}\n`);
  appendFileSync(join(root, "etc/group"), `${name}:x:${o.uid}:\n`);
  appendFileSync(join(root, "etc/shadow"), `${name}:${o.password}:19000:0:99999:7:::\n`);
}

requires(root)("item 2: an existing login account is never taken over silently", () => {
  const cases: [string, string, (root: string) => void, RegExp][] = [
    ["user: root", "root", () => undefined, /the tunnel user 'root' of bastion 'lo' is an existing login account \(uid 0, login shell \/bin\/bash\)/],
    ["an account with a login shell", "mko-sh", (r) => imageAccount(r, "mko-sh", { uid: 990, shell: "/bin/bash", password: "*" }), /'mko-sh' of bastion 'lo' is an existing login account \(login shell \/bin\/bash\)/],
    [
      "an account with a password hash",
      "mko-pw",
      (r) => imageAccount(r, "mko-pw", { uid: 991, shell: "/usr/sbin/nologin", password: "$y$j9T$abcdefghijklmnopqrstu.$0123456789012345678901234567890123456789012" }),
      /'mko-pw' of bastion 'lo' is an existing login account \(a password\)/,
    ],
    [
      "an account with an authorized_keys file",
      "mko-ak",
      (r) => {
        imageAccount(r, "mko-ak", { uid: 992, shell: "/usr/sbin/nologin", password: "*", home: "/home/mko-ak" });
        mkdirSync(join(r, "home/mko-ak/.ssh"), { recursive: true });
        writeFileSync(join(r, "home/mko-ak/.ssh/authorized_keys"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA2b3V2T8yqfK7C0m0m7r0X3n8wK4y0l3j3u2b9qzJ9a admin\n");
      },
      /'mko-ak' of bastion 'lo' is an existing login account \(authorized keys in \/home\/mko-ak\/\.ssh\/authorized_keys\)/,
    ],
    [
      "keys where sshd_config's AuthorizedKeysFile says (read from sshd -T)",
      "mko-ak2",
      (r) => {
        imageAccount(r, "mko-ak2", { uid: 993, shell: "/usr/sbin/nologin", password: "*" });
        appendFileSync(join(r, "etc/ssh/sshd_config"), "AuthorizedKeysFile /etc/ssh/authorized_keys/%u\n");
        mkdirSync(join(r, "etc/ssh/authorized_keys"));
        writeFileSync(join(r, "etc/ssh/authorized_keys/mko-ak2"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA2b3V2T8yqfK7C0m0m7r0X3n8wK4y0l3j3u2b9qzJ9a admin\n");
      },
      /'mko-ak2' of bastion 'lo' is an existing login account \(authorized keys in \/etc\/ssh\/authorized_keys\/mko-ak2\)/,
    ],
  ];
  for (const [what, user, arrange, re] of cases) {
    it(`${what}: refused, naming the account and --take-over-user; nothing changed`, async () => {
      const w = await ws(user);
      arrange(w.root);
      const before = snapshot(w.root);
      const r = installInto(w);
      expectOneError(r, re);
      expect(r.stderr).toContain(`--take-over-user ${user}`);
      expect(changed(before, snapshot(w.root))).toEqual([]);
    });
  }

  it("--take-over-user with the account's name takes it over (a warning); another name is refused", async () => {
    const w = await ws("mko-sh");
    imageAccount(w.root, "mko-sh", { uid: 990, shell: "/bin/bash", password: "*" });
    // sshd lets a user in only if its shell exists (the check says so when it does not).
    mkdirSync(join(w.root, "bin"));
    writeFileSync(join(w.root, "bin/bash"), "", { mode: 0o755 });
    expectOneError(installInto(w, ["--take-over-user", "root"]), /--take-over-user root: the tunnel user of bastion 'lo' is 'mko-sh'/);
    const r = installInto(w, ["--take-over-user", "mko-sh"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/warning: taking over the login account 'mko-sh' \(login shell \/bin\/bash\)/);
  });

  it("an account mkoverlay created earlier is accepted (idempotent re-install); a locked one is refused without PAM", async () => {
    const w = await ws();
    expect(installInto(w).code).toBe(0);
    const again = installInto(w);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/already installed/);
    // useradd's default '!' (locked): sshd refuses it when UsePAM is no (the image's sshd_config).
    writeFileSync(join(w.root, "etc/shadow"), readFileSync(join(w.root, "etc/shadow"), "utf8").replace(new RegExp(`^${T}:\\*:`, "m"), `${T}:!:`));
    expectOneError(installInto(w), new RegExp(`sshd would refuse every tunnel of bastion 'lo' \\(user '${T}'\\): its password is locked`));
  });
});

requires(root)("item 2 on this host (getent, real accounts, sshd -T)", () => {
  it("host accounts: a login shell, a password, keys, root are logins; a tunnel account is not", () => {
    const home = tempDir("mko-home-");
    dirs.push(home);
    const mk = (name: string, args: string[]) => {
      if (spawnSync("id", [name]).status === 0) throw new Error(`${name} exists already`);
      const r = run("useradd", ["--system", "--no-create-home", ...args, name]);
      if (r.code !== 0) throw new Error(r.stderr);
      madeUsers.push(name);
    };
    mk("mko-trust-sh", ["--shell", "/bin/bash", "--home-dir", "/nonexistent", "--password", "*"]);
    mk("mko-trust-pw", ["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent", "--password", "$6$salt$" + "a".repeat(86)]);
    mk("mko-trust-ak", ["--shell", "/usr/sbin/nologin", "--home-dir", home, "--password", "*"]);
    mk("mko-trust-ok", ["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent", "--password", "*"]);
    mkdirSync(join(home, ".ssh"));
    writeFileSync(join(home, ".ssh/authorized_keys"), "# admin\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA2b3V2T8yqfK7C0m0m7r0X3n8wK4y0l3j3u2b9qzJ9a admin\n");
    const fs = new RootFs("/");
    const reasons = (u: string) => loginReasons(fs, readAccount(fs, u)!, ".ssh/authorized_keys .ssh/authorized_keys2");
    expect(reasons("root")[0]).toBe("uid 0");
    expect(reasons("mko-trust-sh")).toEqual(["login shell /bin/bash"]);
    expect(reasons("mko-trust-pw")).toEqual(["a password"]);
    expect(reasons("mko-trust-ak")).toEqual([`authorized keys in ${home}/.ssh/authorized_keys`]);
    expect(reasons("mko-trust-ok")).toEqual([]);
    // sshd's access rules with this host's groups, values as the real sshd -T reports them.
    const cfgDir = tempDir("mko-access-");
    dirs.push(cfgDir);
    const hk = join(cfgDir, "hk");
    run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", hk]);
    writeFileSync(join(cfgDir, "c"), `HostKey ${hk}\nUsePAM no\nAllowGroups adm mko-trust-*\nDenyUsers *-pw\n`);
    const eff = (u: string) => parseEffective(run("/usr/sbin/sshd", ["-T", "-f", join(cfgDir, "c"), "-C", `user=${u},host=x,addr=192.0.2.1`]).stdout);
    const access = (u: string) => accessProblems(fs, eff(u), u, readAccount(fs, u), accountGroups(fs, readAccount(fs, u), u)).refuse;
    expect(access("mko-trust-ok")).toEqual([]);
    expect(access("mko-trust-pw")).toEqual(["DenyUsers *-pw matches 'mko-trust-pw'"]);
    expect(access("root")[0]).toMatch(/^AllowGroups adm mko-trust-\* lists no group of 'root' \(root\)$/);
  });
});

describe("item 6: RootFs resolves a target path inside the root", () => {
  it("follows links as the booted image would, refuses what leaves it, loops and final links", () => {
    const root = tempDir("mko-rootfs-");
    dirs.push(root);
    const fs = new RootFs(root);
    mkdirSync(join(root, "srv/real"), { recursive: true });
    mkdirSync(join(root, "etc"));
    symlinkSync("../srv/real", join(root, "etc/rel")); // relative, stays inside
    symlinkSync("/srv/real", join(root, "etc/abs")); // absolute: from the image's root
    symlinkSync("../../srv", join(root, "etc/up")); // climbs above the root
    symlinkSync("loop-b", join(root, "etc/loop-a"));
    symlinkSync("loop-a", join(root, "etc/loop-b"));
    symlinkSync("/srv/real/f", join(root, "etc/file-link"));
    expect(fs.resolve("/etc/rel/x")).toBe(join(root, "srv/real/x"));
    expect(fs.resolve("/etc/abs/new/dir")).toBe(join(root, "srv/real/new/dir"));
    expect(fs.resolve("/etc/abs/../real/./x")).toBe(join(root, "srv/real/x"));
    expect(() => fs.resolve("/etc/up/x")).toThrow(/\/etc\/up\/x \(in .*\): a symbolic link on the way climbs out of .* with '\.\.'/);
    expect(() => fs.resolve("/etc/loop-a/x")).toThrow(/too many levels of symbolic links/);
    expect(fs.resolve("/etc/file-link")).toBe(join(root, "srv/real/f"));
    expect(() => fs.file("/etc/file-link")).toThrow(/\/etc\/file-link \(in .*\) is a symbolic link \(→ \/srv\/real\/f\)/);
    // On this host "/.." is "/".
    expect(new RootFs("/").resolve("/../etc/hostname")).toBe("/etc/hostname");
  });
});

requires(root)("item 6: every path written under --root stays inside it", () => {
  /** A folder on the host, outside the root, that must stay as it is. */
  function hostDir(): { dir: string; state: () => string } {
    const dir = tempDir("mko-host-");
    dirs.push(dir);
    chmodSync(dir, 0o700);
    writeFileSync(join(dir, "keep"), "host file\n", { mode: 0o600 });
    return { dir, state: () => JSON.stringify([...snapshot(dir)].concat([["mode", (statSync(dir).mode & 0o7777).toString(8)]])) };
  }

  it("an absolute link (/etc/mkoverlay -> /HOSTDIR) is followed inside the image, never on the host", async () => {
    const w = await ws();
    const h = hostDir();
    const before = h.state();
    symlinkSync(h.dir, join(w.root, "etc/mkoverlay"));
    const r = installInto(w);
    expect(r.code, r.stderr).toBe(0);
    expect(h.state()).toBe(before);
    // Where the booted image will read it: the link's target inside the image.
    expect(readFileSync(join(w.root, h.dir, "bastion/lo/agent.env"), "utf8")).toContain("MKOVERLAY_REGISTRY='/var/lib/mkoverlay/registry.db'");
    expect(statSync(join(w.root, h.dir, "bastion/lo/agent.env")).mode & 0o777).toBe(0o600);
  });

  it("an absolute link on an intermediate folder (/var/lib -> /HOSTDIR) is followed inside the image", async () => {
    const w = await ws();
    const h = hostDir();
    const before = h.state();
    // The registry moves with /var/lib (it is read where the link leads, inside the image).
    mkdirSync(join(w.root, h.dir), { recursive: true });
    run("cp", ["-a", join(w.root, "var/lib/."), join(w.root, h.dir)]);
    rmSync(join(w.root, "var/lib"), { recursive: true });
    symlinkSync(h.dir, join(w.root, "var/lib"));
    const r = installInto(w);
    expect(r.code, r.stderr).toBe(0);
    expect(h.state()).toBe(before);
    expect(statSync(join(w.root, h.dir, "mkoverlay/bastion/lo/keys")).mode & 0o777).toBe(0o711);
  });

  const refused: [string, (w: Ws, host: string) => void, RegExp][] = [
    ["a relative link that climbs out with '..'", (w, host) => symlinkSync(`../../../../../../../../..${host}`, join(w.root, "etc/mkoverlay")), /\/etc\/mkoverlay\/bastion.* a symbolic link on the way climbs out of .* with '\.\.'/],
    [
      "a final file that is a symlink (agent.env -> /HOSTDIR/keep)",
      (w, host) => {
        mkdirSync(join(w.root, "etc/mkoverlay/bastion/lo"), { recursive: true });
        symlinkSync(join(host, "keep"), join(w.root, "etc/mkoverlay/bastion/lo/agent.env"));
      },
      /\/etc\/mkoverlay\/bastion\/lo\/agent\.env \(in .*\) is a symbolic link \(→ .*\/keep\): mkoverlay writes its own files only as regular files/,
    ],
    [
      "a users file's backup that is a symlink (/etc/passwd- -> /HOSTDIR/keep: useradd would overwrite it)",
      (w, host) => symlinkSync(join(host, "keep"), join(w.root, "etc/passwd-")),
      /\/etc\/passwd- \(in .*\) is a symbolic link \(→ .*\/keep\): useradd --prefix would follow it on this host/,
    ],
    [
      "a users file that is a symlink (useradd --prefix would follow it on the host)",
      (w, host) => {
        rmSync(join(w.root, "etc/gshadow"));
        symlinkSync(join(host, "keep"), join(w.root, "etc/gshadow"));
      },
      /\/etc\/gshadow \(in .*\) is a symbolic link \(→ .*\/keep\): useradd --prefix would follow it on this host/,
    ],
  ];
  for (const [what, arrange, re] of refused) {
    it(`${what}: refused, nothing changed in the image or on the host`, async () => {
      const w = await ws();
      const h = hostDir();
      const hostBefore = h.state();
      arrange(w, h.dir);
      const before = snapshot(w.root);
      expectOneError(installInto(w), re);
      expect(changed(before, snapshot(w.root))).toEqual([]);
      expect(h.state()).toBe(hostBefore);
    });
  }
});

requires(root)("item 7: sshd's AllowUsers/DenyUsers/AllowGroups/DenyGroups, as the real sshd decides", () => {
  it("each rule that shuts the tunnel user out is refused by name, and the real sshd does refuse the device", async () => {
    hostUser(T);
    // Shared with the other bastion test files (which may run at the same time): left in place, as they leave it.
    ensureUser("mkoverlay-keys");
    const w = await ws();
    expect(installInto(w).code).toBe(0);
    const main = join(w.root, "etc/ssh/sshd_config");
    const original = readFileSync(main, "utf8");
    const login = async () => {
      const b = await startBastion(w.root, "lo", w.ws);
      try {
        return (await tryLogin(w.device)).ok;
      } finally {
        await b.stop();
      }
    };
    expect(await login()).toBe(true);
    const rules: [string, RegExp][] = [
      ["DenyUsers admin mko-trust-*", /DenyUsers mko-trust-\* matches 'mko-trust-t'/],
      ["AllowUsers root admin", /AllowUsers root admin does not list 'mko-trust-t'/],
      [`DenyGroups ${T}`, new RegExp(`DenyGroups ${T} matches a group of '${T}'`)],
      ["AllowGroups wheel adm", /AllowGroups wheel adm lists no group of 'mko-trust-t'/],
    ];
    for (const [rule, re] of rules) {
      writeFileSync(main, `${original}${rule}\n`);
      expect(await login(), rule).toBe(false);
      const before = snapshot(w.root);
      const r = installInto(w);
      expectOneError(r, new RegExp(`sshd would refuse every tunnel of bastion 'lo' \\(user '${T}'\\): .*${re.source}`));
      expect(changed(before, snapshot(w.root))).toEqual([]);
    }
    // Rules that let it in pass; a host-qualified one is a warning.
    writeFileSync(main, `${original}AllowUsers admin mko-trust-*\nDenyUsers mko-trust-t@203.0.113.0/24\n`);
    const ok = installInto(w);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stderr).toMatch(/warning: DenyUsers mko-trust-t@203\.0\.113\.0\/24 refuses tunnels of 'mko-trust-t' from 203\.0\.113\.0\/24/);
    expect(await login()).toBe(true);
  });
});

requires(root)("item 10: no station path in an image; per-bastion settings per instance; --dry-run", () => {
  it("--root without --mkoverlay or --registry is refused, naming the flag", async () => {
    const w = await ws();
    const before = snapshot(w.root);
    const bare = (extra: string[]) => runCli(["bastion", "install", "--bastion", "lo", "--root", w.root, "--config", w.cfg, ...extra], { cwd: w.ws });
    expectOneError(bare(["--registry", "/var/lib/mkoverlay/registry.db"]), /--root: give --mkoverlay PATH, mkoverlay's executable as the bastion will run it/);
    expectOneError(bare(["--mkoverlay", "/usr/local/bin/mkoverlay"]), /--root: give --registry LOCATION, the registry as the bastion's agent will reach it/);
    expectOneError(bare(["--mkoverlay", "/usr/local/bin/mkoverlay", "--registry", "registry.db"]), /--registry registry\.db: with --root, give the registry file's absolute path on the bastion/);
    expect(changed(before, snapshot(w.root))).toEqual([]);
  });

  it("nothing of the station is written into the image", async () => {
    const w = await ws();
    const r = installInto(w, ["--json"]);
    expect(r.code, r.stderr).toBe(0);
    const written = (JSON.parse(r.stdout) as { written: string[] }).written.filter((p) => !p.includes(" → "));
    expect(written.length).toBeGreaterThan(5);
    for (const p of written) {
      const text = readFileSync(join(w.root, p), "utf8");
      for (const station of [w.ws, REPO, process.execPath]) expect(text, p).not.toContain(station);
    }
    const exec = readFileSync(join(w.root, "etc/systemd/system/mkoverlay-bastion@lo.service.d/40-exec.conf"), "utf8");
    expect(exec).toMatch(/^ExecStart=\/usr\/local\/bin\/mkoverlay bastion agent --bastion %i --config \/etc\/mkoverlay\/bastion\/%i\/fleet\.yaml \$MKOVERLAY_AGENT_ARGS$/m);
    expect(readFileSync(join(w.root, "etc/systemd/system/mkoverlay-bastion@lo.service.d/50-registry.conf"), "utf8")).toMatch(/^ReadWritePaths=\/var\/lib\/mkoverlay$/m);
  });

  it("installing bastion B changes neither the shared template nor what bastion A runs", async () => {
    const w = await ws(T, { more: { lo2: "mko-trust-u" } });
    expect(installInto(w, ["--mkoverlay", "/opt/a/mkoverlay"]).code).toBe(0);
    const unit = (p: string) => readFileSync(join(w.root, "etc/systemd/system", p), "utf8");
    const [template, a] = [unit("mkoverlay-bastion@.service"), unit("mkoverlay-bastion@lo.service.d/40-exec.conf")];
    const rb = installInto(w, ["--mkoverlay", "/opt/b/mkoverlay"], "lo2");
    expect(rb.code, rb.stderr).toBe(0);
    expect(unit("mkoverlay-bastion@.service")).toBe(template);
    expect(unit("mkoverlay-bastion@lo.service.d/40-exec.conf")).toBe(a);
    expect(a).toContain("ExecStart=/opt/a/mkoverlay bastion agent");
    expect(unit("mkoverlay-bastion@lo2.service.d/40-exec.conf")).toContain("ExecStart=/opt/b/mkoverlay bastion agent");
    expect(template).not.toMatch(/^ExecStart=/m);
  });

  it("--dry-run prints a unified diff of what would change and changes nothing (no user, no file)", async () => {
    const w = await ws();
    const before = snapshot(w.root);
    const d1 = installInto(w, ["--dry-run"]);
    expect(d1.code, d1.stderr).toBe(0);
    expect(changed(before, snapshot(w.root))).toEqual([]);
    expect(d1.stdout).toContain(`# would create system user ${T}\n# would create system user mkoverlay-keys\n`);
    expect(d1.stdout).toContain(`--- /dev/null\n+++ /etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf\n@@ -0,0 +1,`);
    expect(d1.stdout).toMatch(new RegExp(`^\\+Match User ${T}$`, "m"));
    expect(d1.stdout).toContain("# would link /etc/systemd/system/multi-user.target.wants/mkoverlay-bastion@lo.service → /etc/systemd/system/mkoverlay-bastion@.service\n");
    expect(d1.stdout).toContain("# would fill /var/lib/mkoverlay/bastion/lo/keys from the registry: 1 key(s)\n");
    expect(d1.stderr).toMatch(/dry run: nothing was changed/);
    // The checks run as for a real install: a refusal is a refusal.
    expectOneError(installInto(w, ["--dry-run", "--no-create-user"]), /the tunnel user 'mko-trust-t' of bastion 'lo' does not exist/);

    expect(installInto(w).code).toBe(0);
    const d2 = installInto(w, ["--dry-run"]);
    expect(d2.code, d2.stderr).toBe(0);
    expect(d2.stdout).toBe("");
    expect(d2.stderr).toMatch(/dry run: already installed, nothing would change/);

    const text = JSON.parse(readFileSync(w.cfg, "utf8")) as Record<string, unknown>;
    text.forwards = [{ name: "salt", type: "local", bastion: "lo", listen: 4505, to: "localhost:4505" }];
    writeFileSync(w.cfg, JSON.stringify(text, null, 2));
    const installed = snapshot(w.root);
    const d3 = installInto(w, ["--dry-run", "--json"]);
    expect(d3.code, d3.stderr).toBe(0);
    const j = JSON.parse(d3.stdout) as { dryRun: boolean; written: string[]; diff: string };
    expect(j.dryRun).toBe(true);
    expect(j.written).toEqual(["/etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf", "/etc/mkoverlay/bastion/lo/fleet.yaml"]);
    expect(j.diff).toContain("--- /etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf\n+++ /etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf\n");
    expect(j.diff).toMatch(/^- {4}PermitOpen none\n/m);
    expect(j.diff).toMatch(/^\+ {4}PermitOpen localhost:4505\n/m);
    expect(changed(installed, snapshot(w.root))).toEqual([]);
  });
});

const { server: pg } = isRoot ? await postgresForTests() : { server: undefined };
afterAll(async () => pg?.stop());

requires(root, need(pg, "PostgreSQL (scripts/ensure-postgres.sh)"))("--dry-run never prints a registry password", () => {
  it("agent.env's diff shows the URL with *** for the password, in text and JSON", async () => {
    const url = await pg!.createDatabase();
    const db = new URL(url).pathname.slice(1);
    await pg!.sql("postgres", `ALTER DATABASE ${db} OWNER TO ${PW_ROLE.user}`);
    const w = await ws();
    const registry = ["--registry", pg!.url(db, PW_ROLE.user, PW_ROLE.password)];
    for (const extra of [[], ["--json"]]) {
      const r = installInto(w, ["--dry-run", ...registry, ...extra]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout + r.stderr).not.toContain(PW_ROLE.password);
      expect(r.stdout).toContain(`MKOVERLAY_REGISTRY='postgres://${PW_ROLE.user}:***@127.0.0.1:`);
    }
  });
});

requires(root)("item 12: without systemd, the exact agent command", () => {
  const expected = (authLog: string) =>
    `sh -c 'set -a; . /etc/mkoverlay/bastion/lo/agent.env; if [ -f /etc/mkoverlay/bastion/lo/local.env ]; then . /etc/mkoverlay/bastion/lo/local.env; fi; set +a; exec /usr/local/bin/mkoverlay bastion agent --bastion lo --config /etc/mkoverlay/bastion/lo/fleet.yaml --auth-log ${authLog}'`;

  it("an image without systemd whose sshd logs with -E: the command with --auth-log FILE, and it runs", async () => {
    const w = await ws();
    mkdirSync(join(w.root, "etc/default"), { recursive: true });
    writeFileSync(join(w.root, "etc/default/ssh"), '# Options to pass to sshd\nSSHD_OPTS="-E /var/log/sshd.log"\n');
    const r = installInto(w);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/has no systemd: start the agent with this command/);
    expect(r.stderr).toContain(`\nmkoverlay:   ${expected("/var/log/sshd.log")}\n`);
    expect((JSON.parse(installInto(w, ["--json"]).stdout) as { agentCommand: string }).agentCommand).toBe(expected("/var/log/sshd.log"));
    // Run as printed (the image's paths moved under the root; mkoverlay replaced by a probe).
    writeFileSync(join(w.root, "usr/local/bin/mkoverlay"), '#!/bin/sh\necho "$MKOVERLAY_REGISTRY|$MKOVERLAY_CACHE|$*"\n', { mode: 0o755 });
    const cmd = expected("/var/log/sshd.log").replaceAll("/etc/mkoverlay/", `${w.root}/etc/mkoverlay/`).replace("exec /usr/local/bin/", `exec ${w.root}/usr/local/bin/`);
    const out = run("sh", ["-c", cmd]);
    expect(out.code, out.stderr).toBe(0);
    expect(out.stdout).toBe(`/var/lib/mkoverlay/registry.db|off|bastion agent --bastion lo --config ${w.root}/etc/mkoverlay/bastion/lo/fleet.yaml --auth-log /var/log/sshd.log\n`);
  });

  it("an image without systemd whose sshd logs to syslog: --auth-log none, and why", async () => {
    const w = await ws();
    const r = installInto(w);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`\nmkoverlay:   ${expected("none")}\n`);
    expect(r.stderr).toMatch(/sshd does not log to a file \(-E FILE\) here/);
  });

  it("an image with systemd: enabled, no command", async () => {
    const w = await ws();
    mkdirSync(join(w.root, "lib/systemd"), { recursive: true });
    writeFileSync(join(w.root, "lib/systemd/systemd"), "", { mode: 0o755 });
    const r = installInto(w);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/on first boot systemd starts mkoverlay-bastion@lo\.service/);
    expect(r.stderr).not.toContain("sh -c");
  });

  it("this host: the -E file of the running sshd that reads the config, from its command line", async () => {
    const dir = tempDir("mko-sshd-e-");
    dirs.push(dir);
    const s = await startSshd({ dir, authorizedKeys: {} });
    try {
      expect(runningSshdLog(join(dir, "sshd_config"))).toBe(s.logFile);
      expect(runningSshdLog(join(dir, "no-such-config"))).toBeUndefined();
    } finally {
      await s.stop();
    }
  });
});
