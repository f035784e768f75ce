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
