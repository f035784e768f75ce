/**
 * `mkoverlay verify OVERLAY`: checks an overlay (archive or folder) against itself and the
 * registry before it is flashed — the key pair matches and is the registered one, owners and
 * modes, units and their enablement, the first-boot guards its OS needs.
 */
import { posix } from "node:path";
import { withFleetRegistry } from "../context.js";
import { UserError } from "../errors.js";
import { decodePrivateKey, fingerprint, publicKeyLine } from "../keys/ed25519.js";
import { out } from "../output.js";
import { layerFiles } from "../overlay/layers.js";
import * as P from "../overlay/paths.js";
import { readOverlay, type ReadEntry } from "../overlay/read.js";
import { installSection, SYSTEM_DIR } from "../overlay/systemd.js";
import { loadProfiles } from "../profiles.js";

interface Check {
  ok: boolean;
  what: string;
  detail?: string;
}

const rel = (abs: string): string => abs.replace(/^\//, "");

function globToRegExp(glob: string): RegExp {
  return new RegExp("^" + glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, "[^/]*").replace(/\?/g, "[^/]") + "$");
}

export async function verifyOverlay(path: string, config: string | undefined): Promise<{ hostname: string | undefined; checks: Check[] }> {
  const tree = await readOverlay(path);
  const checks: Check[] = [];
  const check = (ok: boolean, what: string, detail?: string) => checks.push(detail === undefined ? { ok, what } : { ok, what, detail });
  const text = (p: string): string | undefined => tree.get(rel(p))?.content?.toString("utf8");
  const mode = (p: string): number | undefined => tree.get(rel(p))?.mode;
  const link = (p: string): ReadEntry | undefined => {
    const e = tree.get(rel(p));
    return e?.type === "symlink" ? e : undefined;
  };

  const notRoot = [...tree.values()].filter((e) => e.uid !== 0 || e.gid !== 0);
  check(notRoot.length === 0, "every entry is owned by root:root", notRoot.slice(0, 3).map((e) => e.path).join(", ") || undefined);

  // The key pair.
  const keyText = text(P.HOST_KEY);
  let fp: string | undefined;
  let pubLine: string | undefined;
  if (keyText === undefined) check(false, `private key ${P.HOST_KEY} present`);
  else {
    try {
      const { key } = decodePrivateKey(keyText, P.HOST_KEY);
      fp = fingerprint(key.pub);
      pubLine = publicKeyLine(key.pub);
      check(true, `private key ${P.HOST_KEY} is an ed25519 OpenSSH key (${fp})`);
    } catch (e) {
      check(false, `private key ${P.HOST_KEY} is an ed25519 OpenSSH key`, (e as Error).message);
    }
  }
  check(mode(P.HOST_KEY) === 0o600, `${P.HOST_KEY} is mode 0600`, mode(P.HOST_KEY)?.toString(8));
  check(mode(P.KEY_DIR) === 0o755, `${P.KEY_DIR} is mode 0755 (the key itself is 0600)`, mode(P.KEY_DIR)?.toString(8));
  const pubText = text(P.HOST_KEY_PUB)?.trim().split(/\s+/).slice(0, 2).join(" ");
  check(pubLine !== undefined && pubText === pubLine, `${P.HOST_KEY_PUB} matches the private key`);
  check(new RegExp(`^HostKey ${P.HOST_KEY}$`, "m").test(text(P.SSHD_DROPIN) ?? ""), `${P.SSHD_DROPIN} makes it sshd's host key`);

  const hostname = text("/etc/hostname")?.trim();
  const profiles = await loadProfiles();
  await withFleetRegistry(config, async (fleet, registry) => {
    const d = fp ? await registry.getByFingerprint(fp) : undefined;
    check(d !== undefined, "the key is registered", d ? d.hostname : "not in the registry");
    if (!d) return;
    check(d.status === "active", `${d.hostname} is active in the registry`, d.status);
    check(hostname === d.hostname, "/etc/hostname is the registered name", hostname);
    // Tunnels: one env file + enabled instance per registered bastion, on the registered port.
    const unit = text(P.TUNNEL_TEMPLATE);
    check(unit !== undefined, `${P.TUNNEL_TEMPLATE} present`);
    const wanted = installSection(unit ?? "").wantedBy;
    for (const b of d.bastions) {
      const env = text(P.tunnelEnv(b));
      check(env !== undefined && new RegExp(`^TUNNEL_PORT=${d.port}$`, "m").test(env), `tunnel to '${b}' uses port ${d.port}`);
      for (const t of wanted) {
        check(link(`${SYSTEM_DIR}/${t}.wants/${P.tunnelUnit(b)}`)?.target === P.TUNNEL_TEMPLATE, `${P.tunnelUnit(b)} is enabled (${t})`);
      }
    }
    check(mode(P.MONITOR_SCRIPT) === 0o755, `${P.MONITOR_SCRIPT} present and executable`);
    check(text(P.MONITOR_SERVICE) !== undefined, `${P.MONITOR_SERVICE} present`);
    for (const t of installSection(text(P.MONITOR_TIMER) ?? "").wantedBy) {
      check(link(`${SYSTEM_DIR}/${t}.wants/reverse-ssh-monitor.timer`)?.target === P.MONITOR_TIMER, `reverse-ssh-monitor.timer is enabled (${t})`);
    }
    check((text(P.KNOWN_HOSTS) ?? "").split("\n").some((l) => l && !l.startsWith("#")), `${P.KNOWN_HOSTS} pins the bastion host keys`);
    // Operator access as the fleet config says now.
    const o = fleet.operators;
    const dropin = text(P.OPERATORS_DROPIN);
    if (!o) check(dropin === undefined, "no operator access added (operators: none)");
    else {
      check(dropin !== undefined && dropin.includes(`${P.OPERATOR_KEYS_DIR}/%u`), `${P.OPERATORS_DROPIN} adds the operator keys file`);
      check(/^PasswordAuthentication no$/m.test(dropin ?? ""), "password logins are off");
      const keys = (text(`${P.OPERATOR_KEYS_DIR}/${o.user}`) ?? "").split("\n").filter((l) => l && !l.startsWith("#"));
      check(keys.join("\n") === o.authorizedKeys.join("\n"), `operator keys for ${o.user} match the fleet config`, `${keys.length} key(s)`);
      if (o.userCA) {
        check(text(P.USER_CA)?.trim() === o.userCA.trim() && (dropin ?? "").includes(`TrustedUserCAKeys ${P.USER_CA}`), "the operator CA is trusted");
        check((text(`${P.PRINCIPALS_DIR}/${o.user}`) ?? "").trim().split("\n").join(",") === o.principals.join(","), `principals for ${o.user} match the fleet config`);
      }
    }
    // The OS it was built for: ssh enabled, first-boot guards in place.
    const os = profiles.oses.get(d.os);
    check(os !== undefined, `OS profile '${d.os}' known`);
    if (!os) return;
    for (const t of os.ssh.wantedBy) {
      check(link(`${SYSTEM_DIR}/${t}.wants/${os.ssh.unit}`)?.target === posix.join(os.unitDir, os.ssh.unit), `${os.ssh.unit} is enabled (${t})`);
    }
    for (const m of os.firstBoot.mask) check(link(`${SYSTEM_DIR}/${m}`)?.target === "/dev/null", `${m} is masked (${os.id} first boot)`);
    for (const layer of os.firstBoot.layers) {
      for (const f of layerFiles(layer)) check(tree.get(f.path)?.content?.equals(f.content) === true, `/${f.path} present (${os.id} first boot)`);
    }
    const doomed = [...tree.keys()].filter((p) => os.firstBoot.deletes.some((g) => globToRegExp(g).test(`/${p}`)));
    check(doomed.length === 0, `nothing the overlay ships is deleted by ${os.id}'s first boot`, doomed.join(", ") || undefined);
  });
  return { hostname, checks };
}

export async function verifyCommand(path: string, opts: { config?: string; json?: boolean }): Promise<void> {
  const { hostname, checks } = await verifyOverlay(path, opts.config);
  const failed = checks.filter((c) => !c.ok);
  if (opts.json) out(JSON.stringify({ overlay: path, hostname, ok: failed.length === 0, checks }));
  else out(checks.map((c) => `${c.ok ? "ok  " : "FAIL"} ${c.what}${c.detail && !c.ok ? `: ${c.detail}` : ""}`).join("\n"));
  if (failed.length > 0) throw new UserError(`${path}: ${failed.length} check(s) failed`, { exitCode: 1 });
}
