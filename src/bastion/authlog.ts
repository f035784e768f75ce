/**
 * sshd's authentication log, followed live: which key logged in as the tunnel user. The agent
 * uses it to retire a rotated device's old key as soon as the new one is seen (`rotate
 * --grace`); issue 13 cross-checks ports with it.
 *
 * sshd writes `Accepted publickey for USER from ADDR port N ssh2: ED25519 SHA256:…` at INFO, as
 * the whole line (journal MESSAGE, or a `-E` file line ending in CR LF). Only that exact shape
 * counts: sshd also logs text a client chose — an unauthenticated client's disconnect reason
 * goes out verbatim as `Received disconnect from ADDR port N:11: TEXT [preauth]` (OpenSSH 9.2) —
 * so a pattern found anywhere in a line could be forged by anyone who can reach port 22. Every
 * line sshd writes begins with its own words, and what a client sends is vis(3)-encoded (no
 * line breaks), so anchoring on both ends leaves a client nothing to forge.
 * Sources: the journal (`journalctl --follow`, only entries that journald itself saw come from
 * a root-owned sshd process, so another local user cannot forge one with `logger`), or a file
 * sshd writes with `-E FILE` (followed like `tail -F`: from its end, across truncation and
 * rotation).
 */
import { spawn } from "node:child_process";
import { closeSync, fstatSync, openSync, readSync, statSync } from "node:fs";

export interface Accepted {
  user: string;
  address: string;
  port: number;
  keyType: string;
  fingerprint: string;
}

const ACCEPTED = /^Accepted publickey for (\S+) from (\S+) port (\d{1,5}) ssh2: ([A-Z0-9-]+) (SHA256:[A-Za-z0-9+/]{43})\r?$/;

export function parseAccepted(line: string): Accepted | undefined {
  const m = ACCEPTED.exec(line);
  if (!m) return undefined;
  return { user: m[1]!, address: m[2]!, port: Number(m[3]), keyType: m[4]!, fingerprint: m[5]! };
}

export interface Follower {
  stop(): void;
}

/** Splits a byte stream into lines; a partial last line waits for the rest. */
function lineSplitter(onLine: (l: string) => void): (chunk: string) => void {
  let buf = "";
  return (chunk) => {
    buf += chunk;
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      onLine(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
    if (buf.length > 1 << 16) buf = ""; // a runaway line is nobody's log line
  };
}

/**
 * Follows a log file from its current end. Polls (every `intervalMs`): a file sshd appends to
 * is cheap to stat, and polling survives rotation and truncation without inotify corner cases.
 */
export function followFile(file: string, onLine: (l: string) => void, opts: { intervalMs?: number; onError?: (e: Error) => void } = {}): Follower {
  const feed = lineSplitter(onLine);
  let fd: number | undefined;
  let ino = -1;
  let pos = 0;
  let reported = false;
  const buf = Buffer.alloc(64 * 1024);
  const open = (fromEnd: boolean) => {
    if (fd !== undefined) closeSync(fd);
    fd = undefined;
    try {
      fd = openSync(file, "r");
      const st = fstatSync(fd);
      ino = st.ino;
      pos = fromEnd ? st.size : 0;
      reported = false;
    } catch (e) {
      if (!reported) opts.onError?.(e as Error);
      reported = true;
    }
  };
  open(true);
  const tick = () => {
    try {
      if (fd === undefined) return open(false);
      let st = statSync(file, { throwIfNoEntry: false });
      if (st && st.ino !== ino) {
        // Rotated: finish the old file, then read the new one from its start.
        drain();
        open(false);
        st = statSync(file, { throwIfNoEntry: false });
      }
      if (fd === undefined) return;
      if (fstatSync(fd).size < pos) pos = 0; // truncated
      drain();
    } catch (e) {
      opts.onError?.(e as Error);
    }
  };
  const drain = () => {
    if (fd === undefined) return;
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      pos += n;
      feed(buf.subarray(0, n).toString("utf8"));
    }
  };
  const timer = setInterval(tick, opts.intervalMs ?? 250);
  return {
    stop() {
      clearInterval(timer);
      if (fd !== undefined) closeSync(fd);
      fd = undefined;
    },
  };
}

/**
 * Follows sshd's entries in the journal, from now on. journalctl is restarted if it exits, after
 * 5 s doubling to 5 min; a failure is reported once until journalctl runs again.
 */
export function followJournal(onLine: (l: string) => void, opts: { onError?: (e: Error) => void } = {}): Follower {
  let stopped = false;
  let child: ReturnType<typeof spawn> | undefined;
  let restart: NodeJS.Timeout | undefined;
  let delay = 5000;
  let reported = false;
  const start = () => {
    // _UID=0 and _COMM are set by journald from the sending process, not by the sender. From
    // OpenSSH 9.8 on, the login lines come from `sshd-session` (two values of one field: either).
    child = spawn("journalctl", ["--follow", "--lines=0", "--output=cat", "--no-pager", "_COMM=sshd", "_COMM=sshd-session", "_UID=0"], { stdio: ["ignore", "pipe", "pipe"] });
    const feed = lineSplitter(onLine);
    const started = Date.now();
    child.stdout!.setEncoding("utf8").on("data", feed);
    let err = "";
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
    child.on("error", (e) => err || (err = e.message));
    child.on("exit", (code) => {
      if (stopped) return;
      if (Date.now() - started > 60_000) {
        delay = 5000; // it ran for a while: a new failure is news
        reported = false;
      }
      if (!reported) opts.onError?.(new Error(`journalctl exited (${code}): ${err.trim().split("\n")[0] ?? ""}; retrying`));
      reported = true;
      restart = setTimeout(start, delay);
      delay = Math.min(delay * 2, 300_000);
    });
  };
  start();
  return {
    stop() {
      stopped = true;
      if (restart) clearTimeout(restart);
      child?.kill("SIGTERM");
    },
  };
}
