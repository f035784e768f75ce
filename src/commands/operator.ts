/** `mkoverlay ssh-config` and `mkoverlay known-hosts`: operator access by device name. */
import { withFleetRegistry } from "../context.js";
import { resolveBastions } from "../device.js";
import { UserError } from "../errors.js";
import { renderKnownHosts, renderSshConfig, routes } from "../operator.js";
import { out } from "../output.js";
import { userProblem } from "../validate.js";

export async function sshConfigCommand(opts: { bastion?: string; user?: string; knownHosts?: string; config?: string }): Promise<void> {
  const user = opts.user ?? "root";
  const p = userProblem(user);
  if (p) throw new UserError(`--user ${JSON.stringify(user)} ${p}`);
  if (opts.knownHosts !== undefined && /[\s"\\]/.test(opts.knownHosts)) throw new UserError("--known-hosts: no spaces, quotes or backslashes in the path");
  const text = await withFleetRegistry(opts.config, async (fleet, registry) => {
    if (opts.bastion !== undefined) resolveBastions(fleet, opts.bastion);
    return renderSshConfig(routes(fleet, await registry.list(), opts.bastion), user, opts.knownHosts);
  });
  out(text);
}

export async function knownHostsCommand(opts: { config?: string }): Promise<void> {
  out(await withFleetRegistry(opts.config, async (fleet, registry) => renderKnownHosts(await registry.list(), [...fleet.bastions.values()])));
}
