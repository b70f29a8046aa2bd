/**
 * Compact sets and lists of 32-byte object ids: one Buffer of sorted ids and binary search, so that
 * memory is 32 bytes per id rather than a JavaScript object per id (I8).
 */
import { release } from './memory.js';

export const ID_BYTES = 32;

/** Ids per block of IdBlocks (1 MiB): storage grows by blocks, never by copying what it holds. */
const BLOCK_SHIFT = 15;
const BLOCK_IDS = 1 << BLOCK_SHIFT;

/**
 * Append-only storage of ids in blocks of 1 MiB: 32 bytes per id plus at most one partly filled
 * block, where a Buffer that doubles would hold up to twice that while it grows (the old and the
 * new copy).
 */
export class IdBlocks {
  private readonly blocks: Buffer[] = [];
  private n = 0;
  get length(): number {
    return this.n;
  }
  push(id: Uint8Array): number {
    const i = this.n;
    const b = i >>> BLOCK_SHIFT;
    if (b === this.blocks.length) this.blocks.push(Buffer.allocUnsafeSlow(BLOCK_IDS * ID_BYTES));
    this.blocks[b]!.set(id.subarray(0, ID_BYTES), (i & (BLOCK_IDS - 1)) * ID_BYTES);
    this.n++;
    return i;
  }
  /** The block that holds id number i; the id starts at offsetOf(i) in it. */
  blockOf(i: number): Buffer {
    return this.blocks[i >>> BLOCK_SHIFT]!;
  }
  offsetOf(i: number): number {
    return (i & (BLOCK_IDS - 1)) * ID_BYTES;
  }
}

/** Append-only list of ids; sortedUnique() gives the clear-text index format. */
export class IdList {
  /** The ids; an IdSet built over this list keeps its added ids here too (IdSet.addListed). */
  readonly ids = new IdBlocks();
  get length(): number {
    return this.ids.length;
  }
  /** Appends id; returns its number in the list. */
  push(id: Uint8Array): number {
    return this.ids.push(id);
  }
  pushHex(hex: string): void {
    this.push(Buffer.from(hex, 'hex'));
  }
  /**
   * Sorted, de-duplicated concatenation of the ids. Transient memory besides the result: 12 bytes per
   * id while sorting, 4 while copying (the sort keys are freed before the result is allocated).
   */
  sortedUnique(): Buffer {
    const n = this.ids.length;
    const ids = this.ids;
    const keys = new Float64Array(n);
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i++) {
      keys[i] = ids.blockOf(i).readUIntBE(ids.offsetOf(i), 6);
      order[i] = i;
    }
    order.sort((a, b) => {
      const d = keys[a]! - keys[b]!;
      if (d !== 0) return d;
      const oa = ids.offsetOf(a);
      const ob = ids.offsetOf(b);
      return ids.blockOf(a).compare(ids.blockOf(b), ob, ob + ID_BYTES, oa, oa + ID_BYTES);
    });
    release(keys); // before the copy is made: the peak of a commit
    const out = Buffer.allocUnsafe(n * ID_BYTES);
    let m = 0;
    for (let k = 0; k < n; k++) {
      const i = order[k]!;
      const block = ids.blockOf(i);
      const off = ids.offsetOf(i);
      if (m > 0 && block.compare(out, (m - 1) * ID_BYTES, m * ID_BYTES, off, off + ID_BYTES) === 0) continue;
      block.copy(out, m * ID_BYTES, off, off + ID_BYTES);
      m++;
    }
    release(order);
    return out.subarray(0, m * ID_BYTES);
  }
}

/**
 * Membership over a sorted id buffer, plus ids added later. The added ids are kept in blocks
 * (IdBlocks, 32 bytes each) and found through an open-addressing hash table of their numbers
 * (a Uint32Array at most half full: 8-16 bytes per id), not in a Set of strings: a backup that adds
 * 100,000 objects keeps about 4.5 MiB outside the JavaScript heap instead of 100,000 long-lived
 * strings that the garbage collector must promote and trace (I8). Ids are keyed MACs, so their
 * bytes are uniformly distributed and serve as the hash.
 *
 * Built over a list (`new IdSet(sorted, list)`), the set keeps no copy of the ids it adds: they are
 * numbers of the list's ids (addListed). A backup's set of what current holds is built over the new
 * snapshot's list of references, which holds every new object's id anyway: 8-16 bytes per new object
 * instead of 40-48.
 */
export class IdSet {
  private sorted: Buffer;
  private readonly list: IdList;
  private readonly added: IdBlocks;
  private addedCount = 0;
  /** Slot i holds 1 + the number of an added id in `added`, or 0 when free. */
  private table = new Uint32Array(0);
  private mask = -1;
  constructor(sorted: Buffer, list: IdList = new IdList()) {
    this.sorted = sorted;
    this.list = list;
    this.added = list.ids;
  }
  static empty(): IdSet {
    return new IdSet(Buffer.alloc(0));
  }
  get size(): number {
    return this.sorted.length / ID_BYTES + this.addedCount;
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
    return this.addedCount > 0 && this.slotOf(id) >= 0;
  }
  /** Adds id (a copy of it, in the list the set was built over). */
  add(id: Buffer): void {
    if (this.has(id)) return;
    this.addListed(this.list.push(id));
  }
  /**
   * Adds the id at number n of the list the set was built over, without a copy. The caller has made
   * sure that the set lacks it (has()).
   */
  addListed(n: number): void {
    if ((this.addedCount + 1) * 2 > this.table.length) this.grow();
    this.insert(n);
    this.addedCount++;
  }
  /** Frees the set's memory (its sorted buffer, when the set owns all of it); the set is empty after. */
  dispose(): void {
    release(this.sorted);
    release(this.table);
    this.sorted = Buffer.alloc(0);
    this.table = new Uint32Array(0);
    this.mask = -1;
    this.addedCount = 0;
  }
  /** The slot holding id, or -1. */
  private slotOf(id: Buffer): number {
    const t = this.table;
    const first = id.readUInt32LE(0);
    for (let i = this.home(id, 0); t[i] !== 0; i = (i + 1) & this.mask) {
      const n = t[i]! - 1;
      const block = this.added.blockOf(n);
      const off = this.added.offsetOf(n);
      if (block.readUInt32LE(off) === first && block.compare(id, 4, ID_BYTES, off + 4, off + ID_BYTES) === 0) return i;
    }
    return -1;
  }
  /** The first slot to probe for the id at off in b: its bytes 4-7 (ids are keyed MACs, uniformly distributed). */
  private home(b: Uint8Array, off: number): number {
    return (b[off + 4]! | (b[off + 5]! << 8) | (b[off + 6]! << 16) | (b[off + 7]! << 24)) & this.mask;
  }
  private insert(n: number): void {
    let i = this.home(this.added.blockOf(n), this.added.offsetOf(n));
    while (this.table[i] !== 0) i = (i + 1) & this.mask;
    this.table[i] = n + 1;
  }
  private grow(): void {
    const old = this.table;
    const slots = Math.max(1024, old.length * 2);
    this.table = new Uint32Array(slots);
    this.mask = slots - 1;
    for (const v of old) if (v !== 0) this.insert(v - 1);
    release(old);
  }
}

export function* idsOf(index: Buffer): Generator<Buffer> {
  for (let p = 0; p + ID_BYTES <= index.length; p += ID_BYTES) yield index.subarray(p, p + ID_BYTES);
}
