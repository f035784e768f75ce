/**
 * Loopback networking for tests: a free port, and whether something listens. Tests only ever
 * talk to 127.0.0.1 / ::1.
 */
import { randomInt } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A TCP port that is free on 127.0.0.1 (and on ::1 where IPv6 loopback exists) right now. */
export async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = createServer();
      s.once("error", reject);
      s.listen(0, "127.0.0.1", () => {
        const a = s.address();
        const p = typeof a === "object" && a ? a.port : 0;
        s.close(() => resolve(p));
      });
    });
    const v6ok = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "EADDRNOTAVAIL" || e.code === "EAFNOSUPPORT"));
      s.listen(port, "::1", () => s.close(() => resolve(true)));
    });
    if (port > 0 && v6ok) return port;
  }
  throw new Error("no free port found");
}

/** True when something accepts a TCP connection on 127.0.0.1:port. */
export function canConnect(port: number, host = "127.0.0.1", timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ port, host });
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(timeoutMs, () => done(false));
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
  });
}


/**
 * A block of consecutive loopback ports that this test run owns, machine-wide.
 *
 * Tunnel ports are listening ports on the one loopback of the machine: a test that takes them
 * from a fixed range (the default 21000-21999 makes the first device's port always 21000)
 * collides with any other run of the suite on the same machine — another checkout's
 * `make test`, a second CI job — and then either the bastion refuses the -R ("remote port
 * forwarding failed") or, worse, the test's readiness probe finds the *other* run's tunnel and
 * the operator reaches a foreign device. So each file takes its own block:
 * - below the kernel's ephemeral range, so no outgoing connection (ssh, pg, probes) can occupy
 *   one of its ports between the check and the bind, as it can with freePort();
 * - free on 127.0.0.1 and ::1 when taken;
 * - claimed by exclusive lock files (one per 16 ports) naming our PID, so two runs using this
 *   helper never share a port (a lock whose process is gone is taken over).
 */
export interface PortBlock {
  lo: number;
  hi: number;
  /** The i-th port of the block. */
  port(i: number): number;
  /** Ports lo+from to lo+to as a config range string. */
  range(from: number, to: number): string;
  release(): void;
}

/** Below Linux's default ephemeral range (32768-60999) and clear of the fixed test ranges (21000-27199). */
const BLOCK_AREA = { lo: 28_000, hi: 32_767 };
const GRANULE = 16;
const LOCK_DIR = join(tmpdir(), "mkoverlay-test-ports");

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

function tryLock(lock: string): boolean {
  try {
    writeFileSync(lock, String(process.pid), { flag: "wx" });
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    return false;
  }
}

function claim(lock: string): boolean {
  if (tryLock(lock)) return true;
  let holder = 0;
  try {
    holder = Number(readFileSync(lock, "utf8"));
  } catch {
    // released meanwhile
  }
  // A holder that has not written its PID yet reads as 0: treat it as alive.
  if (holder === 0 || alive(holder)) return false;
  // Stale: its process is gone. Remove it and race for it like everybody else.
  rmSync(lock, { force: true });
  return tryLock(lock);
}

function unlock(lock: string): void {
  try {
    if (Number(readFileSync(lock, "utf8")) === process.pid) rmSync(lock);
  } catch {
    // already gone
  }
}

function bindable(port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", (e: NodeJS.ErrnoException) => resolve(host === "::1" && (e.code === "EADDRNOTAVAIL" || e.code === "EAFNOSUPPORT")));
    s.listen(port, host, () => s.close(() => resolve(true)));
  });
}

export async function portBlock(size: number, area = BLOCK_AREA): Promise<PortBlock> {
  if (!existsSync(LOCK_DIR)) {
    mkdirSync(LOCK_DIR, { recursive: true });
    try {
      // Shared by every user's test runs, like /tmp itself.
      chmodSync(LOCK_DIR, 0o1777);
    } catch {
      // another user's run created it first
    }
  }
  const granules = Math.ceil(size / GRANULE);
  const first = Math.ceil(area.lo / GRANULE);
  const slots = Math.floor((area.hi + 1) / GRANULE) - first - granules + 1;
  const start = slots > 0 ? randomInt(slots) : 0;
  for (let k = 0; k < slots; k++) {
    const g0 = first + ((start + k) % slots);
    const locks: string[] = [];
    for (let g = g0; g < g0 + granules; g++) {
      const lock = join(LOCK_DIR, `${g * GRANULE}.lock`);
      if (!claim(lock)) break;
      locks.push(lock);
    }
    const lo = g0 * GRANULE;
    let free = locks.length === granules;
    for (let p = lo; p < lo + size && free; p++) free = (await bindable(p, "127.0.0.1")) && (await bindable(p, "::1"));
    const release = (): void => locks.forEach(unlock);
    if (!free) {
      release();
      continue;
    }
    process.once("exit", release);
    return {
      lo,
      hi: lo + size - 1,
      port: (i) => {
        if (i < 0 || i >= size) throw new Error(`port ${i} is outside a block of ${size}`);
        return lo + i;
      },
      range: (from, to) => `${lo + from}-${lo + to}`,
      release,
    };
  }
  throw new Error(`no free block of ${size} loopback ports in ${area.lo}-${area.hi}`);
}
