/**
 * Paths of the target system (`bastion install --root DIR`, or "/" for this host) as host paths,
 * resolved the way the target will see them: a symlink in the image is followed *inside* the
 * image (an absolute target is taken from the image's root, as the booted system reads it), never
 * into the host. A relative link whose `..` climbs above the root, a loop, or a file mkoverlay
 * writes that is itself a symlink is refused: the install writes only where it can show it stays
 * inside the root.
 */
import { lstatSync, readlinkSync } from "node:fs";
import { join, posix } from "node:path";
import { UserError } from "../util/errors.js";

const MAX_LINKS = 40; // as the kernel's ELOOP limit

export class RootFs {
  constructor(readonly root: string) {}

  get live(): boolean {
    return this.root === "/";
  }

  /** How a message names a target path (with the root when it is an image). */
  name(p: string): string {
    return this.live ? p : `${p} (in ${this.root})`;
  }

  /**
   * The host path of the target's absolute path `p`, with every symlink on the way followed
   * inside the root. Components that do not exist yet are kept as they are (they will be created
   * as real directories). With `final: "nofollow"` the last component is not followed, and must
   * not be a symlink.
   */
  resolve(p: string, opts: { final?: "follow" | "nofollow" } = {}): string {
    if (!p.startsWith("/")) throw new Error(`RootFs.resolve: ${p} is not absolute`);
    const done: string[] = [];
    const todo = p.split("/").filter(Boolean);
    const last = todo.length;
    let links = 0;
    let consumed = 0; // components of `p` itself taken off `todo` (to know which one is final)
    const fromP: boolean[] = todo.map(() => true);
    while (todo.length > 0) {
      const c = todo.shift()!;
      const own = fromP.shift()!;
      if (own) consumed++;
      if (c === ".") continue;
      if (c === "..") {
        if (done.length === 0 && this.live) continue; // "/.." is "/" on a running system
        if (done.length === 0) throw new UserError(`${this.name(p)}: a symbolic link on the way climbs out of ${this.root} with '..'`, { hint: "mkoverlay writes into an image only where the path stays inside it; fix or remove the link" });
        done.pop();
        continue;
      }
      const host = join(this.root, ...done, c);
      const st = lstatSync(host, { throwIfNoEntry: false });
      const isFinal = own && consumed === last && todo.length === 0;
      if (st?.isSymbolicLink() && !(isFinal && opts.final === "nofollow")) {
        if (++links > MAX_LINKS) throw new UserError(`${this.name(p)}: too many levels of symbolic links`);
        const target = readlinkSync(host);
        if (target.startsWith("/")) done.length = 0;
        const parts = target.split("/").filter(Boolean);
        todo.unshift(...parts);
        fromP.unshift(...parts.map(() => false));
        continue;
      }
      if (st?.isSymbolicLink()) {
        throw new UserError(`${this.name(posix.join("/", ...done, c))} is a symbolic link (→ ${readlinkSync(host)}): mkoverlay writes its own files only as regular files`, { hint: "remove the link; the install puts the file there" });
      }
      done.push(c);
    }
    return join(this.root, ...done);
  }

  /** A file mkoverlay writes (or replaces by rename): its folder resolved inside the root, the file itself not a link. */
  file(p: string): string {
    return this.resolve(p, { final: "nofollow" });
  }

  /**
   * useradd --prefix opens ROOT/etc/passwd and friends on the host, following any symlink: refuse
   * an image whose users files (or /etc) are links before asking useradd to write them.
   */
  checkUserFiles(): void {
    if (this.live) return;
    // The files themselves, and the backups (-), temp (+) and lock files shadow-utils opens
    // beside them: each opened with O_CREAT, following a link. (A system user gets no mail spool.)
    const db = ["passwd", "group", "shadow", "gshadow", "subuid", "subgid"].flatMap((f) => [f, `${f}-`, `${f}+`, `${f}.lock`].map((n) => `/etc/${n}`));
    for (const p of ["/etc", ...db, "/etc/.pwd.lock"]) {
      const st = lstatSync(join(this.root, p), { throwIfNoEntry: false });
      if (st?.isSymbolicLink()) {
        throw new UserError(`${this.name(p)} is a symbolic link (→ ${readlinkSync(join(this.root, p))}): useradd --prefix would follow it on this host`, { hint: "make it a regular file (or directory) in the image; nothing was installed" });
      }
    }
  }
}
