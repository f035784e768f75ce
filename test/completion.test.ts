/**
 * Shell completion, run in the real shells: bash sources the script and its function fills
 * COMPREPLY (as readline would call it), fish answers `complete -C`, zsh checks the syntax.
 * The values come from this installation (profiles) and the config on the line.
 */
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { requires, tools } from "./helpers/capability.js";
import { CLI, readPub, removeDir, run, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-compl-");
const bin = join(dir, "bin");
let env: Record<string, string>;

beforeAll(() => {
  mkdirSync(bin);
  // `mkoverlay` on PATH, as an installed user has it (the scripts call it by name).
  symlinkSync(CLI, join(bin, "mkoverlay"));
  const key = readPub(sshKeygen(dir, "bastion"));
  writeFleet(dir, { eu: { hostKeys: [key] }, us: { hostKeys: [key] }, "lab-2": { hostKeys: [key] } });
  mkdirSync(join(dir, "other"));
  writeFleet(join(dir, "other"), { asia: { hostKeys: [key] } });
  writeFileSync(join(dir, "hosts.csv"), "hostname\ngw-a\n");
  env = { PATH: `${bin}:${dirname(process.execPath)}:/usr/bin:/bin`, MKOVERLAY_CONFIG: "", HOME: dir };
});
afterAll(() => removeDir(dir));

/** What bash completes for `line` (cursor at its end), through the sourced script. */
function bash(line: string): string[] {
  // Split as readline does: COMP_WORDBREAKS makes '=' a word of its own.
  const words = line.replace(/=/g, " = ").split(/ +/);
  if (line.endsWith(" ")) words[words.length - 1] = "";
  const arr = words.map((w) => `'${w}'`).join(" ");
  const script = `source <(mkoverlay completion bash) && complete -p mkoverlay && COMP_WORDS=(${arr}) && COMP_CWORD=${words.length - 1} && _mkoverlay && printf '%s\\n' "\${COMPREPLY[@]}"`;
  const r = run("bash", ["-c", script], { cwd: dir, env });
  expect(r.code, r.stderr).toBe(0);
  const [first, ...rest] = r.stdout.split("\n").filter(Boolean);
  expect(first).toBe("complete -F _mkoverlay mkoverlay");
  return rest;
}

describe("bash", () => {
  it("commands at the first word, including help", () => {
    const c = bash("mkoverlay ");
    for (const w of ["build", "batch", "flash", "init", "verify", "registry", "completion", "help", "status"]) expect(c).toContain(w);
    expect(c).not.toContain("__complete");
    expect(bash("mkoverlay ver")).toEqual(["verify"]);
  });

  it("subcommands", () => {
    expect(bash("mkoverlay registry ").sort()).toEqual(["doctor", "import-manufacturing", "list", "migrate", "release", "remove-bastion"]);
    expect(bash("mkoverlay registry d")).toEqual(["doctor"]);
    expect(bash("mkoverlay help registry ").sort()).toEqual(["doctor", "import-manufacturing", "list", "migrate", "release", "remove-bastion"]);
  });

  it("options of the command on the line (build's without a command word)", () => {
    const c = bash("mkoverlay batch --");
    for (const o of ["--board", "--count", "--hosts", "--no-progress", "--json", "--config"]) expect(c).toContain(o);
    expect(c).not.toContain("--fix");
    expect(bash("mkoverlay --bo")).toEqual(["--board"]);
    expect(bash("mkoverlay registry doctor --f")).toEqual(["--fix"]);
    // An option already given is not offered again.
    expect(bash("mkoverlay batch --json --js")).toEqual([]);
  });

  it("board and OS ids from the profiles", () => {
    expect(bash("mkoverlay --board ").sort()).toEqual(["arm64", "cm4", "rpi3", "rpi4", "rpi5", "zero2w"]);
    expect(bash("mkoverlay batch --board rp").sort()).toEqual(["rpi3", "rpi4", "rpi5"]);
    expect(bash("mkoverlay --board rpi4 --os ").sort()).toEqual(["armbian", "debian", "raspios", "ubuntu"]);
    // --os=ub: bash replaces only the piece after '='.
    expect(bash("mkoverlay --board rpi4 --os=ub")).toEqual(["ubuntu"]);
  });

  it("bastion names from the config found the usual way, and after a comma", () => {
    expect(bash("mkoverlay --board rpi4 --bastion ").sort()).toEqual(["eu", "lab-2", "us"]);
    expect(bash("mkoverlay --board rpi4 --bastion eu,").sort()).toEqual(["eu,lab-2", "eu,us"]);
    expect(bash("mkoverlay --config other/mkoverlay.yaml --board rpi4 --bastion ")).toEqual(["asia"]);
    const viaEnv = run("bash", ["-c", "source <(mkoverlay completion bash); COMP_WORDS=(mkoverlay bastion sshd-config --bastion ''); COMP_CWORD=4; _mkoverlay; printf '%s\\n' \"${COMPREPLY[@]}\""], {
      cwd: dir,
      env: { ...env, MKOVERLAY_CONFIG: join(dir, "other/mkoverlay.yaml") },
    });
    expect(viaEnv.stdout.trim()).toBe("asia");
  });

  it("formats, schema kinds, shells", () => {
    expect(bash("mkoverlay --format ").sort()).toEqual(["dir", "tar"]);
    expect(bash("mkoverlay registry list --format ").sort()).toEqual(["csv", "markdown", "table"]);
    expect(bash("mkoverlay status --format ").sort()).toEqual(["json", "prometheus", "table"]);
    expect(bash("mkoverlay status --state ").sort()).toEqual(["connected", "never-seen", "new", "offline", "unknown"]);
    expect(bash("mkoverlay schema ").sort()).toEqual(["board", "fleet", "os"]);
    expect(bash("mkoverlay completion ").sort()).toEqual(["bash", "fish", "zsh"]);
  });

  it("files where a file goes", () => {
    expect(bash("mkoverlay batch --board rpi4 --hosts ho")).toEqual(["hosts.csv"]);
    expect(bash("mkoverlay verify oth")).toEqual(["other"]);
    // flash: its base image, its CSV and its cards (paths such as /dev/sdb) are files.
    expect(bash("mkoverlay flash --base oth")).toEqual(["other"]);
    expect(bash("mkoverlay flash --board rpi4 --hosts ho")).toEqual(["hosts.csv"]);
    expect(bash("mkoverlay flash --base other --board rpi4 oth")).toEqual(["other"]);
  });

  it("a broken config still completes nothing, quietly", () => {
    writeFileSync(join(dir, "broken.yaml"), "bastions: [\n");
    expect(bash("mkoverlay --config broken.yaml --board rpi4 --bastion ")).toEqual([]);
  });
});

requires(tools("fish"))("fish", () => {
  it("the script parses (fish -n) and completes for real (complete -C)", () => {
    const script = join(dir, "mkoverlay.fish");
    writeFileSync(script, run("mkoverlay", ["completion", "fish"], { env }).stdout);
    expect(run("fish", ["-n", script]).code).toBe(0);
    const c = (line: string) => run("fish", ["--no-config", "-c", `source ${script}; complete -C '${line}'`], { cwd: dir, env }).stdout.split("\n").filter(Boolean);
    expect(c("mkoverlay regi")).toEqual(["registry"]);
    expect(c("mkoverlay --board rpi4 --bastion ").sort()).toEqual(["eu", "lab-2", "us"]);
    expect(c("mkoverlay --board rpi")).toEqual(["rpi3", "rpi4", "rpi5"]);
  });
});

requires(tools("zsh"))("zsh", () => {
  it("the script parses (zsh -n)", () => {
    const script = join(dir, "_mkoverlay");
    writeFileSync(script, run("mkoverlay", ["completion", "zsh"], { env }).stdout);
    const r = run("zsh", ["-n", script]);
    expect(r.code, r.stderr).toBe(0);
    expect(run("mkoverlay", ["completion", "zsh"], { env }).stdout).toMatch(/^#compdef mkoverlay\n/);
  });
});

it("an unknown shell is a usage error", () => {
  const r = run("mkoverlay", ["completion", "tcsh"], { env });
  expect(r.code).toBe(2);
  expect(r.stderr).toBe('mkoverlay: error: completion "tcsh": use bash, zsh or fish\n');
});
