/**
 * The bastion's key directory: one small file per accepted key, named after the key's SHA256
 * fingerprint, holding that key's authorized_keys line. sshd's AuthorizedKeysCommand (a tiny sh
 * program, keys-command.ts) is handed the offered key's fingerprint (`%f`) and prints that one
 * file: there is no list to scan, so a login costs the same with 10 or 40,000 devices.
 *
 * The agent is the only writer. Each file is replaced atomically (temp name + rename), so sshd
 * never reads half a line. Files are not fsynced: after a crash or power loss the agent rebuilds
 * the directory from the registry, and while the registry is unreachable the directory as it is
 * stays the last known good state. The directory is 0711 (sshd's command user may open a file
 * whose name it knows, nobody may list the fleet's keys), files 0644.
 */
import { randomBytes } from "node:crypto";
import { closeSync, fchmodSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, unlinkSync, writeSync } from "node:fs";
import { join } from "node:path";

const FINGERPRINT = /^SHA256:[A-Za-z0-9+/]{43}$/;

/** `SHA256:ab+c/…` → `ab-c_…`: base64 made safe for a file name ('/' cannot be in one). */
export function fileNameFor(fingerprint: string): string {
  if (!FINGERPRINT.test(fingerprint)) throw new Error(`not a SHA256 fingerprint: ${JSON.stringify(fingerprint)}`);
  return fingerprint.slice("SHA256:".length).replace(/\+/g, "-").replace(/\//g, "_");
}

export function fingerprintFor(name: string): string | undefined {
  if (!/^[A-Za-z0-9_-]{43}$/.test(name)) return undefined;
  return "SHA256:" + name.replace(/-/g, "+").replace(/_/g, "/");
}

/** The ports an authorized_keys line may listen on (its permitlisten="localhost:PORT" options). */
export function listenPorts(line: string): number[] {
  return [...line.matchAll(/permitlisten="localhost:(\d+)"/g)].map((m) => Number(m[1]));
}

export class KeyStore {
  private readonly files = new Map<string, string>();
  /** How many keys may listen on each port (a rotated device's two keys share its ports). */
  private readonly portRefs = new Map<number, number>();

  private constructor(readonly dir: string) {}

  /** Reads what the directory holds (the last known good state); clears temp files a crash left. */
  static open(dir: string): KeyStore {
    mkdirSync(dir, { recursive: true, mode: 0o711 });
    const s = new KeyStore(dir);
    for (const name of readdirSync(dir)) {
      const fp = fingerprintFor(name);
      if (fp) s.track(fp, readFileSync(join(dir, name), "utf8"));
      else if (name.startsWith(".") && name.endsWith(".tmp")) unlinkSync(join(dir, name));
    }
    return s;
  }

  get size(): number {
    return this.files.size;
  }

  get(fp: string): string | undefined {
    return this.files.get(fp);
  }

  fingerprints(): string[] {
    return [...this.files.keys()];
  }

  /** Does some key allow listening on `port`? */
  allows(port: number): boolean {
    return this.portRefs.has(port);
  }

  private track(fp: string, content: string | undefined): void {
    const old = this.files.get(fp);
    for (const p of old === undefined ? [] : listenPorts(old)) {
      const n = (this.portRefs.get(p) ?? 0) - 1;
      if (n > 0) this.portRefs.set(p, n);
      else this.portRefs.delete(p);
    }
    if (content === undefined) {
      this.files.delete(fp);
      return;
    }
    this.files.set(fp, content);
    for (const p of listenPorts(content)) this.portRefs.set(p, (this.portRefs.get(p) ?? 0) + 1);
  }

  /** Writes the file for `fp` unless it already holds `content`; true when it changed. */
  put(fp: string, content: string): boolean {
    if (this.files.get(fp) === content) return false;
    const target = join(this.dir, fileNameFor(fp));
    const tmp = join(this.dir, `.${fileNameFor(fp)}.${randomBytes(4).toString("hex")}.tmp`);
    const fd = openSync(tmp, "wx", 0o644);
    try {
      fchmodSync(fd, 0o644); // whatever the umask: sshd's command user must read it
      const buf = Buffer.from(content);
      let off = 0;
      while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      closeSync(fd);
      unlinkSync(tmp);
      throw e;
    }
    closeSync(fd);
    try {
      renameSync(tmp, target);
    } catch (e) {
      unlinkSync(tmp);
      throw e;
    }
    this.track(fp, content);
    return true;
  }

  /** Removes the file for `fp`; returns what it held. */
  remove(fp: string): string | undefined {
    const had = this.files.get(fp);
    if (had === undefined) return undefined;
    try {
      unlinkSync(join(this.dir, fileNameFor(fp)));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    this.track(fp, undefined);
    return had;
  }
}
