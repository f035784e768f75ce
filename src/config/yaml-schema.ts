/**
 * Parses YAML with positions and validates it against a zod schema; every problem becomes
 * `file:line:col key: message`, with "did you mean" for unknown keys. This is the slow path
 * (yaml + zod load in tens of milliseconds): load.ts and profiles.ts only import it when their
 * cache cannot answer.
 */
import { isAlias, isCollection, LineCounter, parseDocument, visit, type Alias, type Document, type Node } from "yaml";
import type { z } from "zod";
import { UserError, UserErrors } from "../util/errors.js";
import { didYouMean } from "../util/validate.js";
import { formatPath, positionOf, type Path } from "./positions.js";

type Def = { type: string; shape?: Record<string, unknown>; valueType?: unknown; element?: unknown; innerType?: unknown; in?: unknown; options?: unknown[] };
const defOf = (s: unknown): Def => (s as { def: Def }).def;

/** Strips default/optional/pipe wrappers to reach the schema that has a shape. */
function unwrap(s: unknown): unknown {
  let cur = s;
  for (let d = defOf(cur); ["default", "optional", "pipe", "union"].includes(d.type); d = defOf(cur)) {
    // A union (`none` or a mapping): the mapping is the branch that has keys.
    cur = d.type === "union" ? d.options?.find((o) => defOf(unwrap(o)).type === "object") : (d.innerType ?? d.in);
    if (cur === undefined) return s;
  }
  return cur;
}

/** Names the keys an object at `path` accepts, for "did you mean". */
function knownKeys(root: unknown, path: Path): string[] {
  let schema = unwrap(root);
  for (const seg of path) {
    const d = defOf(schema);
    if (d.type === "object") schema = unwrap(d.shape?.[String(seg)]);
    else if (d.type === "record") schema = unwrap(d.valueType);
    else if (d.type === "array") schema = unwrap(d.element);
    else return [];
    if (schema === undefined) return [];
  }
  const d = defOf(schema);
  return d.type === "object" ? Object.keys(d.shape ?? {}) : [];
}

/**
 * A union (e.g. `operators: none` or a mapping) fails as one opaque issue; report instead the
 * problems of the branch the user evidently meant: the one that got past the type check.
 */
function flattenUnions(issues: readonly z.core.$ZodIssue[]): z.core.$ZodIssue[] {
  const out: z.core.$ZodIssue[] = [];
  for (const issue of issues) {
    if (issue.code !== "invalid_union" || issue.errors.length === 0) {
      out.push(issue);
      continue;
    }
    const meant = issue.errors.find((branch) => !branch.some((b) => (b.code === "invalid_type" || b.code === "invalid_value") && b.path.length === 0));
    if (!meant) {
      out.push({ code: "invalid_type", expected: "`none` or a mapping", path: issue.path, message: "", input: undefined } as unknown as z.core.$ZodIssue);
      continue;
    }
    out.push(...flattenUnions(meant.map((b) => ({ ...b, path: [...issue.path, ...b.path] }) as z.core.$ZodIssue)));
  }
  return out;
}

function describeIssue(issue: z.core.$ZodIssue, value: unknown, present: boolean): string {
  switch (issue.code) {
    case "invalid_type":
      return !present ? `is required (${issue.expected})` : `expected ${issue.expected}, got ${typeOfYaml(value)}`;
    case "invalid_key":
      return `key ${issue.issues.map((i) => i.message).join("; ")}`;
    case "too_small":
      return issue.origin === "array" ? `needs at least ${String(issue.minimum)} entr${issue.minimum === 1 ? "y" : "ies"}` : `must be at least ${String(issue.minimum)}`;
    case "too_big":
      return `must be at most ${String(issue.maximum)}`;
    default:
      return issue.message;
  }
}

function typeOfYaml(v: unknown): string {
  if (v === null) return "null (empty value)";
  if (Array.isArray(v)) return "a list";
  if (typeof v === "object") return "a mapping";
  return `${typeof v} ${JSON.stringify(v)}`;
}

/**
 * Aliases expand into copies: a few lines of `&a [*b, *b, …]` can stand for billions of nodes
 * (an "alias bomb"). The yaml package stops past this many aliased nodes; a real config has a
 * handful at most (a key list shared by two bastions).
 */
const MAX_ALIAS_COUNT = 100;

/** The document as plain data; alias trouble is the user's, reported at the alias. */
function toData(doc: Document, lc: LineCounter, file: string): unknown {
  const at = (node: Node | undefined) => {
    const { line, col } = lc.linePos(node?.range?.[0] ?? 0);
    return `${file}:${line}:${col}`;
  };
  let unresolved: Alias | undefined;
  let circular: Alias | undefined;
  let first: Alias | undefined;
  let complexKey: Node | undefined;
  visit(doc, {
    Alias(_key, node, path) {
      first ??= node;
      const target = node.resolve(doc);
      if (!target) unresolved ??= node;
      else if (path.includes(target as never)) circular ??= node;
    },
    Pair(_key, pair) {
      // `? [a, b] : c` is valid YAML but names no config key (and makes the yaml package warn).
      const k = isAlias(pair.key) ? pair.key.resolve(doc) : pair.key;
      if (isCollection(k)) complexKey ??= pair.key as Node;
    },
  });
  if (complexKey) throw new UserError(`${at(complexKey)} YAML: a key must be a plain name, not a list or mapping`);
  if (unresolved) {
    throw new UserError(`${at(unresolved)} YAML: alias *${unresolved.source} has no anchor &${unresolved.source} before it`, { hint: "define the anchor first, or write the value out" });
  }
  if (circular) throw new UserError(`${at(circular)} YAML: alias *${circular.source} refers to a node that contains it`);
  try {
    return doc.toJS({ maxAliasCount: MAX_ALIAS_COUNT });
  } catch (e) {
    if (/alias count/i.test((e as Error).message)) {
      throw new UserError(`${at(first)} YAML: aliases expand to more than ${MAX_ALIAS_COUNT} nodes (an alias bomb?)`, { hint: "write the values out instead of nesting aliases" });
    }
    throw new UserError(`${at(first)} YAML: cannot be read as data (${(e as Error).message.split("\n")[0]})`);
  }
}

/**
 * Parses YAML text and validates it against a schema; every problem becomes
 * `file:line:col key: message`. Shared by the fleet config and the board/OS profiles.
 */
export function parseYamlWith<T extends z.ZodType>(
  schema: T,
  text: string,
  file: string,
  rules?: (data: z.output<T>) => { path: Path; message: string }[],
  warnings?: { rules: (data: z.output<T>) => { path: Path; message: string }[]; to: string[] },
): z.output<T> {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    throw new UserErrors(
      doc.errors.map((e) => {
        const { line, col } = lc.linePos(e.pos[0]);
        return `${file}:${line}:${col} YAML syntax error: ${e.message.split("\n")[0]}`;
      }),
    );
  }
  const data = toData(doc, lc, file);
  if (data === null || data === undefined) {
    throw new UserError(`${file}: file is empty`, { hint: "start from examples/fleet.yaml" });
  }
  const parsed = schema.safeParse(data);
  const problems: string[] = [];
  if (!parsed.success) {
    for (const issue of flattenUnions(parsed.error.issues)) {
      if (issue.code === "unrecognized_keys") {
        for (const key of issue.keys) {
          const path = [...issue.path, key] as Path;
          const guess = didYouMean(key, knownKeys(schema, issue.path as Path));
          problems.push(`${file}:${positionOf(doc, lc, path, true)} ${formatPath(path)}: unknown key${guess ? ` (did you mean '${guess}'?)` : ""}`);
        }
        continue;
      }
      const path = issue.path as Path;
      const present = doc.hasIn(path);
      const value: unknown = present ? doc.getIn(path) : undefined;
      problems.push(`${file}:${positionOf(doc, lc, path, issue.code === "invalid_key")} ${formatPath(path)}: ${describeIssue(issue, value, present)}`);
    }
    throw new UserErrors(problems);
  }
  for (const p of rules?.(parsed.data) ?? []) {
    problems.push(`${file}:${positionOf(doc, lc, p.path)} ${formatPath(p.path)}: ${p.message}`);
  }
  if (problems.length > 0) throw new UserErrors(problems);
  for (const p of warnings?.rules(parsed.data) ?? []) {
    warnings!.to.push(`${file}:${positionOf(doc, lc, p.path)} ${formatPath(p.path)}: ${p.message}`);
  }
  return parsed.data;
}

