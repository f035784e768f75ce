// Behaviour of overlays/common/usr/local/sbin/reverse-ssh-monitor, run for real with a
// stand-in `systemctl` first on PATH. The stand-in answers `list-units` from a table of
// units and states (honouring --state= and unit patterns like the real one), fails the
// commands it is told to fail, and records every invocation in a log file.
import { describe, it, expect, beforeAll, afterAll } from "vitest";
import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync, readFileSync, rmSync, existsSync, chmodSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const SCRIPT = resolve(import.meta.dirname, "../overlays/common/usr/local/sbin/reverse-ssh-monitor");

const FAKE_SYSTEMCTL = `#!/bin/sh
# Stand-in for systemctl used by test/monitor.test.ts.
printf '%s\\n' "$*" >> "$FAKE_SYSTEMCTL_LOG"
cmd=
state=
patterns=
for a in "$@"; do
  case $a in
    --state=*) state=\${a#--state=} ;;
    -*) ;;
    *) if [ -z "$cmd" ]; then cmd=$a; else patterns="$patterns $a"; fi ;;
  esac
done
case $cmd in
  list-units)
    if [ -n "\${FAKE_LIST_FAIL:-}" ]; then
      echo "Failed to connect to bus: No such file or directory" >&2
      exit 1
    fi
    printf '%s\\n' "$FAKE_UNITS" | while read -r unit st; do
      [ -n "$unit" ] || continue
      if [ -n "$state" ] && [ "$state" != "$st" ]; then continue; fi
      if [ -n "$patterns" ]; then
        hit=
        for p in $patterns; do
          case $unit in $p) hit=1 ;; esac
        done
        [ -n "$hit" ] || continue
      fi
      if [ "$st" = failed ]; then sub=failed; else sub=running; fi
      printf '%s%s loaded %s %s Reverse SSH tunnel to bastion\\n' "\${FAKE_BULLET:-}" "$unit" "$st" "$sub"
    done
    ;;
  reset-failed) ;;
  restart)
    for u in $patterns; do
      case " \${FAKE_RESTART_FAIL:-} " in
        *" $u "*) echo "Job for $u failed because the control process exited with error code." >&2; exit 1 ;;
      esac
    done
    ;;
  *) echo "fake systemctl: unexpected command: $*" >&2; exit 3 ;;
esac
exit 0
`;

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
  calls: string[];
}

let dir = "";
let runNo = 0;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "mkoverlay-monitor-"));
  writeFileSync(join(dir, "systemctl"), FAKE_SYSTEMCTL, { mode: 0o755 });
  chmodSync(join(dir, "systemctl"), 0o755);
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** units: [name, ActiveState] as systemd would report them. */
function runMonitor(
  units: Array<[string, string]>,
  opts: { restartFail?: string[]; listFail?: boolean; bullet?: boolean; shell?: string } = {},
): Run {
  const log = join(dir, `calls-${++runNo}.log`);
  const env: NodeJS.ProcessEnv = {
    PATH: `${dir}:${process.env.PATH ?? "/usr/bin:/bin"}`,
    FAKE_SYSTEMCTL_LOG: log,
    FAKE_UNITS: units.map(([u, s]) => `${u} ${s}`).join("\n"),
    FAKE_RESTART_FAIL: (opts.restartFail ?? []).join(" "),
    LC_ALL: "C",
  };
  if (opts.listFail) env.FAKE_LIST_FAIL = "1";
  if (opts.bullet) env.FAKE_BULLET = "● ";
  // Without a shell the script runs through its own shebang, as systemd would start it.
  const r = opts.shell
    ? spawnSync(opts.shell, [SCRIPT], { env, encoding: "utf8" })
    : spawnSync(SCRIPT, [], { env, encoding: "utf8" });
  if (r.error) throw r.error;
  const calls = existsSync(log) ? readFileSync(log, "utf8").split("\n").filter((l) => l !== "") : [];
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, calls };
}

/** Units the script asked systemctl to restart, in order. */
function restarted(calls: string[]): string[] {
  return calls.filter((c) => c.startsWith("restart ")).map((c) => c.replace(/^restart (-- )?/, ""));
}

const MIXED: Array<[string, string]> = [
  ["reverse-ssh@eu.service", "failed"],
  ["reverse-ssh@us.service", "active"],
  ["reverse-ssh@bastion\\x2dap.service", "failed"],
  ["reverse-ssh@asia.service", "activating"],
  ["ssh.service", "failed"],
];

describe("reverse-ssh-monitor", () => {
  // dash is /bin/sh on Debian and Raspberry Pi OS; bash checks we rely on nothing dash-only.
  for (const shell of [undefined, "bash"] as const) {
    describe(shell ? `under ${shell}` : "through its shebang", () => {
      it("restarts exactly the failed reverse-ssh@ instances and logs each restart", () => {
        const r = runMonitor(MIXED, shell ? { shell } : {});
        expect(r.status).toBe(0);
        expect(r.stderr).toBe("");
        // Enumerated from systemd, not from a glob over /etc/systemd/system.
        expect(r.calls[0]).toMatch(/^list-units .*--state=failed/);
        expect(r.calls[0]).toContain("reverse-ssh@*.service");
        expect(restarted(r.calls).sort()).toEqual(["reverse-ssh@bastion\\x2dap.service", "reverse-ssh@eu.service"]);
        // reset-failed before restart, so a unit that hit its start limit comes back too.
        for (const u of ["reverse-ssh@eu.service", "reverse-ssh@bastion\\x2dap.service"]) {
          const reset = r.calls.findIndex((c) => c.startsWith("reset-failed ") && c.endsWith(` ${u}`));
          const restart = r.calls.findIndex((c) => c.startsWith("restart ") && c.endsWith(` ${u}`));
          expect(reset).toBeGreaterThanOrEqual(0);
          expect(restart).toBeGreaterThan(reset);
        }
        const lines = r.stdout.split("\n").filter((l) => l !== "");
        expect(lines).toHaveLength(2);
        expect(r.stdout).toContain("reverse-ssh@eu.service was failed, restarted it");
        expect(r.stdout).toContain("reverse-ssh@bastion\\x2dap.service was failed, restarted it");
        expect(r.stdout).not.toContain("us.service");
        expect(r.stdout).not.toContain("nothing to do");
      });
    });
  }

  it("copes with a status bullet in front of the unit name", () => {
    const r = runMonitor(MIXED, { bullet: true });
    expect(r.status).toBe(0);
    expect(restarted(r.calls).sort()).toEqual(["reverse-ssh@bastion\\x2dap.service", "reverse-ssh@eu.service"]);
  });

  it("restarts nothing and says so when no instance is failed", () => {
    const r = runMonitor([
      ["reverse-ssh@eu.service", "active"],
      ["reverse-ssh@us.service", "active"],
      ["ssh.service", "failed"],
    ]);
    expect(r.status).toBe(0);
    expect(r.stderr).toBe("");
    expect(r.calls).toHaveLength(1);
    expect(restarted(r.calls)).toEqual([]);
    expect(r.calls.some((c) => c.startsWith("reset-failed"))).toBe(false);
    expect(r.stdout.trim()).toBe("reverse-ssh-monitor: no failed reverse-ssh tunnel, nothing to do");
  });

  it("restarts nothing when there are no instances at all", () => {
    const r = runMonitor([]);
    expect(r.status).toBe(0);
    expect(restarted(r.calls)).toEqual([]);
    expect(r.stdout).toContain("nothing to do");
  });

  it("exits non-zero when a restart fails, after still trying the others", () => {
    const r = runMonitor(MIXED, { restartFail: ["reverse-ssh@eu.service"] });
    expect(r.status).toBe(1);
    expect(restarted(r.calls).sort()).toEqual(["reverse-ssh@bastion\\x2dap.service", "reverse-ssh@eu.service"]);
    expect(r.stderr).toContain("reverse-ssh@eu.service was failed, restart FAILED");
    expect(r.stderr).toContain("1 failed tunnel(s) could not be restarted, 1 restarted");
    expect(r.stdout).toContain("reverse-ssh@bastion\\x2dap.service was failed, restarted it");
    expect(r.stdout).not.toContain("nothing to do");
  });

  it("exits non-zero without restarting anything when systemd cannot be asked", () => {
    const r = runMonitor(MIXED, { listFail: true });
    expect(r.status).toBe(1);
    expect(restarted(r.calls)).toEqual([]);
    expect(r.stderr).toContain("cannot list reverse-ssh@*.service units");
  });
});

describe("reverse-ssh-monitor lint", () => {
  function shellcheck(args: string[], input?: string) {
    const r = spawnSync("shellcheck", args, { encoding: "utf8", ...(input === undefined ? {} : { input }) });
    if (r.error) throw r.error; // shellcheck missing must fail the test, not skip it
    return r;
  }

  it("is shellcheck-clean as POSIX sh", () => {
    // Every optional check too, except SC2250 (braces around every variable): pure style.
    const r = shellcheck(["-s", "sh", "--enable=all", "--exclude=SC2250", SCRIPT]);
    expect(r.stdout + r.stderr).toBe("");
    expect(r.status).toBe(0);
  });

  it("is shellcheck-clean for the shell its shebang names", () => {
    const r = shellcheck([SCRIPT]);
    expect(r.stdout + r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(readFileSync(SCRIPT, "utf8").split("\n")[0]).toBe("#!/bin/sh");
  });

  it("the shellcheck run does catch problems (control)", () => {
    const r = shellcheck(["-s", "sh", "-"], "#!/bin/sh\nfor f in $(ls *.service); do echo $f; done\n");
    expect(r.status).not.toBe(0);
    expect(r.stdout).toMatch(/SC\d{4}/);
  });
});
