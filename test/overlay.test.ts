/**
 * The overlay as the target OS sees it: unpacked with GNU tar, enablement checked by the real
 * `systemctl --root`, first-boot deletions replayed per OS profile, byte-identical rebuilds,
 * modes and owners, and golden files for what is rendered.
 */
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadProfiles } from "../src/config/profiles.js";
import { extract, readPub, removeDir, run, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-overlay-");
const hostKey = join(dir, "device_key");
let fleet: string;

beforeAll(() => {
  sshKeygen(dir, "device_key");
  const bk = readPub(sshKeygen(dir, "bastion_key"));
  fleet = writeFleet(dir, {
    eu: { host: "bastion-eu.example.com", hostKeys: [bk] },
    us: { host: "bastion-us.example.com", port: 2222, user: "tunnel", hostKeys: [bk] },
  });
});
afterAll(() => removeDir(dir));

function build(args: string[], env: Record<string, string> = {}) {
  const r = runCli(["--config", fleet, "--json", ...args], { cwd: dir, env });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as { hostname: string; port: number; overlay: string; os: string };
}

/** A root file system to lay the overlay over: the distribution's ssh units, as on an image. */
function fakeImageRoot(into: string): void {
  for (const unitDir of ["lib/systemd/system", "usr/lib/systemd/system"]) {
    mkdirSync(join(into, unitDir), { recursive: true });
    for (const u of ["ssh.service", "ssh.socket", "ssh@.service"]) {
      const src = `/lib/systemd/system/${u}`;
      if (existsSync(src)) copyFileSync(src, join(into, unitDir, u));
    }
  }
}

describe("enablement, as systemctl --root sees it", () => {
  it.each(["raspios", "debian", "armbian", "ubuntu"])("%s: the ssh server, both tunnel instances and the timer are enabled", (os) => {
    const b = build(["--board", "rpi4", "--os", os, "--bastion", "eu,us"]);
    const root = join(dir, `root-${os}`);
    fakeImageRoot(root);
    extract(b.overlay, root);
    const units = ["reverse-ssh@eu.service", "reverse-ssh@us.service", "reverse-ssh-monitor.timer", os === "ubuntu" ? "ssh.socket" : "ssh.service"];
    for (const u of units) {
      const r = run("systemctl", [`--root=${root}`, "is-enabled", u]);
      expect(`${u}: ${r.stdout.trim()}`).toBe(`${u}: enabled`);
    }
    // The template itself is not an instance and must not be wanted by anything.
    expect(existsSync(join(root, "etc/systemd/system/multi-user.target.wants/reverse-ssh@.service"))).toBe(false);
    if (os === "raspios") {
      expect(run("systemctl", [`--root=${root}`, "is-enabled", "regenerate_ssh_host_keys.service"]).stdout.trim()).toBe("masked");
    }
  });

  it("our links are exactly what `systemctl --root enable` creates", () => {
    const b = build(["--board", "rpi4", "--bastion", "eu"]);
    const ours = join(dir, "links-ours");
    const theirs = join(dir, "links-theirs");
    for (const r of [ours, theirs]) {
      fakeImageRoot(r);
      extract(b.overlay, r);
    }
    rmSync(join(theirs, "etc/systemd/system/multi-user.target.wants"), { recursive: true });
    rmSync(join(theirs, "etc/systemd/system/timers.target.wants"), { recursive: true });
    rmSync(join(theirs, "etc/systemd/system/sshd.service"));
    const en = run("systemctl", [`--root=${theirs}`, "enable", "ssh.service", "reverse-ssh@eu.service", "reverse-ssh-monitor.timer"]);
    expect(en.code, en.stderr).toBe(0);
    const links = (root: string) =>
      ["multi-user.target.wants", "timers.target.wants", "."].flatMap((d) =>
        readdirSync(join(root, "etc/systemd/system", d))
          .filter((n) => lstatSync(join(root, "etc/systemd/system", d, n)).isSymbolicLink())
          .map((n) => `${d}/${n} -> ${run("readlink", [join(root, "etc/systemd/system", d, n)]).stdout.trim()}`),
      ).sort();
    expect(links(ours)).toEqual(links(theirs));
  });
});

/** What each OS deletes on first boot (docs/facts.md table), independent of the profile data. */
const FIRST_BOOT_DELETES: Record<string, string[]> = {
  raspios: ["etc/ssh/ssh_host_*_key*"],
  ubuntu: ["etc/ssh/ssh_host_*key*"],
  armbian: ["etc/ssh/ssh_host*"],
  debian: [],
};

describe("first boot leaves the identity in place", () => {
  it.each(Object.keys(FIRST_BOOT_DELETES))("%s", async (os) => {
    const b = build(["--board", "rpi4", "--os", os, "--bastion", "eu"]);
    const root = join(dir, `fb-${os}`);
    mkdirSync(join(root, "etc/ssh"), { recursive: true });
    // The image's own keys, which the first boot will delete.
    for (const t of ["ed25519", "rsa"]) writeFileSync(join(root, `etc/ssh/ssh_host_${t}_key`), "x");
    extract(b.overlay, root);
    for (const pattern of FIRST_BOOT_DELETES[os]!) {
      const r = run("bash", ["-c", `cd '${root}' && rm -rfv -- ${pattern}`]);
      expect(r.code, r.stderr).toBe(0);
    }
    if (FIRST_BOOT_DELETES[os]!.length > 0) {
      expect(readdirSync(join(root, "etc/ssh")).filter((n) => n.startsWith("ssh_host")), "the image keys are gone").toEqual([]);
    }
    // The profile data documents the same patterns (mkoverlay verify relies on them).
    expect((await loadProfiles()).oses.get(os)?.firstBoot.deletes).toEqual(FIRST_BOOT_DELETES[os]!.map((p) => `/${p}`));
    // sshd's HostKey and the tunnel's -i still point at an existing key.
    const dropin = readFileSync(join(root, "etc/ssh/sshd_config.d/50-mkoverlay.conf"), "utf8");
    const hostKeyPath = /^HostKey (\S+)$/m.exec(dropin)?.[1];
    expect(hostKeyPath).toBe("/etc/ssh/mkoverlay/ssh_host_ed25519_key");
    expect(statSync(join(root, hostKeyPath!)).mode & 0o777).toBe(0o600);
    const unit = readFileSync(join(root, "etc/systemd/system/reverse-ssh@.service"), "utf8");
    const identity = /-i (\S+)/.exec(unit)?.[1];
    expect(identity).toBe(hostKeyPath);
    // The OS-specific guard is in place.
    if (os === "ubuntu") expect(readFileSync(join(root, "etc/cloud/cloud.cfg.d/99-mkoverlay.cfg"), "utf8")).toMatch(/^ssh_deletekeys: false$/m);
    if (os === "armbian") expect(readFileSync(join(root, "etc/default/armbian-firstrun"), "utf8")).toMatch(/^OPENSSHD_REGENERATE_HOST_KEYS=false$/m);
  });
});

describe("archive", () => {
  it("two builds with --host-key and SOURCE_DATE_EPOCH are byte-identical", () => {
    const env = { SOURCE_DATE_EPOCH: "1700000000" };
    const a = build(["--board", "rpi4", "--bastion", "eu,us", "--host-key", hostKey, "--out", join(dir, "repro-a")], env);
    const bytesA = readFileSync(a.overlay);
    // The second build is a re-flash of the same registered device.
    const b = build(["--board", "rpi4", "--bastion", "eu,us", "--host-key", hostKey, "--out", join(dir, "repro-b")], env);
    expect(b.hostname).toBe(a.hostname);
    expect(b.port).toBe(a.port);
    expect(createHash("sha256").update(readFileSync(b.overlay)).digest("hex")).toBe(createHash("sha256").update(bytesA).digest("hex"));
    // And a different epoch does change it (the test can fail).
    const c = build(["--board", "rpi4", "--bastion", "eu,us", "--host-key", hostKey, "--out", join(dir, "repro-c")], { SOURCE_DATE_EPOCH: "1700000001" });
    expect(readFileSync(c.overlay).equals(bytesA)).toBe(false);
  });

  it("every entry is root:root with the intended mode, the file is 0600 in a 0700 folder", () => {
    const out = join(dir, "modes");
    const b = build(["--board", "rpi4", "--bastion", "eu", "--out", out]);
    expect(statSync(out).mode & 0o777).toBe(0o700);
    expect(statSync(b.overlay).mode & 0o777).toBe(0o600);
    const listing = run("tar", ["--numeric-owner", "-tvzf", b.overlay]).stdout.trim().split("\n");
    for (const line of listing) expect(line).toMatch(/^\S+ 0\/0 /);
    const mode = (p: string) => listing.find((l) => l.endsWith(` ${p}`) || l.includes(` ${p} -> `))?.split(" ")[0];
    expect(mode("etc/ssh/mkoverlay/ssh_host_ed25519_key")).toBe("-rw-------");
    expect(mode("etc/ssh/mkoverlay/")).toBe("drwxr-xr-x");
    expect(mode("usr/local/sbin/reverse-ssh-monitor")).toBe("-rwxr-xr-x");
    expect(mode("etc/systemd/system/reverse-ssh@.service")).toBe("-rw-r--r--");
  });
});
