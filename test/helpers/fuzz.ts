/**
 * Seeded mutations for the fuzz tier: broken copies of a fleet config (text-level edits, YAML
 * constructs, hostile values dropped into real keys) and hostile command lines. Everything is
 * drawn from one seeded generator, so a failing case is reproduced from its seed and index.
 */

/** mulberry32: small, fast, good enough to pick mutations. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export type Rand = () => number;
export const pick = <T>(r: Rand, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
const int = (r: Rand, n: number) => Math.floor(r() * n);

/** Characters that mean something to YAML, sshd, systemd or a shell, and some that look blank. */
const CHARS = [
  ":", "-", " ", "  ", "\t", "\n", "\r\n", "{", "}", "[", "]", "&", "*", "!", "|", ">", "'", '"', "#", "%", "@", ",", "?", "=",
  "\\", "/", ".", "0", "9", "a", "Z", "\u00a0", "\ufeff", "\u200b", "\0", "\x1b", "\x7f", "é", "𝔘", "$", "`", ";",
];

/** Values that break things when they land in the place of a scalar. */
const VALUES = [
  "", "''", '""', "~", "null", "true", "no", "0", "-1", "1.5", "65535", "65536", "99999999999999999999", "1e309", ".inf", ".nan", "0x16", "0o17",
  "[]", "{}", "[a, b]", "{a: 1}", "&x 1", "*x", "*nope", "!!binary aGVsbG8=", "!!str 5", "!!int x", "!!float y", "!custom z", "|\n  block", ">-\n  folded",
  "2020-01-01", "2099-12-31", "9999-12-31T23:59", "10000-01-01", "0099-01-01", "2027-02-30", "0d", "365d", "8000y", "99999999999999y", "1y", "-5d",
  "127.0.0.1/8", "127.0.0.0/8", "::1/64", "::/0", "10.0.0.0/33", "fe80::1%eth0", "!10.0.0.0/8", "1.2.3.4/032",
  "21000-21999", "21999-21000", "0-0", "1-65535", "22000-22999", "70000-80000", "1-1",
  "gw-{seq:04}", "{seq}", "{seq:0300}", "{seq}{seq}", "{serial}", "x".repeat(62) + "{seq}", "GW-{seq}", "-{seq}", "{seq}.", "a..{seq}",
  "eu", "us", "EU", "e u", "none", "reverse-ssh", "root", "0root", "a".repeat(40), "localhost:4505", "*:*", "[::1]:22", "host:0", "host:*",
  'x",command="/bin/sh', "a\nb", "x".repeat(5000),
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB",
  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJ",
  "@cert-authority ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB ca",
  "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQ", "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBA==",
];

/** Whole YAML fragments, inserted at a line boundary. */
const SNIPPETS = [
  "forwards:\n  - {name: http, local: 80}",
  "forwards:\n  - {name: salt, type: local, bastion: eu, listen: 4505, to: localhost:4505}",
  "forwards:\n  - {name: proxy, type: socks, bastion: us, listen: 1080, allow: ['intranet.example.com:8080']}",
  "forwards:\n  - {name: a, type: local, bastion: eu, listen: 1, to: '*:1'}\n  - {name: b, type: socks, bastion: us, listen: 1, allow: []}",
  "operators: none",
  "hostname: &h gw-{seq}",
  "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]",
  "x: &x\n  y: *x",
  "<<: {registry: ./other.db}",
  "? [complex, key]\n: value",
  "%YAML 1.1\n---",
  "---\nsecond: document",
  "...",
  "bastions: {}",
  "ports: {ssh: 1-65535, services: 1-2}",
  "  expiry: 2020-01-01",
  "    from: [127.0.0.1/8]",
  "    jumpUser: alice",
  "    port: 0",
];

/** One seeded edit of a config text. */
function mutateOnce(text: string, r: Rand): string {
  const lines = text.split("\n");
  const li = int(r, lines.length);
  const line = lines[li]!;
  switch (int(r, 12)) {
    case 0: { // delete a span of characters
      const at = int(r, text.length);
      return text.slice(0, at) + text.slice(at + 1 + int(r, 8));
    }
    case 1: { // insert a meaningful character
      const at = int(r, text.length + 1);
      return text.slice(0, at) + pick(r, CHARS) + text.slice(at);
    }
    case 2: // delete a line
      return [...lines.slice(0, li), ...lines.slice(li + 1)].join("\n");
    case 3: // duplicate a line
      return [...lines.slice(0, li + 1), line, ...lines.slice(li + 1)].join("\n");
    case 4: { // swap two lines
      const lj = int(r, lines.length);
      const out = [...lines];
      [out[li], out[lj]] = [out[lj]!, out[li]!];
      return out.join("\n");
    }
    case 5: case 6: { // replace a value after "key:" or "- "
      const m = /^(\s*(?:-\s+)?[^:#]*:\s*|\s*-\s+)(.*)$/.exec(line);
      if (!m) return text;
      const out = [...lines];
      out[li] = m[1] + pick(r, VALUES);
      return out.join("\n");
    }
    case 7: { // re-indent a line
      const out = [...lines];
      out[li] = " ".repeat(int(r, 7)) + line.trimStart();
      return out.join("\n");
    }
    case 8: { // insert a fragment
      const out = [...lines];
      out.splice(li, 0, pick(r, SNIPPETS));
      return out.join("\n");
    }
    case 9: { // flip one character inside a key's base64
      const m = /AAAA[A-Za-z0-9+/]{20,}/.exec(line);
      if (!m) return text;
      const at = m.index + 4 + int(r, m[0].length - 4);
      const out = [...lines];
      out[li] = line.slice(0, at) + pick(r, ["A", "/", "+", "=", " ", "", "\u00a0", "z"]) + line.slice(at + 1);
      return out.join("\n");
    }
    case 10: // truncate
      return text.slice(0, int(r, text.length + 1));
    default: { // replace a key name with a near miss
      const m = /^(\s*)([A-Za-z$]+)(:.*)$/.exec(line);
      if (!m) return text;
      const out = [...lines];
      out[li] = m[1] + pick(r, [m[2]!.toUpperCase(), m[2]! + "s", m[2]!.slice(1), "expiry", "from", "hostKeys", "forwards", "operators", "user", "port"]) + m[3];
      return out.join("\n");
    }
  }
}

/** One to four seeded edits of `base`. */
export function mutateConfig(base: string, r: Rand): string {
  let text = base;
  for (let n = 1 + int(r, 4); n > 0; n--) text = mutateOnce(text, r);
  return text;
}

/**
 * A hostile command line. Every path in it lies inside the workspace (the CLI runs as root
 * here; nothing may land outside), and the registry is pinned to the workspace by the caller.
 */
export function hostileArgv(r: Rand): string[] {
  const commands: string[][] = [
    [], ["build"], ["batch"], ["bastion", "authorized-keys"], ["bastion", "sshd-config"], ["ssh-config"], ["known-hosts"],
    ["registry", "list"], ["registry", "doctor"], ["registry", "release", "gw-0001"], ["revoke", "gw-0001"], ["rotate", "gw-0001"],
    ["verify", "out"], ["verify", "a-file"], ["boards"], ["schema", "fleet"], ["biuld"], ["verfy"],
  ];
  const flagValues: Record<string, string[]> = {
    "--board": ["rpi4", "rpi9", "", "RPI4", "../rpi4", "rpi4\n"],
    "--bastion": ["eu", "us", "eu,us", "eu,eu", "", ",", "ue", "eu us", "*"],
    "--os": ["debian", "raspios", "win95", ""],
    "--hostname": ["gw-9999", "", "-x", "GW", "a".repeat(64), 'x",command="sh', "gw\n1", "gw 1", "é"],
    "--count": ["0", "-1", "1", "2", "1e3", "100001", "two", ""],
    "--hosts": ["a-file", "missing.txt", "hosts.csv", "/dev/null", "out"],
    "--format": ["tar", "dir", "zip", ""],
    "--out": ["out", "out2", "a-file", "missing/deep/dir", ""],
    "--host-key": ["a-file", "missing", "/dev/null", "out"],
    "--config": ["mkoverlay.yaml", "missing.yaml", "/dev/null", "out", "a-file"],
    "--user": ["root", "", "Root", "a b"],
    "--known-hosts": ["kh", "a b", 'x"y'],
    "--write": ["ak-out", "out", "a-file"],
    "--authorized-keys-file": ["/etc/ssh/authorized_keys.d/%u", "a b", ""],
    "--grace": ["0", "-1", "x", "1e9"],
  };
  const bare = ["--json", "--quiet", "-q", "--debug", "--help", "--version", "--", "-", "--nope", "-x", "--board=rpi4", "--bastion=eu"];
  const argv = [...pick(r, commands)];
  for (let n = int(r, 6); n > 0; n--) {
    if (r() < 0.3) argv.push(pick(r, bare));
    else {
      const flag = pick(r, Object.keys(flagValues));
      argv.push(flag);
      if (r() < 0.9) argv.push(pick(r, flagValues[flag]!));
    }
  }
  return argv;
}
