/**
 * The fleet config schema: one zod schema is both the validator and the source of the
 * committed JSON Schema (schema/mkoverlay.schema.json) that editors use.
 * Field checks that need a reason (CIDR, key lines, host names) are refinements here so their
 * errors carry the exact path; cross-field rules live in rules.ts.
 */
import { z } from "zod";
import { canonicalHostKeyEntry, canonicalKeyLine, parseHostKeyEntry, parsePublicKey } from "../keys/pubkey.js";
import { cidrProblem, hostProblem, nameProblem, PORT_RANGE, quotedValueProblem, userProblem } from "../util/validate.js";

function check(problem: (v: string) => string | undefined) {
  return (v: string, ctx: z.RefinementCtx) => {
    const p = problem(v);
    if (p) ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} ${p}` });
  };
}


const portRange = z
  .string()
  .describe("An inclusive port range, e.g. 21000-21999")
  .superRefine((v, ctx) => {
    const m = PORT_RANGE.exec(v);
    if (!m) {
      ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} is not a port range like 21000-21999` });
      return;
    }
    const lo = Number(m[1]);
    const hi = Number(m[2]);
    if (lo < 1 || hi > 65535 || lo > 65535) ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)}: ports must be 1-65535` });
    else if (lo > hi) ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} is reversed (write ${hi}-${lo})` });
  });

const hostKey = z
  .string()
  .describe("A pinned bastion host key: an OpenSSH public key line, or '@cert-authority KEYLINE' to trust a host CA")
  .superRefine((v, ctx) => {
    const k = parseHostKeyEntry(v);
    if (typeof k === "string") ctx.addIssue({ code: "custom", message: `is not a public key: it ${k}` });
  })
  // What is validated is what is written: the canonical form, kept in the validated (cached)
  // config, so a build never decodes keys again.
  .transform(canonicalHostKeyEntry);

const hostCA = z
  .string()
  .describe("The bastion's host CA: an OpenSSH public key line (without @cert-authority)")
  .superRefine((v, ctx) => {
    const k = parsePublicKey(v);
    if (typeof k === "string") ctx.addIssue({ code: "custom", message: `is not a public key: it ${k}` });
  })
  .transform(canonicalKeyLine);

const BastionSchema = z
  .strictObject({
    host: z.string().describe("Public DNS name or IP address the gateway connects to").superRefine(check(hostProblem)),
    port: z.number().int().min(1).max(65535).default(22).describe("The bastion's sshd port"),
    user: z.string().default("reverse-ssh").describe("The tunnel user on the bastion").superRefine(check(userProblem)),
    hostKeys: z.array(hostKey).min(1).describe("Pinned bastion host keys (required: the device never trusts an unknown bastion)"),
    nextHostKeys: z
      .array(hostKey)
      .min(1)
      .optional()
      .describe("Host keys the bastion will switch to, pinned beside hostKeys so the switch needs no re-flash (docs/bastion.md, rollover)"),
    hostCA: hostCA
      .optional()
      .describe("A host CA the devices trust for this bastion (@cert-authority): any host key it certifies for `host` is accepted (docs/bastion.md, rollover)"),
    from: z
      .array(z.string().superRefine(check((v) => cidrProblem(v) ?? quotedValueProblem(v))))
      .min(1)
      .optional()
      .describe("Source addresses/CIDRs allowed to use the device key (authorized_keys from=)"),
    expiry: z
      .string()
      .optional()
      .describe("When the device key stops working on this bastion: a date (2027-12-31) or a duration from build time (365d, 12w, 12months, 1y; `m` is a minute and is refused here: README.md, Durations)"),
    expirySpread: z
      .union([z.literal(0), z.string()])
      .optional()
      .describe(
        "With a duration expiry: each device's key lasts up to this much longer (deterministic per key), so one shift's builds do not all expire in the same minute. 0 (none), or a duration (36h, 14d, 2w; README.md, Durations); default a tenth of the duration, at most 30d. Never shortens the expiry",
      ),
    expiryRenewal: z
      .string()
      .optional()
      .describe(
        "With a duration expiry: a device seen connected (by any bastion's agent) keeps its key at least this long after the day it was last seen (plus its share of expirySpread); the agent serves the renewed expiry-time, the device is never touched. A device not seen keeps its build-time expiry. A duration (90d, 12w, 3months, 1y; README.md, Durations)",
      ),
    jumpUser: z
      .string()
      .superRefine(check(userProblem))
      .optional()
      .describe("Operators' own account on this bastion, for ProxyJump in `mkoverlay ssh-config` (not the tunnel user)"),
  })
  .describe("A bastion the gateways keep a reverse tunnel to");

const port = z.number().int().min(1).max(65535);

const ForwardSchema = z
  .strictObject({
    name: z.string().describe("Names the forward (and its reserved port in the registry)").superRefine(check(nameProblem)),
    type: z
      .enum(["remote", "local", "socks"])
      .default("remote")
      .describe("remote: a device port published on the bastion (-R); local: a bastion-side service reachable on the device (-L); socks: a SOCKS proxy on the device (-D)"),
    local: port.optional().describe("remote: the device port to publish (e.g. 80)"),
    bastion: z.string().optional().describe("local/socks: the one bastion whose tunnel carries it"),
    listen: port.optional().describe("local/socks: the device-side port to listen on (localhost)"),
    to: z.string().optional().describe("local: host:port on the bastion side (e.g. localhost:4505)"),
    allow: z.array(z.string()).optional().describe("socks: host:port destinations the proxy may reach (become permitopen entries)"),
  })
  .describe("An extra forward on the device's tunnel(s)");

const publicKeyLine = z
  .string()
  .superRefine((v, ctx) => {
    const k = parsePublicKey(v);
    if (typeof k === "string") ctx.addIssue({ code: "custom", message: `is not a public key: it ${k}` });
  })
  .transform(canonicalKeyLine);

const OperatorsSchema = z
  .union([
    z.literal("none").describe("The image brings its own login access; mkoverlay adds none"),
    z
      .strictObject({
        user: z.string().default("root").describe("The account operators log in as").superRefine(check(userProblem)),
        authorizedKeys: z.array(publicKeyLine).optional().describe("Operators' OpenSSH public keys"),
        userCA: publicKeyLine.optional().describe("An SSH CA public key: certificates it signs for `principals` may log in"),
        principals: z
          .array(z.string().regex(/^[A-Za-z0-9_.@-]{1,64}$/, "principals are 1-64 of A-Z a-z 0-9 _ . @ -"))
          .min(1)
          .optional()
          .describe("Certificate principals accepted for `user` (required with userCA)"),
      })
      .describe("Who may log in to the gateways"),
  ])
  .describe("Operator access on the device: a mapping, or `none`");

export const FleetSchema = z
  .strictObject({
    $schema: z.string().optional().describe("JSON Schema reference for editors"),
    registry: z
      .string()
      .default("./mkoverlay.db")
      .describe("Port registry: an embedded SQLite file (path relative to this file), or postgres://user@host:5432/db shared by several stations"),
    hostname: z
      .string()
      .default("gw-{seq:04}")
      .describe("Hostname template when --hostname is not given: {seq} or {seq:0N} is the next sequence number"),
    ports: z
      .strictObject({
        ssh: portRange.default("21000-21999").describe("Tunnel ports for the device's sshd (-R), one per device"),
        services: portRange.default("22000-22999").describe("Ports for extra service tunnels"),
        allowPrivileged: z
          .string()
          .min(1)
          .optional()
          .describe(
            "Allow ports below 1024 in ssh/services, with your reason as the value (e.g. \"the bastions set net.ipv4.ip_unprivileged_port_start=0\"): the tunnel user is not root and cannot bind them otherwise",
          ),
      })
      .default({ ssh: "21000-21999", services: "22000-22999" }),
    bastions: z
      .record(z.string().superRefine(check(nameProblem)), BastionSchema)
      .describe("Bastions by name; --bastion picks them"),
    forwards: z.array(ForwardSchema).default([]).describe("Service tunnels besides the device's sshd"),
    operators: OperatorsSchema,
  })
  .describe("mkoverlay fleet configuration");

export type FleetRaw = z.output<typeof FleetSchema>;

/** The JSON Schema for editors, derived from the same schema (tested against the committed file). */
export function fleetJsonSchema(): unknown {
  return z.toJSONSchema(FleetSchema, { io: "input", unrepresentable: "any" });
}
