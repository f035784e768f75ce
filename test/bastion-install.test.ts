/**
 * `mkoverlay bastion install --root DIR` against the real sshd and systemd-analyze: idempotent,
 * checked by sshd before anything is left in place, and all-or-nothing on every fault.
 */
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { requires, root } from "./helpers/capability.js";
import { bastionConfig, cleanup } from "./helpers/bastion.js";
import { changed, expectOneError, installInto, installWorkspace, snapshot, type Ws } from "./helpers/install.js";
import { closedPort } from "./helpers/postgres.js";
import { ensureUser, SSHD } from "./helpers/sshd.js";
import { run, type Run } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-bastion-i";
const dirs: string[] = [];
afterAll(() => cleanup(dirs));

async function workspace(opts: { bastionUser?: string } = {}): Promise<Ws> {
  return installWorkspace(dirs, opts.bastionUser ?? TUNNEL_USER);
}

const install = (w: Ws, extra: string[] = [], bastion = "lo"): Run => installInto(w, extra, bastion);

/** Users files compared by content: userdel after useradd leaves the same text with a new mtime. */
function content(snap: Map<string, string>): Map<string, string> {
  return new Map([...snap].map(([k, v]) => [k, /^etc\/(passwd|group|shadow|gshadow)-?$/.test(k) ? v.replace(/ [\d.]+$/, "") : v]));
}

requires(root)("bastion install --root", () => {
  it("installs, and a second run changes nothing; sshd -t passes and the drop-in wins for the tunnel user only", async () => {
    const w = await workspace();
    const before = snapshot(w.root);
    const r1 = install(w);
    expect(r1.code, r1.stderr).toBe(0);
    const after1 = snapshot(w.root);
    const mine = [
      "etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf",
      "usr/local/lib/mkoverlay/authorized-keys",
      "etc/systemd/system/mkoverlay-bastion@.service",
      "etc/systemd/system/mkoverlay-bastion@lo.service.d/40-exec.conf",
      "etc/systemd/system/mkoverlay-bastion@lo.service.d/50-registry.conf",
      "etc/systemd/system/multi-user.target.wants/mkoverlay-bastion@lo.service",
      "etc/mkoverlay/bastion/lo/fleet.yaml",
      "etc/mkoverlay/bastion/lo/agent.env",
    ];
    for (const f of mine) expect(after1.has(f), f).toBe(true);
    expect(after1.get("etc/mkoverlay/bastion/lo/agent.env")).toMatch(/^file 600 0:0 /);
    expect(after1.get("usr/local/lib/mkoverlay/authorized-keys")).toMatch(/^file 755 0:0 /);
    expect(after1.get("var/lib/mkoverlay/bastion/lo/keys")).toMatch(/^dir 711 0:0/);
    expect(after1.get("etc/systemd/system/multi-user.target.wants/mkoverlay-bastion@lo.service")).toBe("link -> /etc/systemd/system/mkoverlay-bastion@.service");
    // The first key set came from the registry (the device built above).
    expect(readdirSync(join(w.root, "var/lib/mkoverlay/bastion/lo/keys"))).toHaveLength(1);
    // The tunnel user: system account, no password ('*', not locked), nologin shell.
    const passwd = readFileSync(join(w.root, "etc/passwd"), "utf8");
    expect(passwd).toMatch(new RegExp(`^${TUNNEL_USER}:x:\\d+:\\d+::/nonexistent:/usr/sbin/nologin$`, "m"));
    expect(readFileSync(join(w.root, "etc/shadow"), "utf8")).toMatch(new RegExp(`^${TUNNEL_USER}:\\*:`, "m"));
    expect(passwd).toMatch(/^mkoverlay-keys:x:/m);
    // Only mkoverlay's own files and directories (and the users files) changed.
    for (const k of changed(before, after1)) expect(k, k).toMatch(/^(etc\/(ssh\/sshd_config\.d|systemd|mkoverlay|passwd|group|shadow|gshadow)|usr\/local|var)/);
    expect(after1.get("etc/ssh/sshd_config")).toBe(before.get("etc/ssh/sshd_config"));

    const r2 = install(w);
    expect(r2.code, r2.stderr).toBe(0);
    expect(r2.stderr).toMatch(/already installed: 7 file\(s\) unchanged/);
    expect(changed(after1, snapshot(w.root))).toEqual([]);

    ensureUser(TUNNEL_USER);
    ensureUser("mkoverlay-keys");
    const { config } = bastionConfig(w.root, "lo", w.ws);
    const t = run(SSHD, ["-t", "-f", config]);
    expect(t.code, t.stderr).toBe(0);
    const spec = (u: string) => ["-T", "-f", config, "-C", `user=${u},host=gw.invalid,addr=127.0.0.1`];
    const tunnel = run(SSHD, spec(TUNNEL_USER)).stdout;
    expect(tunnel).toMatch(new RegExp(`^authorizedkeyscommand ${w.root}/usr/local/lib/mkoverlay/authorized-keys ${w.root}/var/lib/mkoverlay/bastion/lo/keys %f$`, "m"));
    expect(tunnel).toMatch(/^authorizedkeyscommanduser mkoverlay-keys$/m);
    expect(tunnel).toMatch(/^authorizedkeysfile none$/m);
    expect(tunnel).toMatch(/^forcecommand \/sbin\/nologin$/m);
    expect(tunnel).toMatch(/^permitopen none$/m);
    const other = run(SSHD, spec("root")).stdout;
    expect(other).toMatch(/^authorizedkeyscommand none$/m);
    expect(other).toMatch(/^forcecommand none$/m);
    // What follows the Include in sshd_config is global again (not swallowed by the Match block).
    expect(other).toMatch(/^x11forwarding yes$/m);
    expect(other).toMatch(/^subsystem sftp \/usr\/lib\/openssh\/sftp-server$/m);
  });

  it("after a config change, replaces only mkoverlay's own files that changed", async () => {
    const w = await workspace();
    expect(install(w).code).toBe(0);
    const before = snapshot(w.root);
    // A -L forward on this bastion changes the Match block's PermitOpen (and the config copy).
    const text = JSON.parse(readFileSync(w.cfg, "utf8")) as Record<string, unknown>;
    text.forwards = [{ name: "salt", type: "local", bastion: "lo", listen: 4505, to: "localhost:4505" }];
    writeFileSync(w.cfg, JSON.stringify(text, null, 2));
    const r = install(w);
    expect(r.code, r.stderr).toBe(0);
    expect(changed(before, snapshot(w.root))).toEqual(["etc/mkoverlay/bastion/lo/fleet.yaml", "etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf"]);
    expect(readFileSync(join(w.root, "etc/ssh/sshd_config.d/60-mkoverlay-bastion-lo.conf"), "utf8")).toMatch(/^ {4}PermitOpen localhost:4505$/m);
  });

  it("the agent's unit passes systemd-analyze verify and scores OK in systemd-analyze security", async () => {
    const w = await workspace();
    expect(install(w, ["--mkoverlay", process.execPath]).code).toBe(0);
    // The template with the instance's own drop-ins, found as systemd finds them (verify checks
    // ExecStart's program on this host: node).
    const env = { SYSTEMD_UNIT_PATH: `${join(w.root, "etc/systemd/system")}:` };
    const v = run("systemd-analyze", ["verify", "mkoverlay-bastion@lo.service"], { env });
    expect(v.code, v.stderr).toBe(0);
    expect(v.stderr).toBe("");
    const s = run("systemd-analyze", ["security", "--offline=yes", "mkoverlay-bastion@lo.service"], { env });
    const score = Number(/Overall exposure level for .*: (\d+\.\d+)/.exec(s.stdout)?.[1]);
    expect(score, s.stdout).toBeLessThanOrEqual(2.5);
    // Every directive says why (like the device units).
    for (const f of ["mkoverlay-bastion@.service", "mkoverlay-bastion@lo.service.d/40-exec.conf", "mkoverlay-bastion@lo.service.d/50-registry.conf"]) {
      const lines = readFileSync(join(w.root, "etc/systemd/system", f), "utf8").split("\n");
      lines.forEach((l, i) => {
        if (/^[A-Z][A-Za-z]+=/.test(l) && !/^ExecStart=$/.test(l)) expect(lines[i - 1], l).toMatch(/^#/);
      });
    }
  });

  describe("faults: one message, nothing half installed", () => {
    const cases: [string, (w: Ws) => string[] | void, RegExp][] = [
      ["a missing tunnel user (not creating it)", () => ["--no-create-user"], new RegExp(`the tunnel user '${TUNNEL_USER}' of bastion 'lo' does not exist in `)],
      ["sshd missing", (w) => void rmSync(join(w.root, "usr/sbin/sshd")), /sshd is not installed in .*usr\/sbin\/sshd is missing/],
      ["an sshd_config that does not include sshd_config.d", (w) => void writeFileSync(join(w.root, "etc/ssh/sshd_config"), readFileSync(join(w.root, "etc/ssh/sshd_config"), "utf8").replace(/^Include .*\n/m, "")), /sshd_config does not include \/etc\/ssh\/sshd_config\.d\/60-mkoverlay-bastion-lo\.conf/],
      ["an sshd that rejects the configuration", (w) => void writeFileSync(join(w.root, "etc/ssh/sshd_config.d/10-broken.conf"), "NoSuchOption yes\n"), /sshd rejects the existing configuration of .* \(without mkoverlay's drop-in\): .*Bad configuration option: NoSuchOption/],
      [
        "an earlier Match block that would override the drop-in",
        (w) => void writeFileSync(join(w.root, "etc/ssh/sshd_config.d/10-admin.conf"), `Match User ${TUNNEL_USER}\n    ForceCommand /bin/sh\n    PermitTTY yes\n`),
        new RegExp(`sshd would not use mkoverlay's settings for '${TUNNEL_USER}': permittty is 'yes', not 'no'; forcecommand is '/bin/sh', not '/sbin/nologin'`),
      ],
    ];
    for (const [what, arrange, re] of cases) {
      it(what, async () => {
        const w = await workspace();
        const extra = arrange(w) ?? [];
        const before = snapshot(w.root);
        expectOneError(install(w, extra), re);
        expect(changed(before, snapshot(w.root))).toEqual([]);
      });
    }

    it("a bastion not in the config", async () => {
      const w = await workspace();
      const before = snapshot(w.root);
      expectOneError(install(w, [], "nope"), /--bastion "nope": no such bastion in .*mkoverlay\.yaml/);
      expect(changed(before, snapshot(w.root))).toEqual([]);
    });

    it("a registry URL unreachable at install time", async () => {
      const w = await workspace();
      const before = snapshot(w.root);
      const r = install(w, ["--registry", `postgres://agent@127.0.0.1:${await closedPort()}/fleet`]);
      expectOneError(r, /the agent's registry is unusable: registry postgres:\/\/agent@127\.0\.0\.1:\d+\/fleet: cannot connect to PostgreSQL at 127\.0\.0\.1:\d+ \(connection refused\)/);
      expect(changed(before, snapshot(w.root))).toEqual([]);
    });

    it("a registry URL that could break out of the unit's environment file", async () => {
      const w = await workspace();
      const before = snapshot(w.root);
      const r = install(w, ["--registry", "postgres://agent@127.0.0.1/fleet\nExecStartPre=/bin/sh"]);
      expectOneError(r, /registry postgres:\/\/agent@127\.0\.0\.1\/fleet.*contains a quote, backslash or control character/);
      expect(changed(before, snapshot(w.root))).toEqual([]);
    });

    it("a keys-command directory sshd would not trust", async () => {
      const w = await workspace();
      run("mkdir", ["-p", "-m", "0775", join(w.root, "usr/local/lib")]);
      const before = snapshot(w.root);
      expectOneError(install(w), /cannot install the keys command: \/usr\/local\/lib is 775 owned by uid 0: sshd runs an AuthorizedKeysCommand only below root-owned directories/);
      expect(changed(before, snapshot(w.root))).toEqual([]);
    });

    it("a failure after the users were created and files renamed puts everything back", async () => {
      const w = await workspace();
      // The unit's enablement link cannot be made: a file where systemd's wants directory should be.
      writeFileSync(join(w.root, "etc/systemd/system/multi-user.target.wants"), "");
      const before = snapshot(w.root);
      expectOneError(install(w), /bastion install failed: ENOTDIR: .*multi-user\.target\.wants/);
      expect(changed(content(before), content(snapshot(w.root))).filter((k) => !/^etc\/(passwd|group|shadow|gshadow)-$/.test(k))).toEqual([]);
      expect(readFileSync(join(w.root, "etc/passwd"), "utf8")).not.toMatch(TUNNEL_USER);
      expect(readFileSync(join(w.root, "etc/passwd"), "utf8")).not.toMatch("mkoverlay-keys");
    });
  });
});
