/**
 * Backup: walk the source, reuse what the previous snapshot already has, split changed files into
 * fixed-size chunks, store only objects current lacks, then commit (I4, I7).
 *
 * Unchanged files (same kind, size, mtime, ctime and inode as in the previous snapshot) are not read;
 * their chunk lists are taken from the previous tree. A directory whose entries all match encodes to
 * the same tree bytes, hence the same id, and is not stored again.
 */
import path from 'node:path';
import {
  type NodeKindCode, type SnapshotRoot, type SnapshotStats, type TreeEntry, type Xattr,
  NO_CHUNKS, NO_XATTRS, NodeKind, TreeBuilder, type TreeView, ZERO_CHUNK, encodeHead, encodeSnapshotRoot, encodeTree,
} from '../core/format.js';
import { ObjectType, objectId, type ObjectTypeCode } from '../core/crypto.js';
import { release } from '../core/memory.js';
import { Writer } from '../core/codec.js';
import { ID_BYTES, IdSet, RefRuns } from '../core/idset.js';
import { SnapError } from '../core/errors.js';
import type { Excluder } from '../core/excluder.js';
import type { Repository } from './repository.js';
import { BufferPool, type FileChunks, type SealPool, isZero } from './seal.js';
import type { SourceFs, SourceStat } from './source.js';
import { type AheadFile, type AsyncSource, ReadAhead, asyncSource, readFullAsync, readFullSync } from './readahead.js';
import { type DirCounts, type EnterRecord, type LeaveRecord, DirRecordsReader, DirRecordsWriter, StatLine } from './dirrecords.js';
import { rng } from './repository.js';
import { type DirectWriterSpec, type IndexBytes, type IndexSource, type SnapshotInfo, type ObjectReader, isIndexSource } from '../storage/types.js';


export const IGNORE_FILE = '.snapcryptignore';
const IGNORE_NAME = Buffer.from(IGNORE_FILE, 'latin1');
const CACHEDIR_TAG = Buffer.from('CACHEDIR.TAG');
const CACHEDIR_SIGNATURE = Buffer.from('Signature: 8a477f597d28d172789f06886806bc55');

export interface BackupProgress {
  filesDone: number;
  bytesDone: number;
  filesTotal: number | null;
  bytesTotal: number | null;
  currentPath: string;
}

export interface BackupOptions {
  readonly paths: readonly string[];
  readonly source: SourceFs;
  readonly excluder?: Excluder;
  readonly host: string;
  readonly user: string;
  readonly tags?: readonly string[];
  readonly onWarning?: (path: string, message: string) => void;
  readonly onProgress?: ((p: BackupProgress) => void) | undefined;
  /** Walk once before the backup to know totals (for an ETA). */
  readonly prescan?: boolean;
  /** Test hook: called at named points of the run (crash tests). */
  readonly onStep?: (step: string) => void;
  /**
   * Maximum bytes of memory held by objects being compressed/encrypted/uploaded at once (default
   * 8 MiB: 16 measured no faster over SSH, and costs its size in RSS).
   */
  readonly inflightBytes?: number;
}

export interface BackupResult {
  readonly snapshot: SnapshotInfo;
  readonly rootId: string;
  readonly root: SnapshotRoot;
}

function newStats(): SnapshotStats {
  return { files: 0, dirs: 0, symlinks: 0, others: 0, bytes: 0, filesRead: 0, bytesRead: 0, objectsAdded: 0, bytesAdded: 0, errors: 0 };
}

const display = (p: Buffer): string => p.toString('utf8');

const MAX_INFLIGHT_OBJECTS = 256;

/**
 * Chunk-sized read buffers kept for reuse when they come back from sealing. Two, like the sealed
 * buffers of seal.ts (SEALED_BUFFERS_KEPT): after a large file, the walk of small files that follows
 * (where a backup peaks) keeps what the pools hold. With four of each, the first backup of the
 * benchmark corpus over SSH peaked at 144.3-160.3 MiB (median 149.7), with two at 140.9-153.0
 * (median 144.3), in the same time (24.5-27.0 s against 25.1-26.5), six runs each, alternating.
 */
const MAX_FREE_READ_BUFFERS = 2;

/** Files are read into buffers of their own size up to this size, into pooled chunk buffers above it. */
const SMALL_READ = 64 * 1024;

/**
 * The buffers files are read into. Reads above SMALL_READ go into chunk-sized buffers that are
 * reused (seal.ts BufferPool): each goes to a seal worker and comes back with its reply. Smaller
 * reads get a buffer of their own size, which is freed (core/memory.ts release) once it comes back: a
 * pool of buffers as large as the largest small file would hold MAX_INFLIGHT_OBJECTS of them.
 * Dropping either kind to the garbage collector instead lets tens of MB pile up per thread.
 */
export class ReadBuffers {
  private readonly chunk: BufferPool;
  constructor(chunkSize: number, inflightBytes: number) {
    // at most 4 free buffers kept (fewer when fewer can be in flight): they come back from sealing in
    // turn, and one per read is taken again soon; 8 (as many as can be in flight) sat unused through
    // most of a backup after a day's changes, once its one large file was read
    this.chunk = new BufferPool(chunkSize, Math.min(MAX_FREE_READ_BUFFERS, Math.ceil(inflightBytes / chunkSize)));
  }

  /** A buffer of exactly `size` bytes (at most the chunk size), a view of a pooled one. */
  take(size: number): Buffer {
    // small ones whole, so that they move to a worker without a copy
    return size <= SMALL_READ ? Buffer.allocUnsafeSlow(size) : this.chunk.take().subarray(0, size);
  }

  /** Takes back a buffer from take() (any view of it) once its bytes are no longer needed. */
  give(view: Uint8Array): void {
    if (this.chunk.owns(view)) this.chunk.give(view);
    else release(view);
  }
}

/** Stores objects that current lacks, with bounded memory in flight. */
class Uploader {
  private inflight = 0;
  private inflightCount = 0;
  private pending = new Set<Promise<void>>();
  private failure: unknown = null;
  private waiters: Array<() => void> = [];
  private readonly repo: Repository;
  private readonly known: IdSet;
  private readonly limit: number;
  private readonly stats: SnapshotStats;
  private readonly step: (s: string) => void;
  readonly pool: SealPool;
  constructor(repo: Repository, pool: SealPool, known: IdSet, limit: number, stats: SnapshotStats, step: (s: string) => void) {
    this.repo = repo;
    this.pool = pool;
    this.known = known;
    this.limit = limit;
    this.stats = stats;
    this.step = step;
  }

  /**
   * Store the object unless current has it; returns once it is queued (not necessarily stored). With
   * reads, plain is in one of its buffers, which goes back to it once plain is no longer needed.
   */
  async store(type: ObjectTypeCode, id: Buffer, plain: Buffer, reads: ReadBuffers | null = null): Promise<void> {
    if (this.failure) {
      reads?.give(plain);
      throw this.failure;
    }
    if (this.known.has(id)) {
      reads?.give(plain);
      return;
    }
    this.known.addNew(id);
    // bounded in bytes and in count. The bytes are those of the memory the object holds (a pooled
    // read buffer is a whole chunk's, and so is the buffer it is sealed into), not its length: else
    // 8 MiB of 100 KB files would hold 80 chunk buffers. Taken now: the buffer may move to a worker.
    const size = plain.buffer.byteLength;
    await this.room(size);
    this.track(size, type, id, this.pool.seal(type, id, plain, reads && ((b) => reads.give(b))));
  }

  /**
   * For a chunk of a file read on a worker (SealPool.readFile): false if current has it or it is
   * queued; else it counts as queued from now on, room is taken for it, and its sealed form must
   * follow (sealed()).
   */
  async admit(id: Buffer, size: number): Promise<boolean> {
    if (this.failure) throw this.failure;
    if (this.known.has(id)) return false;
    this.known.addNew(id);
    await this.room(size);
    return true;
  }

  /** Stores a chunk admitted with admit() once a worker has sealed it. */
  sealed(id: Buffer, size: number, object: Promise<Buffer>): void {
    this.track(size, ObjectType.data, id, object);
  }

  /** Waits until an object of this much memory may be in flight, and counts it as in flight. */
  private async room(size: number): Promise<void> {
    while (this.inflight > 0 && (this.inflight + size > this.limit || this.inflightCount >= MAX_INFLIGHT_OBJECTS)) {
      await new Promise<void>((resolve) => this.waiters.push(resolve));
      if (this.failure) throw this.failure;
    }
    this.inflight += size;
    this.inflightCount++;
  }

  /** Stores an object once sealed (or counts what a worker stored), and gives its room back. */
  private track(size: number, type: ObjectTypeCode, id: Buffer, sealing: Promise<Buffer | number>): void {
    const p = (async () => {
      try {
        const sealed = await sealing;
        this.step(type === ObjectType.data ? 'put-chunk' : 'put-tree');
        const bytes = typeof sealed === 'number' ? sealed : sealed.length;
        if (typeof sealed !== 'number') {
          // a remote target: keep the new trees in the local cache too, so that the next backup
          // compares against them without downloading them (a local target is read cheaply anyway)
          if (type === ObjectType.tree) this.repo.cache?.put(id, sealed);
          await this.repo.storage.putObject(id.toString('hex'), sealed);
          this.pool.stored(sealed); // the storage is done with it (Storage contract): reused
        }
        this.stats.objectsAdded++;
        this.stats.bytesAdded += bytes;
      } catch (err) {
        this.failure ??= err;
      } finally {
        this.inflight -= size;
        this.inflightCount--;
        const w = this.waiters;
        this.waiters = [];
        for (const f of w) f();
      }
    })();
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
  }

  /** The first failure of a store, once there is one (the run then fails with it). */
  get failed(): unknown {
    return this.failure;
  }

  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
    if (this.failure) throw this.failure;
  }
}

interface Walk {
  readonly repo: Repository;
  readonly opts: BackupOptions;
  readonly fs: SourceFs;
  readonly up: Uploader;
  readonly reads: ReadBuffers;
  /** The source's asynchronous calls, when it has them: files are then read ahead (ahead). */
  readonly async: AsyncSource | null;
  readonly ahead: ReadAhead | null;
  readonly known: IdSet;
  readonly refs: RefRuns;
  readonly stats: SnapshotStats;
  readonly prevReader: ObjectReader;
  readonly hardlinks: Map<string, readonly Buffer[]>;
  readonly progress: BackupProgress;
  /**
   * current holds every object the previous snapshot references (known is the index committed with
   * it), so reused chunk lists and tree ids need no lookup.
   */
  readonly prevComplete: boolean;
  lastProgress: number;
  /** The last run's directory records (opened only with the kept index, so only with prevComplete: they describe the parent snapshot). */
  readonly records: DirRecordsReader | null;
  /** This run's directory records. */
  readonly recordsOut: DirRecordsWriter | null;
  /** Stat lines of the directory being compared (one buffer for the walk). */
  readonly line: StatLine;
  /** The stat line of the ENTER record being made (EnterMaker; one buffer for the walk). */
  readonly enterLine: StatLine;
  /** The source's reader for worker threads, when large files are read on the seal workers (forWorker). */
  readonly workerReader: DirectWriterSpec | null;
  /** Files being read on worker threads now. */
  onWorkers: number;
  /** The previous trees of the directories whose tree changed: dropped from the tree cache once committed. */
  readonly replaced: Writer;
}

/** Notes a directory's previous tree as replaced when its new tree differs. */
function noteReplaced(w: Walk, prevId: Buffer | null | undefined, id: Buffer): void {
  if (prevId && !prevId.equals(id)) w.replaced.raw(prevId);
}

/**
 * A result that comes later: a file read on a worker thread, and every directory above it, whose
 * tree waits for it while the walk goes on (section 4 of DESIGN.md). Its rejection is handled where it
 * is awaited; the catch here only keeps it from counting as unhandled meanwhile.
 */
class Later<T> {
  readonly promise: Promise<T>;
  constructor(promise: Promise<T>) {
    this.promise = promise;
    promise.catch(() => {});
  }
}
type Maybe<T> = T | Later<T>;

function settle<T>(x: Maybe<T>): T | Promise<T> {
  return x instanceof Later ? x.promise : x;
}

/** Files of at least this many chunks are read on a seal worker, and at most this many at once. */
const WORKER_FILE_CHUNKS = 8;
const WORKER_FILES = 2;

/**
 * The records of a directory whose tree is not known when their turn comes (it waits for a file read
 * on a worker): an ENTER whose stat line equals none (every entry of a real one takes more than one
 * byte), so that the next backup compares the directory with its previous tree; and a LEAVE that
 * says its tree does not match its ENTER (valid false), so that the next backup builds the tree again
 * if it takes the directory's ENTER. Both cost the next backup a tree or two, not a file read.
 */
const NEVER_MATCHES = Buffer.from([0xff]);
const NO_COUNTS: DirCounts = { files: 0, bytes: 0, symlinks: 0, others: 0 };

/** Whether a file of this size is read on a worker thread when it must be read (and one is free). */
function forWorker(w: Walk, st: SourceStat): boolean {
  return w.workerReader !== null && st.nlink === 1 && st.size >= WORKER_FILE_CHUNKS * w.repo.chunkSize;
}

function joinPath(dir: Buffer, name: Buffer): Buffer {
  const at = dir.length === 1 && dir[0] === 0x2f ? 1 : dir.length + 1; // "/" + name, else dir + "/" + name
  const out = Buffer.allocUnsafe(at + name.length);
  dir.copy(out, 0);
  out[at - 1] = 0x2f;
  name.copy(out, at);
  return out;
}

/**
 * Paths of one directory's entries written into one reused buffer, for calls that do not keep them
 * (the lstat of every entry before any is backed up): no allocation per entry.
 */
class ScratchPaths {
  private buf: Buffer;
  private readonly at: number;
  constructor(dir: Buffer) {
    this.at = dir.length === 1 && dir[0] === 0x2f ? 1 : dir.length + 1;
    this.buf = Buffer.allocUnsafe(this.at + 256);
    dir.copy(this.buf, 0);
    this.buf[this.at - 1] = 0x2f;
  }
  /** dir/name, valid until the next call. */
  path(name: Buffer): Buffer {
    if (this.at + name.length > this.buf.length) {
      const grown = Buffer.allocUnsafe(this.at + name.length);
      this.buf.copy(grown, 0, 0, this.at);
      this.buf = grown;
    }
    name.copy(this.buf, this.at);
    return this.buf.subarray(0, this.at + name.length);
  }
}

function relOf(p: Buffer): string {
  return p.toString('latin1').replace(/^\/+/, '');
}

/** A file's chunks as references of the new snapshot (zero chunks are none: not stored). */
function pushChunkRefs(w: Walk, chunks: readonly Buffer[]): void {
  for (const c of chunks) if (!c.equals(ZERO_CHUNK)) w.refs.push(c);
}

/**
 * An entry that could not be backed up is a warning; a SnapError (a storage failure, say), or the
 * failure of a store whatever its type, stops the run.
 */
function warnUnlessFatal(w: Walk, p: Buffer, err: unknown): void {
  if (err instanceof SnapError || (err !== null && err === w.up.failed)) throw err;
  warn(w, p, err);
}

function warn(w: Walk, p: Buffer, err: unknown): void {
  w.stats.errors++;
  const msg = err instanceof Error ? ((err as NodeJS.ErrnoException).code ?? err.message) : String(err);
  w.opts.onWarning?.(display(p), msg);
}

function tick(w: Walk, p: Buffer): void {
  if (!w.opts.onProgress) return;
  const now = Date.now();
  if (now - w.lastProgress < 200) return;
  w.lastProgress = now;
  w.progress.currentPath = display(p);
  w.opts.onProgress({ ...w.progress });
}

function sameFile(st: SourceStat, prev: TreeEntry | undefined): prev is TreeEntry {
  return (
    prev !== undefined &&
    prev.kind === NodeKind.file &&
    prev.size === st.size &&
    prev.mtimeNs === st.mtimeNs &&
    prev.ctimeNs === st.ctimeNs &&
    prev.inode === st.ino
  );
}

/** Copies of ids in one buffer of their own (views of Node's shared pool would keep all of it alive). */
function ownedIds(ids: readonly Buffer[]): Buffer[] {
  const all = Buffer.allocUnsafeSlow(ids.length * 32);
  return ids.map((id, i) => {
    const c = all.subarray(i * 32, i * 32 + 32);
    id.copy(c);
    return c;
  });
}

/** Read exactly `want` bytes at pos, or fewer at end of file. */
function readFull(w: Walk, fd: number, buf: Buffer, pos: number): number {
  return readFullSync((f, b, p) => w.fs.read(f, b, p), fd, buf, pos);
}

/**
 * A symlink's target cannot be changed in place (a new target is a new symlink, a new inode): with the
 * inode, ctime, mtime and length (lstat's size) of the previous entry, it has the previous target,
 * which is taken without a readlink.
 */
function sameSymlink(st: SourceStat, prev: TreeEntry | undefined): prev is TreeEntry & { readonly target: Buffer } {
  return (
    prev !== undefined && prev.kind === NodeKind.symlink && st.kind === NodeKind.symlink && prev.inode === st.ino &&
    prev.ctimeNs === st.ctimeNs && prev.mtimeNs === st.mtimeNs && prev.target !== null && prev.target.length === st.size
  );
}

/**
 * Whether an entry whose contents are its previous entry's (reusable, sameSymlink) is that entry
 * itself: the same xattrs (the previous list, sameXattrs), mode, owner and link count.
 */
function sameOwnMeta(st: SourceStat, xattrs: readonly Xattr[], prev: TreeEntry): boolean {
  return xattrs === prev.xattrs && (st.mode & 0o7777) === prev.mode && st.uid === prev.uid && st.gid === prev.gid && st.nlink === prev.nlink;
}

/** Whether a file's previous chunk list can be taken as it is (the file is not read). */
function reusable(w: Walk, st: SourceStat, prev: TreeEntry | undefined): prev is TreeEntry {
  return sameFile(st, prev) && (w.prevComplete || prev.chunks.every((c) => c.equals(ZERO_CHUNK) || w.known.has(c)));
}

/** Whether the walk asks for a file ahead: one it will read, and not a hard link (read once, by its first name). */
function readsAhead(w: Walk, st: SourceStat, prev: TreeEntry | undefined): boolean {
  return st.kind === NodeKind.file && st.size > 0 && st.nlink === 1 && !forWorker(w, st) && !reusable(w, st, prev);
}

/**
 * Reads a file in chunks, stores the ones current lacks, returns its chunk list. The first chunk may
 * have been read ahead (ahead); with an asynchronous source, each next chunk of a large file is read
 * while the one before is hashed and stored.
 */
async function readFileChunks(w: Walk, p: Buffer, st: SourceStat, ahead: AheadFile | null): Promise<{ chunks: Buffer[]; size: number }> {
  const cs = w.repo.chunkSize;
  const chunks: Buffer[] = [];
  let pos = 0;
  if (st.size === 0) {
    w.stats.filesRead++;
    return { chunks, size: 0 };
  }
  // a read in flight: its buffer, the bytes it asked for, and the promise of the bytes it got
  let next: { data: Buffer; want: number; n: Promise<number> } | null = null;
  let fd: number;
  if (ahead !== null) {
    const first = await w.ahead!.take(ahead);
    fd = first.fd;
    next = { data: first.data, want: ahead.want, n: Promise.resolve(first.n) };
  } else {
    fd = w.fs.open(p);
  }
  try {
    for (;;) {
      // buffers sized by what lstat said is left, so small files do not pin a whole chunk each
      let want = Math.min(cs, Math.max(st.size - pos, 0));
      if (want === 0) {
        // lstat's size is reached: go on only if the file grew since (a one-byte probe, no chunk buffer)
        if (readFull(w, fd, PROBE, pos) === 0) break;
        want = cs;
      }
      let data: Buffer;
      let n: number;
      if (next !== null && next.want === want) {
        data = next.data;
        const got = next.n;
        next = null;
        n = await got;
      } else {
        data = w.reads.take(want);
        n = w.async ? await readFullAsync(w.async, fd, data, pos) : readFull(w, fd, data, pos);
      }
      let pooled = true; // data is from w.reads (and goes back to it)
      if (n === want && want < cs && readFull(w, fd, PROBE, pos + n) > 0) {
        // the file grew since lstat: a short chunk is only allowed at the end
        const more = Buffer.allocUnsafeSlow(cs - want);
        const m = readFull(w, fd, more, pos + n);
        if (m > 0) {
          const grown = Buffer.concat([data, more.subarray(0, m)]);
          w.reads.give(data);
          data = grown;
          pooled = false;
          n += m;
        }
      }
      if (n === 0) {
        if (pooled) w.reads.give(data);
        break;
      }
      if (n < data.length) data = data.subarray(0, n);
      pos += n;
      w.progress.bytesDone += n;
      // the next chunk is read while this one is hashed and stored
      const after = Math.min(cs, st.size - pos);
      if (n === cs && after > 0 && w.async) {
        const buf = w.reads.take(after);
        const got = readFullAsync(w.async, fd, buf, pos);
        got.catch(() => {}); // handled where it is awaited; not an unhandled rejection meanwhile
        next = { data: buf, want: after, n: got };
      }
      if (isZero(data)) {
        chunks.push(ZERO_CHUNK);
        if (pooled) w.reads.give(data);
      } else {
        // a copy in Node's shared pool: the digest has an ArrayBuffer of its own (about 200 bytes more
        // per id, held in the directory's entries until its tree is built)
        const id = Buffer.from(objectId(w.repo.keys, ObjectType.data, data));
        chunks.push(id);
        w.refs.push(id);
        await w.up.store(ObjectType.data, id, data, pooled ? w.reads : null);
      }
      if (n < cs) break;
    }
  } finally {
    if (next !== null) {
      // a read still in flight must end before its descriptor is closed (the number could be reused)
      await next.n.catch(() => 0);
      w.reads.give(next.data);
    }
    w.fs.close(fd);
  }
  w.stats.filesRead++;
  w.stats.bytesRead += pos;
  // a copy of exactly its length: push() made room for 17 ids (150 bytes more per file held in the
  // directory's entries)
  return { chunks: chunks.slice(), size: pos };
}

/**
 * Reads a large file on a seal worker (SealPool.readFile) while the walk goes on: the worker hashes
 * its chunks and seals the ones current lacks; the main thread only answers which those are and stores
 * them. A chunk whose id is the previous version's at the same place (and current has it) needs no
 * question at all: after the benchmark's mutation, 5 of the disk image's 1,024 chunks are asked about.
 */
async function readFileOnWorker(w: Walk, p: Buffer, st: SourceStat, prev: TreeEntry | undefined): Promise<FileChunks> {
  const fd = w.fs.open(p);
  w.onWorkers++;
  try {
    const old = prev?.kind === NodeKind.file ? prev.chunks : NO_CHUNKS;
    const before = Buffer.alloc(old.length * ID_BYTES); // zeros where there is nothing to compare with
    old.forEach((c, k) => {
      if (!c.equals(ZERO_CHUNK) && (w.prevComplete || w.known.has(c))) c.copy(before, k * ID_BYTES);
    });
    const cs = w.repo.chunkSize;
    const r = await w.up.pool.readFile(fd, w.workerReader!, before, {
      admit: (id) => {
        w.refs.push(id);
        return w.up.admit(id, cs);
      },
      sealed: (id, object) => w.up.sealed(id, cs, object),
    });
    pushChunkRefs(w, r.chunks);
    w.stats.filesRead++;
    w.stats.bytesRead += r.size;
    w.progress.bytesDone += r.size;
    return r;
  } catch (err) {
    // a store failed meanwhile (the worker was cancelled): the run fails with that, and this file is
    // no warning of its own
    throw w.up.failed ?? err;
  } finally {
    w.onWorkers--;
    w.fs.close(fd); // (the worker is done with it: the read settled only then)
  }
}

/** Reads past lstat's size, to see whether a file grew (read synchronously, so one buffer serves all). */
const PROBE = Buffer.alloc(1);

function kindOf(st: SourceStat): NodeKindCode {
  return st.kind;
}

/** Extended attributes change ctime: when kind, ctime and inode are the previous ones, so are the xattrs. */
function sameXattrs(st: SourceStat, prev: TreeEntry | undefined): prev is TreeEntry {
  return prev !== undefined && prev.kind === st.kind && prev.ctimeNs === st.ctimeNs && prev.inode === st.ino;
}

/** The xattrs of p, or null when they are prev's (sameXattrs). */
function requestXattrs(w: Walk, p: Buffer, st: SourceStat, prev: TreeEntry | undefined): Promise<Xattr[]> | null {
  if (sameXattrs(st, prev)) return null;
  return w.fs.xattrs(p).catch((err: unknown) => {
    warn(w, p, err);
    return [];
  });
}

/**
 * A tree entry from an lstat result. One object literal with every field, in the order decodeTree
 * writes them: every entry has the same shape, with its fields inside the object (spreading a partial
 * entry and adding fields put some into a separate property array).
 */
function entryOf(
  name: Buffer, st: SourceStat, xattrs: readonly Xattr[], size: number, chunks: readonly Buffer[], subtree: Buffer | null, target: Buffer | null,
): TreeEntry {
  return {
    kind: st.kind, name, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs, inode: st.ino,
    nlink: st.nlink, xattrs: xattrs.length === 0 ? NO_XATTRS : xattrs, size, chunks, subtree, target,
    rdev: st.kind === NodeKind.file || st.kind === NodeKind.dir || st.kind === NodeKind.symlink ? 0 : st.rdev,
  };
}

/** Back up one file system object; returns its tree entry, or null if it was skipped. */
async function backupNode(
  w: Walk, p: Buffer, name: Buffer, st: SourceStat, prev: TreeEntry | undefined, xattrsP: Promise<Xattr[]> | null, ahead: AheadFile | null, attached: boolean,
): Promise<Maybe<TreeEntry | null>> {
  const kind = kindOf(st);
  const xattrs: readonly Xattr[] = xattrsP === null ? (prev?.xattrs ?? []) : await xattrsP;
  switch (kind) {
    case NodeKind.file: {
      w.stats.files++;
      w.progress.filesDone++;
      tick(w, p);
      // (a file asked for ahead is read: it was not reusable then, and reading it is right anyway)
      if (ahead === null && reusable(w, st, prev)) {
        pushChunkRefs(w, prev.chunks);
        w.stats.bytes += prev.size;
        w.progress.bytesDone += prev.size;
        // the common case, nothing at all changed: the previous entry itself (no new object)
        if (sameOwnMeta(st, xattrs, prev)) return prev;
        return entryOf(name, st, xattrs, prev.size, prev.chunks, null, null);
      }
      const hkey = st.nlink > 1 ? `${st.dev}:${st.ino}` : null;
      const linked = hkey ? w.hardlinks.get(hkey) : undefined;
      if (linked) {
        pushChunkRefs(w, linked);
        w.stats.bytes += st.size;
        return entryOf(name, st, xattrs, st.size, linked, null, null);
      }
      if (ahead === null && w.onWorkers < WORKER_FILES && forWorker(w, st)) {
        return new Later(
          readFileOnWorker(w, p, st, prev).then(({ chunks, size }) => {
            w.stats.bytes += size;
            return entryOf(name, st, xattrs, size, chunks, null, null);
          }),
        );
      }
      const { chunks, size } = await readFileChunks(w, p, st, ahead);
      // kept for the whole run: in memory of their own, not pinning a pool that other ids lie in
      if (hkey) w.hardlinks.set(hkey, ownedIds(chunks));
      w.stats.bytes += size;
      return entryOf(name, st, xattrs, size, chunks, null, null);
    }
    case NodeKind.dir: {
      w.stats.dirs++;
      const r = await backupDir(w, p, new PrevDir(w, null, null, prev?.kind === NodeKind.dir ? prev.subtree : null), attached);
      if (r instanceof Later) return new Later(r.promise.then((d) => entryOf(name, st, xattrs, 0, NO_CHUNKS, d.id, null)));
      return entryOf(name, st, xattrs, 0, NO_CHUNKS, r.id, null);
    }
    case NodeKind.symlink: {
      w.stats.symlinks++;
      if (sameSymlink(st, prev)) {
        if (sameOwnMeta(st, xattrs, prev)) return prev;
        return entryOf(name, st, xattrs, 0, NO_CHUNKS, null, prev.target);
      }
      return entryOf(name, st, xattrs, 0, NO_CHUNKS, null, w.fs.readlink(p));
    }
    default:
      w.stats.others++;
      return entryOf(name, st, xattrs, 0, NO_CHUNKS, null, null);
  }
}

async function loadPrevTree(w: Walk, id: Buffer): Promise<TreeView | null> {
  try {
    return await w.repo.loadTreeView(w.prevReader, id);
  } catch (err) {
    if (err instanceof SnapError && err.code === 'integrity') return null; // read it all again
    throw err;
  }
}

function readSmallFile(fs: SourceFs, p: Buffer, max: number): Buffer | null {
  let fd: number;
  try {
    fd = fs.open(p);
  } catch {
    return null;
  }
  try {
    const buf = Buffer.alloc(max);
    const n = fs.read(fd, buf, 0);
    return buf.subarray(0, n);
  } finally {
    fs.close(fd);
  }
}

/** An entry of the directory being backed up, from its lstat until it is backed up. */
interface Item {
  readonly name: Buffer;
  readonly st: SourceStat;
  /** Its entry in the previous tree (an index of the TreeView), or -1. */
  prevAt: number;
  /** That entry, decoded when it enters the window of XATTRS_AHEAD entries. */
  prev: TreeEntry | undefined;
  /** Its path, from when it enters the window of XATTRS_AHEAD entries. */
  child: Buffer | null;
  xattrs: Promise<Xattr[]> | null;
  /** The file's first chunk, asked for ahead (ReadAhead). */
  ahead: AheadFile | null;
}

/** How many entries ahead of the one being backed up have their xattrs requested. */
const XATTRS_AHEAD = 256;

/**
 * A directory renamed within its parent (same inode, new name, the old name gone) is compared with its
 * old tree, so that the files below it are not read again: they still have to match that tree exactly
 * (size, mtime, ctime, inode). Only its own entry differs (name, ctime). matched[i] is 1 for the
 * entries of prevTree whose name still holds the same inode.
 */
function pairRenamedDirs(items: Item[], prevTree: TreeView, matched: Uint8Array): void {
  let byInode: Map<number, number> | null = null;
  for (const it of items) {
    if (it.prevAt >= 0 || it.st.kind !== NodeKind.dir) continue;
    if (byInode === null) {
      byInode = new Map();
      for (let k = 0; k < prevTree.length; k++) if (matched[k] === 0 && prevTree.kind(k) === NodeKind.dir) byInode.set(prevTree.inode(k), k);
    }
    const old = byInode.get(it.st.ino);
    if (old === undefined) continue;
    byInode.delete(it.st.ino);
    it.prevAt = old;
  }
}

/**
 * What the walk knows of a directory's previous tree: its id (from its parent's previous tree, from
 * the previous snapshot's root, or found lazily in the parent's previous tree when the parent was
 * matched by its record and its tree never loaded) and the tree itself, loaded on first use.
 */
class PrevDir {
  private readonly w: Walk;
  private readonly parent: PrevDir | null;
  private readonly name: Buffer | null;
  private known: Buffer | null | undefined;
  private loaded: TreeView | null | undefined;
  constructor(w: Walk, parent: PrevDir | null, name: Buffer | null, id: Buffer | null | undefined, tree?: TreeView | null) {
    this.w = w;
    this.parent = parent;
    this.name = name;
    this.known = id;
    this.loaded = tree;
  }
  async id(): Promise<Buffer | null> {
    if (this.known === undefined) {
      const pt = this.parent ? await this.parent.tree() : null;
      const k = pt ? pt.find(this.name!) : -1;
      this.known = k >= 0 && pt!.kind(k) === NodeKind.dir ? pt!.entry(k).subtree : null;
    }
    return this.known;
  }
  async tree(): Promise<TreeView | null> {
    if (this.loaded === undefined) {
      const id = await this.id();
      this.loaded = id ? await loadPrevTree(this.w, id) : null;
    }
    return this.loaded;
  }
}

/** A directory's tree id, and whether it is its previous tree's id. */
interface DirResult {
  readonly id: Buffer;
  readonly same: boolean;
}

/**
 * Back up the contents of directory p (whose previous tree prev describes). attached: the last run's
 * records are read at this directory's place (its parent's record was found, or it is a backup path).
 */
async function backupDir(w: Walk, p: Buffer, prev: PrevDir, attached: boolean): Promise<Maybe<DirResult>> {
  let names: Buffer[];
  try {
    names = w.fs.readdir(p);
  } catch (err) {
    warn(w, p, err);
    names = [];
  }
  names.sort(Buffer.compare);
  const rel = relOf(p);

  // CACHEDIR.TAG: keep only the tag itself (as tar --exclude-caches-under does)
  if (names.some((n) => n.equals(CACHEDIR_TAG))) {
    const head = readSmallFile(w.fs, joinPath(p, CACHEDIR_TAG), CACHEDIR_SIGNATURE.length);
    if (head?.equals(CACHEDIR_SIGNATURE)) names = [CACHEDIR_TAG];
  }
  let ignoreText: string | null = null;
  if (w.opts.excluder && names.some((n) => n.equals(IGNORE_NAME))) {
    ignoreText = readSmallFile(w.fs, joinPath(p, IGNORE_NAME), 1 << 20)?.toString('latin1') ?? null;
  }
  const excluder = w.opts.excluder;
  excluder?.enter(rel, ignoreText);
  try {
    const filtering = excluder?.active === true;
    // First stat every entry, then back them up (asking for the xattrs of changed ones a little ahead).
    const items: Item[] = [];
    const scratch = new ScratchPaths(p);
    for (const name of names) {
      const child = scratch.path(name); // not kept: joinPath makes it when the entry's turn comes near
      let st: SourceStat;
      try {
        st = w.fs.lstat(child);
      } catch (err) {
        warn(w, child, err);
        continue;
      }
      if (filtering && excluder!.isExcluded(relOf(child), st.kind === NodeKind.dir)) continue;
      items.push({ name, st, prevAt: -1, prev: undefined, child: null, xattrs: null, ahead: null });
    }
    const rec = attached && w.records !== null ? w.records.enter(p) : null;
    if (rec !== null) {
      w.line.reset();
      for (const it of items) w.line.addStat(it.name, it.st);
      if (w.line.view().equals(rec.line)) return await unchangedDir(w, p, items, prev, rec);
    }
    return await changedDir(w, p, items, prev, rec !== null);
  } finally {
    excluder?.leave();
  }
}

/** Whether a tree entry has the metadata an lstat result gives (what a stat line holds). */
function sameStat(e: TreeEntry, st: SourceStat): boolean {
  return (
    e.kind === st.kind && e.mode === (st.mode & 0o7777) && e.uid === st.uid && e.gid === st.gid && e.mtimeNs === st.mtimeNs &&
    e.ctimeNs === st.ctimeNs && e.inode === st.ino && e.nlink === st.nlink && (e.kind !== NodeKind.file || e.size === st.size) &&
    (e.kind !== NodeKind.chardev && e.kind !== NodeKind.blockdev || e.rdev === st.rdev)
  );
}

/** Adds a reused non-directory entry to the references and stats (as backupNode does). */
function reuseEntry(w: Walk, e: TreeEntry): void {
  switch (e.kind) {
    case NodeKind.file:
      pushChunkRefs(w, e.chunks);
      addCounts(w, { files: 1, bytes: e.size, symlinks: 0, others: 0 });
      break;
    case NodeKind.symlink:
      w.stats.symlinks++;
      break;
    default:
      w.stats.others++;
  }
}

function addCounts(w: Walk, c: DirCounts): void {
  w.stats.files += c.files;
  w.stats.bytes += c.bytes;
  w.stats.symlinks += c.symlinks;
  w.stats.others += c.others;
  w.progress.filesDone += c.files;
  w.progress.bytesDone += c.bytes;
}

/**
 * A directory whose entries all have the metadata its record lists: its files are not looked at
 * (their chunk ids are the record's), its subdirectories are walked, and if each of them has its
 * previous tree, so has this one (the id in the record's LEAVE). Else its tree is built from the
 * previous tree's entries and the subdirectories' new ids.
 */
async function unchangedDir(w: Walk, p: Buffer, items: Item[], prev: PrevDir, rec: EnterRecord): Promise<Maybe<DirResult>> {
  w.recordsOut?.enterCopy(rec);
  // (rec is a view of the reader's block, which the next record overwrites; the copy is freed below)
  const ids = rec.ids.length > 0 ? Buffer.allocUnsafeSlow(rec.ids.length) : null;
  ids?.set(rec.ids);
  const counts: DirCounts = { files: rec.files, bytes: rec.bytes, symlinks: rec.symlinks, others: rec.others };
  const subs: Maybe<DirResult | null>[] = new Array<Maybe<DirResult | null>>(items.length).fill(null);
  for (let i = 0; i < items.length; i++) {
    const it = items[i]!;
    if (it.st.kind !== NodeKind.dir) continue;
    w.stats.dirs++;
    const child = joinPath(p, it.name);
    try {
      subs[i] = guarded(w, child, await backupDir(w, child, new PrevDir(w, prev, it.name, undefined), true));
    } catch (err) {
      warnUnlessFatal(w, child, err);
    }
  }
  const left = w.records!.leave();
  if (!subs.some((s) => s instanceof Later)) return unchangedTail(w, p, items, prev, ids, counts, subs as (DirResult | null)[], left, true);
  // a file below is read on a worker: the tree comes later, and the LEAVE record says it is not known
  w.recordsOut?.leave(false, ZERO_CHUNK);
  const leave = left && { valid: left.valid, id: Buffer.from(left.id) }; // (a view of the reader's block)
  return new Later((async () => unchangedTail(w, p, items, prev, ids, counts, await Promise.all(subs.map(settle)), leave, false))());
}

/** The rest of unchangedDir, once its subdirectories' trees are known. */
async function unchangedTail(
  w: Walk, p: Buffer, items: Item[], prev: PrevDir, ids: Buffer | null, counts: DirCounts, subs: (DirResult | null)[], leave: LeaveRecord | null,
  record: boolean,
): Promise<DirResult> {
  const allSame = items.every((it, i) => it.st.kind !== NodeKind.dir || subs[i]?.same === true);
  if (allSame && leave?.valid === true && (w.prevComplete || w.known.has(leave.id))) {
    if (ids !== null) {
      w.refs.pushAll(ids);
      release(ids);
    }
    addCounts(w, counts);
    tick(w, p);
    w.refs.push(leave.id);
    if (record) w.recordsOut?.leave(true, leave.id);
    return { id: leave.id, same: true };
  }
  // something below changed: this tree is the previous one's entries with the new subtree ids
  if (ids !== null) release(ids);
  const prevTree = await prev.tree();
  const tree = new TreeBuilder();
  let valid = true;
  for (let i = 0; i < items.length; i++) {
    const it = items[i]!;
    const k = prevTree ? prevTree.find(it.name) : -1;
    const e = k >= 0 ? prevTree!.entry(k) : undefined;
    if (it.st.kind === NodeKind.dir) {
      const sub = subs[i];
      if (!sub) {
        valid = false;
        continue;
      }
      const xattrs = (await requestXattrs(w, joinPath(p, it.name), it.st, e)) ?? e!.xattrs;
      tree.add(entryOf(it.name, it.st, xattrs, 0, NO_CHUNKS, sub.id, null));
    } else if (e !== undefined && sameStat(e, it.st) && (e.kind !== NodeKind.file || reusable(w, it.st, e))) {
      reuseEntry(w, e);
      tree.addRaw(prevTree!, k);
    } else {
      // the previous tree disagrees with the record (not written by this program): back it up
      valid = false;
      const child = joinPath(p, it.name);
      try {
        const n = await settle(await backupNode(w, child, it.name, it.st, e, requestXattrs(w, child, it.st, e), null, false));
        if (n) tree.add(n);
      } catch (err) {
        warnUnlessFatal(w, child, err);
      }
    }
  }
  const id = await storeTreeBytes(w, tree.finish());
  if (record) w.recordsOut?.leave(valid, id);
  const prevId = await prev.id();
  noteReplaced(w, prevId, id);
  return { id, same: prevId?.equals(id) === true };
}

/**
 * A result as it is, or, if it comes later, one whose failure becomes a warning (null) unless it is
 * fatal, as for the entries backed up now.
 */
function guarded<T>(w: Walk, p: Buffer, r: Maybe<T>): Maybe<T | null> {
  if (!(r instanceof Later)) return r;
  return new Later(
    r.promise.catch((err: unknown) => {
      warnUnlessFatal(w, p, err);
      return null;
    }),
  );
}

/**
 * A directory with changed, new or missing entries (or no record): compared with its previous tree.
 * Its previous entries are decoded one at a time, as their turn comes near, and the new tree is
 * encoded as the entries are backed up (an unchanged one copied from the previous tree's bytes): a
 * directory of 17,849 files held about 450 bytes of objects per entry for each of the two trees.
 */
async function changedDir(w: Walk, p: Buffer, items: Item[], prev: PrevDir, attached: boolean): Promise<Maybe<DirResult>> {
  const prevTree = await prev.tree();
  const prevId = prevTree ? await prev.id() : null;
  // names and prevTree are both sorted by name bytes: their entries are paired by one merge
  if (prevTree) {
    let k = 0;
    const matched = new Uint8Array(prevTree.length);
    for (const it of items) {
      while (k < prevTree.length && prevTree.compareName(k, it.name) < 0) k++;
      if (k < prevTree.length && prevTree.compareName(k, it.name) === 0) {
        it.prevAt = k;
        if (prevTree.inode(k) === it.st.ino) matched[k] = 1; // else the name went to another object, and the old one may be renamed
        k++;
      }
    }
    pairRenamedDirs(items, prevTree, matched);
  }
  // Everything but directories first, then the directories: the files read ahead for this directory
  // are all taken before the walk goes down into a subdirectory (which asks for its own).
  const order = new Uint32Array(items.length);
  let o = 0;
  for (let i = 0; i < items.length; i++) if (items[i]!.st.kind !== NodeKind.dir) order[o++] = i;
  const firstDir = o;
  for (let i = 0; i < items.length; i++) if (items[i]!.st.kind === NodeKind.dir) order[o++] = i;
  // An item is dropped once backed up (its stat, path, xattrs request and read ahead): a directory
  // of 17,916 files held them all until its tree was built
  const pending: (Item | null)[] = items;
  const tree = new TreeBuilder();
  const later: { readonly entry: Later<TreeEntry | null>; readonly dir: boolean }[] = [];
  const enter = w.recordsOut !== null ? new EnterMaker(w.enterLine, pending) : null;
  let valid = true; // (a file that failed is not in the stat line; a directory is)
  let asked = 0;
  try {
    for (let j = 0; j < order.length; j++) {
      if (j === firstDir) enter?.write(w.recordsOut!, p);
      // xattrs (pipelined through the helper) and files' first chunks are asked for XATTRS_AHEAD
      // entries ahead, not for the whole directory at once: 17,916 pending xattr requests held
      // about 20 MB in one directory of the corpus
      for (; asked < Math.min(order.length, j + XATTRS_AHEAD); asked++) {
        const next = pending[order[asked]!]!;
        if (next.prevAt >= 0) next.prev = prevTree!.entry(next.prevAt);
        const child = joinPath(p, next.name);
        next.child = child;
        next.xattrs = requestXattrs(w, child, next.st, next.prev);
        if (w.ahead !== null && readsAhead(w, next.st, next.prev)) next.ahead = w.ahead.request(child, Math.min(w.repo.chunkSize, next.st.size));
      }
      const i = order[j]!;
      const it = pending[i]!;
      let r: Maybe<TreeEntry | null> = null;
      try {
        r = guarded(w, it.child!, await backupNode(w, it.child!, it.name, it.st, it.prev, it.xattrs, it.ahead, attached));
      } catch (err) {
        warnUnlessFatal(w, it.child!, err);
        if (it.ahead !== null) await w.ahead!.drop(it.ahead); // (taken already, unless the error came first)
      }
      if (j < firstDir) enter?.entry(i, r);
      const dir = it.st.kind === NodeKind.dir;
      if (r instanceof Later) later.push({ entry: r, dir });
      else if (r === null) valid &&= !dir;
      else if (r === it.prev && prevTree!.compareName(it.prevAt, r.name) === 0) tree.addRaw(prevTree!, it.prevAt); // (nothing changed)
      else tree.add(r);
      pending[i] = null;
    }
    if (firstDir === order.length) enter?.write(w.recordsOut!, p);
  } finally {
    // files asked for and not taken (an error ended the walk): closed, their buffers given back
    for (let j = 0; j < asked; j++) {
      const a = pending[order[j]!]?.ahead;
      if (a) await w.ahead!.drop(a);
    }
  }
  if (attached && w.records !== null) w.records.leave(); // past this directory's records
  if (later.length === 0) return changedTail(w, tree, valid, prevTree, prevId, true);
  // a file here or below is read on a worker: the tree comes later, and the LEAVE record says it is not known
  w.recordsOut?.leave(false, ZERO_CHUNK);
  return new Later(
    (async () => {
      for (const l of later) {
        const e = await l.entry.promise;
        if (e !== null) tree.add(e);
        else valid &&= !l.dir;
      }
      return changedTail(w, tree, valid, prevTree, prevId, false);
    })(),
  );
}

/** The rest of changedDir, once its entries are known: its tree and its LEAVE record. */
async function changedTail(
  w: Walk, tree: TreeBuilder, valid: boolean, prevTree: TreeView | null, prevId: Buffer | null, record: boolean,
): Promise<DirResult> {
  const plain = tree.finish();
  let id: Buffer;
  // Nothing changed in this directory: its tree has the previous bytes, so it has the same id (no
  // hashing or upload)
  if (prevId !== null && prevTree !== null && plain.equals(prevTree.bytes) && (w.prevComplete || w.known.has(prevId))) {
    w.refs.push(prevId);
    id = prevId;
  } else {
    id = await storeTreeBytes(w, plain);
  }
  if (record) w.recordsOut?.leave(valid, id);
  noteReplaced(w, prevId, id);
  return { id, same: prevId !== null && id.equals(prevId) };
}

/**
 * This run's ENTER record of a directory (changedDir), made as its non-directory entries are backed
 * up, in the order of the names: the stat line of its tree's entries (the directories' from their
 * lstat results, as entryOf makes their entries), its files' chunk ids and its counts.
 */
class EnterMaker {
  private readonly line: StatLine;
  private readonly items: readonly (Item | null)[];
  /** The items before this one are in the line. */
  private next = 0;
  private readonly ids = new Writer(ID_BYTES * 64);
  private readonly counts: DirCounts = { files: 0, bytes: 0, symlinks: 0, others: 0 };
  /** A file read on a worker: its entry is not known yet. */
  private unknown = false;

  constructor(line: StatLine, items: readonly (Item | null)[]) {
    this.line = line;
    this.items = items;
    line.reset();
  }

  /** Item i's entry (null: skipped), after the directories before it (still pending). */
  entry(i: number, e: Maybe<TreeEntry | null>): void {
    this.dirsBefore(i);
    this.next = i + 1;
    if (e instanceof Later) this.unknown = true;
    if (e === null || e instanceof Later || this.unknown) return;
    this.line.addEntry(e);
    if (e.kind === NodeKind.file) {
      this.counts.files++;
      this.counts.bytes += e.size;
      for (const c of e.chunks) if (!c.equals(ZERO_CHUNK)) this.ids.raw(c);
    } else if (e.kind === NodeKind.symlink) this.counts.symlinks++;
    else this.counts.others++;
  }

  write(out: DirRecordsWriter, p: Buffer): void {
    this.dirsBefore(this.items.length);
    if (this.unknown) out.enter(p, NEVER_MATCHES, EMPTY, NO_COUNTS);
    else out.enter(p, this.line.view(), this.ids.finish(), this.counts);
  }

  private dirsBefore(end: number): void {
    for (; this.next < end; this.next++) {
      const it = this.items[this.next];
      if (it && it.st.kind === NodeKind.dir) this.line.addStat(it.name, it.st);
    }
  }

}
const EMPTY = Buffer.alloc(0);

function storeTree(w: Walk, entries: TreeEntry[]): Promise<Buffer> {
  return storeTreeBytes(w, encodeTree(entries));
}

async function storeTreeBytes(w: Walk, plain: Buffer): Promise<Buffer> {
  const id = objectId(w.repo.keys, ObjectType.tree, plain);
  w.refs.push(id);
  await w.up.store(ObjectType.tree, id, plain);
  return id;
}

/** A node of the tree of backup paths: /home/a/docs and /etc give / -> home -> a -> docs, / -> etc. */
interface PathNode {
  readonly children: Map<string, PathNode>;
  target: boolean;
}

function buildPathTree(paths: readonly Buffer[]): PathNode {
  const root: PathNode = { children: new Map(), target: false };
  for (const p of paths) {
    let node = root;
    for (const part of p.toString('latin1').split('/').filter((s) => s.length > 0)) {
      let next = node.children.get(part);
      if (!next) {
        next = { children: new Map(), target: false };
        node.children.set(part, next);
      }
      node = next;
    }
    node.target = true;
  }
  return root;
}

/** Build the virtual directories above the backed-up paths, with the real directories' metadata. */
async function backupAncestors(w: Walk, p: Buffer, node: PathNode, prevTree: TreeView | null): Promise<Buffer> {
  // (a backup path's entry may come later: its tree waits for a file read on a worker)
  const entries: Maybe<TreeEntry | null>[] = [];
  const names = [...node.children.keys()].sort((a, b) => Buffer.compare(Buffer.from(a, 'latin1'), Buffer.from(b, 'latin1')));
  for (const n of names) {
    const child = node.children.get(n)!;
    const name = Buffer.from(n, 'latin1');
    const cp = joinPath(p, name);
    const st = w.fs.lstat(cp); // checked before the walk started
    const k = prevTree ? prevTree.find(name) : -1;
    const prev = k >= 0 ? prevTree!.entry(k) : undefined;
    if (child.target) {
      entries.push(await backupNode(w, cp, name, st, prev, requestXattrs(w, cp, st, prev), null, true));
    } else {
      w.stats.dirs++;
      const prevSub = prev?.kind === NodeKind.dir && prev.subtree ? await loadPrevTree(w, prev.subtree) : null;
      const subtree = await backupAncestors(w, cp, child, prevSub);
      noteReplaced(w, prev?.kind === NodeKind.dir ? prev.subtree : null, subtree);
      // the previous xattrs while they are unchanged: a backup with nothing changed then starts no
      // xattr helper at all
      const xattrs = sameXattrs(st, prev) ? prev.xattrs : await w.fs.xattrs(cp).catch(() => []);
      entries.push({
        kind: NodeKind.dir, name, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs,
        inode: st.ino, nlink: st.nlink, xattrs, size: 0, chunks: [], subtree, target: null, rdev: 0,
      });
    }
  }
  const known: TreeEntry[] = [];
  for (const e of await Promise.all(entries.map(settle))) if (e) known.push(e);
  return storeTree(w, known);
}

/** Normalise and check the paths to back up: absolute, existing, no duplicates or nesting. */
export function normalisePaths(paths: readonly string[], fs: SourceFs, cwd: string): Buffer[] {
  if (paths.length === 0) throw new SnapError('usage', 'Nothing to back up: give at least one PATH');
  const abs = [...new Set(paths.map((p) => path.resolve(cwd, p)))].sort();
  for (const p of abs) {
    try {
      fs.lstat(Buffer.from(p));
    } catch (err) {
      throw new SnapError('not-found', `Cannot back up ${p}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
  }
  const out = abs.filter((p) => !abs.some((q) => q !== p && (q === '/' || p.startsWith(q + '/'))));
  return out.map((p) => Buffer.from(p));
}

export async function backup(repo: Repository, opts: BackupOptions): Promise<BackupResult> {
  const step = opts.onStep ?? (() => {});
  const started = new Date();
  const paths = normalisePaths(opts.paths, opts.source, process.cwd());
  step('start');
  const parent = await repo.currentHead();
  // What current holds: the index this workstation committed last, when current's head is still that
  // commit's (no listing of current), else a listing. Forgotten until this run commits, since objects
  // uploaded by a run that does not commit are in current but not in that index.
  let cached = parent ? (repo.cache?.getIndex?.(parent.rootId) ?? null) : null;
  // the walk's directory records of that commit (only with its index: they describe what it committed)
  const recordsIn = cached ? (repo.cache?.readRecords?.() ?? null) : null;
  let records = recordsIn && parent ? DirRecordsReader.open(repo.keys, recordsIn, Buffer.from(parent.rootId, 'hex')) : null;
  if (records === null) recordsIn?.close();
  repo.cache?.dropIndex?.();
  repo.cache?.dropRecords?.();
  for (;;) {
    // the new snapshot's references: sorted runs in the cache, merged at the commit (one block in memory)
    const refs = new RefRuns(repo.cache?.refRuns?.() ?? null);
    const known = cached ? new IdSet(cached) : await repo.knownObjects();
    const stats = newStats();
    const pool = await repo.sealPool();
    const inflight = opts.inflightBytes ?? 8 * 1024 * 1024;
    const up = new Uploader(repo, pool, known, inflight, stats, step);
    const out = repo.cache?.writeRecords?.() ?? null;
    const recordsOut = out ? new DirRecordsWriter(repo.keys, out, rng) : null;
    try {
      const reads = new ReadBuffers(repo.chunkSize, inflight);
      return await runBackup(repo, opts, paths, known, cached !== null, parent, stats, refs, up, reads, step, started, records, recordsOut);
    } catch (err) {
      // current lacks an object the kept index lists (removed on the server since): once more with a listing
      if (!(err instanceof CommitRefused) || cached === null) throw err instanceof CommitRefused ? err.cause : err;
      cached = null;
    } finally {
      known.dispose(); // (the kept index's open file, on every way out)
      refs.dispose(); // (the runs' open file, on every way out)
      records?.close();
      records = null;
      recordsOut?.discard(); // (after finish, nothing)
      await pool.close();
    }
  }
}

/** The storage refused the commit as inconsistent (an indexed object is missing from current). */
class CommitRefused extends Error {
  override readonly cause: SnapError;
  constructor(cause: SnapError) {
    super(cause.message);
    this.cause = cause;
  }
}

async function runBackup(
  repo: Repository, opts: BackupOptions, paths: Buffer[], known: IdSet, prevComplete: boolean, parent: Awaited<ReturnType<Repository['currentHead']>>,
  stats: SnapshotStats, refs: RefRuns, up: Uploader, reads: ReadBuffers, step: (s: string) => void, started: Date,
  records: DirRecordsReader | null, recordsOut: DirRecordsWriter | null,
): Promise<BackupResult> {
  const async = asyncSource(opts.source);
  const w: Walk = {
    reads, async, ahead: async ? new ReadAhead(async, reads) : null,
    repo, opts, fs: opts.source, up, known, refs, stats, prevReader: repo.storage, hardlinks: new Map(), prevComplete,
    progress: { filesDone: 0, bytesDone: 0, filesTotal: null, bytesTotal: null, currentPath: '' }, lastProgress: 0,
    records, recordsOut, line: new StatLine(), enterLine: new StatLine(),
    workerReader: async !== null && up.pool.readsFiles ? (opts.source.workerReader?.() ?? null) : null, onWorkers: 0,
    replaced: new Writer(ID_BYTES * 64),
  };
  if (opts.prescan && opts.onProgress) {
    const t = prescan(opts.source, paths, opts.excluder);
    w.progress.filesTotal = t.files;
    w.progress.bytesTotal = t.bytes;
  }
  const prevRoot = parent ? await loadPrevTree(w, Buffer.from(parent.root.tree, 'hex')) : null;
  const pathTree = buildPathTree(paths);
  // backing up "/" itself: the root tree is the root directory's own
  const treeId = pathTree.target
    ? (await settle(await backupDir(w, Buffer.from('/'), new PrevDir(w, null, null, prevRoot && Buffer.from(parent!.root.tree, 'hex'), prevRoot), true))).id
    : await backupAncestors(w, Buffer.from('/'), pathTree, prevRoot);
  if (!pathTree.target) noteReplaced(w, parent ? Buffer.from(parent.root.tree, 'hex') : null, treeId);
  step('trees-done');
  await up.drain();
  step('uploaded');
  const root: SnapshotRoot = {
    version: 1,
    tree: treeId.toString('hex'),
    paths,
    host: opts.host,
    user: opts.user,
    clientTime: started.toISOString(),
    parent: parent?.rootId ?? null,
    chunkSize: repo.chunkSize,
    stats,
    tags: opts.tags ?? [],
  };
  const rootPlain = encodeSnapshotRoot(root);
  const rootId = objectId(repo.keys, ObjectType.snapshot, rootPlain);
  refs.push(rootId);
  await up.store(ObjectType.snapshot, rootId, rootPlain);
  await up.drain();
  step('commit');
  // what current held is no longer needed: its memory (32 bytes per object after a listing, the
  // kept index's open file otherwise, and the ids added) is freed before the index is made
  known.dispose();
  const rootHex = rootId.toString('hex');
  // references in runs in the cache: merged into the kept index's new file, which the commit reads;
  // else (few references, or no cache) sorted where they lie
  const kept = refs.spilled ? (repo.cache?.writeIndex?.(rootHex) ?? null) : null;
  let index: IndexBytes | IndexSource | null = null;
  if (kept !== null) {
    let written = true;
    refs.merge((part) => {
      written &&= kept.append(part);
    });
    index = written ? kept.finish() : null;
  }
  if (index === null) {
    const parts: Buffer[] = [];
    if (refs.spilled) refs.merge((part) => parts.push(Buffer.from(part)));
    else parts.push(...refs.sortedInMemory());
    index = parts;
  }
  refs.dispose();
  let snapshot: SnapshotInfo;
  try {
    snapshot = await repo.storage.commit(encodeHead(rootHex), index);
  } catch (err) {
    kept?.discard();
    if (err instanceof SnapError && err.code === 'integrity') throw new CommitRefused(err);
    throw err;
  }
  if (isIndexSource(index)) kept!.keep();
  else {
    kept?.discard();
    repo.cache?.putIndex?.(rootHex, index);
  }
  recordsOut?.finish(rootId);
  // the trees this snapshot replaced leave the tree cache, which would otherwise keep every tree it
  // was ever given (one the snapshot still lists elsewhere, such as an empty directory's, costs a
  // download when next needed, never correctness)
  await repo.cache?.dropAll?.(w.replaced.finish());
  step('committed');
  opts.onProgress?.({ ...w.progress, currentPath: '' });
  return { snapshot, rootId: rootId.toString('hex'), root };
}

/** Count files and bytes below the paths (for an ETA), honouring excludes. */
function prescan(fs: SourceFs, paths: readonly Buffer[], excluder: Excluder | undefined): { files: number; bytes: number } {
  let files = 0;
  let bytes = 0;
  const visit = (p: Buffer, st: SourceStat): void => {
    if (st.kind === NodeKind.file) {
      files++;
      bytes += st.size;
      return;
    }
    if (st.kind !== NodeKind.dir) return;
    let names: Buffer[];
    try {
      names = fs.readdir(p);
    } catch {
      return;
    }
    let text: string | null = null;
    if (excluder && names.some((n) => n.toString('latin1') === IGNORE_FILE)) {
      text = readSmallFile(fs, joinPath(p, Buffer.from(IGNORE_FILE)), 1 << 20)?.toString('latin1') ?? null;
    }
    excluder?.enter(relOf(p), text);
    for (const n of names) {
      const c = joinPath(p, n);
      try {
        const cst = fs.lstat(c);
        if (excluder?.isExcluded(relOf(c), cst.kind === NodeKind.dir)) continue;
        visit(c, cst);
      } catch {
        /* counted as an error by the real walk */
      }
    }
    excluder?.leave();
  };
  for (const p of paths) {
    try {
      visit(p, fs.lstat(p));
    } catch {
      /* reported by the walk */
    }
  }
  return { files, bytes };
}
