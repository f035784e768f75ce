/** The board and OS profile schemas (loaded only when the profile cache cannot answer). */
import { z } from "zod";

const id = z.string().regex(/^[a-z0-9][a-z0-9-]*$/, "must be lower-case letters, digits and '-'");
const unitName = z.string().regex(/^[A-Za-z0-9:_.@-]+\.(service|socket|timer|target|path)$/, "is not a systemd unit name");
const absPath = z.string().regex(/^\/[^\0\n]*$/, "must be an absolute path");

export const BoardSchema = z.strictObject({
  $schema: z.string().optional(),
  id,
  name: z.string().min(1),
  arch: z.enum(["arm64", "armhf", "amd64"]),
  defaultOs: id,
});

export const OsSchema = z.strictObject({
  $schema: z.string().optional(),
  id,
  name: z.string().min(1),
  unitDir: absPath.describe("Where the distribution's units live: the target of enable links"),
  ssh: z.strictObject({
    unit: unitName.describe("The unit that starts sshd"),
    wantedBy: z.array(unitName).min(1),
    aliases: z.array(unitName).default([]),
  }),
  firstBoot: z.strictObject({
    deletes: z.array(absPath).describe("Globs this OS deletes on first boot (checked by mkoverlay verify and the tests)"),
    mask: z.array(unitName).default([]).describe("Units masked (linked to /dev/null) so they never run"),
    layers: z.array(id).default([]).describe("Overlay layers under overlays/ laid in for this OS"),
  }),
});

export type BoardData = z.output<typeof BoardSchema>;
export type OsData = z.output<typeof OsSchema>;
