/**
 * `batch --hosts FILE`: the devices of a shift, as a factory hands them over. Either one
 * hostname a line (`#` comment lines and blank lines ignored), or CSV (RFC 4180, as
 * spreadsheets export it: quoted fields, `""` escapes, a byte-order mark, CRLF) whose header
 * has a `hostname` column; the other columns come back per row (name → value) for whoever
 * wants to keep them.
 *
 * The file is checked whole before anything is reserved: every bad row is reported at once,
 * with its line number. A quoted comma is part of its field (`"SN,0042",gw-lab-a` is a serial
 * and a hostname, never the device `0042`), and a header alone is no device.
 */
import { readFileSync } from "node:fs";
import { parse } from "csv-parse/sync";
import { atPath, ioUserError, UserError, UserErrors } from "../util/errors.js";
import { attributeName, attributeNameProblem, attributeProblem } from "./attributes.js";
import { hostnameProblem } from "../util/validate.js";

export interface HostRow {
  /** Line of the file the row ends on (1-based). */
  line: number;
  hostname: string;
  /** The row's other, non-empty columns, by attribute name (empty for a plain list). */
  fields: Record<string, string>;
}

interface Parsed {
  record: string[];
  info: { lines: number };
}

function parseCsv(file: string, text: string): Parsed[] {
  try {
    return parse(text, {
      bom: true,
      info: true,
      trim: true,
      // Only whole-line comments: '#' inside a value ("rack #3") is data.
      comment: "#",
      comment_no_infix: true,
      skip_empty_lines: true,
      // A spreadsheet's trailing ",,," rows.
      skip_records_with_empty_values: true,
      // Rows of the wrong width are reported with the others, not as the first error alone.
      relax_column_count: true,
    }) as unknown as Parsed[];
  } catch (e) {
    // A quoting error: the parser cannot know where the next row starts, so it is the only one.
    const err = e as Error & { lines?: number };
    const line = typeof err.lines === "number" ? `:${err.lines}` : "";
    throw new UserError(`${file}${line}: not valid CSV (${err.message})`, {
      hint: "quote a field that holds a comma or a quote (\"SN,0042\"), double a quote inside one (\"\")",
    });
  }
}

/** The rows of a hosts file; every bad row is reported (UserErrors) before any is returned. */
// Long on purpose (~80 lines): one pass over the rows that collects every problem with its
// line number before any row is returned (a factory fixes its CSV once, not row by row).
export function readHostRows(file: string): HostRow[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    const io = ioUserError(atPath(e, file));
    throw new UserError(`--hosts ${io ? io.message : `${file}: ${(e as Error).message}`}`, io?.hint === undefined ? {} : { hint: io.hint });
  }
  const records = parseCsv(file, text);
  const first = records[0];
  if (!first) return [];
  const header = first.record.map((h) => h.toLowerCase());
  const col = header.indexOf("hostname");
  const problems: string[] = [];
  const rows: HostRow[] = [];
  let body: Parsed[];
  let names: string[];
  if (col >= 0) {
    names = first.record;
    const seen = new Set<string>();
    header.forEach((h, i) => {
      const bad = attributeNameProblem(attributeName(h));
      if (h === "") problems.push(`${file}:${first.info.lines}: column ${i + 1} of the header has no name`);
      else if (seen.has(h)) problems.push(`${file}:${first.info.lines}: column '${first.record[i]}' appears twice in the header`);
      else if (i !== col && bad) problems.push(`${file}:${first.info.lines}: column '${first.record[i]}' ${bad}`);
      seen.add(h);
    });
    body = records.slice(1);
  } else if (first.record.length > 1) {
    throw new UserError(`--hosts ${file}: CSV header has no 'hostname' column`, { hint: `columns: ${first.record.join(", ")}` });
  } else {
    // "serial;hostname": a spreadsheet set to another list separator.
    const sep = /[;\t|]/.exec(first.record[0]!)?.[0];
    if (sep && header[0]!.split(sep).map((h) => h.trim()).includes("hostname")) {
      throw new UserError(`${file}:${first.info.lines}: the header's columns are separated by ${JSON.stringify(sep)}`, { hint: "export the sheet as CSV with commas between the columns" });
    }
    names = ["hostname"];
    body = records;
  }
  const where = new Map<string, number>();
  for (const { record, info } of body) {
    const at = `${file}:${info.lines}`;
    if (record.length !== names.length) {
      problems.push(
        col >= 0
          ? `${at}: ${record.length} field(s), the header has ${names.length}`
          : `${at}: ${record.length} fields in a list of one hostname a line (for CSV, start with a header that has a 'hostname' column)`,
      );
      continue;
    }
    const hostname = record[Math.max(col, 0)]!;
    const p = hostnameProblem(hostname);
    if (p) {
      problems.push(`${at}: hostname ${JSON.stringify(hostname)} ${p}`);
      continue;
    }
    const dup = where.get(hostname);
    if (dup !== undefined) {
      problems.push(`${at}: hostname ${hostname} is already on line ${dup}`);
      continue;
    }
    where.set(hostname, info.lines);
    const fields: Record<string, string> = {};
    const bad: string[] = [];
    if (col >= 0) {
      names.forEach((n, i) => {
        if (i === col || record[i] === "" || attributeNameProblem(attributeName(n))) return;
        const name = attributeName(n);
        const p2 = attributeProblem(name, record[i]!);
        if (p2) bad.push(p2);
        else fields[name] = record[i]!;
      });
    }
    if (bad.length > 0) {
      problems.push(`${at}: ${bad.join("; ")}`);
      continue;
    }
    rows.push({ line: info.lines, hostname, fields });
  }
  if (problems.length > 0) throw new UserErrors(problems, "fix these rows and run again; nothing was reserved");
  return rows;
}
