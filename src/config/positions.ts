/** Maps a path inside a YAML document to `line:column`, for error messages. */
import { isMap, isScalar, isSeq, type Document, type LineCounter, type Node } from "yaml";

export type Path = readonly (string | number)[];

function child(node: unknown, key: string | number): { value: unknown; keyNode?: Node } | undefined {
  if (isMap(node)) {
    for (const pair of node.items) {
      const k = isScalar(pair.key) ? pair.key.value : pair.key;
      if (String(k) === String(key)) return { value: pair.value, keyNode: pair.key as Node };
    }
    return undefined;
  }
  if (isSeq(node) && typeof key === "number") {
    const v = node.items[key];
    return v === undefined ? undefined : { value: v };
  }
  return undefined;
}

/**
 * Position of the value at `path` (or of its key with `atKey`); when the path does not exist
 * (a missing key), the position of the deepest existing parent.
 */
export function positionOf(doc: Document, lc: LineCounter, path: Path, atKey = false): string {
  let node: unknown = doc.contents;
  let keyNode: Node | undefined;
  for (const seg of path) {
    const c = child(node, seg);
    if (!c) break;
    node = c.value;
    keyNode = c.keyNode;
  }
  const target = (atKey && keyNode) || (node as Node | null);
  const offset = target && "range" in target && target.range ? target.range[0] : 0;
  const { line, col } = lc.linePos(offset);
  return `${line}:${col}`;
}

/** `bastions.eu.from[1]` */
export function formatPath(path: Path): string {
  let s = "";
  for (const seg of path) s += typeof seg === "number" ? `[${seg}]` : s ? `.${seg}` : seg;
  return s || "(top level)";
}
