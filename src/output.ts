/**
 * stdout is for data; everything else — progress, notes, warnings, errors — goes to stderr
 * through a Log, prefixed `mkoverlay:`, and `--quiet`/`--json` silence all but errors.
 */
export interface Log {
  info(msg: string): void;
  warn(msg: string): void;
  /** One user-facing error line (and its hint); never silenced. */
  error(msg: string, hint?: string): void;
  /** Raw terminal output for a progress display (no prefix, no newline added). */
  progress(text: string): void;
  readonly quiet: boolean;
}

export function stderrLog(quiet: boolean): Log {
  const w = (s: string) => void process.stderr.write(s);
  return {
    quiet,
    info: (msg) => (quiet ? undefined : w(`mkoverlay: ${msg}\n`)),
    warn: (msg) => w(`mkoverlay: warning: ${msg}\n`),
    error: (msg, hint) => w(msg.split("\n").map((l) => `mkoverlay: error: ${l}\n`).join("") + (hint ? `mkoverlay: hint: ${hint}\n` : "")),
    progress: (text) => (quiet ? undefined : w(text)),
  };
}

export function out(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : text + "\n");
}
