/**
 * Every command's --help: examples that are real command lines of that command, the
 * environment variables that matter to it, exit codes; `mkoverlay help CMD SUB`.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { Command } from "commander";
import { afterAll, describe, expect, it } from "vitest";
import { ENV, HELP } from "../src/cli/help.js";
import { allCommands, commandPath, program } from "../src/cli/main.js";
import { REPO, removeDir, runCli, tempDir } from "./helpers/workspace.js";

const dir = tempDir("mko-help-");
afterAll(() => removeDir(dir));
const cli = (args: string[]) => runCli(args, { cwd: dir });

const p = program();
const commands = allCommands(p).filter((c) => !(c as unknown as { _hidden?: boolean })._hidden);

/** The mkoverlay words of an example line (after a pipe, inside `<(…)`, before a redirection). */
function words(example: string): string[] {
  const inner = /<\((mkoverlay [^)]*)\)/.exec(example)?.[1] ?? example;
  const part = inner.split("|").map((s) => s.trim()).find((s) => s.startsWith("mkoverlay "))!;
  expect(part, example).toBeDefined();
  return part.split(/\s+(?:>>?|2>).*$/)[0]!.split(/\s+/).slice(1);
}

function findOption(c: Command, name: string) {
  for (let x: Command | null = c; x; x = x.parent) {
    const o = x.options.find((o) => o.long === name || o.short === name || o.long === name.replace(/^--no-/, "--"));
    if (o) return o;
  }
  return undefined;
}

/** Resolves an example to its command and checks every option exists there. */
function resolve(ws: string[]): Command {
  let c: Command = p;
  for (let i = 0; i < ws.length; i++) {
    const w = ws[i]!;
    if (w.startsWith("-")) {
      const name = w.split("=")[0]!;
      let o = findOption(c, name);
      if (!o && c === p) {
        c = p.commands.find((x) => x.name() === "build")!;
        o = findOption(c, name);
      }
      expect(o, `option ${name} of '${commandPath(c) || "mkoverlay"}' in "${ws.join(" ")}"`).toBeDefined();
      if ((o!.required || o!.optional) && !w.includes("=")) i++;
      continue;
    }
    const sub = c.commands.find((x) => x.name() === w);
    if (sub) c = sub;
  }
  return c;
}

describe("--help of every command", () => {
  it("every command has examples, environment and exit codes", () => {
    expect(commands.length).toBeGreaterThan(15);
    for (const c of commands) expect(HELP[commandPath(c)], commandPath(c)).toBeDefined();
  });

  it.each(commands.map((c) => [commandPath(c), c] as const))("%s: each example is a command line of it, with its options", (path, c) => {
    const spec = HELP[path]!;
    expect(spec.examples.length).toBeGreaterThan(0);
    for (const [ex] of spec.examples) {
      const target = resolve(words(ex));
      // A group's examples name its subcommands.
      expect(commandPath(target) === path || commandPath(target).startsWith(`${path} `), `${ex} is an example of '${path}'`).toBe(true);
      expect(target).toBeDefined();
      void c;
    }
    for (const e of spec.env) expect(ENV[e], `${path} lists ${e}`).toBeDefined();
  });

  it("every environment variable the code reads is documented", () => {
    const found = new Set<string>();
    const walk = (d: string) => {
      for (const n of readdirSync(d, { withFileTypes: true })) {
        if (n.isDirectory()) walk(join(d, n.name));
        else if (n.name.endsWith(".ts")) {
          const src = readFileSync(join(d, n.name), "utf8");
          for (const m of src.matchAll(/\b(?:process\.)?env\.([A-Z][A-Z0-9_]+)\b(?!\s*=[^=])|process\.env\[["']([A-Z0-9_]+)["']\](?!\s*=[^=])/g)) found.add((m[1] ?? m[2])!);
        }
      }
    };
    walk(join(REPO, "src"));
    // What the code sets for a child, not what it reads, is excluded by the pattern; PATH is no setting.
    found.delete("PATH");
    // A test hook (src/registry/test-pause.ts), not a setting: never documented.
    found.delete("MKOVERLAY_TEST_ONLY_PAUSE");
    expect(found.size).toBeGreaterThan(5);
    for (const v of found) expect(Object.keys(ENV), `${v} is read in src/ and must be in ENV (src/cli/help.ts)`).toContain(v);
  });

  it.each(commands.map((c) => [commandPath(c)]))("mkoverlay %s --help prints examples, environment and exit codes", (path) => {
    const r = cli([...path.split(" "), "--help"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Usage: mkoverlay /);
    expect(r.stdout).toMatch(/\nExamples:\n {2}\$ mkoverlay|\nExamples:\n {2}\$ (ssh-keyscan|source)/);
    expect(r.stdout).toMatch(/\nExit codes: 0 /);
    for (const e of HELP[path]!.env) expect(r.stdout).toContain(`  ${e} `);
  });

  it("the main --help lists every variable and the interrupted exit codes", () => {
    const r = cli(["--help"]);
    for (const e of Object.keys(ENV)) expect(r.stdout).toContain(`  ${e} `);
    expect(r.stdout.replace(/\n/g, " ")).toMatch(/130\/143 interrupted/);
  });

  it("verify and batch say what their exit codes mean", () => {
    expect(cli(["verify", "--help"]).stdout).toMatch(/Exit codes: 0 every check passed; 1 a check failed; 2 an overlay could not be read/);
    expect(cli(["batch", "--help"]).stdout).toMatch(/1 some devices failed .*130\/143 interrupted/s);
  });

  it.each(commands.filter((c) => c.commands.length > 0).map((c) => [commandPath(c), c] as const))("every subcommand of '%s' is in its help, its line in the parent's help, and its examples", (path, c) => {
    const subs = c.commands.map((s) => s.name());
    expect(subs.length).toBeGreaterThan(1);
    const own = cli([...path.split(" "), "--help"]).stdout;
    const listed = /\nCommands:\n([\s\S]*?)\n\n/.exec(own)?.[1] ?? "";
    const examples = own.slice(own.indexOf("\nExamples:\n"));
    // The parent's line for this group (`mkoverlay --help`) is its description, wrapped.
    const line = c.description();
    expect(cli([...path.split(" ").slice(0, -1), "--help"]).stdout.replace(/\s+/g, " "), `'${path}' in its parent's help`).toContain(` ${path.split(" ").at(-1)} ${line} `);
    for (const s of subs) {
      expect(listed, `${path} --help lists ${s}`).toMatch(new RegExp(`^  ${s} `, "m"));
      expect(line, `the parent's line for '${path}' names ${s}`).toMatch(new RegExp(`\\b${s}\\b`));
      expect(examples, `${path} --help has an example of ${s}`).toMatch(new RegExp(`\\$ mkoverlay ${path} ${s}[ \\n]`));
    }
  });

  it("init's help says it never fetches a host key", () => {
    expect(cli(["init", "--help"]).stdout.replace(/\n/g, " ")).toMatch(/never fetches a host key itself: pinning a bastion's key is your decision/);
  });
});

describe("mkoverlay help COMMAND [SUBCOMMAND]", () => {
  it.each([["registry", "doctor"], ["bastion", "sshd-config"], ["registry", "migrate"], ["verify"], ["batch"]])("help %s %s is that command's --help", (...path) => {
    const viaHelp = cli(["help", ...path.filter(Boolean)]);
    const viaFlag = cli([...path.filter(Boolean), "--help"]);
    expect(viaHelp.code).toBe(0);
    expect(viaHelp.stdout).toBe(viaFlag.stdout);
    expect(viaHelp.stdout).toMatch(new RegExp(`^Usage: mkoverlay ${path.filter(Boolean).join(" ")} `));
  });

  it("help with no command is the main help", () => {
    const r = cli(["help"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Usage: mkoverlay \[options\] \[command\]/);
  });

  it("an unknown subcommand is an error naming the known ones", () => {
    const r = cli(["help", "registry", "docter"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("mkoverlay: error: help: unknown subcommand of 'registry' 'docter'\nmkoverlay: hint: did you mean 'doctor'? known: list, release, remove-bastion, doctor, migrate, import-manufacturing\n");
    const u = cli(["help", "verfy"]);
    expect(u.code).toBe(2);
    expect(u.stderr).toMatch(/unknown command 'verfy'\nmkoverlay: hint: did you mean 'verify'\?/);
  });
});
