/** The workstation's local state: the tree cache and kept index (DirTreeCache) and key copies (DirKeyStore). */
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import type { KeptIndexWriter, KeyStore, RecordsIn, RecordsOut, TreeCache } from '../engine/cache.js';
import { type IndexBytes, indexParts } from '../storage/types.js';
import { ID_BYTES, type RunStore, type SortedIds, sortedHas } from '../core/idset.js';
import { release } from '../core/memory.js';
import { SnapError } from '../core/errors.js';
import { mapInLanes } from '../core/lanes.js';

export { defaultCacheRoot, defaultConfigRoot } from './localpaths.js';

/** How many cache entries dropAll removes at once (libuv's pool has 4 threads). */
const DROP_LANES = 8;

/** First line of the kept index file; then the head (64 hex), a newline, the ids, and SHA-256 of all before. */
const INDEX_MAGIC = 'snapcrypt-index-cache 1\n';

export class DirTreeCache implements TreeCache {
  private readonly dir: string;
  private ok = true;
  private readonly indexFile: string;
  private readonly recordsFile: string;
  constructor(root: string, repoId: string) {
    this.dir = path.join(root, repoId, 'trees');
    this.indexFile = path.join(root, repoId, 'index');
    this.recordsFile = path.join(root, repoId, 'dirs');
  }
  private file(id: Buffer): string {
    const hex = id.toString('hex');
    return path.join(this.dir, hex.slice(0, 2), hex);
  }
  get(id: Buffer): Buffer | null {
    if (!this.ok) return null;
    try {
      return fs.readFileSync(this.file(id));
    } catch {
      return null;
    }
  }
  /** The prefix directories made (or found) in this run: made once, not once per tree. */
  private readonly made = new Set<string>();

  /**
   * Written in place under its final name, created exclusively: an entry cut short (a crash, a full
   * disk) fails its authentication when used and is dropped like any damaged one, so a temp file and
   * a rename (twice the file system's work: 900 trees on btrfs 57-98 ms against 30-32) buy nothing.
   * An entry that exists already is left alone: the same id is the same bytes, and a damaged one is
   * dropped when it is read.
   */
  put(id: Buffer, data: Buffer): void {
    if (!this.ok) return;
    const f = this.file(id);
    try {
      const dir = path.dirname(f);
      if (!this.made.has(dir)) fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      this.made.add(dir);
    } catch {
      this.ok = false; // a read-only cache disables itself for this run
      return;
    }
    let fd: number;
    try {
      fd = fs.openSync(f, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') this.ok = false;
      return;
    }
    try {
      let off = 0;
      while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
    } catch {
      this.ok = false; // a full cache disables itself for this run, without the entry it could not finish
      removeQuietly(f);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Removes the entries of the ids in `ids` (ID_BYTES each), DROP_LANES at a time on libuv's pool. */
  async dropAll(ids: Buffer): Promise<void> {
    const all: Buffer[] = [];
    for (let o = 0; o + ID_BYTES <= ids.length; o += ID_BYTES) all.push(ids.subarray(o, o + ID_BYTES));
    // (node:fs's callback call: an ssh:// client loads no node:fs/promises, test/layers.test.ts)
    await mapInLanes(all, DROP_LANES, (id) => new Promise<void>((resolve) => fs.unlink(this.file(id), () => resolve())));
  }

  drop(id: Buffer): void {
    try {
      fs.rmSync(this.file(id), { force: true });
    } catch {
      /* ignore */
    }
  }
  /**
   * The kept index for head, checked whole (its SHA-256) but not held: lookups read it from the open
   * file (KeptIndex), so that what current holds costs no memory per object.
   */
  getIndex(head: string): SortedIds | null {
    const fd = openForReading(this.indexFile);
    if (fd === null) return null;
    try {
      const kept = checkKeptIndex(fd, head);
      if (kept) return kept;
    } catch {
      /* unreadable: not used */
    }
    fs.closeSync(fd);
    return null;
  }
  /** The kept index of head from the index in memory (a commit that had its references in memory). */
  putIndex(head: string, index: IndexBytes): void {
    const writer = this.writeIndex(head);
    if (writer === null) return;
    // part by part, not one write of a concatenation: that would be a second copy of the index
    if (indexParts(index).every((part) => writer.append(part)) && writer.finish() !== null) writer.keep();
    else writer.discard();
  }
  dropIndex(): void {
    // (one left behind lacks only what a later session uploaded, which is sent again)
    removeQuietly(this.indexFile);
  }
  readRecords(): RecordsIn | null {
    const fd = openForReading(this.recordsFile);
    if (fd === null) return null;
    return {
      read: (buf, position) => {
        try {
          return readUpTo(fd, buf, position);
        } catch {
          return 0; // (an unreadable file ends its use, as a cut one does)
        }
      },
      close: () => fs.closeSync(fd),
    };
  }
  writeRecords(): RecordsOut | null {
    if (!this.ok) return null;
    const file = this.recordsFile;
    const tmp = `${file}.${process.pid}.tmp`;
    const fd = openInCache(tmp, 'w');
    if (fd === null) return null;
    let end = 0;
    let open = true;
    const close = (): void => {
      if (open) fs.closeSync(fd);
      open = false;
    };
    return {
      write: (data, position) => {
        writeAt(fd, data, position ?? end);
        if (position === undefined) end += data.length;
      },
      keep: () => {
        close();
        fs.renameSync(tmp, file);
      },
      discard: () => {
        try {
          close();
        } catch {
          /* ignore */
        }
        removeQuietly(tmp);
      },
    };
  }
  /**
   * A temp file for the sorted runs of a backup's references (RunStore), unlinked as soon as it is
   * open: nothing is left behind however the run ends. In the cache, on the workstation's disk (a
   * tmpfs /tmp would hold it in memory all the same).
   */
  refRuns(): RunStore | null {
    if (!this.ok) return null;
    const file = path.join(path.dirname(this.indexFile), `refs.${process.pid}.tmp`);
    const fd = openInCache(file, 'wx+');
    if (fd === null) return null;
    removeQuietly(file);
    return fileRunStore(fd, file);
  }
  /** The kept index of head, written while the commit's index is made (KeptIndexWriter). */
  writeIndex(head: string): KeptIndexWriter | null {
    if (!this.ok) return null;
    const tmp = `${this.indexFile}.${process.pid}.tmp`;
    const dir = path.dirname(this.indexFile);
    const base = path.basename(this.indexFile);
    try {
      // one left by a backup that was killed during its commit (this one holds the repository's lock)
      for (const name of fs.readdirSync(dir)) if (name.startsWith(`${base}.`) && name.endsWith('.tmp')) removeQuietly(path.join(dir, name));
    } catch {
      /* no directory yet */
    }
    const fd = openInCache(tmp, 'w+');
    if (fd === null) return null;
    const header = keptIndexHeader(head);
    const hash = createHash('sha256').update(header);
    let end = 0;
    let failed = false;
    let open = true;
    const write = (buf: Buffer): void => {
      writeAt(fd, buf, end);
      end += buf.length;
    };
    const close = (): void => {
      if (open) closeQuietly(fd);
      open = false;
    };
    try {
      write(header);
    } catch {
      failed = true;
    }
    return {
      append: (ids) => {
        if (failed) return false;
        try {
          hash.update(ids);
          write(ids);
          return true;
        } catch {
          failed = true;
          return false;
        }
      },
      finish: () => {
        if (failed) return null;
        const length = end - header.length;
        try {
          write(hash.digest());
        } catch {
          failed = true;
          return null;
        }
        return {
          length,
          read: async (pos, n, scratch) => {
            const buf = scratch.subarray(0, n);
            if (!open || !readAt(fd, buf, header.length + pos)) throw new SnapError('io', `Cannot read the index back from ${tmp}: the cache directory failed; run the backup again`);
            return buf;
          },
        };
      },
      keep: () => {
        close();
        try {
          fs.renameSync(tmp, this.indexFile);
        } catch {
          removeQuietly(tmp);
        }
      },
      discard: () => {
        close();
        removeQuietly(tmp);
      },
    };
  }
  dropRecords(): void {
    // (records are used only with the kept index, which is gone)
    removeQuietly(this.recordsFile);
  }
}

/** A RunStore on an open file (fd, which it closes); label names the file in errors. */
export function fileRunStore(fd: number, label: string): RunStore {
  let end = 0;
  let open = true;
  return {
    append: (run) => {
      if (!open) return false;
      try {
        writeAt(fd, run, end);
      } catch {
        return false; // a full or failing cache: the runs stay in memory from here
      }
      end += run.length;
      return true;
    },
    read: (pos, buf) => {
      if (!open || pos + buf.length > end || !readAt(fd, buf, pos)) {
        throw new SnapError('io', `Cannot read back the references from ${label}: the cache directory failed; run the backup again`);
      }
    },
    close: () => {
      if (open) closeQuietly(fd);
      open = false;
    },
  };
}

/** Opens a file of the cache (made 0600, its directory 0700 if need be), or null when it cannot. */
function openInCache(file: string, flags: string): number | null {
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
    return fs.openSync(file, flags, 0o600);
  } catch {
    return null;
  }
}

/** Writes all of buf at position pos of the file; throws what the write throws. */
function writeAt(fd: number, buf: Uint8Array, pos: number): void {
  for (let off = 0; off < buf.length; ) off += fs.writeSync(fd, buf, off, buf.length - off, pos + off);
}

function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    /* ignore */
  }
}

/** Removes a file of the cache if it is there; a failure is harmless (the cache is only a cache). */
function removeQuietly(file: string): void {
  try {
    fs.rmSync(file, { force: true });
  } catch {
    /* ignore */
  }
}

export function openTreeCache(root: string | null): ((repoId: string) => TreeCache | null) | null {
  if (root === null) return null;
  return (repoId) => new DirTreeCache(root, repoId);
}

const KEY_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** Local copies of key files: <root>/repos/<repo id>/keys/<name>, private to the user. */
export class DirKeyStore implements KeyStore {
  private readonly root: string;
  constructor(root: string) {
    this.root = root;
  }
  private dir(repoId: string): string {
    if (!/^[0-9a-f]{32}$/.test(repoId)) throw new Error(`bad repository id ${repoId}`);
    return path.join(this.root, 'repos', repoId, 'keys');
  }
  async list(repoId: string): Promise<string[]> {
    try {
      return (await fs.promises.readdir(this.dir(repoId))).filter((n) => KEY_NAME.test(n)).sort();
    } catch {
      return [];
    }
  }
  async read(repoId: string, name: string): Promise<Buffer | null> {
    if (!KEY_NAME.test(name)) return null;
    try {
      return await fs.promises.readFile(path.join(this.dir(repoId), name));
    } catch {
      return null;
    }
  }
  private locationFile(location: string): string {
    return path.join(this.root, 'locations', createHash('sha256').update(location).digest('hex'));
  }
  async repoIdAt(location: string): Promise<string | null> {
    try {
      const id = (await fs.promises.readFile(this.locationFile(location), 'latin1')).trim();
      return /^[0-9a-f]{32}$/.test(id) ? id : null;
    } catch {
      return null;
    }
  }
  async rememberRepoId(location: string, repoId: string): Promise<void> {
    if ((await this.repoIdAt(location)) === repoId) return;
    const file = this.locationFile(location);
    await fs.promises.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const tmp = `${file}.${process.pid}.tmp`;
    await fs.promises.writeFile(tmp, `${repoId}\n`, { mode: 0o600 });
    await fs.promises.rename(tmp, file);
  }
  async write(repoId: string, name: string, data: Buffer): Promise<void> {
    if (!KEY_NAME.test(name)) return;
    const dir = this.dir(repoId);
    await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = path.join(dir, `.${name}.${process.pid}.tmp`);
    await fs.promises.writeFile(tmp, data, { mode: 0o600 });
    await fs.promises.rename(tmp, path.join(dir, name));
  }
}

/** The first bytes of a kept index: its magic line and the head it belongs to (64 hex and a newline). */
function keptIndexHeader(head: string): Buffer {
  return Buffer.from(`${INDEX_MAGIC}${head}\n`, 'latin1');
}

/** Ids per bucket of a kept index: a lookup reads one bucket (2 KiB), found by its first id's key. */
const BUCKET_IDS = 64;

/** Reads into buf at pos until it is full or the file ends; returns the bytes read. */
function readUpTo(fd: number, buf: Buffer, pos: number): number {
  let off = 0;
  while (off < buf.length) {
    const n = fs.readSync(fd, buf, off, buf.length - off, pos + off);
    if (n === 0) break;
    off += n;
  }
  return off;
}

/** Reads exactly buf.length bytes at pos; false when the file ends first. */
function readAt(fd: number, buf: Buffer, pos: number): boolean {
  return readUpTo(fd, buf, pos) === buf.length;
}

/** A file of the cache opened for reading, or null if it cannot be (missing: not kept). */
function openForReading(file: string): number | null {
  try {
    return fs.openSync(file, 'r');
  } catch {
    return null;
  }
}

/**
 * The kept index in fd, if it is whole and for head: read once in 1 MiB pieces to check its SHA-256,
 * keeping only the first 6 bytes of every BUCKET_IDS-th id (8 bytes per 64 ids).
 */
function checkKeptIndex(fd: number, head: string): KeptIndex | null {
  const size = fs.fstatSync(fd).size;
  const expected = keptIndexHeader(head);
  const start = expected.length;
  if (size < start + ID_BYTES || (size - start - ID_BYTES) % ID_BYTES !== 0) return null;
  const header = Buffer.alloc(start);
  if (!readAt(fd, header, 0) || !header.equals(expected)) return null;
  const count = (size - start - ID_BYTES) / ID_BYTES;
  const fences = new Float64Array(Math.ceil(count / BUCKET_IDS));
  const hash = createHash('sha256').update(header);
  const piece = Buffer.allocUnsafeSlow(512 * BUCKET_IDS * ID_BYTES);
  try {
    for (let i = 0; i < count; ) {
      const n = Math.min(count - i, piece.length / ID_BYTES);
      const ids = piece.subarray(0, n * ID_BYTES);
      if (!readAt(fd, ids, start + i * ID_BYTES)) return null;
      hash.update(ids);
      for (let k = 0; k < n; k += BUCKET_IDS) fences[(i + k) / BUCKET_IDS] = ids.readUIntBE(k * ID_BYTES, 6);
      i += n;
    }
  } finally {
    release(piece);
  }
  const sum = Buffer.alloc(32);
  if (!readAt(fd, sum, size - 32) || !hash.digest().equals(sum)) return null;
  return new KeptIndex(fd, start, count, fences);
}

/**
 * A kept index searched in its file: the bucket an id would be in is found among the fences in memory
 * and read (2 KiB, from the page cache after the check). A backup asks only about the objects it would
 * upload (new chunks and trees), so a few microseconds per lookup are cheap next to the 32 bytes per
 * object that the index would take in memory. The file may be unlinked meanwhile (dropIndex): the open
 * descriptor keeps it readable.
 */
class KeptIndex implements SortedIds {
  private fd: number;
  private readonly start: number;
  readonly count: number;
  private readonly fences: Float64Array;
  private scratch = Buffer.allocUnsafeSlow(BUCKET_IDS * ID_BYTES);
  constructor(fd: number, start: number, count: number, fences: Float64Array) {
    this.fd = fd;
    this.start = start;
    this.count = count;
    this.fences = fences;
  }
  has(id: Buffer): boolean {
    const key = id.readUIntBE(0, 6);
    const f = this.fences;
    // the last bucket whose first id's key is <= key; earlier ones too while their keys tie with it
    let lo = 0;
    let hi = f.length - 1;
    let last = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (f[mid]! <= key) {
        last = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    if (last < 0) return false;
    let first = last;
    while (first > 0 && f[first] === key) first--;
    const from = first * BUCKET_IDS;
    const n = Math.min(this.count, (last + 1) * BUCKET_IDS) - from;
    if (this.scratch.length < n * ID_BYTES) this.scratch = Buffer.allocUnsafeSlow(n * ID_BYTES);
    const ids = this.scratch.subarray(0, n * ID_BYTES);
    if (this.fd < 0 || !readAt(this.fd, ids, this.start + from * ID_BYTES)) {
      throw new SnapError('io', `The kept index in the cache ended early or was closed; run the backup again with --no-cache`);
    }
    return sortedHas(ids, id);
  }
  dispose(): void {
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }
}
