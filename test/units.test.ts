// The systemd units under overlays/common/, checked with the real systemd-analyze (252 on
// Debian bookworm) offline: no running systemd is needed.
//
// `systemd-analyze verify` checks that every ExecStart= binary exists and is executable, and
// dependencies (multi-user.target, network-online.target, timers.target, ...) load. The
// monitor script does not exist on the test host, so verify runs with --root= on a temporary
// tree laid out like the device: the overlay itself, a copy of this host's
// /usr/lib/systemd/system (where those targets come from), and an executable stand-in for
// /usr/bin/ssh (verify only checks that the path is an executable file). Under --root= every
// path is looked up inside that tree, so nothing on the host is used by accident.
import { describe, it, expect, beforeAll, afterAll } from "vitest";
import { spawnSync } from "node:child_process";
import { cpSync, mkdtempSync, mkdirSync, readFileSync, readlinkSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const OVERLAY = resolve(import.meta.dirname, "../overlays/common");
const UNIT_DIR = join(OVERLAY, "etc/systemd/system");
const TUNNEL = "reverse-ssh@.service";
const MONITOR = "reverse-ssh-monitor.service";
const TIMER = "reverse-ssh-monitor.timer";
const MAX_EXPOSURE = 2.0;
/** The tunnel's score in docs/unit-hardening.md and README.md. */
const DOCUMENTED_TUNNEL_EXPOSURE = 1.6;

// The template unit as published in the reference write-up, kept only to show that the
// exposure check does tell a bad unit from a good one.
const RECIPE_UNIT = `[Unit]
Description=Reverse SSH Tunnel to %i
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
Environment=SELF_REMOTE_HOST=%H
ExecStart=/usr/bin/ssh -N -T \\
    -o ServerAliveInterval=60 \\
    -o ServerAliveCountMax=3 \\
    -o StrictHostKeyChecking=no \\
    -o ExitOnForwardFailure=yes \\
    -o UserKnownHostsFile=/dev/null \\
    -o SendEnv=SELF_REMOTE_HOST \\
    -i /etc/ssh/ssh_host_ed25519_key \\
    -R localhost:21022:localhost:22 \\
    reverse-ssh@%i
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
`;

let root = "";

function analyze(args: string[]) {
  const r = spawnSync("systemd-analyze", args, {
    encoding: "utf8",
    env: { ...process.env, LC_ALL: "C", SYSTEMD_PAGER: "", SYSTEMD_COLORS: "0" },
  });
  if (r.error) throw r.error; // a missing systemd-analyze must fail, not pass
  return r;
}

/** Overall exposure as printed by `systemd-analyze security`, e.g. 1.6. */
function exposure(unit: string): { score: number; rating: string; output: string } {
  const r = analyze(["security", "--offline=yes", "--no-pager", `--root=${root}`, unit]);
  expect(r.stderr).toBe("");
  expect(r.status).toBe(0);
  const m = /Overall exposure level for (\S+): (\d+\.\d+) (\S+)/.exec(r.stdout);
  expect(m, `no overall exposure line in:\n${r.stdout}`).not.toBeNull();
  const [, name, score, rating] = m ?? [];
  expect(name).toBe(unit.replace(/@\.service$/, "@i.service"));
  return { score: Number(score), rating: rating ?? "", output: r.stdout };
}

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), "mkoverlay-units-"));
  cpSync(OVERLAY, root, { recursive: true, verbatimSymlinks: true });
  // The stock units (targets, …) the overlay's units depend on, as on the device.
  mkdirSync(join(root, "usr/lib/systemd"), { recursive: true });
  cpSync(realpathSync("/usr/lib/systemd/system"), join(root, "usr/lib/systemd/system"), {
    recursive: true,
    verbatimSymlinks: true,
  });
  mkdirSync(join(root, "usr/bin"), { recursive: true });
  writeFileSync(join(root, "usr/bin/ssh"), "#!/bin/sh\n# stand-in: verify only checks that ExecStart= is executable\nexit 0\n", {
    mode: 0o755,
  });
});

afterAll(() => {
  if (root) rmSync(root, { recursive: true, force: true });
});

describe("systemd-analyze verify", () => {
  // The template is verified as instances: "eu" as a bastion would be named, and the bare
  // template name, which systemd-analyze instantiates as reverse-ssh@i.service.
  for (const unit of ["reverse-ssh@eu.service", TUNNEL, MONITOR, TIMER]) {
    it(`${unit} verifies clean`, () => {
      const r = analyze(["verify", "--man=no", `--root=${root}`, unit]);
      // Unknown keys and bad values are only warnings (exit 0), so stderr must be empty too.
      expect(r.stderr).toBe("");
      expect(r.stdout).toBe("");
      expect(r.status).toBe(0);
    });
  }

  it("does report a broken unit (controls)", () => {
    const text = readFileSync(join(UNIT_DIR, MONITOR), "utf8");
    const dir = join(root, "etc/systemd/system");
    // A bad value is only a warning: exit status 0, which is why stderr is checked above.
    writeFileSync(join(dir, "bad-value.service"), text.replace("ProtectSystem=strict", "ProtectSystem=strictly"));
    const bad = analyze(["verify", "--man=no", `--root=${root}`, "bad-value.service"]);
    expect(bad.stderr).toMatch(/bad-value\.service:\d+: Failed to parse protect system value/);
    expect(bad.status).toBe(0);
    // A missing ExecStart= binary is an error.
    writeFileSync(join(dir, "no-exec.service"), text.replace("ExecStart=/usr/local/sbin/reverse-ssh-monitor", "ExecStart=/usr/local/sbin/no-such-monitor"));
    const noExec = analyze(["verify", "--man=no", `--root=${root}`, "no-exec.service"]);
    expect(noExec.stderr).toContain("Command /usr/local/sbin/no-such-monitor is not executable");
    expect(noExec.status).not.toBe(0);
  });
});

describe("systemd-analyze security --offline", () => {
  it(`rates the tunnel template at most ${MAX_EXPOSURE}`, () => {
    const { score, rating } = exposure("reverse-ssh@eu.service");
    expect(Number.isFinite(score)).toBe(true);
    expect(score).toBeLessThanOrEqual(MAX_EXPOSURE);
    expect(["SAFE", "OK"]).toContain(rating);
    // Never worse than the score docs/unit-hardening.md and the README state (the back-off's
    // RuntimeDirectory= costs nothing).
    expect(score).toBeLessThanOrEqual(DOCUMENTED_TUNNEL_EXPOSURE);
    // Same result for the bare template name, and systemd's own threshold agrees (×10).
    expect(exposure(TUNNEL).score).toBe(score);
    const t = analyze(["security", "--offline=yes", `--threshold=${MAX_EXPOSURE * 10}`, `--root=${root}`, "reverse-ssh@eu.service"]);
    expect(t.status).toBe(0);
  });

  it(`rates the monitor service at most ${MAX_EXPOSURE}`, () => {
    const { score } = exposure(MONITOR);
    expect(score).toBeLessThanOrEqual(MAX_EXPOSURE);
  });

  it("rates the reference write-up's unit as unsafe (control)", () => {
    writeFileSync(join(root, "etc/systemd/system/recipe-ssh@.service"), RECIPE_UNIT);
    const { score, rating } = exposure("recipe-ssh@eu.service");
    expect(score).toBeGreaterThan(9);
    expect(rating).toBe("UNSAFE");
    const t = analyze(["security", "--offline=yes", `--threshold=${MAX_EXPOSURE * 10}`, `--root=${root}`, "recipe-ssh@eu.service"]);
    expect(t.status).not.toBe(0);
  });
});

/** [section, key, value, line number] of every directive, continuation lines joined. */
function directives(text: string): Array<{ section: string; key: string; value: string; line: number; commented: boolean }> {
  const out: Array<{ section: string; key: string; value: string; line: number; commented: boolean }> = [];
  const lines = text.split("\n");
  let section = "";
  let prev = "";
  for (let i = 0; i < lines.length; i++) {
    const l = (lines[i] ?? "").trim();
    if (l.startsWith("[")) {
      section = l;
    } else if (/^[A-Za-z]+=/.test(l)) {
      const start = i;
      let value = l.slice(l.indexOf("=") + 1);
      while (value.endsWith("\\") && i + 1 < lines.length) {
        value = `${value.slice(0, -1)} ${(lines[++i] ?? "").trim()}`;
      }
      out.push({ section, key: l.slice(0, l.indexOf("=")), value: value.replace(/\s+/g, " ").trim(), line: start + 1, commented: prev.startsWith("#") });
    }
    if (l !== "") prev = (lines[i] ?? "").trim();
  }
  return out;
}

describe("unit contents", () => {
  for (const file of [TUNNEL, MONITOR, TIMER]) {
    it(`${file}: every directive has a comment saying why`, () => {
      const missing = directives(readFileSync(join(UNIT_DIR, file), "utf8")).filter((d) => !d.commented);
      expect(missing.map((d) => `${file}:${d.line} ${d.key}`)).toEqual([]);
    });
  }

  it("the tunnel pins the bastion and never gives up restarting", () => {
    const ds = directives(readFileSync(join(UNIT_DIR, TUNNEL), "utf8"));
    const get = (section: string, key: string) => ds.filter((d) => d.section === section && d.key === key).map((d) => d.value);
    const exec = get("[Service]", "ExecStart");
    expect(exec).toHaveLength(1);
    const cmd = exec[0] ?? "";
    // The back-off wrapper runs the ssh command as given (test/backoff.test.ts).
    expect(cmd).toMatch(/^\/usr\/local\/sbin\/reverse-ssh-backoff \/usr\/bin\/ssh -F none -N -T /);
    expect(cmd).not.toMatch(/StrictHostKeyChecking=(no|accept-new)/i);
    for (const opt of [
      "BatchMode=yes",
      "ExitOnForwardFailure=yes",
      "StrictHostKeyChecking=yes",
      "UserKnownHostsFile=/etc/ssh/mkoverlay/known_hosts",
      "GlobalKnownHostsFile=/dev/null",
      "UpdateHostKeys=no",
      "IdentitiesOnly=yes",
    ]) {
      expect(cmd).toContain(`-o ${opt}`);
    }
    expect(cmd).toContain("-i /etc/ssh/mkoverlay/ssh_host_ed25519_key");
    expect(cmd).toContain("-R localhost:${TUNNEL_PORT}:localhost:22");
    // Unbraced, so systemd splits it into words and an empty value adds no argument.
    expect(cmd).toMatch(/ \$EXTRA_FORWARDS /);
    expect(cmd).toMatch(/\$\{BASTION_HOST\}$/);
    expect(get("[Service]", "EnvironmentFile")).toEqual(["/etc/mkoverlay/tunnels/%i.env"]);
    expect(get("[Service]", "Restart")).toEqual(["always"]);
    // A floor only: the growing, jittered wait is the wrapper's, from its state in /run.
    expect(Number(get("[Service]", "RestartSec")[0])).toBeGreaterThanOrEqual(1);
    expect(get("[Service]", "ExecStopPost")).toEqual(["/usr/local/sbin/reverse-ssh-backoff --record"]);
    expect(get("[Service]", "RuntimeDirectory")).toEqual(["reverse-ssh-%i"]);
    expect(get("[Service]", "RuntimeDirectoryPreserve")).toEqual(["restart"]);
    expect(get("[Unit]", "StartLimitIntervalSec")).toEqual(["0"]);
    expect(get("[Install]", "WantedBy")).toEqual(["multi-user.target"]);
    // Not proven to work on the devices (libnss-systemd; bastion IP unknown): see docs.
    for (const banned of ["DynamicUser", "LoadCredential", "IPAddressDeny", "User"]) {
      expect(ds.filter((d) => d.key === banned)).toEqual([]);
    }
  });
});

describe("systemctl --root enable", () => {
  it("enables a tunnel instance and the timer as symlinks, the way the overlay ships them", () => {
    const r = spawnSync("systemctl", ["--root", root, "enable", "reverse-ssh@eu.service", TIMER], { encoding: "utf8" });
    if (r.error) throw r.error;
    expect(r.status).toBe(0);
    const wants = join(root, "etc/systemd/system");
    expect(readlinkSync(join(wants, "multi-user.target.wants/reverse-ssh@eu.service"))).toBe(
      "/etc/systemd/system/reverse-ssh@.service",
    );
    expect(readlinkSync(join(wants, "timers.target.wants", TIMER))).toBe(`/etc/systemd/system/${TIMER}`);
  });
});
