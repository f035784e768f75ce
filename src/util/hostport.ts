/**
 * `host:port` in the forms OpenSSH reads, written and read in one place. An IPv6 address is
 * always bracketed next to a port (`[2001:db8::1]:2222`): ssh refuses an unbracketed one in
 * ProxyJump ("Invalid ProxyJump", even `::1` alone — checked with ssh -G), and known_hosts names a
 * host off port 22 as `[host]:port` whatever the host is.
 */
import { isIPv6 } from "node:net";

export interface HostPort {
  host: string;
  port: number;
}

/** `host:port`, IPv6 as `[addr]:port`; with `omitPort`, that port is left off (`host`, `[addr]`). */
export function formatHostPort(host: string, port: number, o: { omitPort?: number } = {}): string {
  const h = isIPv6(host) ? `[${host}]` : host;
  return port === o.omitPort ? h : `${h}:${port}`;
}

/** How ssh looks a host up in known_hosts (and ssh-keyscan names it): `host`, or `[host]:port` off 22. */
export function knownHostsName(host: string, port: number): string {
  return port === 22 ? host : `[${host}]:${port}`;
}

/**
 * `host`, `host:port`, `[addr]:port`, `[addr]` or a bare IPv6 address (no port then): the host and
 * port, or why not. The host itself is not checked here (the caller's validator does that).
 */
export function parseHostPort(text: string, o: { defaultPort?: number } = {}): HostPort | string {
  let host = text;
  let port: string | undefined;
  const bracket = /^\[([^\]]*)\](?::(.*))?$/.exec(text);
  if (bracket) {
    host = bracket[1]!;
    port = bracket[2];
  } else if (!isIPv6(text) && text.includes(":")) {
    const i = text.lastIndexOf(":");
    host = text.slice(0, i);
    port = text.slice(i + 1);
  }
  if (host === "") return "has no host";
  if (port === undefined) return o.defaultPort === undefined ? "has no port (host:port, [IPv6]:port)" : { host, port: o.defaultPort };
  if (!/^\d{1,5}$/.test(port)) return `${JSON.stringify(port)} is not a port`;
  const n = Number(port);
  if (n < 1 || n > 65535) return `port ${n} is not 1-65535`;
  return { host, port: n };
}
