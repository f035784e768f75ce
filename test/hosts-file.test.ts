/**
 * `batch --hosts FILE`: plain lists and real CSV (quoted commas, a header alone, spreadsheet
 * exports), every bad row reported with its line before anything is reserved.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserError, UserErrors } from "../src/util/errors.js";
import { readHostRows } from "../src/device/hosts-file.js";
import { readPub, removeDir, runCli, sshKeygen, tempDir, writeFleet } from "./helpers/workspace.js";

const dir = tempDir("mko-hosts-");
let n = 0;
function file(text: string): string {
  const f = join(dir, `hosts-${++n}.csv`);
  writeFileSync(f, text);
  return f;
}
function problems(text: string): string[] {
  const f = file(text);
  try {
    readHostRows(f);
  } catch (e) {
    expect(e).toBeInstanceOf(UserError);
    return (e instanceof UserErrors ? e.problems : [(e as Error).message]).map((p) => p.replace(f, "F"));
  }
  throw new Error("no error");
}

afterAll(() => removeDir(dir));

describe("readHostRows", () => {
  it("a quoted comma stays in its field; the other columns come back by name", () => {
    expect(readHostRows(file('serial,hostname,rack\n"SN,0042",gw-lab-a,"rack #3"\n'))).toEqual([
      { line: 2, hostname: "gw-lab-a", fields: { serial: "SN,0042", rack: "rack #3" } },
    ]);
  });

  it("a CSV with only a hostname column: the header is a header, not a device", () => {
    expect(readHostRows(file("hostname\n"))).toEqual([]);
    expect(readHostRows(file("hostname\ngw-1\ngw-2\n")).map((r) => r.hostname)).toEqual(["gw-1", "gw-2"]);
  });

  it("a plain list: one name a line, # comment lines and blank lines ignored", () => {
    expect(readHostRows(file("# shift 3\ngw-1\n\n  gw-2  \n# end\n"))).toEqual([
      { line: 2, hostname: "gw-1", fields: {} },
      { line: 4, hostname: "gw-2", fields: {} },
    ]);
  });

  it("a spreadsheet export: byte-order mark, CRLF, header case, doubled quotes, empty trailing rows", () => {
    expect(readHostRows(file('\ufeffSerial,HostName,Note\r\n1,gw-1,"say ""hi"""\r\n,,\r\n'))).toEqual([
      { line: 2, hostname: "gw-1", fields: { serial: "1", note: 'say "hi"' } },
    ]);
  });

  it("every bad row at once, each with its line", () => {
    expect(problems('serial,hostname,rack\n1,gw-1,a\n2,Bad Name,b\n3,gw-3\n"4",gw-1,c\n5,,d\n6,GW-6,e\n7,gw-7,f\n')).toEqual([
      'F:3: hostname "Bad Name" contains spaces, control or non-ASCII characters',
      "F:4: 2 field(s), the header has 3",
      "F:5: hostname gw-1 is already on line 2",
      'F:6: hostname "" is empty',
      'F:7: hostname "GW-6" has upper-case letters (use lower case)',
    ]);
  });

  it("a plain list with a stray comma, and a bad name", () => {
    expect(problems("gw-1\ngw-2,gw-3\ngw 4\n")).toEqual([
      "F:2: 2 fields in a list of one hostname a line (for CSV, start with a header that has a 'hostname' column)",
      'F:3: hostname "gw 4" contains spaces, control or non-ASCII characters',
    ]);
  });

  it("header problems", () => {
    expect(problems("serial,name\n1,gw-1\n")).toEqual(["--hosts F: CSV header has no 'hostname' column"]);
    expect(problems("serial,hostname,serial\n1,gw-1,2\n")).toEqual(["F:1: column 'serial' appears twice in the header"]);
    expect(problems("serial,,hostname\n1,x,gw-1\n")).toEqual(["F:1: column 2 of the header has no name"]);
    expect(problems("serial;hostname\n1;gw-1\n")).toEqual(['F:1: the header\'s columns are separated by ";"']);
    expect(problems("Serial Number,hostname,9lives\n1,gw-1,x\n")).toEqual(["F:1: column '9lives' is not a usable name (a letter, then letters, digits, '_' or '.', at most 32)"]);
  });

  it("the other columns are the device's factory data: names normalized, empty values left out, values checked", () => {
    expect(readHostRows(file("Serial Number,hostname,MAC,site\nSN1,gw-1,aa:bb,\n"))).toEqual([
      { line: 2, hostname: "gw-1", fields: { serial_number: "SN1", mac: "aa:bb" } },
    ]);
    expect(problems(`serial,hostname\n"SN\u0007",gw-1\n${"x".repeat(300)},gw-2\n`)).toEqual([
      "F:2: serial: the value has a control character",
      "F:3: serial: the value is 300 characters long (at most 256)",
    ]);
  });

  it("broken quoting is reported where the parser gave up", () => {
    expect(problems('serial,hostname\n1,gw"x\n')[0]).toMatch(/^F:2: not valid CSV \(Invalid Opening Quote/);
    expect(problems('serial,hostname\n"2,gw-2\n3,gw-3\n')[0]).toMatch(/^F:3: not valid CSV \(Quote Not Closed/);
  });

  it("a missing file names the flag and the path", () => {
    expect(() => readHostRows(join(dir, "nope.csv"))).toThrow(`--hosts ${join(dir, "nope.csv")}: no such file or directory (open)`);
  });
});

describe("batch --hosts end to end", () => {
  const cli = (args: string[]) => runCli(args, { cwd: dir });
  const batch = (hosts: string) => cli(["batch", "--board", "rpi4", "--bastion", "eu", "--hosts", hosts, "--out", join(dir, "out"), "--json"]);
  const registered = () => (JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string }[]).map((d) => d.hostname).sort();

  beforeAll(() => {
    writeFleet(dir, { eu: { hostKeys: [readPub(sshKeygen(dir, "bastion"))] } });
  });

  it("a header alone builds nothing and says so", () => {
    const r = batch(file("hostname\n"));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--hosts .*: no hostnames in it/);
    expect(registered()).toEqual([]);
  });

  it("bad rows: all reported, exit 2, nothing reserved", () => {
    const f = file('serial,hostname\n"SN,0001",gw-lab-b\n2,Bad Name\n3,gw-lab-b\n');
    const r = batch(f);
    expect(r.code).toBe(2);
    // batch runs with --json here: the error is one JSON object on stderr, a line per row in it.
    expect(JSON.parse(r.stderr)).toEqual({
      error: `${f}:3: hostname "Bad Name" contains spaces, control or non-ASCII characters\n${f}:4: hostname gw-lab-b is already on line 2`,
      hint: "fix these rows and run again; nothing was reserved",
      exitCode: 2,
    });
    // Without --json: a line each, in mkoverlay's style.
    const text = cli(["batch", "--board", "rpi4", "--bastion", "eu", "--hosts", f, "--out", join(dir, "out")]);
    expect(text.stderr).toBe(
      `mkoverlay: error: ${f}:3: hostname "Bad Name" contains spaces, control or non-ASCII characters\n` +
        `mkoverlay: error: ${f}:4: hostname gw-lab-b is already on line 2\n` +
        "mkoverlay: hint: fix these rows and run again; nothing was reserved\n",
    );
    expect(registered()).toEqual([]);
  });

  it('"SN,0042",gw-lab-a registers gw-lab-a (not 0042), with its serial as factory data', () => {
    const r = batch(file('serial,hostname,MAC\n"SN,0042",gw-lab-a,dc:a6:32:00:00:01\n'));
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ hostname: "gw-lab-a", attributes: { serial: "SN,0042", mac: "dc:a6:32:00:00:01" } });
    expect(registered()).toEqual(["gw-lab-a"]);
    const listed = JSON.parse(cli(["registry", "list", "--json"]).stdout) as { hostname: string; attributes: Record<string, string> }[];
    expect(listed.find((d) => d.hostname === "gw-lab-a")?.attributes).toEqual({ serial: "SN,0042", mac: "dc:a6:32:00:00:01" });
  });

  it("a plain list with comments still works", () => {
    const r = batch(file("# line 3 shift\ngw-plain-1\ngw-plain-2\n"));
    expect(r.code, r.stderr).toBe(0);
    expect(registered()).toEqual(["gw-lab-a", "gw-plain-1", "gw-plain-2"]);
  });
});
