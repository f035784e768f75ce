/**
 * Loop devices as SD cards, for `mkoverlay flash` (as root): sparse backing files, each loop
 * throttled to a card's write speed, and a card that is "pulled" mid-write — its backing file on
 * a tmpfs smaller than the base's data, so the kernel fails the loop's writes with a real EIO
 * (the loop device returns the backing file's ENOSPC as an I/O error).
 *
 * Throttling: cgroup v1's root `blkio.throttle.write_bps_device` (it applies to every writer,
 * write-back included), else cgroup v2's `io.max` in a cgroup of our own that the CLI is started
 * in (`wrap`). Everything made is undone by `cleanup()`, whatever failed.
 */
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { run } from "./workspace.js";
import { SBIN_PATH } from "./disk.js";

const V1 = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device";
const V2 = "/sys/fs/cgroup";

export interface Card {
  loop: string;
  backing: string;
  majMin: string;
}

function sh(cmd: string, args: string[]): string {
  const r = run(cmd, args, { env: { PATH: SBIN_PATH } });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}: ${r.stderr}`);
  return r.stdout.trim();
}

/** How loop devices can be throttled here, if at all (v1 root blkio, or v2 io controller). */
export function throttleKind(): "v1" | "v2" | undefined {
  if (existsSync(V1)) return "v1";
  try {
    if (readFileSync(join(V2, "cgroup.controllers"), "utf8").split(/\s+/).includes("io")) return "v2";
  } catch {
    // no unified hierarchy at /sys/fs/cgroup
  }
  return undefined;
}

export class Cards {
  readonly cards: Card[] = [];
  private mounts: string[] = [];
  private cgroup: string | undefined;
  private readonly kind = throttleKind();

  constructor(private readonly dir: string) {}

  /** A card of `bytes`; `onTmpfs` bytes: its backing file lives on a tmpfs that small (a pulled card). */
  make(name: string, bytes: number, opts: { onTmpfs?: number; partscan?: boolean } = {}): Card {
    let where = this.dir;
    if (opts.onTmpfs !== undefined) {
      where = join(this.dir, `${name}-tmpfs`);
      mkdirSync(where, { recursive: true });
      sh("mount", ["-t", "tmpfs", "-o", `size=${opts.onTmpfs}`, `mko-${name}`, where]);
      this.mounts.push(where);
    }
    const backing = join(where, `${name}.raw`);
    sh("truncate", ["-s", String(bytes), backing]);
    const loop = sh("losetup", ["--show", "-f", ...(opts.partscan ? ["-P"] : []), backing]);
    const majMin = readFileSync(`/sys/block/${loop.replace("/dev/", "")}/dev`, "utf8").trim();
    const card = { loop, backing, majMin };
    this.cards.push(card);
    return card;
  }

  /** Limits writes to `bps` bytes a second, as a card does. */
  throttle(card: Card, bps: number): void {
    if (this.kind === "v1") writeFileSync(V1, `${card.majMin} ${bps}`);
    else if (this.kind === "v2") {
      if (!this.cgroup) {
        this.cgroup = join(V2, `mko-flash-${process.pid}`);
        const ctl = join(V2, "cgroup.subtree_control");
        if (!readFileSync(ctl, "utf8").includes("io")) writeFileSync(ctl, "+io");
        mkdirSync(this.cgroup);
      }
      writeFileSync(join(this.cgroup, "io.max"), `${card.majMin} wbps=${bps}`);
    } else throw new Error("no cgroup blkio (v1) or io controller (v2) to throttle loop devices with");
  }

  /** The command line to run so that its writes are throttled (v2: started inside our cgroup). */
  wrap(cmd: string, args: string[]): [string, string[]] {
    if (this.kind !== "v2" || !this.cgroup) return [cmd, args];
    return ["sh", ["-c", `echo $$ > ${this.cgroup}/cgroup.procs && exec "$@"`, "sh", cmd, ...args]];
  }

  cleanup(): void {
    const errors: string[] = [];
    const tryIt = (f: () => void) => {
      try {
        f();
      } catch (e) {
        errors.push((e as Error).message);
      }
    };
    for (const c of this.cards) {
      if (this.kind === "v1") tryIt(() => writeFileSync(V1, `${c.majMin} 0`));
      tryIt(() => sh("losetup", ["-d", c.loop]));
    }
    if (this.cgroup) tryIt(() => rmdirSync(this.cgroup!));
    for (const m of this.mounts) tryIt(() => sh("umount", [m]));
    this.cards.length = 0;
    this.mounts = [];
    if (errors.length) throw new Error(`cleaning up the loop cards: ${errors.join("; ")}`);
  }
}
