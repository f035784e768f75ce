/**
 * `flash`'s progress on stderr: one line per card. On a terminal the block of lines is redrawn
 * in place (at most ten times a second), each line cut to the terminal's current width;
 * otherwise (or with --no-progress) a plain line per card when it is verified or fails.
 */
import type { CardProgress } from "../../image/flash.js";

const PHASE: Record<CardProgress["phase"], string> = { base: "writing", check: "reading back", overlay: "laying overlay", verify: "verifying", done: "placing" };
const MB = (n: number): string => (n / 1e6).toFixed(1);

interface Card {
  card: string;
  hostname: string;
  p: CardProgress | undefined;
  started: number;
  final: string | undefined;
  good: boolean;
}

export class CardLines {
  private cards: Card[] = [];
  private total = 0;
  private drawn = 0;
  private timer: NodeJS.Timeout | undefined;
  private readonly write: (s: string) => void;
  private readonly columns: () => number;

  constructor(private readonly o: { tty: boolean; silent: boolean; color: boolean; write?: (s: string) => void; columns?: () => number }) {
    this.write = o.write ?? ((s) => void process.stderr.write(s));
    this.columns = o.columns ?? (() => process.stderr.columns || 80);
  }

  start(cards: string[], total: number): void {
    this.total = total;
    const now = Date.now();
    this.cards = cards.map((card) => ({ card, hostname: "", p: undefined, started: now, final: undefined, good: false }));
    if (this.o.silent) return;
    if (!this.o.tty) {
      this.write(`mkoverlay: flashing ${cards.length} card(s), ${MB(total)} MB of the base each\n`);
      return;
    }
    this.draw();
    this.timer = setInterval(() => this.draw(), 100);
    this.timer.unref();
  }

  name(k: number, hostname: string): void {
    this.cards[k]!.hostname = hostname;
  }

  update(k: number, p: CardProgress): void {
    this.cards[k]!.p = p;
  }

  finish(k: number, text: string, good: boolean): void {
    const c = this.cards[k]!;
    c.final = text;
    c.good = good;
    if (this.o.silent || this.o.tty) return;
    this.write(`mkoverlay: ${this.line(c, Number.POSITIVE_INFINITY)}\n`);
  }

  /** A note above the lines (a signal's). */
  note(text: string): void {
    if (this.o.silent) return;
    if (!this.o.tty || this.drawn === 0) {
      this.write(`mkoverlay: ${text}\n`);
      return;
    }
    this.write(`\x1b[${this.drawn}A\r\x1b[J`);
    this.drawn = 0;
    this.write(`mkoverlay: ${text}\n`);
    this.draw();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    if (this.o.tty && !this.o.silent && this.cards.length > 0) this.draw();
  }

  /** One card's line, at most `width` characters. */
  line(c: Card, width: number): string {
    const who = c.hostname ? ` ${c.hostname}` : "";
    let rest: string;
    if (c.final !== undefined) rest = c.final;
    else if (!c.p) rest = "waiting";
    else if (c.p.phase === "base" || c.p.phase === "check") {
      const s = (Date.now() - c.started) / 1000;
      const pct = this.total > 0 ? Math.floor((100 * c.p.done) / this.total) : 100;
      rest = `${PHASE[c.p.phase]} ${String(pct).padStart(3)}% ${MB(c.p.done)}/${MB(this.total)} MB${c.p.phase === "base" && s > 0 ? ` ${MB(c.p.done / s)} MB/s` : ""}`;
    } else rest = PHASE[c.p.phase];
    const text = `${c.card}${who}: ${rest}`;
    return text.length <= width ? text : `${text.slice(0, Math.max(1, width - 1))}…`;
  }

  private draw(): void {
    const width = Math.max(20, this.columns() - 1);
    let s = this.drawn > 0 ? `\x1b[${this.drawn}A` : "";
    for (const c of this.cards) {
      let l = this.line(c, width);
      if (this.o.color && c.final !== undefined) l = `\x1b[${c.good ? 32 : 31}m${l}\x1b[0m`;
      s += `\r\x1b[2K${l}\n`;
    }
    this.drawn = this.cards.length;
    this.write(s);
  }
}
