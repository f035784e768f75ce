/**
 * What each of a device's tunnels carries besides the sshd forward, derived from the fleet's
 * `forwards:` and the ports reserved for the device: the extra ssh arguments for its env file
 * and the permitlisten/permitopen entries for its bastion line. One function feeds both, so
 * the device and the bastion can never disagree.
 */
import type { Bastion, Fleet } from "./fleet.js";

export interface TunnelPlan {
  bastion: Bastion;
  /** Reserved bastion port forwarded to the device's sshd. */
  port: number;
  /** `-R …`, `-L …`, `-D …` after the sshd forward. */
  extraArgs: string[];
  /** Extra bastion ports this tunnel listens on (service tunnels). */
  extraListen: number[];
  /** Exact destinations for -L/-D (only on the one tunnel that carries them). */
  permitOpen: string[];
}

/** Names of the forwards that need a reserved port (remote ones). */
export function serviceNames(fleet: Fleet): string[] {
  return fleet.forwards.filter((f) => f.type === "remote").map((f) => f.name);
}

export function planTunnel(fleet: Fleet, bastion: Bastion, port: number, services: Record<string, number>): TunnelPlan {
  const plan: TunnelPlan = { bastion, port, extraArgs: [], extraListen: [], permitOpen: [] };
  for (const f of fleet.forwards) {
    if (f.type === "remote") {
      const p = services[f.name];
      // A device registered before the forward was added has no port for it: skip, don't guess.
      if (p === undefined) continue;
      plan.extraArgs.push("-R", `localhost:${p}:localhost:${f.local}`);
      plan.extraListen.push(p);
    } else if (f.bastion === bastion.name) {
      if (f.type === "local") {
        plan.extraArgs.push("-L", `localhost:${f.listen}:${f.to}`);
        plan.permitOpen.push(f.to);
      } else {
        plan.extraArgs.push("-D", `localhost:${f.listen}`);
        plan.permitOpen.push(...f.allow);
      }
    }
  }
  return plan;
}

export function planTunnels(fleet: Fleet, bastions: Bastion[], port: number, services: Record<string, number>): TunnelPlan[] {
  return bastions.map((b) => planTunnel(fleet, b, port, services));
}
