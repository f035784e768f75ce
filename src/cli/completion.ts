/**
 * Shell completion. `mkoverlay completion bash|zsh|fish` prints a small script; the script asks
 * `mkoverlay __complete` for the candidates of the word under the cursor, so the commands,
 * options and values it knows are always this installation's: commands and options from the
 * commander tree itself, boards and OS profiles from the profile files, bastions from the
 * fleet config found the usual way (--config on the line, $MKOVERLAY_CONFIG, ./mkoverlay.yaml),
 * read leniently — a config with an error elsewhere still completes its bastion names.
 */
import { readdirSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import type { Command, Option } from "commander";
import { UserError } from "../util/errors.js";
import { out } from "../util/log.js";
import { resourceDir } from "../util/resources.js";

const BASH = `# mkoverlay completion for bash: source <(mkoverlay completion bash)
_mkoverlay() {
    local cur="\${COMP_WORDS[COMP_CWORD]}"
    local IFS=$'\\n'
    local -a reply
    reply=($(mkoverlay __complete --shell bash --cur "$cur" -- "$COMP_CWORD" "\${COMP_WORDS[@]}" 2>/dev/null))
    case "\${reply[0]}" in
        :files) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
        :dirs) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;
        *) COMPREPLY=("\${reply[@]}") ;;
    esac
}
complete -F _mkoverlay mkoverlay
`;

const ZSH = `#compdef mkoverlay
# mkoverlay completion for zsh: mkoverlay completion zsh > "\${fpath[1]}/_mkoverlay" (or source it)
_mkoverlay() {
    local -a reply
    reply=("\${(@f)$(mkoverlay __complete --shell zsh --cur "\${words[CURRENT]}" -- $((CURRENT - 1)) "\${words[@]}" 2>/dev/null)}")
    case "\${reply[1]}" in
        :files) _files ;;
        :dirs) _files -/ ;;
        '') return 1 ;;
        *) compadd -Q -- "\${reply[@]}" ;;
    esac
}
if [[ "\${funcstack[1]}" = "_mkoverlay" ]]; then
    _mkoverlay "$@"
else
    compdef _mkoverlay mkoverlay
fi
`;

const FISH = `# mkoverlay completion for fish: mkoverlay completion fish > ~/.config/fish/completions/mkoverlay.fish
function __mkoverlay_complete
    set -l tokens (commandline -opc)
    set -l cur (commandline -ct)
    set -l reply (mkoverlay __complete --shell fish --cur "$cur" -- (count $tokens) $tokens "$cur" 2>/dev/null)
    switch "$reply[1]"
        case ':files'
            __fish_complete_path "$cur"
        case ':dirs'
            __fish_complete_directories "$cur"
        case '*'
            printf '%s\\n' $reply
    end
end
complete -c mkoverlay -f -a '(__mkoverlay_complete)'
`;

export const SCRIPTS: Record<string, string> = { bash: BASH, zsh: ZSH, fish: FISH };

export function completionCommand(shell: string): void {
  const script = SCRIPTS[shell];
  if (!script) throw new UserError(`completion ${JSON.stringify(shell)}: use bash, zsh or fish`);
  out(script);
}

/** What a word completes to, when it is not a fixed list: the shell's own file completion. */
const FILES = ":files";
const DIRS = ":dirs";

const profileIds = (sub: string): string[] => {
  try {
    return readdirSync(resourceDir("boards", sub))
      .filter((n) => n.endsWith(".yaml"))
      .map((n) => n.slice(0, -".yaml".length))
      .sort();
  } catch {
    return [];
  }
};

/** The bastion names of the config this command line would use; none when it cannot be read. */
async function bastionNames(words: string[]): Promise<string[]> {
  let file = process.env.MKOVERLAY_CONFIG || "mkoverlay.yaml";
  for (let i = 0; i < words.length; i++) {
    if (words[i] === "--config" && words[i + 1] !== undefined) file = words[i + 1]!;
    else if (words[i]!.startsWith("--config=")) file = words[i]!.slice("--config=".length);
  }
  try {
    // The bundle hands a dynamically imported CommonJS-style module over as `default`.
    type Yaml = { parse: (text: string) => unknown };
    const mod = (await import("yaml")) as unknown as Partial<Yaml> & { default?: Yaml };
    const parse = mod.parse ?? mod.default!.parse;
    const doc = parse(readFileSync(file.replace(/^~(?=\/)/, homedir()), "utf8")) as { bastions?: unknown };
    return doc && typeof doc.bastions === "object" && doc.bastions !== null ? Object.keys(doc.bastions).sort() : [];
  } catch {
    return [];
  }
}

function takesValue(o: Option): boolean {
  return o.required || o.optional;
}

function findOption(cmd: Command, name: string): Option | undefined {
  for (let c: Command | null = cmd; c; c = c.parent) {
    const o = c.options.find((x) => x.long === name || x.short === name);
    if (o) return o;
  }
  return undefined;
}

/**
 * What a value placeholder in the command definitions (`--config <file>`, `<overlay...>`) is
 * completed with: the shell's file or folder completion.
 */
const PLACEHOLDER: Record<string, string> = { file: FILES, "[name=]file": FILES, path: FILES, registry: FILES, overlay: FILES, db: FILES, image: FILES, cards: FILES, dir: DIRS, root: DIRS };

/** The placeholder of an option's value: `dir` of `--out <dir>`, `[name=]file` of `--host-key-file <[name=]file>`. */
const placeholder = (flags: string): string => flags.slice(flags.lastIndexOf(" ") + 1).replace(/^[<[]/, "").replace(/(\.\.\.)?[>\]]$/, "");

/**
 * The values an option takes: its choices in the command definitions (cli.ts), else what only
 * the installation knows (profiles, the config's bastions, device states), else files or folders
 * by the option's placeholder.
 */
async function optionValues(cmd: Command, o: Option, words: string[], word: string): Promise<string[]> {
  if (o.argChoices) return [...o.argChoices];
  switch (o.long) {
    case "--board":
      return profileIds("");
    case "--os":
      return profileIds("os");
    case "--bastion": {
      if (cmd.name() === "init") return [];
      // A comma-separated list: complete the name after the last comma.
      const head = word.slice(0, word.lastIndexOf(",") + 1);
      const given = head.split(",").filter(Boolean);
      return (await bastionNames(words)).filter((n) => !given.includes(n)).map((n) => head + n);
    }
    case "--state":
      return [...(await import("../fleet/status-options.js")).STATES];
    case "--auth-log":
      // A file is possible too, but these are the usual answers.
      return ["journal", "none"];
    default: {
      const kind = PLACEHOLDER[placeholder(o.flags)];
      return kind ? [kind] : [];
    }
  }
}

/** The values of the positional argument the cursor is on: its choices, or files/folders by its name. */
function positionalValues(cmd: Command, index: number): string[] {
  const args = cmd.registeredArguments;
  const a = args[index] ?? (args.at(-1)?.variadic ? args.at(-1) : undefined);
  if (!a) return [];
  if (a.argChoices) return [...a.argChoices];
  const kind = PLACEHOLDER[a.name()];
  return kind ? [kind] : [];
}

const visible = (cmd: Command): Command[] => cmd.commands.filter((c) => !(c as unknown as { _hidden?: boolean })._hidden);

function optionNames(cmd: Command, used: Set<string>): string[] {
  const names: string[] = [];
  // Without a command word, options are build's (the default command) and the program's.
  const build = cmd.parent ? undefined : cmd.commands.find((c) => c.name() === "build");
  for (let c: Command | null = build ?? cmd; c; c = c.parent) {
    for (const o of c.options) {
      if (o.hidden || !o.long) continue;
      // Repeatable options (a collecting parser) may be given again.
      const repeatable = typeof o.parseArg === "function" && o.defaultValue === undefined && /repeatable/.test(o.description);
      if (!used.has(o.long) || repeatable) names.push(o.long);
    }
  }
  return [...new Set([...names, "--help"])].sort();
}

/**
 * Bash splits words at '=' and ':' (COMP_WORDBREAKS): `--bastion=eu` arrives as three words.
 * They are joined back here; the shell replaces only its own last piece, which the caller
 * cuts the candidates down to.
 */
function joinBreaks(words: string[], cword: number): { words: string[]; cword: number } {
  const out: string[] = [];
  let at = -1;
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    const prev = words[i - 1];
    const glue = i > 0 && (w === "=" || w === ":" || prev === "=" || prev === ":");
    if (glue && out.length > 0) out[out.length - 1] += w;
    else out.push(w);
    if (i === cword) at = out.length - 1;
  }
  if (at < 0) {
    out.push("");
    at = out.length - 1;
  }
  return { words: out, cword: at };
}

/** The candidates for `words[cword]` (words[0] is the program name). */
export async function candidates(p: Command, words: string[], cword: number): Promise<string[]> {
  const word = words[cword] ?? "";
  let cmd = p;
  let pending: Option | undefined;
  let positionals = 0;
  let help = false;
  const used = new Set<string>();
  for (const w of words.slice(1, cword)) {
    if (pending) {
      pending = undefined;
      continue;
    }
    if (w.startsWith("-") && w !== "-") {
      const long = w.split("=")[0]!;
      let o = findOption(cmd, long);
      // Options of the default command (build) without a command word mean build.
      if (!o && cmd === p) {
        const build = p.commands.find((c) => c.name() === "build")!;
        o = findOption(build, long);
        if (o) cmd = build;
      }
      if (o?.long) used.add(o.long);
      if (o && takesValue(o) && !w.includes("=")) pending = o;
      continue;
    }
    const sub = cmd.commands.find((c) => c.name() === w);
    if (sub && positionals === 0) cmd = sub;
    else if (cmd === p && w === "help") help = true;
    else positionals++;
  }
  let list: string[];
  let prefix = "";
  if (pending) list = await optionValues(cmd, pending, words, word);
  else if (word.startsWith("--") && word.includes("=")) {
    const long = word.slice(0, word.indexOf("="));
    prefix = `${long}=`;
    const o = findOption(cmd, long);
    list = o ? await optionValues(cmd, o, words, word.slice(prefix.length)) : [];
  } else if (word.startsWith("-")) list = optionNames(cmd, used);
  else if (visible(cmd).length > 0 && positionals === 0) list = [...visible(cmd).map((c) => c.name()), ...(cmd === p && !help ? ["help"] : [])];
  else if (help) list = [];
  else list = positionalValues(cmd, positionals);
  if (list[0] === FILES || list[0] === DIRS) return [list[0]];
  return list.map((v) => prefix + v).filter((v) => v.startsWith(word));
}

/**
 * `mkoverlay __complete [--shell S] [--cur PIECE] -- CWORD WORDS…`: one candidate a line, or
 * `:files` / `:dirs` for the shell's own file completion. Never fails loudly: a shell
 * completing a word must not print errors into the command line.
 */
export async function completeCommand(p: Command, args: string[]): Promise<void> {
  let cur: string | undefined;
  let i = 0;
  for (; i < args.length && args[i] !== "--"; i++) {
    if (args[i] === "--cur") cur = args[++i];
    else if (args[i] === "--shell") i++;
  }
  const rest = args.slice(i + 1);
  const raw = Number(rest[0]);
  if (!Number.isInteger(raw) || raw < 1) return;
  const { words, cword } = joinBreaks(rest.slice(1), raw);
  let list: string[];
  try {
    list = await candidates(p, words, cword);
  } catch {
    return;
  }
  const word = words[cword] ?? "";
  // The shell replaces only its own current piece (bash: after the last '=' or ':').
  const cut = cur !== undefined && word.endsWith(cur) ? word.length - cur.length : 0;
  const shown = list[0] === FILES || list[0] === DIRS ? list : list.map((c) => c.slice(cut));
  if (shown.length > 0) out(shown.join("\n"));
}
