/**
 * Factory data names and values (serial number, MAC, site…): the extra columns of a --hosts CSV
 * and `--attr KEY=VALUE`. They are stored in the registry and printed in lists, so a name is a
 * plain word and a value has no control characters. A leaf module: a single build that only
 * checks `--attr` never loads the CSV parser.
 */

/** A header name as a device attribute name: `Serial Number` → `serial_number`. */
export function attributeName(header: string): string {
  return header.trim().toLowerCase().replace(/[\s-]+/g, "_");
}

/** What is wrong with a column name as an attribute name, if anything. */
export function attributeNameProblem(name: string): string | undefined {
  return /^[a-z][a-z0-9_.]{0,31}$/.test(name) ? undefined : "is not a usable name (a letter, then letters, digits, '_' or '.', at most 32)";
}

/** What is wrong with an attribute value, if anything (they are stored and printed). */
export function attributeProblem(name: string, value: string): string | undefined {
  // eslint-disable-next-line no-control-regex -- rejecting control characters is the point
  if (/[\x00-\x1f\x7f]/.test(value)) return `${name}: the value has a control character`;
  if (value.length > 256) return `${name}: the value is ${value.length} characters long (at most 256)`;
  return undefined;
}
