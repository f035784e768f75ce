/**
 * `bastion install` with a tunnel port (issue 20): when devices dial a port the administrators'
 * sshd does not listen on, the install writes a dedicated tunnel sshd (src/bastion/tunnel-sshd.ts):
 * its whole config, the unit template and its enablement, checked by the real `sshd -t`, and
 * `systemd-analyze verify`. A device's tunnel comes up through that sshd (the real one, on the
 * installed config, with the agent's key directory); the admin sshd's effective config is what it
 * was. When devices dial the admin sshd's own port, the install keeps the drop-in alone, and on
 * OpenSSH >= 9.8 warns that its per-source penalties hit tunnels and admins alike.
 */
import { chmodSync, copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, expect, it } from "vitest";
import { itRequires, need, requires, root } from "./helpers/capability.js";
import { bastionConfig, cleanup, tunnelUp } from "./helpers/bastion.js";
import { changed, expectOneError, installInto, installWorkspace, snapshot, type Ws } from "./helpers/install.js";
import { ensureUser, freePort, runSshd, SSHD } from "./helpers/sshd.js";
import { openssh10 } from "./helpers/sshd10.js";
import { run } from "./helpers/workspace.js";

const TUNNEL_USER = "mko-bastion-tt";
const dirs: string[] = [];
afterAll(() => cleanup(dirs));

const TUNNEL_FILES = [
  "etc/mkoverlay/bastion/lo/sshd_config",
  "etc/systemd/system/mkoverlay-tunnel-sshd@.service",
  "etc/systemd/system/multi-user.target.wants/mkoverlay-tunnel-sshd@lo.service",
];

/** The admin sshd's effective settings (sshd -T) for root, with mkoverlay's drop-ins as installed. */
function adminEffective(w: Ws, tag: string): string {
  const { config } = bastionConfig(w.root, "lo", join(w.ws, tag));
  const r = run(SSHD, ["-T", "-f", config, "-C", "user=root,host=gw.invalid,addr=127.0.0.1"]);
  expect(r.code, r.stderr).toBe(0);
  return r.stdout.replace(/^pidfile .*\n/m, "");
}

/** The installed tunnel sshd config as this host runs it: paths inside the root, loopback only, a test pid file. */
function tunnelConfig(w: Ws): string {
  const text = readFileSync(join(w.root, "etc/mkoverlay/bastion/lo/sshd_config"), "utf8")
    .replace(/(^|\s)(\/etc\/ssh\/|\/usr\/local\/lib\/mkoverlay\/|\/var\/lib\/mkoverlay\/)/gm, (_, pre: string, p: string) => `${pre}${w.root}${p}`)
    .replace(/^PidFile .*$/m, `PidFile ${join(w.ws, "tunnel-sshd.pid")}\nListenAddress 127.0.0.1`);
  const file = join(w.ws, "tunnel-sshd.conf");
  writeFileSync(file, text);
  return file;
}

requires(root)("bastion install with a tunnel port: a dedicated tunnel sshd", () => {
  it("writes its config, unit and enablement; sshd -t and systemd-analyze verify pass; a re-install changes nothing; the admin sshd is as it was", async () => {
    const tunnelPort = await freePort();
    const w = await installWorkspace(dirs, TUNNEL_USER, { tunnelPort });
    const adminBefore = adminEffective(w, "before");
    const dry = installInto(w, ["--dry-run", "--mkoverlay", process.execPath]);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout).toMatch(/^\+\+\+ \/etc\/mkoverlay\/bastion\/lo\/sshd_config$/m);
    expect(dry.stdout).toMatch(/^\+\+\+ \/etc\/systemd\/system\/mkoverlay-tunnel-sshd@\.service$/m);
    expect(dry.stdout).toMatch(/^# would link \/etc\/systemd\/system\/multi-user\.target\.wants\/mkoverlay-tunnel-sshd@lo\.service → \/etc\/systemd\/system\/mkoverlay-tunnel-sshd@\.service$/m);

    const r1 = installInto(w, ["--mkoverlay", process.execPath, "--json"]);
    expect(r1.code, r1.stderr).toBe(0);
    expect((JSON.parse(r1.stdout) as { mode: string }).mode).toBe("tunnel");
    const after1 = snapshot(w.root);
    for (const f of TUNNEL_FILES) expect(after1.has(f), f).toBe(true);
    expect(after1.get("etc/systemd/system/multi-user.target.wants/mkoverlay-tunnel-sshd@lo.service")).toBe("link -> /etc/systemd/system/mkoverlay-tunnel-sshd@.service");
    const cfg = readFileSync(join(w.root, "etc/mkoverlay/bastion/lo/sshd_config"), "utf8");
    expect(cfg).toMatch(new RegExp(`^Port ${tunnelPort}$`, "m"));
    // The admin sshd's host key (sshd -T of the real config): the one the devices pin.
    expect(cfg).toMatch(/^HostKey \/etc\/ssh\/ssh_host_ed25519_key$/m);
    expect(cfg.match(/^HostKey /gm)).toHaveLength(1);
    expect(cfg).toMatch(new RegExp(`^AllowUsers ${TUNNEL_USER}$`, "m"));
    expect(cfg).toMatch(/^ {4}AuthorizedKeysCommand \/usr\/local\/lib\/mkoverlay\/authorized-keys \/var\/lib\/mkoverlay\/bastion\/lo\/keys %f$/m);

    // Idempotent.
    const r2 = installInto(w, ["--mkoverlay", process.execPath]);
    expect(r2.code, r2.stderr).toBe(0);
    expect(r2.stderr).toMatch(/already installed: 9 file\(s\) unchanged/);
    expect(changed(after1, snapshot(w.root))).toEqual([]);

    // The admin sshd: same effective settings for its own users (the drop-in touches the tunnel user only).
    expect(adminEffective(w, "after")).toBe(adminBefore);

    // systemd checks the unit (with the agent's, which it Wants= and is ordered after).
    const env = { SYSTEMD_UNIT_PATH: `${join(w.root, "etc/systemd/system")}:` };
    const v = run("systemd-analyze", ["verify", "mkoverlay-tunnel-sshd@lo.service"], { env });
    expect(v.code, v.stderr).toBe(0);
    expect(v.stderr).toBe("");
    const unit = readFileSync(join(w.root, "etc/systemd/system/mkoverlay-tunnel-sshd@.service"), "utf8");
    expect(unit).toMatch(/^After=mkoverlay-bastion@%i\.service$/m);

    // The real sshd accepts the installed config and carries a device's tunnel with the agent's keys.
    ensureUser(TUNNEL_USER);
    ensureUser("mkoverlay-keys");
    const conf = tunnelConfig(w);
    const t = run(SSHD, ["-t", "-f", conf]);
    expect(t.code, t.stderr).toBe(0);
    const sshd = await runSshd(conf, join(w.ws, "tunnel-sshd.log"), tunnelPort);
    try {
      const { tunnel } = await tunnelUp(w.device, 20_000);
      await tunnel.stop();
    } finally {
      await sshd.stop();
    }
    expect(readFileSync(join(w.ws, "tunnel-sshd.log"), "utf8")).toMatch(new RegExp(`Accepted publickey for ${TUNNEL_USER} from 127\\.0\\.0\\.1`));
  }, 120_000);

  it("an image whose sshd cannot run here needs --sshd-version; with it, the config is written for that version", async () => {
    const w = await installWorkspace(dirs, TUNNEL_USER, { tunnelPort: await freePort() });
    writeFileSync(join(w.root, "usr/sbin/sshd"), "#!/nonexistent/interpreter\n");
    chmodSync(join(w.root, "usr/sbin/sshd"), 0o755);
    const before = snapshot(w.root);
    expectOneError(installInto(w), /usr\/sbin\/sshd \(in .*\) does not run here .*: the tunnel sshd's config depends on its version/);
    expect(changed(before, snapshot(w.root))).toEqual([]);
    expectOneError(installInto(w, ["--sshd-version", "ten"]), /--sshd-version ten: give OpenSSH's version as MAJOR\.MINOR/);
    const sys = /OpenSSH_(\d+\.\d+)/.exec(run(SSHD, ["-V"]).stderr)![1]!;
    const r = installInto(w, ["--sshd-version", sys]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(w.root, "etc/mkoverlay/bastion/lo/sshd_config"), "utf8")).toContain(`written for\n# OpenSSH ${sys}.`);
  }, 120_000);
});

requires(root)("bastion install on the admin sshd's own port: the drop-in alone", () => {
  it("installs no tunnel sshd; on OpenSSH 9.2 no warning", async () => {
    const w = await installWorkspace(dirs, TUNNEL_USER);
    const r = installInto(w, ["--json"]);
    expect(r.code, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as { mode: string }).mode).toBe("dropin");
    const snap = snapshot(w.root);
    for (const f of TUNNEL_FILES) expect(snap.has(f), f).toBe(false);
    expect(r.stderr).not.toMatch(/PerSourcePenalties/);
  });

  const ten = openssh10();
  itRequires(need(ten, "OpenSSH 10.x (scripts/ensure-openssh10.sh)"))("on OpenSSH >= 9.8, warns that penalties hit the tunnels and the admins alike, and names the way out", async () => {
    const w = await installWorkspace(dirs, TUNNEL_USER);
    copyFileSync(ten!.sshd, join(w.root, "usr/sbin/sshd"));
    const r = installInto(w);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/mkoverlay: warning: bastion 'lo': devices dial port \d+, the administrators' sshd's \(OpenSSH 10\.\d+\): its PerSourcePenalties count every failed tunnel login .* give the tunnels a port of their own \(bastions\.lo\.port, e\.g\. 2222/);
    for (const f of TUNNEL_FILES) expect(snapshot(w.root).has(f), f).toBe(false);
  });
});

