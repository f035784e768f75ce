/**
 * The fleet status in Prometheus's text exposition format, written with prom-client (the
 * library Prometheus's Node users use) into a registry of its own: `mkoverlay status --format
 * prometheus`, and the bastion agent's `--metrics-listen` endpoint.
 */
import { Gauge, Registry } from "prom-client";
import { ALARM_KINDS, type FleetStatus } from "./status.js";
const STATES = ["connected", "offline", "never-seen", "new", "unknown"] as const;

export async function prometheusText(s: FleetStatus): Promise<string> {
  const registry = new Registry();
  const gauge = (name: string, help: string, labelNames: string[]) => new Gauge({ name, help, labelNames, registers: [registry] });
  const up = gauge("mkoverlay_device_up", "1 when the device's tunnel listens on the bastion now, else 0 (one series per device and bastion it tunnels to)", ["hostname", "bastion"]);
  const lastSeen = gauge("mkoverlay_device_last_seen_timestamp_seconds", "When a bastion last saw the device's tunnel (Unix time)", ["hostname"]);
  const devices = gauge("mkoverlay_devices", "Devices by bastion and state (connected, offline, never-seen, new, unknown)", ["bastion", "state"]);
  const alarms = gauge("mkoverlay_alarms", `Alarms by kind (${ALARM_KINDS.join(", ")})`, ["kind"]);
  const beat = gauge("mkoverlay_bastion_heartbeat_timestamp_seconds", "When the bastion's agent last reported (Unix time)", ["bastion"]);
  const expiry = gauge("mkoverlay_device_key_expiry_timestamp_seconds", "When the device's key stops working on the bastion (Unix time; expirySpread and expiryRenewal included), for bastions that set an expiry", ["hostname", "bastion"]);
  const bastionUp = gauge("mkoverlay_bastion_up", "1 when the bastion's agent reported within three intervals", ["bastion"]);
  for (const d of s.devices) {
    for (const b of d.bastions) up.set({ hostname: d.hostname, bastion: b }, d.connected.some((c) => c.bastion === b) ? 1 : 0);
    if (d.lastSeen) lastSeen.set({ hostname: d.hostname }, Date.parse(d.lastSeen) / 1000);
    for (const e of d.expires ?? []) expiry.set({ hostname: d.hostname, bastion: e.bastion }, Date.parse(e.at) / 1000);
  }
  for (const b of s.bastions) {
    for (const state of STATES) devices.set({ bastion: b.name, state }, s.devices.filter((d) => d.bastions.includes(b.name) && (state === "connected" ? d.connected.some((c) => c.bastion === b.name) : d.state === state)).length);
    if (b.heartbeat) beat.set({ bastion: b.name }, Date.parse(b.heartbeat) / 1000);
    bastionUp.set({ bastion: b.name }, b.fresh ? 1 : 0);
  }
  for (const kind of ALARM_KINDS) alarms.set({ kind }, s.alarms.filter((a) => a.kind === kind).length);
  return registry.metrics();
}
