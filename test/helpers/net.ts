/**
 * Loopback networking for tests: a free port, and whether something listens. Tests only ever
 * talk to 127.0.0.1 / ::1.
 */
import { connect, createServer } from "node:net";

/** A TCP port that is free on 127.0.0.1 (and on ::1 where IPv6 loopback exists) right now. */
export async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = createServer();
      s.once("error", reject);
      s.listen(0, "127.0.0.1", () => {
        const a = s.address();
        const p = typeof a === "object" && a ? a.port : 0;
        s.close(() => resolve(p));
      });
    });
    const v6ok = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once("error", (e: NodeJS.ErrnoException) => resolve(e.code === "EADDRNOTAVAIL" || e.code === "EAFNOSUPPORT"));
      s.listen(port, "::1", () => s.close(() => resolve(true)));
    });
    if (port > 0 && v6ok) return port;
  }
  throw new Error("no free port found");
}

/** True when something accepts a TCP connection on 127.0.0.1:port. */
export function canConnect(port: number, host = "127.0.0.1", timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ port, host });
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(timeoutMs, () => done(false));
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
  });
}

