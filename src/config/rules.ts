/**
 * Cross-field rules the schema cannot express. Each rule returns problems with the path they
 * belong to; all are collected so the user fixes everything in one pass.
 */
import { hostnameProblem, parseExpiry } from "../validate.js";
import { parseRange } from "./fleet.js";
import type { Path } from "./positions.js";
import type { FleetRaw } from "./schema.js";

export interface Problem {
  path: Path;
  message: string;
}

const TEMPLATE_FIELD = /\{([^}]*)\}/g;

/** Renders `gw-{seq:04}`; throws on an unknown placeholder (checked by the rule below first). */
export function renderHostname(template: string, seq: number): string {
  return template.replace(TEMPLATE_FIELD, (_, field: string) => {
    const m = /^seq(?::(0?)(\d+))?$/.exec(field);
    if (!m) throw new Error(`unknown placeholder {${field}}`);
    const width = m[2] ? Number(m[2]) : 0;
    return String(seq).padStart(width, m[1] === "0" ? "0" : " ");
  });
}

function hostnameTemplateRule(raw: FleetRaw): Problem[] {
  const t = raw.hostname;
  const fields = [...t.matchAll(TEMPLATE_FIELD)].map((m) => m[1] ?? "");
  const bad = fields.find((f) => !/^seq(?::0\d+)?$/.test(f));
  if (bad !== undefined) return [{ path: ["hostname"], message: `unknown placeholder {${bad}} (use {seq} or {seq:04})` }];
  if (fields.length === 0) return [{ path: ["hostname"], message: `${JSON.stringify(t)} has no {seq} placeholder, so every device would get the same name` }];
  const sample = renderHostname(t, 1);
  const p = hostnameProblem(sample);
  return p ? [{ path: ["hostname"], message: `renders names like ${JSON.stringify(sample)} that ${p}` }] : [];
}

function portRangesRule(raw: FleetRaw): Problem[] {
  const ssh = parseRange(raw.ports.ssh);
  const svc = parseRange(raw.ports.services);
  if (ssh.lo <= svc.hi && svc.lo <= ssh.hi) {
    return [{ path: ["ports", "services"], message: `${raw.ports.services} overlaps ports.ssh ${raw.ports.ssh}` }];
  }
  return [];
}

function bastionsRule(raw: FleetRaw, now: Date): Problem[] {
  const out: Problem[] = [];
  const names = Object.keys(raw.bastions);
  if (names.length === 0) out.push({ path: ["bastions"], message: "no bastion defined" });
  for (const [name, b] of Object.entries(raw.bastions)) {
    if (b.expiry !== undefined) {
      const t = parseExpiry(b.expiry, now);
      if (typeof t === "string") out.push({ path: ["bastions", name, "expiry"], message: `${JSON.stringify(b.expiry)} ${t}` });
      else if (t.getTime() <= now.getTime()) out.push({ path: ["bastions", name, "expiry"], message: `${JSON.stringify(b.expiry)} is in the past` });
    }
  }
  return out;
}

export function crossCheck(raw: FleetRaw, now: Date): Problem[] {
  return [...hostnameTemplateRule(raw), ...portRangesRule(raw), ...bastionsRule(raw, now)];
}
