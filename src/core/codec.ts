/**
 * Minimal binary codec used by every stored structure: unsigned LEB128 varints, zig-zag signed
 * varints, length-prefixed byte strings. The reader checks every length against the bytes that remain
 * and against caller-given limits before it allocates, so hostile input cannot make it allocate much.
 */
import { SnapError } from './errors.js';

export class Writer {
  private buf: Buffer;
  private pos = 0;
  constructor(initial = 256) {
    this.buf = Buffer.allocUnsafe(initial);
  }
  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = Buffer.allocUnsafe(size);
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }
  u8(v: number): this {
    this.ensure(1);
    this.buf[this.pos++] = v & 0xff;
    return this;
  }
  /** Unsigned varint for 0 <= v <= 2^53-1. */
  uvar(v: number): this {
    if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`uvar out of range: ${v}`);
    this.ensure(8);
    while (v >= 0x80) {
      this.buf[this.pos++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.pos++] = v;
    return this;
  }
  /** Signed varint (zig-zag) for safe integers. */
  svar(v: number): this {
    if (!Number.isSafeInteger(v)) throw new RangeError(`svar out of range: ${v}`);
    return this.uvar(v >= 0 ? v * 2 : -v * 2 - 1);
  }
  /** Raw bytes without a length. */
  raw(b: Uint8Array): this {
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
    return this;
  }
  /** Bytes src[start, end) without a length. */
  rawRange(src: Uint8Array, start: number, end: number): this {
    const n = end - start;
    this.ensure(n);
    if (n <= 64) for (let i = 0; i < n; i++) this.buf[this.pos + i] = src[start + i]!;
    else this.buf.set(src.subarray(start, end), this.pos);
    this.pos += n;
    return this;
  }
  /** Length-prefixed bytes. */
  bytes(b: Uint8Array): this {
    return this.uvar(b.length).raw(b);
  }
  str(s: string): this {
    return this.bytes(Buffer.from(s, 'utf8'));
  }
  /** Bytes written so far. */
  get position(): number {
    return this.pos;
  }
  finish(): Buffer {
    return this.buf.subarray(0, this.pos);
  }
}

export class Reader {
  private pos = 0;
  private readonly buf: Buffer;
  private readonly what: string;
  constructor(buf: Buffer, what: string, start = 0) {
    this.buf = buf;
    this.what = what;
    this.pos = start;
  }
  get position(): number {
    return this.pos;
  }
  fail(msg: string): never {
    throw new SnapError('integrity', `Malformed ${this.what}: ${msg} at byte ${this.pos}`);
  }
  get remaining(): number {
    return this.buf.length - this.pos;
  }
  u8(): number {
    if (this.pos >= this.buf.length) this.fail('unexpected end');
    return this.buf[this.pos++]!;
  }
  uvar(): number {
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 8; i++) {
      const b = this.u8();
      result += (b & 0x7f) * mul;
      if ((b & 0x80) === 0) {
        if (!Number.isSafeInteger(result)) this.fail('varint too large');
        return result;
      }
      mul *= 0x80;
    }
    return this.fail('varint too long');
  }
  svar(): number {
    const z = this.uvar();
    return z % 2 === 0 ? z / 2 : -(z + 1) / 2;
  }
  raw(n: number): Buffer {
    if (n > this.remaining) this.fail(`length ${n} exceeds the ${this.remaining} bytes left`);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  /** Steps over n bytes (as raw(n) reads them). */
  skip(n: number): void {
    if (n > this.remaining) this.fail(`length ${n} exceeds the ${this.remaining} bytes left`);
    this.pos += n;
  }
  /** Steps over a length-prefixed field (as bytes(limit) reads it); returns its length. */
  skipBytes(limit: number): number {
    const n = this.uvar();
    if (n > limit) this.fail(`field of ${n} bytes exceeds limit ${limit}`);
    this.skip(n);
    return n;
  }
  bytes(limit: number): Buffer {
    const n = this.uvar();
    if (n > limit) this.fail(`field of ${n} bytes exceeds limit ${limit}`);
    return this.raw(n);
  }
  str(limit: number): string {
    return this.bytes(limit).toString('utf8');
  }
  /** A count that must be plausible given the bytes left (each item takes at least minItemBytes). */
  count(limit: number, minItemBytes = 1): number {
    const n = this.uvar();
    if (n > limit || n * minItemBytes > this.remaining) this.fail(`count ${n} is implausible`);
    return n;
  }
  end(): void {
    if (this.pos !== this.buf.length) this.fail(`${this.remaining} trailing bytes`);
  }
}
