/** SSH wire encoding (RFC 4251 §5): uint32 big-endian lengths and strings. */

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

export function sshString(data: Buffer | string): Buffer {
  const buf = typeof data === "string" ? Buffer.from(data, "utf8") : data;
  return Buffer.concat([u32(buf.length), buf]);
}

/** Sequential reader over a wire buffer; every read is bounds-checked. */
export class WireReader {
  private off = 0;
  constructor(private readonly buf: Buffer) {}

  get remaining(): number {
    return this.buf.length - this.off;
  }

  uint32(): number {
    if (this.remaining < 4) throw new Error("truncated (uint32)");
    const v = this.buf.readUInt32BE(this.off);
    this.off += 4;
    return v;
  }

  bytes(n: number): Buffer {
    if (n > this.remaining) throw new Error("truncated (bytes)");
    const v = this.buf.subarray(this.off, this.off + n);
    this.off += n;
    return v;
  }

  string(): Buffer {
    return this.bytes(this.uint32());
  }

  rest(): Buffer {
    return this.bytes(this.remaining);
  }
}
