/**
 * How a file found in an overlay differs from the one mkoverlay builds, said so a person can act
 * on it: for KEY=VALUE files, systemd units and sshd configs the key (with its unit section) and
 * both values; for other text the first line that differs; for binary files the size and the
 * first byte that differs. A private key is never shown: only which key (fingerprint and
 * comment) each side holds. Pure: contents in, differences out.
 */
import { decodePrivateKey, fingerprint } from "../keys/ed25519.js";

/** One difference in a file; `expected`/`found` are never key material. */
export interface Difference {
  /** The file, absolute in the device's root. */
  path: string;
  /** What differs: the content, or the entry's type, mode, owner or link target. */
  attribute: "content" | "type" | "mode" | "owner" | "target" | "presence";
  /** The key (`[Section] Key` in a unit) that differs, for key/value files. */
  key?: string;
  /** 1-based line in the file found (absent: the line is missing from it). */
  line?: number;
  /** What mkoverlay builds (absent: the file found has something extra here). */
  expected?: string;
  /** What the file holds (absent: missing from it). */
  found?: string;
  /** Binary files: the first byte offset that differs (`expected`/`found` are the sizes). */
  byte?: number;
  /** Set for the private key: the values are key fingerprints, never key material. */
  secret?: boolean;
}

/** At most this many differences are named per file; the rest are counted. */
const MAX_PER_FILE = 5;
const SHOWN = 120;

/**
 * A value found in an overlay, safe to print: quoted, with every control character (C0, DEL,
 * C1) and bidirectional override escaped, so a crafted file cannot drive the terminal.
 */
export const safe = (v: string): string => JSON.stringify(v).replace(/[\u007f-\u009f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
const show = (v: string): string => safe(v.length > SHOWN ? `${v.slice(0, SHOWN)}…` : v);

interface Line {
  n: number;
  text: string;
  /** The key, with its `[Section]` in an INI-style file, when the line is KEY=VALUE or `Keyword value`. */
  key?: string;
  value?: string;
}

const KV = /^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*?)\s*$/;
const KEYWORD = /^\s*([A-Za-z][A-Za-z0-9]*)\s+(\S.*?)\s*$/;
const SECTION = /^\s*\[([A-Za-z0-9_. -]+)\]\s*$/;

function parse(text: string): Line[] {
  const lines = text.split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  let section: string | undefined;
  return lines.map((t, i) => {
    const s = SECTION.exec(t);
    if (s) section = s[1];
    const m = t.trimStart().startsWith("#") ? null : (KV.exec(t) ?? KEYWORD.exec(t));
    const line: Line = { n: i + 1, text: t };
    if (m) {
      line.key = section ? `[${section}] ${m[1]}` : m[1]!;
      line.value = m[2]!;
    }
    return line;
  });
}

const isText = (b: Buffer): boolean => !b.includes(0) && Buffer.from(b.toString("utf8"), "utf8").equals(b);

/** Which key a private key file holds, said without its material. */
function keyIdentity(content: Buffer, path: string): string {
  try {
    const { key, comment } = decodePrivateKey(content.toString("utf8"), path);
    return `key ${fingerprint(key.pub)}${comment ? ` (comment ${JSON.stringify(comment)})` : ""}`;
  } catch {
    return `not an OpenSSH ed25519 private key (${content.length} bytes)`;
  }
}

/** The text of one difference, after the file's path. */
export function describe(d: Difference): string {
  if (d.secret) return ` differs (a private key: its content is not shown): it holds ${d.found}, mkoverlay builds ${d.expected}`;
  if (d.byte !== undefined) return ` differs from byte ${d.byte} on: it is ${d.found}, mkoverlay builds ${d.expected}`;
  const at = d.line === undefined ? "" : ` (line ${d.line})`;
  if (d.key !== undefined) {
    if (d.found === undefined) return `: ${d.key} is missing; mkoverlay builds ${d.key} ${show(d.expected!)}`;
    if (d.expected === undefined) return `: ${d.key} ${show(d.found)}${at} is not built by mkoverlay`;
    return `: ${d.key} is ${show(d.found)}${at}, not ${show(d.expected)}`;
  }
  if (d.found === undefined) return `: line ${d.line} ${show(d.expected!)} is missing`;
  if (d.expected === undefined) return `: line ${d.line} ${show(d.found)} is not built by mkoverlay`;
  return `: line ${d.line} is ${show(d.found)}, not ${show(d.expected)}`;
}

/**
 * The differences between `want` (built) and `got` (found) for the file at `path`, at most
 * MAX_PER_FILE, plus how many more there are. Empty when they are equal.
 */
export function contentDifferences(path: string, want: Buffer, got: Buffer, opts: { secret?: boolean } = {}): { differences: Difference[]; more: number } {
  if (want.equals(got)) return { differences: [], more: 0 };
  if (opts.secret) return { differences: [{ path, attribute: "content", secret: true, expected: keyIdentity(want, path), found: keyIdentity(got, path) }], more: 0 };
  if (!isText(want) || !isText(got)) {
    let i = 0;
    while (i < want.length && i < got.length && want[i] === got[i]) i++;
    const d: Difference = { path, attribute: "content", byte: i, expected: `${want.length} bytes`, found: `${got.length} bytes` };
    return { differences: [d], more: 0 };
  }
  const w = parse(want.toString("utf8"));
  const g = parse(got.toString("utf8"));
  // The changed region: everything between the common head and the common tail.
  let head = 0;
  while (head < w.length && head < g.length && w[head]!.text === g[head]!.text) head++;
  let tail = 0;
  while (tail < w.length - head && tail < g.length - head && w[w.length - 1 - tail]!.text === g[g.length - 1 - tail]!.text) tail++;
  const wr = w.slice(head, w.length - tail);
  const gr = g.slice(head, g.length - tail);
  const all: Difference[] = [];
  if (head === w.length - tail && head === g.length - tail) {
    // Same lines, different bytes: a final newline, or line endings.
    all.push({ path, attribute: "content", key: "end of file", line: Math.max(g.length, 1), expected: want.toString("utf8").endsWith("\n") ? "a final newline" : "no final newline", found: got.toString("utf8").endsWith("\n") ? "a final newline" : "no final newline" });
  } else if (wr.every((l) => l.key !== undefined) && gr.every((l) => l.key !== undefined)) {
    // Key/value lines: pair them by key, in order, so a changed value reads as one difference.
    const used = new Set<Line>();
    for (const wl of wr) {
      const gl = gr.find((l) => !used.has(l) && l.key === wl.key);
      if (gl) {
        used.add(gl);
        if (gl.value !== wl.value) all.push({ path, attribute: "content", key: wl.key!, line: gl.n, expected: wl.value!, found: gl.value! });
        else if (gl.text !== wl.text) all.push({ path, attribute: "content", line: gl.n, expected: wl.text, found: gl.text });
      } else all.push({ path, attribute: "content", key: wl.key!, expected: wl.value! });
    }
    for (const gl of gr) if (!used.has(gl)) all.push({ path, attribute: "content", key: gl.key!, line: gl.n, found: gl.value! });
  } else {
    // Other text: line by line through the changed region.
    for (let i = 0; i < Math.max(wr.length, gr.length); i++) {
      const wl = wr[i];
      const gl = gr[i];
      if (wl && gl) all.push({ path, attribute: "content", line: gl.n, expected: wl.text, found: gl.text });
      else if (wl) all.push({ path, attribute: "content", line: head + i + 1, expected: wl.text });
      else all.push({ path, attribute: "content", line: gl!.n, found: gl!.text });
    }
  }
  return { differences: all.slice(0, MAX_PER_FILE), more: Math.max(0, all.length - MAX_PER_FILE) };
}
