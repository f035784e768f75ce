/**
 * A package registry on 127.0.0.1 for installing the packed tarball the way a user would
 * (`npm install -g ./mkoverlay-X.tgz`) without the network: it serves the dependency versions
 * the lock file pins, with the tarballs `npm ci` already put in npm's cache (content-addressed
 * by integrity). npm resolves the package's ranges against it as against the public registry.
 * Tests talk to 127.0.0.1 only.
 */
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";

interface LockEntry {
  version?: string;
  integrity?: string;
  dev?: boolean;
  link?: boolean;
  [k: string]: unknown;
}

/** npm's cache folder (`npm config get cache`), where `npm ci` left the tarballs. */
function npmCache(): string {
  return spawnSync("npm", ["config", "get", "cache"], { encoding: "utf8" }).stdout.trim();
}

/** cacache keeps content under content-v2/ALGO/xx/yy/rest-of-hex. */
function cachedTarball(cache: string, integrity: string): Buffer {
  const [algo, b64] = integrity.split(" ")[0]!.split("-", 2) as [string, string];
  const hex = Buffer.from(b64, "base64").toString("hex");
  return readFileSync(join(cache, "_cacache", "content-v2", algo, hex.slice(0, 2), hex.slice(2, 4), hex.slice(4)));
}

export async function localRegistry(lockFile: string): Promise<{ url: string; close(): Promise<void> }> {
  const lock = JSON.parse(readFileSync(lockFile, "utf8")) as { packages: Record<string, LockEntry> };
  const cache = npmCache();
  const docs = new Map<string, { versions: Record<string, Record<string, unknown>> }>();
  const tarballs = new Map<string, string>();
  let url = "";
  for (const [path, e] of Object.entries(lock.packages)) {
    if (!path || e.dev || e.link || !e.version || !e.integrity) continue;
    const name = path.slice(path.lastIndexOf("node_modules/") + "node_modules/".length);
    const file = `/${name}/-/${name.split("/").pop()}-${e.version}.tgz`;
    tarballs.set(file, e.integrity);
    const { version, integrity, resolved: _r, dev: _d, optional: _o, devOptional: _do, inBundle: _b, ...meta } = e;
    const doc = docs.get(name) ?? { versions: {} };
    doc.versions[version] = { ...meta, name, version, dist: { integrity, tarball: file } };
    docs.set(name, doc);
  }
  const server = createServer((req, res) => {
    const path = decodeURIComponent((req.url ?? "/").split("?")[0]!);
    const integrity = tarballs.get(path);
    if (integrity) {
      res.writeHead(200, { "content-type": "application/octet-stream" }).end(cachedTarball(cache, integrity));
      return;
    }
    const doc = docs.get(path.slice(1));
    if (!doc) {
      res.writeHead(404, { "content-type": "application/json" }).end('{"error":"not found"}');
      return;
    }
    const versions = Object.fromEntries(Object.entries(doc.versions).map(([v, d]) => [v, { ...d, dist: { ...(d.dist as object), tarball: url + (d.dist as { tarball: string }).tarball } }]));
    const latest = Object.keys(versions).sort((a, b) => a.localeCompare(b, undefined, { numeric: true })).pop()!;
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ name: path.slice(1), "dist-tags": { latest }, versions }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { url, close: () => new Promise((resolve) => server.close(() => resolve())) };
}
