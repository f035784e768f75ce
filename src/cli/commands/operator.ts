/** `mkoverlay ssh-config` and `mkoverlay known-hosts`: operator access by device name. */
import { withFleetRegistry } from "../context.js";
import { resolveBastions } from "../../device/inputs.js";
import { UserError } from "../../util/errors.js";
import { jumpHost, renderKnownHosts, renderSshConfig, routes } from "../../fleet/operator.js";
import { out } from "../../util/log.js";
import { bastionKnownHosts } from "../../overlay/steps.js";
import { userProblem } from "../../util/validate.js";

export async function sshConfigCommand(opts: { bastion?: string; user?: string; knownHosts?: string; config?: string; json?: boolean }): Promise<void> {
  const user = opts.user ?? "root";
  const p = userProblem(user);
  if (p) throw new UserError(`--user ${JSON.stringify(user)} ${p}`);
  if (opts.knownHosts !== undefined && /[\s"\\]/.test(opts.knownHosts)) throw new UserError("--known-hosts: no spaces, quotes or backslashes in the path");
  const text = await withFleetRegistry(opts.config, async (fleet, registry) => {
    if (opts.bastion !== undefined) resolveBastions(fleet, opts.bastion);
    const rs = routes(fleet, await registry.list(), opts.bastion);
    if (opts.json) {
      return JSON.stringify(
        rs.map(({ device: d, bastion: b }) => ({ host: d.hostname, hostName: "localhost", port: d.port, user, proxyJump: jumpHost(b), hostKeyAlias: d.hostname, bastion: b.name })),
      );
    }
    return renderSshConfig(rs, user, opts.knownHosts);
  });
  out(text);
}

export async function knownHostsCommand(opts: { config?: string; json?: boolean }): Promise<void> {
  out(
    await withFleetRegistry(opts.config, async (fleet, registry) => {
      const devices = await registry.list();
      const bastions = [...fleet.bastions.values()];
      if (!opts.json) return renderKnownHosts(devices, bastions);
      return JSON.stringify({
        devices: devices
          .filter((d) => d.status === "active")
          .sort((a, b) => a.hostname.localeCompare(b.hostname))
          .map((d) => ({ hostname: d.hostname, line: `${d.hostname} ${d.publicKey}` })),
        bastions: bastions.sort((a, b) => a.name.localeCompare(b.name)).flatMap((b) => bastionKnownHosts(b).map((line) => ({ bastion: b.name, line }))),
      });
    }),
  );
}
