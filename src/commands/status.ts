/**
 * `mkoverlay status [DEVICE]`: the registry at a glance (devices by status, ports used and
 * free, factory data recorded, unfinished work), or one device's record — named by hostname
 * or by its factory data (`serial=SN0042`).
 */
import type { PortRange } from "../config/fleet.js";
import { withFleetRegistry } from "../context.js";
import { out } from "../output.js";
import type { DeviceRecord, DeviceStatus } from "../registry/types.js";
import { findDevice } from "./device-arg.js";
import { deviceJson } from "./registry-list.js";

interface PortUse {
  range: string;
  used: number;
  free: number;
}

function portUse(range: PortRange, ports: number[]): PortUse {
  const used = ports.filter((p) => p >= range.lo && p <= range.hi).length;
  return { range: `${range.lo}-${range.hi}`, used, free: range.hi - range.lo + 1 - used };
}

function deviceText(d: DeviceRecord): string {
  const rows: [string, string][] = [
    ["hostname", d.hostname],
    ["status", d.status],
    ["board", d.board],
    ["os", d.os],
    ["bastions", d.bastions.join(", ") || "(none)"],
    ["port", String(d.port)],
    ...Object.entries(d.services).map(([k, v]): [string, string] => [`port ${k}`, String(v)]),
    ["fingerprint", d.fingerprint],
    ["created", d.created],
    ["updated", d.updated],
    ...(d.previous ? [["previous key", `${d.previous.fingerprint} (valid until ${d.previous.until})`] as [string, string]] : []),
    ...(d.rotating ? [["rotating to", d.rotating.fingerprint] as [string, string]] : []),
    ...Object.entries(d.attributes).map(([k, v]): [string, string] => [k, v]),
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `${(k + ":").padEnd(w + 1)} ${v}`).join("\n");
}

export async function statusCommand(arg: string | undefined, opts: { config?: string; json?: boolean }): Promise<void> {
  await withFleetRegistry(opts.config, async (fleet, registry) => {
    if (arg !== undefined) {
      const d = await findDevice(registry, arg, "status");
      out(opts.json ? JSON.stringify(deviceJson(d)) : deviceText(d));
      return;
    }
    const devices = await registry.list();
    const statuses: Record<DeviceStatus, number> = { active: 0, pending: 0, revoked: 0 };
    const attributes: Record<string, number> = {};
    for (const d of devices) {
      statuses[d.status]++;
      for (const k of Object.keys(d.attributes)) attributes[k] = (attributes[k] ?? 0) + 1;
    }
    const ports = devices.flatMap((d) => [d.port, ...Object.values(d.services)]);
    const unfinished = (await registry.unfinished()).length;
    const s = {
      config: fleet.file,
      registry: registry.where,
      devices: devices.length,
      statuses,
      sshPorts: portUse(fleet.ports.ssh, ports),
      servicePorts: portUse(fleet.ports.services, ports),
      unfinished,
      attributes,
    };
    if (opts.json) {
      out(JSON.stringify(s));
      return;
    }
    const attrs = Object.entries(attributes).map(([k, n]) => `${k} (${n})`);
    out(
      [
        `config:        ${s.config}`,
        `registry:      ${s.registry}`,
        `devices:       ${s.devices} (${statuses.active} active, ${statuses.pending} pending, ${statuses.revoked} revoked)`,
        `ssh ports:     ${s.sshPorts.used} used, ${s.sshPorts.free} free (${s.sshPorts.range})`,
        `service ports: ${s.servicePorts.used} used, ${s.servicePorts.free} free (${s.servicePorts.range})`,
        `factory data:  ${attrs.length > 0 ? attrs.join(", ") : "(none)"}`,
        `unfinished:    ${unfinished === 0 ? "none" : `${unfinished} build(s) or rotation(s): see 'mkoverlay registry doctor'`}`,
      ].join("\n"),
    );
  });
}
