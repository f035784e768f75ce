/**
 * TEST ONLY: pauses in a reservation, so the registry tests SIGKILL a build at an exact point
 * instead of guessing it from timings (test/helpers/registry-suite.ts).
 *
 * Inert unless MKOVERLAY_TEST_ONLY_PAUSE is `PHASE:FOLDER`, PHASE one of
 * - `in-reserve`: the reservation's rows are written, its transaction not yet committed;
 * - `reserved`: the transaction committed, the device pending, its output not yet written.
 * At that point the process writes `FOLDER/PID.PHASE` (the hostname, by rename: it appears
 * whole) and waits until `FOLDER/PID.go` exists; the test kills it or lets it go on.
 * Not a setting: undocumented on purpose, never set by mkoverlay itself.
 */
import { existsSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";

export type PausePhase = "in-reserve" | "reserved";

export async function testOnlyPause(phase: PausePhase, hostname: string): Promise<void> {
  const v = process.env.MKOVERLAY_TEST_ONLY_PAUSE;
  if (!v?.startsWith(`${phase}:`)) return;
  const base = join(v.slice(phase.length + 1), String(process.pid));
  writeFileSync(`${base}.tmp`, hostname);
  renameSync(`${base}.tmp`, `${base}.${phase}`);
  while (!existsSync(`${base}.go`)) await new Promise((r) => setTimeout(r, 10));
}
