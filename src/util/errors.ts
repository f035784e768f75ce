/**
 * User errors: things the person at the station can fix. The top-level handler prints
 * them as one line (plus an optional hint) with no stack trace; anything else is a bug.
 */
export class UserError extends Error {
  readonly hint: string | undefined;
  readonly exitCode: number;
  constructor(message: string, opts: { hint?: string; exitCode?: number } = {}) {
    super(message);
    this.name = "UserError";
    this.hint = opts.hint;
    this.exitCode = opts.exitCode ?? 2;
  }
}

/** Several problems found at once (config validation collects them all). */
export class UserErrors extends UserError {
  readonly problems: string[];
  constructor(problems: string[], hint?: string) {
    super(problems.join("\n"), hint === undefined ? {} : { hint });
    this.problems = problems;
  }
}

export function isUserError(e: unknown): e is UserError {
  return e instanceof UserError;
}

export function errnoCode(e: unknown): string | undefined {
  return typeof e === "object" && e !== null && "code" in e ? String((e as { code: unknown }).code) : undefined;
}

/** What a failed system call on a file means to the person at the station, and what to do. */
const IO_PROBLEMS: Record<string, { what: string; fix: string }> = {
  ENOSPC: { what: "no space left on device", fix: "free space on that file system, or write elsewhere (--out)" },
  EDQUOT: { what: "disk quota exceeded", fix: "free space or raise the quota, or write elsewhere (--out)" },
  EFBIG: { what: "file too large", fix: "raise the file-size limit (ulimit -f) or write elsewhere (--out)" },
  EROFS: { what: "read-only file system", fix: "remount it read-write, or write elsewhere" },
  EACCES: { what: "permission denied", fix: "run as a user who may use that path, or choose another path" },
  EPERM: { what: "operation not permitted", fix: "an immutable file, or a file system without Unix owners and modes (e.g. FAT): choose another path" },
  EEXIST: { what: "already exists", fix: "something is in the way (a dangling symbolic link counts): remove it, or choose another path" },
  EBUSY: { what: "device or resource busy", fix: "it is a mount point or in use: unmount it, or choose another path" },
  EISDIR: { what: "is a directory", fix: "a directory sits where a file goes: remove it, or choose another path" },
  ENOTDIR: { what: "not a directory", fix: "a file sits where a directory goes: remove it, or choose another path" },
  ENOTEMPTY: { what: "directory not empty", fix: "a directory sits where a file goes: remove it, or choose another path" },
  ENOENT: { what: "no such file or directory", fix: "check the path (it may have been removed while mkoverlay ran)" },
  ELOOP: { what: "too many levels of symbolic links", fix: "a symbolic link loop is in the way: remove it" },
  ENAMETOOLONG: { what: "file name too long", fix: "choose a shorter path" },
  EMFILE: { what: "too many open files", fix: "raise the limit (ulimit -n) and run again" },
  ENFILE: { what: "too many open files on this system", fix: "close other programs or raise fs.file-max, and run again" },
  EIO: { what: "input/output error", fix: "the disk or the network file system failed: check it (dmesg), then run again" },
  ETXTBSY: { what: "text file busy", fix: "a running program holds the file: stop it, or choose another path" },
};

interface ErrnoLike {
  code?: unknown;
  syscall?: unknown;
  path?: unknown;
  dest?: unknown;
}

function isErrnoLike(e: unknown): e is ErrnoLike & object {
  return typeof e === "object" && e !== null && typeof (e as ErrnoLike).code === "string" && typeof (e as ErrnoLike).syscall === "string";
}

/**
 * A failed system call on a file is the station's problem (a full disk, a read-only mount, a
 * missing permission), not a bug: the top-level handler reports it as a user error naming the
 * path. Only errors that say which call failed qualify, and only codes a person can act on.
 */
export function ioUserError(e: unknown): UserError | undefined {
  if (!isErrnoLike(e)) return undefined;
  const p = IO_PROBLEMS[e.code as string];
  if (!p) return undefined;
  // rename, link, symlink and copyfile name their destination `dest` (for symlink, `path` is
  // the link's text): the destination is what the user can act on.
  const where = typeof e.dest === "string" ? e.dest : typeof e.path === "string" ? e.path : undefined;
  return new UserError(`${where === undefined ? "" : `${where}: `}${p.what} (${e.syscall as string})`, { hint: p.fix });
}

/**
 * Names the file an operation was about when the failing call did not (write(2) on a file
 * descriptor carries no path) or named a temp file the user never sees.
 */
export function atPath<E>(e: E, path: string): E {
  if (isErrnoLike(e)) {
    (e as ErrnoLike).path = path;
    delete (e as ErrnoLike).dest;
  }
  return e;
}
