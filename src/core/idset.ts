/**
 * Compact sets and lists of 32-byte object ids: one Buffer of sorted ids and binary search, so that
 * memory is 32 bytes per id rather than a JavaScript object per id (I8).
 */
export const ID_BYTES = 32;

/** Append-only list of ids; sortedUnique() gives the clear-text index format. */
export class IdList {
  private buf = Buffer.allocUnsafe(ID_BYTES * 1024);
  private n = 0;
  get length(): number {
    return this.n;
  }
  push(id: Uint8Array): void {
    if ((this.n + 1) * ID_BYTES > this.buf.length) {
      const next = Buffer.allocUnsafe(this.buf.length * 2);
      this.buf.copy(next, 0, 0, this.n * ID_BYTES);
      this.buf = next;
    }
    this.buf.set(id, this.n * ID_BYTES);
    this.n++;
  }
  pushHex(hex: string): void {
    this.push(Buffer.from(hex, 'hex'));
  }
  /** Sorted, de-duplicated concatenation of the ids. */
  sortedUnique(): Buffer {
    const n = this.n;
    const buf = this.buf;
    const keys = new Float64Array(n);
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i++) {
      keys[i] = buf.readUIntBE(i * ID_BYTES, 6);
      order[i] = i;
    }
    order.sort((a, b) => {
      const d = keys[a]! - keys[b]!;
      if (d !== 0) return d;
      return Buffer.compare(buf.subarray(a * ID_BYTES, (a + 1) * ID_BYTES), buf.subarray(b * ID_BYTES, (b + 1) * ID_BYTES));
    });
    const out = Buffer.allocUnsafe(n * ID_BYTES);
    let m = 0;
    for (let k = 0; k < n; k++) {
      const i = order[k]!;
      const src = buf.subarray(i * ID_BYTES, (i + 1) * ID_BYTES);
      if (m > 0 && src.equals(out.subarray((m - 1) * ID_BYTES, m * ID_BYTES))) continue;
      src.copy(out, m * ID_BYTES);
      m++;
    }
    return out.subarray(0, m * ID_BYTES);
  }
}

/**
 * Membership over a sorted id buffer, plus ids added later. The added ids live in an open-addressing
 * hash table inside one Buffer (32 bytes a slot, at most 70% full), not in a Set of strings: a backup
 * that adds 100,000 objects keeps 4-8 MiB outside the JavaScript heap instead of 100,000 long-lived
 * strings that the garbage collector must promote and trace (I8). Ids are keyed MACs, so their
 * first bytes are uniformly distributed and serve as the hash.
 */
export class IdSet {
  private readonly sorted: Buffer;
  /** Hash table of added ids: slot i at i * ID_BYTES; a slot is in use when used[i] is 1. */
  private table: Buffer = Buffer.alloc(0);
  private used: Uint8Array = new Uint8Array(0);
  private mask = -1;
  private count = 0;
  constructor(sorted: Buffer) {
    this.sorted = sorted;
  }
  static empty(): IdSet {
    return new IdSet(Buffer.alloc(0));
  }
  get size(): number {
    return this.sorted.length / ID_BYTES + this.count;
  }
  has(id: Buffer): boolean {
    const s = this.sorted;
    const key = id.readUInt32BE(0);
    let lo = 0;
    let hi = s.length / ID_BYTES - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const k = s.readUInt32BE(mid * ID_BYTES);
      // compare the first 4 bytes in JavaScript; the rest only on a tie
      const c = k !== key ? k - key : s.compare(id, 4, ID_BYTES, mid * ID_BYTES + 4, (mid + 1) * ID_BYTES);
      if (c === 0) return true;
      if (c < 0) lo = mid + 1;
      else hi = mid - 1;
    }
    return this.count > 0 && this.slotOf(id) >= 0;
  }
  add(id: Buffer): void {
    if (this.has(id)) return;
    if ((this.count + 1) * 10 > (this.mask + 1) * 7) this.grow();
    this.insert(id);
  }
  /** The slot holding id, or -1. */
  private slotOf(id: Buffer): number {
    const t = this.table;
    const first = id.readUInt32LE(0);
    for (let i = this.hash(id); this.used[i] === 1; i = (i + 1) & this.mask) {
      const off = i * ID_BYTES;
      if (t.readUInt32LE(off) === first && t.compare(id, 4, ID_BYTES, off + 4, off + ID_BYTES) === 0) return i;
    }
    return -1;
  }
  private hash(id: Buffer): number {
    return id.readUInt32LE(4) & this.mask;
  }
  private insert(id: Buffer): void {
    let i = this.hash(id);
    while (this.used[i] === 1) i = (i + 1) & this.mask;
    this.used[i] = 1;
    this.table.set(id.subarray(0, ID_BYTES), i * ID_BYTES);
    this.count++;
  }
  private grow(): void {
    const oldTable = this.table;
    const oldUsed = this.used;
    const slots = Math.max(1024, (this.mask + 1) * 2);
    this.table = Buffer.allocUnsafeSlow(slots * ID_BYTES);
    this.used = new Uint8Array(slots);
    this.mask = slots - 1;
    this.count = 0;
    for (let i = 0; i < oldUsed.length; i++) {
      if (oldUsed[i] === 1) this.insert(oldTable.subarray(i * ID_BYTES, (i + 1) * ID_BYTES));
    }
  }
}

export function* idsOf(index: Buffer): Generator<Buffer> {
  for (let p = 0; p + ID_BYTES <= index.length; p += ID_BYTES) yield index.subarray(p, p + ID_BYTES);
}
