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

/** A Log that prints nothing (the programmatic API); warnings go to `onWarning` if given. */
export function quietLog(onWarning?: (msg: string) => void): Log {
  return { quiet: true, info: () => undefined, warn: (msg) => onWarning?.(msg), error: () => undefined, progress: () => undefined };
}

export function out(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : text + "\n");
}

/** What the progress display writes to: stderr, or a test's stand-in. */
export interface Terminal {
  write(text: string): void;
  /** Current width in columns (it may change while the bar runs). */
  columns(): number;
}

export interface ProgressOptions {
  total: number;
  /** A redrawn bar (a terminal, progress wanted); else one plain line per device. */
  bar: boolean;
  /** Colour in the bar (not when NO_COLOR is set). */
  color: boolean;
  /** Nothing at all (--quiet, --json keeps its lines for stdout). */
  silent: boolean;
  term?: Terminal;
  now?: () => number;
}

const MIN_REDRAW_MS = 100;

function clock(s: number): string {
  if (!Number.isFinite(s)) return "--:--";
  const t = Math.round(s);
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const sec = String(t % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

/**
 * A batch's progress. On a terminal: one line, redrawn in place at most ten times a second,
 * that always fits the terminal's current width (the bar shrinks first, then the label, rate,
 * elapsed time and ETA are dropped, in that order, never wrapping): count, percentage, rate,
 * elapsed, ETA and the last device. Drawn as soon as the batch starts. Not on a terminal (or
 * with --no-progress): a plain line per device. NO_COLOR only takes the colour away.
 */
export class Progress {
  private done = 0;
  private worked = 0;
  private label = "starting";
  /** The device the work count has reached (rendered, not yet finished). */
  private workLabel = "";
  private lastDraw = -Infinity;
  private drawn = false;
  private readonly started: number;
  private readonly term: Terminal;
  private readonly now: () => number;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly o: ProgressOptions) {
    this.now = o.now ?? (() => performance.now());
    this.term = o.term ?? { write: (t) => void process.stderr.write(t), columns: () => process.stderr.columns || 80 };
    this.started = this.now();
  }

  private get live(): boolean {
    return this.o.bar && !this.o.silent;
  }

  /** Shows the bar at once, and keeps its clock moving while devices are being synced. */
  start(): void {
    if (!this.live) return;
    this.draw(true);
    this.timer = setInterval(() => this.draw(false), 250);
    this.timer.unref();
  }

  /**
   * A device's work is done (rendered): the bar moves before its chunk is written, and names
   * this device, so the name shown is the one the count has reached, not the last of the
   * previous chunk.
   */
  work(label?: string): void {
    this.worked++;
    if (label !== undefined) this.workLabel = label;
    if (this.live) this.draw(false);
  }

  /**
   * A device is finished (built or failed). Results arrive a chunk at a time, right after its
   * sync, so the bar is drawn from the work done (above) and not from this burst: it moves
   * with the work, not in steps of a chunk.
   */
  result(label: string): void {
    this.done++;
    this.label = label;
    if (this.live) {
      if (this.done === this.o.total) this.draw(true);
    } else if (!this.o.silent) this.term.write(`mkoverlay: [${this.done}/${this.o.total}] ${label}\n`);
  }

  /** Prints a message on its own line (the bar is redrawn under it). */
  message(write: () => void): void {
    if (this.live && this.drawn) this.term.write("\r\x1b[K");
    write();
    if (this.live && this.drawn) this.draw(true);
  }

  /** The bar's last state stays on screen; the cursor goes to the next line. */
  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    if (this.live && this.drawn) {
      // What is finished, not what was being worked on when the run stopped.
      this.worked = this.done;
      this.draw(true);
      this.term.write("\n");
      this.drawn = false;
    }
  }

  /** The line for a terminal of `width` columns (exported for the tests through render()). */
  render(width: number): string {
    const total = this.o.total;
    const n = Math.min(total, Math.max(this.done, this.worked));
    // The device the count stands at: the last rendered while rendering runs ahead of the
    // results, the last finished once they have caught up.
    const label = this.worked > this.done && this.workLabel ? this.workLabel : this.label;
    const elapsed = (this.now() - this.started) / 1000;
    const rate = n > 0 && elapsed > 0.2 ? n / elapsed : NaN;
    const counts = `${n}/${total}`;
    const pct = `${Math.floor((n / total) * 100)}%`;
    const rateText = Number.isFinite(rate) ? `${rate >= 100 ? Math.round(rate) : rate.toFixed(1)}/s` : "--/s";
    const eta = `ETA ${n >= total ? "0:00" : Number.isFinite(rate) ? clock((total - n) / rate) : "--:--"}`;
    // The last column is never written: some terminals wrap as soon as it is.
    const room = Math.max(1, width - 1);
    const optional = [pct, eta, rateText, clock(elapsed), label];
    const MIN_BAR = 10;
    let parts = [counts];
    for (const p of optional) {
      const next = [...parts, p];
      if (2 + MIN_BAR + 1 + next.join(" ").length <= room) parts = next;
    }
    // Shown in a fixed order whatever was dropped.
    const order = [counts, pct, rateText, clock(elapsed), eta, label];
    const text = order.filter((p) => parts.includes(p)).join(" ");
    const barWidth = Math.min(40, room - 3 - text.length);
    if (barWidth < MIN_BAR) return text.slice(0, room);
    const filled = Math.floor((n / total) * barWidth);
    const fill = "#".repeat(filled);
    const rest = "-".repeat(barWidth - filled);
    const bar = this.o.color ? `\x1b[32m${fill}\x1b[2m${rest}\x1b[0m` : fill + rest;
    return `[${bar}] ${text}`;
  }

  private draw(force: boolean): void {
    const t = this.now();
    if (!force && t - this.lastDraw < MIN_REDRAW_MS) return;
    this.lastDraw = t;
    this.drawn = true;
    this.term.write(`\r${this.render(this.term.columns())}\x1b[K`);
  }
}
