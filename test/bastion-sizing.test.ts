/**
 * A bastion sized for its share (issue 21): the host's kernel and memory against the tunnels it
 * will carry, and the tunnel sshd's unit not capped by systemd's default task limit.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { capacityProblems, hostLimits, PER_TUNNEL } from "../src/bastion/install-checks.js";
import { renderTunnelSshdUnit } from "../src/bastion/tunnel-sshd.js";

const roomy = { pidMax: 4_194_304, threadsMax: 1_000_000, memTotalKiB: 64 * 1024 * 1024 };

describe("bastion sizing", () => {
  const dir = mkdtempSync(join(tmpdir(), "mko-sizing-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("a host with room says nothing; each short limit is named with the size it needs", () => {
    expect(capacityProblems(roomy, 10_000)).toEqual([]);
    // Debian's kernel default without systemd's 50-pid-max.conf: 32,768 processes.
    const p = capacityProblems({ ...roomy, pidMax: 32_768 }, 10_000);
    expect(p).toHaveLength(1);
    expect(p[0]).toMatch(/^kernel\.pid_max is 32768: 10000 tunnels need 20000 processes, twice that with room; set kernel\.pid_max = 4194304/);
    // 8,192 tunnels need 16,384 processes, 32,768 with room: exactly enough.
    expect(capacityProblems({ ...roomy, pidMax: 32_768 }, 8_192)).toEqual([]);
    expect(capacityProblems({ ...roomy, pidMax: 32_768 }, 8_193)).toHaveLength(1);
    const mem = capacityProblems({ ...roomy, memTotalKiB: 8 * 1024 * 1024 }, 10_000);
    expect(mem).toEqual([expect.stringMatching(/^memory is 8192 MiB: 10000 tunnels take about 18555 MiB, 23193 MiB with room$/)]);
    expect(capacityProblems({ ...roomy, threadsMax: 15_000 }, 10_000)[0]).toMatch(/^kernel\.threads-max is 15000/);
    expect(PER_TUNNEL).toEqual({ processes: 2, memoryKiB: 1_900 });
  });

  it("reads the limits from /proc (this host's, and a given tree)", () => {
    const here = hostLimits();
    expect(here).toBeDefined();
    expect(here!.pidMax).toBeGreaterThan(300);
    expect(here!.memTotalKiB).toBeGreaterThan(1024);
    const proc = join(dir, "proc");
    mkdirSync(join(proc, "sys", "kernel"), { recursive: true });
    writeFileSync(join(proc, "sys", "kernel", "pid_max"), "32768\n");
    writeFileSync(join(proc, "sys", "kernel", "threads-max"), "15432\n");
    writeFileSync(join(proc, "meminfo"), "MemTotal:        2014232 kB\nMemFree:          123456 kB\n");
    expect(hostLimits(proc)).toEqual({ pidMax: 32_768, threadsMax: 15_432, memTotalKiB: 2_014_232 });
    writeFileSync(join(proc, "meminfo"), "MemFree: 1 kB\n");
    expect(hostLimits(proc)).toBeUndefined();
  });

  it("the tunnel sshd's unit lifts systemd's default task limit (two processes per tunnel)", () => {
    const unit = renderTunnelSshdUnit();
    expect(unit).toMatch(/^TasksMax=infinity$/m);
  });
});
