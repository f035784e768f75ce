/** stdout is for data; progress and logs go to stderr (and can be silenced). */
export interface Log {
  info(msg: string): void;
}

export function stderrLog(quiet: boolean): Log {
  return { info: (msg) => (quiet ? undefined : process.stderr.write(`mkoverlay: ${msg}\n`)) };
}

export function out(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : text + "\n");
}
