/**
 * Tunnel sessions on the bastion, read from /proc: which process listens on which loopback
 * port. A gateway's `ssh -R` makes the tunnel user's sshd session process (the unprivileged
 * `sshd: USER` child of the `[priv]` monitor) listen on 127.0.0.1 and ::1. Ending that process
 * ends the session and frees the port (checked with OpenSSH 9.2: SIGTERM → the monitor exits,
 * the client sees the connection close); killing the sshd listener does not (FACTS.md).
 *
 * Reading another user's /proc/PID/fd links needs CAP_SYS_PTRACE (sshd marks its session
 * processes non-dumpable, so even the same uid could not), and signalling them CAP_KILL: the
 * agent's unit keeps exactly these two capabilities.
 *
 * Used by the agent to end revoked devices' sessions, and meant for the fleet view (issue 13),
 * which lists the listeners of the tunnel range every few seconds.
 */
import { readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { endianness } from "node:os";
import { join } from "node:path";
import type { PortRange } from "../config/fleet.js";

export interface Listener {
  port: number;
  /** `127.0.0.1` (any 127/8 address is printed as such) or `::1`. */
  address: string;
  /** The socket's owner (the uid of the process that created it). */
  uid: number;
  inode: number;
  /** The process holding the socket, when it was looked up and found. */
  pid?: number;
}

const LISTEN = "0A";

/** A /proc/net hex address (32-bit words in host byte order) as bytes in network order. */
function addressBytes(hex: string, littleEndian: boolean): Buffer {
  const out = Buffer.alloc(hex.length / 2);
  for (let w = 0; w < hex.length / 8; w++) {
    const v = Number.parseInt(hex.slice(w * 8, w * 8 + 8), 16) >>> 0;
    if (littleEndian) out.writeUInt32LE(v, w * 4);
    else out.writeUInt32BE(v, w * 4);
  }
  return out;
}

/** `127.0.0.1` / `::1` for a loopback address (IPv4-mapped included), else undefined. */
function loopbackName(b: Buffer): string | undefined {
  if (b.length === 4) return b[0] === 127 ? "127.0.0.1" : undefined;
  if (b.subarray(0, 15).every((x) => x === 0) && b[15] === 1) return "::1";
  const mapped = b.subarray(0, 10).every((x) => x === 0) && b[10] === 0xff && b[11] === 0xff;
  return mapped && b[12] === 127 ? "127.0.0.1" : undefined;
}

/**
 * Listening loopback sockets in a /proc/net/tcp or tcp6 text, with ports in `ranges`. Pure:
 * `littleEndian` is the byte order of the machine that printed it.
 */
export function parseProcNetTcp(text: string, ranges: PortRange[], littleEndian = endianness() === "LE"): Listener[] {
  const out: Listener[] = [];
  const lines = text.split("\n");
  for (let i = 1; i < lines.length; i++) {
    const f = lines[i]!.trim().split(/\s+/);
    if (f.length < 10 || f[3] !== LISTEN) continue;
    const [addrHex = "", portHex = ""] = f[1]!.split(":");
    const port = Number.parseInt(portHex, 16);
    if (!ranges.some((r) => port >= r.lo && port <= r.hi)) continue;
    if (addrHex.length !== 8 && addrHex.length !== 32) continue;
    const address = loopbackName(addressBytes(addrHex, littleEndian));
    if (!address) continue;
    out.push({ port, address, uid: Number(f[7]), inode: Number(f[9]) });
  }
  return out;
}

export interface ProcOptions {
  /** Where procfs is mounted (tests point it elsewhere). */
  proc?: string;
}

/** Loopback listeners on ports in `ranges`, optionally only sockets of `uid`, with their pids. */
export function loopbackListeners(ranges: PortRange[], opts: ProcOptions & { uid?: number; withPids?: boolean } = {}): Listener[] {
  const proc = opts.proc ?? "/proc";
  const all: Listener[] = [];
  for (const f of ["tcp", "tcp6"]) {
    let text: string;
    try {
      text = readFileSync(join(proc, "net", f), "utf8");
    } catch {
      continue; // no IPv6 in this kernel
    }
    all.push(...parseProcNetTcp(text, ranges).filter((l) => opts.uid === undefined || l.uid === opts.uid));
  }
  if (opts.withPids && all.length > 0) {
    const owners = socketOwners(new Set(all.map((l) => l.inode)), { proc, ...(opts.uid === undefined ? {} : { uid: opts.uid }) });
    for (const l of all) {
      const pid = owners.pids.get(l.inode);
      if (pid !== undefined) l.pid = pid;
    }
  }
  return all;
}

/**
 * Which process holds each socket inode: scans /proc/PID/fd of the processes whose effective
 * uid is `uid` (all processes without it) and stops once every inode is found. `denied`
 * counts processes whose fds could not be read (missing CAP_SYS_PTRACE).
 */
function socketOwners(inodes: Set<number>, opts: ProcOptions & { uid?: number } = {}): { pids: Map<number, number>; denied: number } {
  const proc = opts.proc ?? "/proc";
  const pids = new Map<number, number>();
  let denied = 0;
  if (inodes.size === 0) return { pids, denied };
  for (const name of readdirSync(proc)) {
    if (!/^\d+$/.test(name)) continue;
    const dir = join(proc, name);
    try {
      // /proc/PID itself is owned by the effective uid, even for a non-dumpable process.
      if (opts.uid !== undefined && statSync(dir).uid !== opts.uid) continue;
      for (const fd of readdirSync(join(dir, "fd"))) {
        let target: string;
        try {
          target = readlinkSync(join(dir, "fd", fd));
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === "EACCES" || (e as NodeJS.ErrnoException).code === "EPERM") {
            denied += 1;
            break;
          }
          continue;
        }
        const m = /^socket:\[(\d+)\]$/.exec(target);
        if (m && inodes.has(Number(m[1]))) pids.set(Number(m[1]), Number(name));
      }
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === "EACCES" || code === "EPERM") denied += 1;
      // ENOENT: the process ended while we looked.
      continue;
    }
    if (pids.size === inodes.size) break;
  }
  return { pids, denied };
}

export interface Ended {
  port: number;
  pid: number;
}

/**
 * Ends the sessions of `uid` that listen on any of `ports` on loopback: SIGTERM to the process
 * holding the socket, SIGKILL if the port is still held after `graceMs`. Returns what was
 * signalled, and the ports no process of `uid` could be found for (`unowned`) or whose fds could
 * not be read (`denied` > 0: the agent lacks CAP_SYS_PTRACE).
 */
export async function endSessions(ports: number[], uid: number, opts: ProcOptions & { graceMs?: number } = {}): Promise<{ ended: Ended[]; unowned: number[]; denied: number }> {
  const wanted = [...new Set(ports)].sort((a, b) => a - b);
  if (wanted.length === 0) return { ended: [], unowned: [], denied: 0 };
  const ranges = wanted.map((p) => ({ lo: p, hi: p }));
  const listeners = loopbackListeners(ranges, { ...opts, uid });
  const { pids, denied } = socketOwners(new Set(listeners.map((l) => l.inode)), { ...opts, uid });
  const ended: Ended[] = [];
  const signalled = new Set<number>();
  for (const l of listeners) {
    const pid = pids.get(l.inode);
    if (pid === undefined) continue;
    if (!signalled.has(pid)) {
      try {
        process.kill(pid, "SIGTERM");
        signalled.add(pid);
      } catch {
        continue; // gone already
      }
    }
    if (!ended.some((e) => e.port === l.port)) ended.push({ port: l.port, pid });
  }
  const unowned = wanted.filter((p) => listeners.some((l) => l.port === p) && !ended.some((e) => e.port === p));
  // Make sure: a session that ignores SIGTERM must not keep a revoked device's port.
  const mine = ended.map((e) => ({ lo: e.port, hi: e.port }));
  const held = () => loopbackListeners(mine, { ...opts, uid }).length > 0;
  const deadline = Date.now() + (opts.graceMs ?? 2000);
  while (mine.length > 0 && held() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  if (mine.length > 0 && held()) {
    for (const pid of signalled) {
      try {
        // Only if it is still the tunnel user's process (not a reused pid).
        if (statSync(join(opts.proc ?? "/proc", String(pid))).uid === uid) process.kill(pid, "SIGKILL");
      } catch {
        // ended meanwhile
      }
    }
  }
  return { ended, unowned, denied };
}

const ESTABLISHED = "01";

/** `address:port` of a /proc/net hex address, as sshd's log prints a client (IPv4-mapped shown as IPv4). */
function peerName(hex: string, littleEndian: boolean): string | undefined {
  const [addrHex = "", portHex = ""] = hex.split(":");
  if (addrHex.length !== 8 && addrHex.length !== 32) return undefined;
  const b = addressBytes(addrHex, littleEndian);
  const port = Number.parseInt(portHex, 16);
  if (b.length === 4) return `${[...b].join(".")}:${port}`;
  if (b.subarray(0, 10).every((x) => x === 0) && b[10] === 0xff && b[11] === 0xff) return `${[...b.subarray(12)].join(".")}:${port}`;
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(b.readUInt16BE(i).toString(16));
  // The shortest form, as sshd prints it (inet_ntop).
  const full = groups.join(":");
  const zeros = full.match(/(^|:)0(:0)+(:|$)/g)?.sort((x, y) => y.length - x.length)[0];
  return `${zeros ? full.replace(zeros, "::") : full}:${port}`;
}

/** Each established connection of a /proc/net/tcp{,6} text: socket inode → the client's "addr port". */
function establishedPeers(text: string, le: boolean, into: Map<number, string>): void {
  for (const line of text.split("\n").slice(1)) {
    const x = line.trim().split(/\s+/);
    if (x.length < 10 || x[3] !== ESTABLISHED) continue;
    const name = peerName(x[2]!, le);
    if (name) into.set(Number(x[9]), name);
  }
}

/**
 * The client end (`address:port`, as sshd's "Accepted publickey … from ADDRESS port PORT" line
 * names it) of the connection each of `pids` holds: a tunnel's session process holds both its
 * listening sockets and its client's connection, so this ties a listening port to the login
 * that made it.
 */
export function peersOf(pids: number[], opts: ProcOptions = {}): Map<number, string[]> {
  const proc = opts.proc ?? "/proc";
  const le = endianness() === "LE";
  const remote = new Map<number, string>();
  for (const f of ["tcp", "tcp6"]) {
    let text: string;
    try {
      text = readFileSync(join(proc, "net", f), "utf8");
    } catch {
      continue;
    }
    establishedPeers(text, le, remote);
  }
  const out = new Map<number, string[]>();
  for (const pid of new Set(pids)) {
    const peers: string[] = [];
    try {
      for (const fd of readdirSync(join(proc, String(pid), "fd"))) {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(join(proc, String(pid), "fd", fd)));
        const peer = m ? remote.get(Number(m[1])) : undefined;
        if (peer) peers.push(peer);
      }
    } catch {
      // gone, or not ours to read
    }
    out.set(pid, peers);
  }
  return out;
}

/** The command name of a process (`/proc/PID/comm`), or undefined when it is gone. */
function commOf(pid: number, proc: string): string | undefined {
  try {
    return readFileSync(join(proc, String(pid), "comm"), "utf8").trim();
  } catch {
    return undefined;
  }
}

/** sshd's per-connection processes: `sshd` on OpenSSH 9.x, `sshd-session` from 9.8 on. */
const SSHD_COMMS = new Set(["sshd", "sshd-session"]);

/**
 * Is `pid` the tunnel user's sshd session process? Its effective uid is the tunnel user's (the
 * owner of /proc/PID, which even a non-dumpable process keeps) and it is sshd. Any other local
 * user's listener fails the first test; the tunnel user runs nothing but sshd (nologin shell,
 * ForceCommand), so a listener of its uid that is not sshd fails the second.
 */
export function isTunnelSession(pid: number, uid: number, opts: ProcOptions = {}): boolean {
  const proc = opts.proc ?? "/proc";
  try {
    if (statSync(join(proc, String(pid))).uid !== uid) return false;
  } catch {
    return false;
  }
  return SSHD_COMMS.has(commOf(pid, proc) ?? "");
}

export interface TunnelSession {
  pid: number;
  /** When the process started (ms since the epoch), when /proc tells. */
  startedAt?: number;
  /** The tunnel-range ports it listens on. */
  ports: number[];
  /** Its client connection(s), `address:port` as sshd's log names them. */
  peers: string[];
}

/** The tunnel user's sshd sessions listening on ports in `ranges`, with their client ends. */
export function tunnelSessions(ranges: PortRange[], uid: number, opts: ProcOptions = {}): TunnelSession[] {
  const byPid = new Map<number, Set<number>>();
  for (const l of loopbackListeners(ranges, { ...opts, uid, withPids: true })) {
    if (l.pid === undefined || !isTunnelSession(l.pid, uid, opts)) continue;
    byPid.set(l.pid, (byPid.get(l.pid) ?? new Set()).add(l.port));
  }
  const peers = peersOf([...byPid.keys()], opts);
  return [...byPid].map(([pid, ports]) => withStart({ pid, ports: [...ports].sort((a, b) => a - b), peers: peers.get(pid) ?? [] }, procRoot(opts)));
}

/**
 * Ends sessions by process: SIGTERM to each pid that is still `uid`'s, SIGKILL to any still
 * there after `graceMs`. Returns the pids signalled.
 */
export async function endProcesses(pids: number[], uid: number, opts: ProcOptions & { graceMs?: number } = {}): Promise<number[]> {
  const proc = opts.proc ?? "/proc";
  const ours = (pid: number) => {
    try {
      // Not a reused pid of someone else's, and not a zombie its parent has yet to reap.
      if (statSync(join(proc, String(pid))).uid !== uid) return false;
      const stat = readFileSync(join(proc, String(pid), "stat"), "utf8");
      return !/^\S+ \(.*\) [ZX]/s.test(stat);
    } catch {
      return false;
    }
  };
  const signalled: number[] = [];
  for (const pid of new Set(pids)) {
    if (!ours(pid)) continue;
    try {
      process.kill(pid, "SIGTERM");
      signalled.push(pid);
    } catch {
      // gone already
    }
  }
  const deadline = Date.now() + (opts.graceMs ?? 2000);
  while (signalled.some(ours) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  for (const pid of signalled.filter(ours)) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // ended meanwhile
    }
  }
  return signalled;
}

/**
 * Every sshd session process of `uid`, listening or not, with the tunnel-range ports (`ranges`)
 * it listens on and its client connections: one pass over /proc. A session that holds no port
 * still counts — an authenticated session may ask for a forward at any time.
 */
export function allTunnelSessions(ranges: PortRange[], uid: number, opts: ProcOptions = {}): TunnelSession[] {
  const proc = opts.proc ?? "/proc";
  const le = endianness() === "LE";
  const listening = new Map<number, number>();
  const remote = new Map<number, string>();
  for (const f of ["tcp", "tcp6"]) {
    let text: string;
    try {
      text = readFileSync(join(proc, "net", f), "utf8");
    } catch {
      continue;
    }
    for (const l of parseProcNetTcp(text, ranges, le)) listening.set(l.inode, l.port);
    establishedPeers(text, le, remote);
  }
  const out: TunnelSession[] = [];
  for (const name of readdirSync(proc)) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    try {
      if (statSync(join(proc, name)).uid !== uid || !SSHD_COMMS.has(commOf(pid, proc) ?? "")) continue;
      const ports = new Set<number>();
      const peers: string[] = [];
      for (const fd of readdirSync(join(proc, name, "fd"))) {
        let target: string;
        try {
          target = readlinkSync(join(proc, name, "fd", fd));
        } catch {
          continue;
        }
        const m = /^socket:\[(\d+)\]$/.exec(target);
        if (!m) continue;
        const inode = Number(m[1]);
        const port = listening.get(inode);
        if (port !== undefined) ports.add(port);
        const peer = remote.get(inode);
        if (peer) peers.push(peer);
      }
      out.push(withStart({ pid, ports: [...ports].sort((a, b) => a - b), peers }, proc));
    } catch {
      // ended while we looked, or not readable (no CAP_SYS_PTRACE)
    }
  }
  return out;
}

const procRoot = (opts: ProcOptions) => opts.proc ?? "/proc";

/** Linux reports process start times in USER_HZ ticks, 100 on every architecture it runs on. */
const USER_HZ = 100;

function bootTimeMs(procDir: string): number | undefined {
  try {
    const m = /^btime (\d+)$/m.exec(readFileSync(join(procDir, "stat"), "utf8"));
    return m ? Number(m[1]) * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/** When `pid` started (ms since the epoch): its starttime in /proc/PID/stat after the boot time. */
function processStartMs(pid: number, opts: ProcOptions = {}): number | undefined {
  const boot = bootTimeMs(procRoot(opts));
  if (boot === undefined) return undefined;
  try {
    const stat = readFileSync(join(procRoot(opts), String(pid), "stat"), "utf8");
    // Fields after the command name (which may hold spaces and parentheses): state is field 3, starttime 22.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ticks = Number(rest[19]);
    return Number.isFinite(ticks) ? boot + (ticks * 1000) / USER_HZ : undefined;
  } catch {
    return undefined;
  }
}

function withStart(s: TunnelSession, procDir: string): TunnelSession {
  const t = processStartMs(s.pid, { proc: procDir });
  return t === undefined ? s : { ...s, startedAt: t };
}
