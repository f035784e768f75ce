/** `mkoverlay boards`: the boards and OS profiles this installation knows. */
import { out } from "../../util/log.js";
import { loadProfiles } from "../../config/profiles.js";

export async function boardsCommand(opts: { json?: boolean }): Promise<void> {
  const p = await loadProfiles();
  if (opts.json) {
    out(JSON.stringify({ boards: [...p.boards.values()], oses: [...p.oses.values()] }));
    return;
  }
  const rows = [...p.boards.values()].map((b) => `  ${b.id.padEnd(8)} ${b.arch.padEnd(6)} default OS ${b.defaultOs.padEnd(8)} ${b.name}`);
  const oses = [...p.oses.values()].map((o) => `  ${o.id.padEnd(8)} ${o.name}`);
  out(["Boards:", ...rows, "", "OS profiles (--os):", ...oses].join("\n"));
}
