/**
 * The walk's directory records (docs/DESIGN.md section 10): what the last backup saw in each
 * directory, so that the next one can tell an unchanged directory from its lstat results alone,
 * without loading and decoding the previous tree.
 *
 * For each directory the walk backs up, in walk order (a directory before what is below it, siblings
 * in name order), the file holds an ENTER record (its path; a "stat line" of its tree's entries in name
 * order: name, kind, mode, owner, size, times, inode, link count, device; the chunk ids of its files; how
 * many files, bytes, symlinks and other entries it holds) and, after the records of everything below
 * it, a LEAVE record (the id of its tree, and whether that tree lists exactly the entries of the
 * stat line). A directory whose stat line built from this run's lstat results equals the recorded one
 * has the same entries with the same metadata (an entry whose ctime and inode are unchanged has
 * unchanged contents, xattrs and symlink target, section 4 step 5): its files are not looked at, and
 * if nothing below it changed either, its tree id is the recorded one.
 *
 * The file is written as the walk goes, in blocks of about 256 KiB sealed by core/crypto (AES-256-GCM
 * under a key of its own, block numbers as nonces, the last block marked), and tied to the head its
 * commit wrote by a tag in its header: it holds nothing the repository does not, and nothing it says
 * is taken unless it opens under the key. Records never span blocks.
 */
import type { KeyObject } from 'node:crypto';
import { type NodeKindCode, type TreeEntry, NodeKind } from '../core/format.js';
import { release } from '../core/memory.js';
import { type Keys, type Rng, LOCAL_BLOCK_OVERHEAD, localFileKey, localHeadTag, openLocalBlock, sealLocalBlock } from '../core/crypto.js';
import type { RecordsIn, RecordsOut } from './cache.js';
import type { SourceStat } from './source.js';

const MAGIC = Buffer.from('snapcrypt-dirs1\n', 'latin1');
const SALT_LEN = 32;
const HEAD_LEN = 32;
const TAG_LEN = 32;
/** magic, salt, head (the root id of the commit), tag of the head under the file key */
export const RECORDS_HEADER_LEN = MAGIC.length + SALT_LEN + HEAD_LEN + TAG_LEN;
/** Records per block, in bytes: a block is held whole while written and while read. */
const BLOCK = 256 * 1024;
/** The block length field: the low 31 bits are the sealed length, the top bit marks the last block. */
const LAST_BIT = 0x80000000;
const MAX_SEALED = 0x7fffffff;

const ENTER = 1;
const LEAVE = 2;
const ID_LEN = 32;
/** type (1), length of the rest (4) */
const ENTER_HEAD = 5;
/** type (1), valid (1), tree id */
const LEAVE_LEN = 2 + ID_LEN;
/** files (u32), bytes (f64), symlinks (u32), others (u32) */
const COUNTS_LEN = 20;

/** What a directory's own non-directory entries add to a snapshot's stats. */
export interface DirCounts {
  files: number;
  bytes: number;
  symlinks: number;
  others: number;
}

/** A directory's ENTER record; its buffers are views of the reader's block, valid until its next call. */
export interface EnterRecord extends DirCounts {
  /** The whole record, as written (copied into the next file when the directory is unchanged). */
  readonly raw: Buffer;
  readonly line: Buffer;
  /** The chunk ids of its files, 32 bytes each (zero chunks are not listed). */
  readonly ids: Buffer;
}

export interface LeaveRecord {
  /** Whether the tree lists exactly the entries of the ENTER record's stat line. */
  readonly valid: boolean;
  readonly id: Buffer;
}

const isDevice = (k: NodeKindCode): boolean => k === NodeKind.chardev || k === NodeKind.blockdev;

/** Stat lines, built in one reused buffer. */
export class StatLine {
  private buf = Buffer.allocUnsafe(64 * 1024);
  /** The times are written through this view: Buffer.writeBigInt64LE makes three BigInts per call. */
  private view64 = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.length);
  private len = 0;
  reset(): void {
    this.len = 0;
  }
  /** The line so far (valid until the next add or reset). */
  view(): Buffer {
    return this.buf.subarray(0, this.len);
  }
  /** An entry as the tree will list it, from its lstat result (what entryOf in backup.ts keeps). */
  addStat(name: Buffer, st: SourceStat): void {
    const k = st.kind;
    this.add(name, k, st.mode & 0o7777, st.uid, st.gid, k === NodeKind.file ? st.size : 0, st.mtimeNs, st.ctimeNs, st.ino, st.nlink, isDevice(k) ? st.rdev : 0);
  }
  /** A tree entry. */
  addEntry(e: TreeEntry): void {
    const k = e.kind;
    this.add(e.name, k, e.mode, e.uid, e.gid, k === NodeKind.file ? e.size : 0, e.mtimeNs, e.ctimeNs, e.inode, e.nlink, isDevice(k) ? e.rdev : 0);
  }
  private add(name: Buffer, kind: number, mode: number, uid: number, gid: number, size: number, mtime: bigint, ctime: bigint, ino: number, nlink: number, rdev: number): void {
    const need = this.len + 2 + name.length + 55;
    if (need > this.buf.length) {
      const grown = Buffer.allocUnsafe(Math.max(need, this.buf.length * 2));
      this.buf.copy(grown, 0, 0, this.len);
      this.buf = grown;
      this.view64 = new DataView(grown.buffer, grown.byteOffset, grown.length);
    }
    const b = this.buf;
    let o = b.writeUInt16LE(name.length, this.len);
    o += name.copy(b, o);
    o = b.writeUInt8(kind, o);
    o = b.writeUInt16LE(mode, o);
    o = b.writeUInt32LE(uid, o);
    o = b.writeUInt32LE(gid, o);
    o = b.writeDoubleLE(size, o);
    this.view64.setBigInt64(o, mtime, true);
    this.view64.setBigInt64(o + 8, ctime, true);
    o += 16;
    o = b.writeDoubleLE(ino, o);
    o = b.writeUInt32LE(nlink, o);
    o = b.writeDoubleLE(rdev, o);
    this.len = o;
  }
}

/**
 * Walk order of two paths: a directory before the paths below it, siblings by the bytes of their
 * names (so "a/z" comes before "a-b": "/" ends a name, below every byte).
 */
export function walkOrder(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x === y) continue;
    if (x === 0x2f) return -1;
    if (y === 0x2f) return 1;
    return x - y;
  }
  return a.length - b.length;
}

/** Writes the records of this run's walk; any failure to write disables it (the cache is only a cache). */
export class DirRecordsWriter {
  private readonly out: RecordsOut;
  private readonly key: KeyObject;
  private readonly salt: Buffer;
  private buf = Buffer.allocUnsafe(BLOCK);
  private len = 0;
  private index = 0;
  private dead = false;

  constructor(keys: Keys, out: RecordsOut, rng: Rng) {
    this.out = out;
    this.salt = rng(SALT_LEN);
    this.key = localFileKey(keys, this.salt);
    this.io(() => out.write(Buffer.alloc(RECORDS_HEADER_LEN))); // the real header comes last
  }

  private io(f: () => void): void {
    if (this.dead) return;
    try {
      f();
    } catch {
      this.disable();
    }
  }

  /** Stops writing and deletes the file. */
  private disable(): void {
    this.dead = true;
    this.out.discard();
  }

  private room(n: number): Buffer {
    if (this.len + n > this.buf.length) {
      if (this.len > 0) this.flush(false);
      if (n > this.buf.length) this.buf = Buffer.allocUnsafe(n);
    }
    return this.buf;
  }

  private flush(last: boolean): void {
    const sealed = sealLocalBlock(this.key, this.index++, last, this.buf.subarray(0, this.len));
    this.len = 0;
    if (sealed.length > MAX_SEALED) {
      this.disable();
      return;
    }
    const head = Buffer.allocUnsafe(4);
    head.writeUInt32BE((sealed.length | (last ? LAST_BIT : 0)) >>> 0);
    this.io(() => {
      this.out.write(head);
      this.out.write(sealed);
    });
    release(sealed);
    // a block made larger for one large record goes back to the usual size
    if (this.buf.length > BLOCK) this.buf = Buffer.allocUnsafe(BLOCK);
  }

  /** A directory's ENTER record: its path, its stat line, its files' chunk ids (one after another) and its counts. */
  enter(path: Buffer, line: Buffer, ids: Buffer, counts: DirCounts): void {
    if (this.dead) return;
    const rest = 2 + path.length + COUNTS_LEN + 4 + line.length + 4 + ids.length;
    const b = this.room(ENTER_HEAD + rest);
    let o = b.writeUInt8(ENTER, this.len);
    o = b.writeUInt32LE(rest, o);
    o = b.writeUInt16LE(path.length, o);
    o += path.copy(b, o);
    o = b.writeUInt32LE(counts.files, o);
    o = b.writeDoubleLE(counts.bytes, o);
    o = b.writeUInt32LE(counts.symlinks, o);
    o = b.writeUInt32LE(counts.others, o);
    o = b.writeUInt32LE(line.length, o);
    o += line.copy(b, o);
    o = b.writeUInt32LE(ids.length / ID_LEN, o);
    o += ids.copy(b, o);
    this.len = o;
  }

  /** The ENTER record of the last run, for a directory whose stat line is unchanged. */
  enterCopy(rec: EnterRecord): void {
    if (this.dead) return;
    const b = this.room(rec.raw.length);
    this.len += rec.raw.copy(b, this.len);
  }

  leave(valid: boolean, id: Buffer): void {
    if (this.dead) return;
    const b = this.room(LEAVE_LEN);
    let o = b.writeUInt8(LEAVE, this.len);
    o = b.writeUInt8(valid ? 1 : 0, o);
    o += id.copy(b, o);
    this.len = o;
  }

  /** Seals the last block, writes the header for head (the root id committed) and keeps the file. */
  finish(head: Buffer): void {
    if (this.dead) return;
    this.flush(true);
    const header = Buffer.concat([MAGIC, this.salt, head, localHeadTag(this.key, head)]);
    this.io(() => {
      this.out.write(header, 0);
      this.out.keep();
    });
    this.dead = true;
  }

  discard(): void {
    if (!this.dead) this.disable();
  }
}

/**
 * Reads the records of the last run as the walk goes. What it returns are views of its one block
 * buffer: valid until its next call. enter() is asked only for a directory whose
 * parent's record was found (or for one of the paths given to the backup), and leave() only for a
 * directory whose record enter() gave: the file is read once, front to back. A block that does not
 * open, or a file cut short, ends the reading: every later question gets null (the walk then loads the
 * previous trees, as without records).
 */
export class DirRecordsReader {
  private readonly input: RecordsIn;
  private readonly key: KeyObject;
  private pos = RECORDS_HEADER_LEN;
  private index = 0;
  /** The records of the block being read: a view of plainBuf. */
  private block: Buffer = Buffer.alloc(0);
  /** Reused for every block (grown for a larger one): blocks of their own would be ArrayBuffers that V8 frees late. */
  private sealedBuf = Buffer.alloc(0);
  private plainBuf = Buffer.alloc(0);
  private at = 0;
  private last = false;
  private dead = false;

  private constructor(input: RecordsIn, key: KeyObject) {
    this.input = input;
    this.key = key;
  }

  /** The reader of a records file written for head (the parent's root id); null if it is not one. */
  static open(keys: Keys, input: RecordsIn, head: Buffer): DirRecordsReader | null {
    const header = Buffer.alloc(RECORDS_HEADER_LEN);
    if (input.read(header, 0) !== header.length || !header.subarray(0, MAGIC.length).equals(MAGIC)) return null;
    let o = MAGIC.length;
    const key = localFileKey(keys, header.subarray(o, (o += SALT_LEN)));
    const h = header.subarray(o, (o += HEAD_LEN));
    if (!h.equals(head) || !localHeadTag(key, h).equals(header.subarray(o, o + TAG_LEN))) return null;
    return new DirRecordsReader(input, key);
  }

  close(): void {
    this.dead = true;
    this.input.close();
  }

  /** Ends the reading: nothing more is answered. */
  private fail(): null {
    this.dead = true;
    return null;
  }

  /** The type of the next record (loading the next block when this one is done), or 0 at the end or on failure. */
  private peek(): number {
    if (this.dead) return 0;
    while (this.at >= this.block.length) {
      if (this.last) return 0;
      const lenBuf = Buffer.alloc(4);
      if (this.input.read(lenBuf, this.pos) !== 4) return (this.fail(), 0);
      const word = lenBuf.readUInt32BE(0);
      const last = (word & LAST_BIT) !== 0;
      const len = (word & MAX_SEALED) >>> 0;
      if (len < LOCAL_BLOCK_OVERHEAD) return (this.fail(), 0);
      if (this.sealedBuf.length < len) {
        this.sealedBuf = Buffer.allocUnsafe(Math.max(len, BLOCK + LOCAL_BLOCK_OVERHEAD));
        this.plainBuf = Buffer.allocUnsafe(this.sealedBuf.length);
      }
      const sealed = this.sealedBuf.subarray(0, len);
      if (this.input.read(sealed, this.pos + 4) !== len) return (this.fail(), 0);
      const plain = openLocalBlock(this.key, this.index, last, sealed, this.plainBuf);
      if (plain === null) return (this.fail(), 0);
      this.index++;
      this.pos += 4 + sealed.length;
      this.block = plain;
      this.at = 0;
      this.last = last;
    }
    const t = this.block[this.at]!;
    if (t === ENTER ? this.at + ENTER_HEAD > this.block.length : t !== LEAVE || this.at + LEAVE_LEN > this.block.length) return (this.fail(), 0);
    return t;
  }

  /** The length of the ENTER record at `at`, checked to lie in the block. */
  private enterLength(): number {
    const n = ENTER_HEAD + this.block.readUInt32LE(this.at + 1);
    if (this.at + n > this.block.length) {
      this.fail();
      return 0;
    }
    return n;
  }

  /** The path of the ENTER record at `at`, n bytes long (a view). */
  private enterPath(n: number): Buffer | null {
    if (n < ENTER_HEAD + 2) return this.fail();
    const len = this.block.readUInt16LE(this.at + ENTER_HEAD);
    const start = this.at + ENTER_HEAD + 2;
    if (2 + len > n - ENTER_HEAD) return this.fail();
    return this.block.subarray(start, start + len);
  }

  /** Skips the ENTER record at `at` and everything up to its LEAVE record. */
  private skipSpan(): boolean {
    let depth = 0;
    do {
      const t = this.peek();
      if (t === ENTER) {
        const n = this.enterLength();
        if (n === 0) return false;
        this.at += n;
        depth++;
      } else if (t === LEAVE) {
        this.at += LEAVE_LEN;
        depth--;
      } else {
        return false;
      }
    } while (depth > 0);
    return true;
  }

  /** The record of directory `path`, if the last run wrote one where the walk now is. */
  enter(path: Buffer): EnterRecord | null {
    for (;;) {
      if (this.peek() !== ENTER) return null; // the parent's LEAVE: path is new, or the end
      const n = this.enterLength();
      const p = this.enterPath(n);
      if (p === null) return null;
      const order = walkOrder(p, path);
      if (order > 0) return null; // a later directory: path is new
      if (order < 0) {
        if (!this.skipSpan()) return null; // a directory that is gone (or renamed)
        continue;
      }
      return this.takeEnter(n, p.length);
    }
  }

  /** The ENTER record at `at`, n bytes long, whose path is pathLen bytes. */
  private takeEnter(n: number, pathLen: number): EnterRecord | null {
    const b = this.block;
    const end = this.at + n;
    let o = this.at + ENTER_HEAD + 2 + pathLen;
    if (o + COUNTS_LEN + 4 > end) return this.fail();
    const files = b.readUInt32LE(o);
    const bytes = b.readDoubleLE(o + 4);
    const symlinks = b.readUInt32LE(o + 12);
    const others = b.readUInt32LE(o + 16);
    const lineLen = b.readUInt32LE(o + 20);
    o += COUNTS_LEN + 4;
    if (o + lineLen + 4 > end) return this.fail();
    const line = b.subarray(o, (o += lineLen));
    const count = b.readUInt32LE(o);
    o += 4;
    if (o + count * ID_LEN !== end) return this.fail();
    const rec: EnterRecord = { raw: b.subarray(this.at, end), line, ids: b.subarray(o, end), files, bytes, symlinks, others };
    this.at = end;
    return rec;
  }

  /** The LEAVE record of the directory whose record enter() gave last among those not yet left. */
  leave(): LeaveRecord | null {
    for (;;) {
      const t = this.peek();
      if (t === ENTER) {
        if (!this.skipSpan()) return null;
        continue;
      }
      if (t !== LEAVE) return null;
      const valid = this.block[this.at + 1] === 1;
      const id = Buffer.from(this.block.subarray(this.at + 2, this.at + LEAVE_LEN));
      this.at += LEAVE_LEN;
      return { valid, id };
    }
  }
}
