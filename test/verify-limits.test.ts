/**
 * `verify` (and the doctor, which reads overlays the same way) is bounded (issue 11, item 20):
 * an archive that unpacks to a huge entry is refused as "not an overlay" without being
 * unpacked into memory, and a folder that is not an overlay is refused without reading its
 * files. Memory is measured as the child's peak RSS.
 */
import { spawnSync } from "node:child_process";
import { closeSync, mkdirSync, openSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { CLI, readPub, removeDir, run, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-vlimits-");
afterAll(() => removeDir(dir));
writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
writeFileSync(join(dir, "rss.py"), "import resource,subprocess,sys\nr=subprocess.run(sys.argv[1:],capture_output=True,text=True)\nsys.stderr.write(r.stderr)\nprint(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n");

/** Runs the CLI; returns its exit code, stderr and peak RSS in MB. */
function verify(target: string): { code: number; stderr: string; rssMb: number } {
  const r = spawnSync("python3", [join(dir, "rss.py"), process.execPath, CLI, "verify", target], {
    cwd: dir,
    encoding: "utf8",
    env: { ...process.env, MKOVERLAY_CONFIG: "", MKOVERLAY_REGISTRY: "" },
  });
  const [code = "-1", kb = "0"] = r.stdout.trim().split(" ");
  return { code: Number(code), stderr: r.stderr, rssMb: Number(kb) / 1024 };
}

function sparse(file: string, size: string): void {
  closeSync(openSync(file, "w"));
  expect(run("truncate", ["-s", size, file]).code).toBe(0);
}

describe("verify reads within bounds", () => {
  it("refuses an archive with a 1 GiB entry without unpacking it (a few MB packed)", () => {
    const src = join(dir, "bomb");
    mkdirSync(src);
    sparse(join(src, "zeros"), "1G");
    const archive = join(dir, "bomb.overlay.tar.gz");
    expect(run("bash", ["-c", `tar -C ${src} -cf - zeros | gzip -1 > ${archive}`]).code).toBe(0);
    const r = verify(archive);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/^mkoverlay: error: .*bomb\.overlay\.tar\.gz: not an mkoverlay overlay \(unpacks to more than 32 MiB\)$/m);
    expect(r.stderr).not.toMatch(/internal error|\n\s+at /);
    expect(r.rssMb).toBeLessThan(250);
  }, 60_000);

  it("refuses a folder that is not an overlay without reading its files (a 2 GiB file in it costs nothing)", () => {
    const junk = join(dir, "junk");
    mkdirSync(junk);
    for (let i = 0; i < 2000; i++) writeFileSync(join(junk, `f${i}`), "x".repeat(100));
    sparse(join(junk, "disk.img"), "2G");
    const r = verify(junk);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/not an mkoverlay overlay \(\/etc\/ssh\/mkoverlay\/ssh_host_ed25519_key is missing\)/);
    expect(r.rssMb).toBeLessThan(250);
  });
});
