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
  /**
   * Moves the ids into the given order: afterwards the id at i is the one that was at order[i].
   * order must be a permutation of 0..length-1; it is overwritten (each slot set to its own index
   * once done). One id at a time follows each cycle of the permutation, so no second copy is made.
   */
  permute(order: Uint32Array): void {
    const w = this.words();
    const tmp = [new Uint32Array(WORDS)]; // one id, as id number 0 of its own blocks
    for (let start = 0; start < this.n; start++) {
      if (order[start] === start) continue;
      copyWords(w, start, tmp, 0);
      let j = start;
      for (;;) {
        const k = order[j]!;
        order[j] = j;
        if (k === start) {
          copyWords(tmp, 0, w, j);
          break;
        }
        copyWords(w, k, w, j);
        j = k;
      }
    }
  }
  /**
   * The ids without adjacent duplicates (the list is sorted by permute first), in order, as views of
   * the list's blocks (the last one cut to what it holds); the list is left empty and the views are
   * the caller's.
   */
  drainUnique(): Buffer[] {
    const m = this.uniqueInPlace();
    const parts: Buffer[] = [];
    this.blocks.forEach((block, b) => {
      const held = Math.min(BLOCK_IDS, m - b * BLOCK_IDS);
      if (held > 0) parts.push(block.subarray(0, held * ID_BYTES));
      else release(block); // held only duplicates
    });
    this.blocks.length = 0;
    this.n = 0;
    return parts;
  }
  /**
   * Moves the ids kept down over adjacent duplicates (the list is sorted by permute first); returns
   * how many are kept. The list's length is not changed.
   */
  private uniqueInPlace(): number {
    const w = this.words();
    let m = 0;
    for (let i = 0; i < this.n; i++) {
      if (m > 0 && sameWords(w, i, m - 1)) continue;
      if (i !== m) copyWords(w, i, w, m);
      m++;
    }
    return m;
  }
  /**
   * Like drainUnique, but the views go to `each` one by one, valid only during the call, and the list
   * keeps its blocks for the ids pushed next (empty afterwards).
   */
  eachUnique(each: (part: Buffer) => void): void {
    const m = this.uniqueInPlace();
    for (let b = 0; b * BLOCK_IDS < m; b++) each(this.blocks[b]!.subarray(0, Math.min(BLOCK_IDS, m - b * BLOCK_IDS) * ID_BYTES));
    this.n = 0;
  }
  /** Appends the whole ids in src from byte start to end, a block's worth at a time. */
  pushRange(src: Buffer, start: number, end: number): void {
    while (start < end) {
      const b = this.n >>> BLOCK_SHIFT;
      if (b === this.blocks.length) this.blocks.push(Buffer.allocUnsafeSlow(BLOCK_IDS * ID_BYTES));
      const at = (this.n & (BLOCK_IDS - 1)) * ID_BYTES;
      const take = Math.min(end - start, BLOCK_IDS * ID_BYTES - at);
      src.copy(this.blocks[b]!, at, start, start + take);
      this.n += take / ID_BYTES;
      start += take;
    }
  }
  /** Frees the blocks; the list is empty afterwards. */
  clear(): void {
    for (const b of this.blocks) release(b);
    this.blocks.length = 0;
    this.n = 0;
  }
  /** The blocks as 32-bit words: ids are moved and compared 8 words at a time (Buffer.copy per id: 3x the time). */
  private words(): Uint32Array[] {
    return this.blocks.map((b) => new Uint32Array(b.buffer, b.byteOffset, b.length / 4));
  }
  /** The block that holds id number i; the id starts at offsetOf(i) in it. */
  blockOf(i: number): Buffer {
    return this.blocks[i >>> BLOCK_SHIFT]!;
  }
  offsetOf(i: number): number {
    return (i & (BLOCK_IDS - 1)) * ID_BYTES;
  }
}

/** 32-bit words per id. */
const WORDS = ID_BYTES / 4;

/** Copies id number i of the blocks w over id number j of the blocks to. */
function copyWords(w: Uint32Array[], i: number, to: Uint32Array[], j: number): void {
  const a = w[i >>> BLOCK_SHIFT]!;
  const b = to[j >>> BLOCK_SHIFT]!;
  const oa = (i & (BLOCK_IDS - 1)) * WORDS;
  const ob = (j & (BLOCK_IDS - 1)) * WORDS;
  for (let k = 0; k < WORDS; k++) b[ob + k] = a[oa + k]!;
}

/** Whether ids number i and j of the blocks w are the same. */
function sameWords(w: Uint32Array[], i: number, j: number): boolean {
  const a = w[i >>> BLOCK_SHIFT]!;
  const b = w[j >>> BLOCK_SHIFT]!;
  const oa = (i & (BLOCK_IDS - 1)) * WORDS;
  const ob = (j & (BLOCK_IDS - 1)) * WORDS;
  for (let k = 0; k < WORDS; k++) if (a[oa + k] !== b[ob + k]) return false;
  return true;
}

/** Append-only list of ids; sortedUnique() gives the clear-text index format. */
export class IdList {
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
   * Sorted, de-duplicated concatenation of the ids in one Buffer (for an IdSet); the list is empty
   * afterwards. Transient memory: a second copy while it is made (sortedParts has none).
   */
  sortedUnique(): Buffer {
    const parts = this.sortedParts();
    if (parts.length === 1) return parts[0]!;
    const out = Buffer.concat(parts);
    for (const p of parts) release(new Uint8Array(p.buffer as ArrayBuffer));
    return out;
  }
  /**
   * The sorted, de-duplicated ids as parts to be read in order (the index of a commit: storage takes
   * it in parts); the list is empty afterwards, and an IdSet built over it must not be used. The ids
   * are sorted where they lie, in the list's own blocks, which become the parts: 8 bytes per id of
   * scratch (sortOrder), and no second copy. (A copy into one Buffer while the blocks were freed one
   * by one did not help: glibc keeps freed blocks in the middle of its heap, so the copy came on top;
   * 1,000,000 ids over SSH, docs/DESIGN.md section 13.)
   */
  sortedParts(): Buffer[] {
    this.sortInPlace();
    return this.ids.drainUnique();
  }
  /**
   * The sorted, de-duplicated ids to `each` in parts, each valid only during its call; the list is
   * empty afterwards and keeps its memory for the ids pushed next (RefRuns sorts many small lists so).
   */
  sortedEach(each: (part: Buffer) => void): void {
    this.sortInPlace();
    this.ids.eachUnique(each);
  }
  /** Appends the whole ids in src from byte start to end. */
  pushRange(src: Buffer, start: number, end: number): void {
    this.ids.pushRange(src, start, end);
  }
  /** Frees the list's memory; it is empty afterwards. */
  clear(): void {
    this.ids.clear();
  }
  private sortInPlace(): void {
    const order = this.sortOrder();
    this.ids.permute(order);
    release(new Uint8Array(order.buffer as ArrayBuffer)); // (a view of the first half of the sort's memory)
  }
  /**
   * The ids' numbers in the order of their ids, in 8 bytes per id (4 once done). Each id's first bits
   * and its number are packed into one 64-bit integer, sorted by the typed array's own sort (in place,
   * outside the JavaScript heap; a sort with a comparator copied the array onto the heap first, 16
   * bytes per id, and was slower); runs whose packed bits tie are then sorted by their whole ids.
   */
  private sortOrder(): Uint32Array {
    const n = this.ids.length;
    const ids = this.ids;
    const numberBits = Math.max(1, Math.ceil(Math.log2(n + 1)));
    const numberMask = numberBits >= 32 ? 0xffffffff : 2 ** numberBits - 1;
    const packed = new BigUint64Array(n);
    const words = new Uint32Array(packed.buffer); // little-endian: the low word first
    if (new Uint8Array(Uint32Array.of(1).buffer)[0] !== 1) throw new Error('IdList.sortOrder assumes a little-endian machine');
    for (let i = 0; i < n; i++) {
      const block = ids.blockOf(i);
      const off = ids.offsetOf(i);
      words[2 * i + 1] = block.readUInt32BE(off);
      words[2 * i] = ((block.readUInt32BE(off + 4) & ~numberMask) | i) >>> 0;
    }
    packed.sort();
    // ties of the packed bits (ids alike in their first 64 - numberBits bits): order them by whole id
    const same = (a: number, b: number): boolean => words[2 * a + 1] === words[2 * b + 1] && (words[2 * a]! & ~numberMask) === (words[2 * b]! & ~numberMask);
    for (let k = 0; k < n; ) {
      let end = k + 1;
      while (end < n && same(k, end)) end++;
      if (end - k > 1) {
        const run = Array.from({ length: end - k }, (_, r) => words[2 * (k + r)]! & numberMask).sort((a, b) => {
          const oa = ids.offsetOf(a);
          const ob = ids.offsetOf(b);
          return ids.blockOf(a).compare(ids.blockOf(b), ob, ob + ID_BYTES, oa, oa + ID_BYTES);
        });
        run.forEach((v, r) => (words[2 * (k + r)] = ((words[2 * (k + r)]! & ~numberMask) | v) >>> 0));
      }
      k = end;
    }
    // the numbers, moved down into the first half of the same memory (word k is read before it is written)
    for (let k = 0; k < n; k++) words[k] = words[2 * k]! & numberMask;
    return words.subarray(0, n);
  }
}

/**
 * Membership in a sorted list of ids held elsewhere than in one Buffer (the kept index, read from
 * its file on demand: drivers/cachedir.ts).
 */
export interface SortedIds {
  readonly count: number;
  has(id: Buffer): boolean;
  /** Lets go of what it holds (an open file); has() must not be called afterwards. */
  dispose(): void;
}

/** Whether the sorted ids in b hold id (binary search; the first 4 bytes compared as a number). */
export function sortedHas(s: Buffer, id: Buffer): boolean {
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
  return false;
}

/** Bytes of an added id that an IdSet keeps: its first 128 bits (see IdSet). */
const FP_BYTES = 16;
/** Added ids per block of an IdSet (1 MiB). */
const FP_SHIFT = 16;
const FP_IDS = 1 << FP_SHIFT;

/**
 * Membership over sorted ids (a Buffer, or SortedIds), plus ids added later. The added ids are kept
 * in blocks of 1 MiB and found through an open-addressing hash table of their numbers (a Uint32Array
 * at most half full: 8-16 bytes per id), not in a Set of strings: a backup that adds 100,000 objects
 * keeps about 2.5 MiB outside the JavaScript heap instead of 100,000 long-lived strings that the
 * garbage collector must promote and trace (I8). Ids are keyed MACs, so their bytes are uniformly
 * distributed and serve as the hash.
 *
 * Of an added id the set keeps the first 16 bytes (128 bits): 24-32 bytes per added id with the
 * table, where the whole id took 40-48 (a first backup of 1,000,000 small files adds as many; DESIGN.md
 * section 9). Two different ids share their first 128 bits with probability 2^-128 per pair, about
 * 10^-27 for a million lookups against a million added ids, and nobody without the repository's key
 * can make such a pair. Were it to happen, a backup would take an object for stored that is not: the
 * server's commit check refuses the index that lists it; a backup that trusted the kept index runs
 * again with a listing of current (engine/backup.ts, CommitRefused), any other fails with that error,
 * and the next run sends the object. The sorted ids are compared whole.
 */
export class IdSet {
  private sorted: Buffer | SortedIds;
  /** The added ids' first FP_BYTES bytes, FP_IDS per block. */
  private added: Buffer[] = [];
  private addedCount = 0;
  /** Slot i holds 1 + the number of an added id, or 0 when free. */
  private table = new Uint32Array(0);
  private mask = -1;
  constructor(sorted: Buffer | SortedIds) {
    this.sorted = sorted;
  }
  static empty(): IdSet {
    return new IdSet(Buffer.alloc(0));
  }
  get size(): number {
    const s = this.sorted;
    return (Buffer.isBuffer(s) ? s.length / ID_BYTES : s.count) + this.addedCount;
  }
  has(id: Buffer): boolean {
    const s = this.sorted;
    if (Buffer.isBuffer(s) ? sortedHas(s, id) : s.has(id)) return true;
    return this.addedCount > 0 && this.slotOf(id) >= 0;
  }
  /** Adds id (a copy of its first 16 bytes). */
  add(id: Buffer): void {
    if (!this.has(id)) this.addNew(id);
  }
  /** Adds id, which the caller has made sure the set lacks (has()). */
  addNew(id: Buffer): void {
    const n = this.addedCount;
    if ((n + 1) * 2 > this.table.length) this.grow();
    const b = n >>> FP_SHIFT;
    if (b === this.added.length) this.added.push(Buffer.allocUnsafeSlow(FP_IDS * FP_BYTES));
    this.added[b]!.set(id.subarray(0, FP_BYTES), (n & (FP_IDS - 1)) * FP_BYTES);
    this.insert(n);
    this.addedCount++;
  }
  /** Frees the set's memory (its sorted buffer, when the set owns all of it); the set is empty after. */
  dispose(): void {
    if (Buffer.isBuffer(this.sorted)) release(this.sorted);
    else this.sorted.dispose();
    release(this.table);
    for (const b of this.added) release(b);
    this.added = [];
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
      const block = this.added[n >>> FP_SHIFT]!;
      const off = (n & (FP_IDS - 1)) * FP_BYTES;
      if (block.readUInt32LE(off) === first && block.compare(id, 4, FP_BYTES, off + 4, off + FP_BYTES) === 0) return i;
    }
    return -1;
  }
  /** The first slot to probe for the id at off in b: its bytes 4-7 (ids are keyed MACs, uniformly distributed). */
  private home(b: Uint8Array, off: number): number {
    return (b[off + 4]! | (b[off + 5]! << 8) | (b[off + 6]! << 16) | (b[off + 7]! << 24)) & this.mask;
  }
  private insert(n: number): void {
    let i = this.home(this.added[n >>> FP_SHIFT]!, (n & (FP_IDS - 1)) * FP_BYTES);
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

/**
 * Where RefRuns keeps its sorted runs: appended one after another, read back by byte position (a temp
 * file of the workstation's cache, drivers/cachedir.ts).
 */
export interface RunStore {
  /** Appends a run (whole ids); false when it cannot (RefRuns then keeps its runs in memory). */
  append(run: Buffer): boolean;
  /** Fills buf with the bytes appended from position pos on, exactly; throws when it cannot. */
  read(pos: number, buf: Buffer): void;
  /** Lets go of the file (never throws). */
  close(): void;
}

/** Bytes of each stored run that RefRuns.merge reads at a time. */
const RUN_WINDOW = 64 * 1024;

/** A run being merged: the rest of it from `pos` to `end`, of which [at, to) of `window` is read. */
interface RunCursor {
  pos: number;
  readonly end: number;
  window: Buffer;
  at: number;
  to: number;
}

/**
 * A backup's references: ids pushed in any order, given back sorted and without duplicates (the
 * index of its commit). Each BLOCK_IDS pushed are sorted where they lie into a run that goes to the
 * store, so that the walk holds one block (1 MiB) of them and not 32 bytes per reference. merge()
 * reads the runs back one first byte at a time: the ids of that byte in every run (contiguous, since
 * each run is sorted), sorted together; about 1/256 of the references at once. Without a store, or
 * once it refuses a run (a full disk), the runs stay in memory.
 */
export class RefRuns {
  private readonly cur = new IdList();
  private store: RunStore | null;
  /** Whether runs still go to the store (it refused none so far). */
  private appending: boolean;
  private readonly stored: { start: number; end: number }[] = [];
  private storedBytes = 0;
  private readonly held: Buffer[] = [];
  private pushed = 0;
  constructor(store: RunStore | null) {
    this.store = store;
    this.appending = store !== null;
  }
  /** Ids pushed so far (with repeats). */
  get length(): number {
    return this.pushed;
  }
  /** Ids held in memory now, repeats included (for tests and measurements). */
  get inMemory(): number {
    return this.cur.length + this.held.reduce((n, b) => n + b.length / ID_BYTES, 0);
  }
  push(id: Uint8Array): void {
    this.cur.push(id);
    this.pushed++;
    if (this.appending && this.cur.length === BLOCK_IDS) this.endRun();
  }
  /** Pushes the whole ids in ids, in order (as push does one at a time, without a view per id). */
  pushAll(ids: Buffer): void {
    let at = 0;
    while (at < ids.length) {
      const take = this.appending ? Math.min(ids.length - at, (BLOCK_IDS - this.cur.length) * ID_BYTES) : ids.length - at;
      this.cur.pushRange(ids, at, at + take);
      this.pushed += take / ID_BYTES;
      at += take;
      if (this.appending && this.cur.length === BLOCK_IDS) this.endRun();
    }
  }
  /** Whether some runs are in the store (else sortedInMemory() gives the index). */
  get spilled(): boolean {
    return this.stored.length > 0;
  }
  /** The current block as a run, to the store (the block then takes the next ids), else kept. */
  private endRun(): void {
    const parts: Buffer[] = [];
    this.cur.sortedEach((part) => parts.push(part));
    const run = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    if (this.appending && this.store!.append(run)) {
      this.stored.push({ start: this.storedBytes, end: this.storedBytes + run.length });
      this.storedBytes += run.length;
      return;
    }
    this.appending = false; // from now on the ids stay in `cur` (the runs stored are read back from the store)
    this.held.push(Buffer.from(run)); // (a copy: the block takes the next ids)
  }
  /**
   * With no run in the store: the ids sorted where they lie and de-duplicated, as parts of the
   * list's own blocks (IdList.sortedParts: no copy); RefRuns is empty afterwards.
   */
  sortedInMemory(): Buffer[] {
    if (this.spilled) throw new Error('RefRuns.sortedInMemory: runs are in the store; merge() them');
    if (this.held.length > 0) {
      // (the store refused its first run: that run and the rest)
      for (const b of this.held) this.cur.pushRange(b, 0, b.length);
      this.held.length = 0;
    }
    return this.cur.sortedParts();
  }
  /**
   * Gives the ids, sorted and unique, to `each` in order, in parts that are valid only during the
   * call. May be called again; the runs are kept until dispose().
   */
  merge(each: (part: Buffer) => void): void {
    if (this.cur.length > 0) {
      if (this.appending) this.endRun();
      else for (const part of this.cur.sortedParts()) this.held.push(part); // (the store refused a run: the rest, sorted)
    }
    const cursors: RunCursor[] = [
      ...this.stored.map((r) => ({ pos: r.start, end: r.end, window: Buffer.alloc(0), at: 0, to: 0 })),
      ...this.held.map((b) => ({ pos: b.length, end: b.length, window: b, at: 0, to: b.length })),
    ];
    const bucket = new IdList();
    try {
      for (let p = 0; p < 256; p++) {
        for (const c of cursors) {
          for (;;) {
            if (c.at === c.to) {
              if (c.pos === c.end) break;
              const n = Math.min(RUN_WINDOW, c.end - c.pos);
              if (c.window.length < n) c.window = Buffer.allocUnsafe(RUN_WINDOW);
              this.store!.read(c.pos, c.window.subarray(0, n));
              c.pos += n;
              c.at = 0;
              c.to = n;
            }
            const from = c.at;
            while (c.at < c.to && c.window[c.at] === p) c.at += ID_BYTES;
            if (c.at > from) bucket.pushRange(c.window, from, c.at);
            if (c.at < c.to) break; // the next id is of a later first byte
          }
        }
        // a run's ids below p would mean it is not sorted: they are never taken, and the count below tells
        if (bucket.length > 0) bucket.sortedEach(each);
      }
      for (const c of cursors) {
        if (c.at !== c.to || c.pos !== c.end) throw new Error('RefRuns.merge: a run is not sorted');
      }
    } finally {
      bucket.clear();
    }
  }
  /** Frees the runs and the store; empty afterwards. */
  dispose(): void {
    this.cur.clear();
    this.store?.close();
    this.store = null;
    this.appending = false;
    for (const b of this.held) release(b);
    this.held.length = 0;
    this.stored.length = 0;
    this.storedBytes = 0;
    this.pushed = 0;
  }
}

export function* idsOf(index: Buffer): Generator<Buffer> {
  for (let p = 0; p + ID_BYTES <= index.length; p += ID_BYTES) yield index.subarray(p, p + ID_BYTES);
}
