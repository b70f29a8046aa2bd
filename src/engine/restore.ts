/**
 * Restore: one file, one directory or a whole snapshot, straight from the snapshot's own trees and
 * chunks (no chains). Every chunk is authenticated before a byte of it is written. A file is written
 * under a temporary name and renamed once all of it authenticated, except a file of one chunk in a
 * directory this restore created (or found empty): its content is authenticated whole before the file
 * is created under its final name (DESIGN.md 6). Metadata is set in the order that keeps it: owner,
 * xattrs, mode, then times; directories after their contents (I10).
 *
 * Files of one chunk are fetched in batches (Storage.getObjects: one round trip for many objects) and
 * written as their objects arrive; larger files, symlinks and directories are restored in tree order
 * meanwhile. What must follow a batched file (its directory's metadata, a hard link to it) waits for
 * the batch. With more than one core, chunks are opened and written by worker threads (RestorePool);
 * a batch, or a larger file, is done once they have answered for all of it.
 */
import { createHash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { type TreeEntry, NodeKind, ZERO_CHUNK } from '../core/format.js';
import { SnapError, IntegrityError } from '../core/errors.js';
import type { Repository, SnapshotRecord } from './repository.js';
import type { TargetFs } from './source.js';
import { getObjects } from '../storage/types.js';
import { Decompressor, openChunk } from './open.js';
import type { RestorePool } from './restore-pool.js';
import { type SmallFile, renameIntoPlace, replaceExisting, writeSmallFile } from './restore-write.js';

export interface RestoreOptions {
  readonly target: Buffer;
  readonly fs: TargetFs;
  readonly onWarning?: (path: string, message: string) => void;
  readonly onProgress?: ((p: { files: number; bytes: number; bytesTotal: number | null }) => void) | undefined;
  /** Chunks fetched ahead of the one being written. */
  readonly readAhead?: number;
  /**
   * Worker threads that open and write chunks (when the target offers TargetFs.workerFs); 0: all on
   * the main thread. Default: one per core beside the main thread's, at most 3 (none with one core).
   */
  readonly threads?: number;
  /**
   * Chunks opened on the main thread before the workers take over (default 64): a restore of a few
   * files does not wait for a worker to start (about 0.3 CPU-s, most of a one-file restore's work).
   */
  readonly inlineFirst?: number;
}

export interface RestoreResult {
  files: number;
  dirs: number;
  bytes: number;
  errors: Array<{ path: string; message: string; integrity: boolean }>;
}

interface Ctx {
  readonly repo: Repository;
  readonly snap: SnapshotRecord;
  readonly opts: RestoreOptions;
  readonly fs: TargetFs;
  readonly result: RestoreResult;
  /** linkKey() -> the first name restored for it (entries with nlink > 1) */
  readonly links: Map<string, FirstName>;
  readonly pending: Array<Promise<void>>;
  lastProgress: number;
  /** Counter for temporary file names. */
  tmpSeq: number;
  /** Files of one chunk waiting to be fetched. */
  batch: Batch;
  /** Batches being fetched, oldest first. */
  readonly inflight: Array<{ readonly done: Promise<void>; readonly after: Array<() => void> }>;
  /** Worker threads that open and write chunks; null: the main thread does. */
  readonly pool: RestorePool | null;
  /** Chunks opened so far (the first RestoreOptions.inlineFirst on the main thread). */
  opened: number;
  /** zstd for the chunks opened on the main thread. */
  readonly z: Decompressor;
}

/** The pool that opens and writes the next chunk, or null for the main thread. */
function workerFor(c: Ctx): RestorePool | null {
  return c.opened++ < (c.opts.inlineFirst ?? 64) ? null : c.pool;
}

/** The first name of a hard-linked inode; the later names link to it once it is written. */
interface FirstName {
  readonly path: Buffer;
  /** null while it is being restored or once it was; the error if it failed. */
  failure: unknown;
}

interface FileJob {
  readonly dest: Buffer;
  readonly e: TreeEntry;
  /** dest is in a directory this restore created or found empty: nothing is in the way. */
  readonly fresh: boolean;
  readonly first: FirstName | null;
}

interface Batch {
  readonly ids: string[];
  readonly jobs: FileJob[];
  bytes: number;
  /** Runs once this batch and every earlier one are written. */
  readonly after: Array<() => void>;
}

function newBatch(): Batch {
  return { ids: [], jobs: [], bytes: 0, after: [] };
}

function join(dir: Buffer, name: Buffer): Buffer {
  return dir.length === 1 && dir[0] === 0x2f ? Buffer.concat([dir, name]) : Buffer.concat([dir, Buffer.from('/'), name]);
}

/** Split "/a/b/c" into name components (bytes); "" or "/" gives []. */
export function splitPath(p: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let start = 0;
  for (let i = 0; i <= p.length; i++) {
    if (i === p.length || p[i] === 0x2f) {
      if (i > start) out.push(p.subarray(start, i));
      start = i + 1;
    }
  }
  return out;
}

/** Find the entry at a path inside a snapshot; null path = the root. */
export async function lookup(repo: Repository, snap: SnapshotRecord, p: Buffer): Promise<{ entry: TreeEntry | null; tree: TreeEntry[] }> {
  let tree = await repo.loadTree(snap.reader, Buffer.from(snap.root.tree, 'hex'));
  let entry: TreeEntry | null = null;
  const parts = splitPath(p);
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i]!;
    const found = tree.find((e) => e.name.equals(part));
    if (!found) {
      throw new SnapError('not-found', `Path ${p.toString('utf8')} is not in snapshot ${snap.rootId.slice(0, 8)}`, { hint: 'list it with "snapcrypt ls"' });
    }
    entry = found;
    if (i < parts.length - 1) {
      if (found.kind !== NodeKind.dir || !found.subtree) throw new SnapError('not-found', `Path ${p.toString('utf8')}: ${part.toString('utf8')} is not a directory`);
      tree = await repo.loadTree(snap.reader, found.subtree);
    }
  }
  if (entry?.kind === NodeKind.dir && entry.subtree) tree = await repo.loadTree(snap.reader, entry.subtree);
  return { entry, tree };
}

function fail(c: Ctx, p: Buffer, err: unknown): void {
  const integrity = err instanceof IntegrityError || (err instanceof SnapError && err.code === 'integrity');
  if (!integrity && err instanceof SnapError && err.code !== 'io') throw err;
  const message = err instanceof Error ? err.message : String(err);
  c.result.errors.push({ path: p.toString('utf8'), message, integrity });
  c.opts.onWarning?.(p.toString('utf8'), message);
}

/**
 * Owner first (chown clears setuid/setgid and file capabilities), then xattrs while the entry is still
 * writable (user.* xattrs need write permission: a 0444 file or 0500 directory would refuse them to a
 * non-root owner), then the mode, then the times (nothing after them may touch the entry).
 */
async function setMeta(c: Ctx, p: Buffer, e: TreeEntry): Promise<void> {
  const isLink = e.kind === NodeKind.symlink;
  if (c.fs.isRoot) c.fs.chown(p, e.uid, e.gid);
  for (const x of e.xattrs) await c.fs.setXattr(p, x);
  if (!isLink) c.fs.chmod(p, e.mode);
  await c.fs.setTimes(p, e.mtimeNs, e.mtimeNs);
}

/** Queue metadata without waiting (the fs helper pipelines requests in order). */
function queueMeta(c: Ctx, p: Buffer, e: TreeEntry): void {
  c.pending.push(setMeta(c, p, e).catch((err) => fail(c, p, err)));
}

/**
 * Which entries are names of one inode. Trees record the inode number but not the device, and a
 * snapshot may span file systems (several backup paths, mount points), where unrelated files share
 * inode numbers; so the key also holds what every name of one inode has in common (ctime, mtime,
 * owner, mode, size and content). Entries that agree on all of it are interchangeable anyway.
 */
function linkKey(e: TreeEntry): string {
  const h = createHash('sha256');
  for (const id of e.chunks) h.update(id);
  return `${e.inode}:${e.ctimeNs}:${e.mtimeNs}:${e.uid}:${e.gid}:${e.mode}:${e.size}:${h.digest('base64')}`;
}

/** A file of several chunks: written under a temporary name, chunk by chunk, then renamed. */
async function restoreFile(c: Ctx, dest: Buffer, e: TreeEntry, first: FirstName | null): Promise<void> {
  try {
    await restoreChunks(c, dest, e);
  } catch (err) {
    if (first) first.failure = err;
    throw err;
  }
}

async function restoreChunks(c: Ctx, dest: Buffer, e: TreeEntry): Promise<void> {
  const tmp = partialName(c, dest);
  c.fs.remove(tmp);
  const fd = c.fs.create(tmp);
  let ok = false;
  // Chunks are fetched in groups, two groups at a time, and written as they arrive (each at its
  // offset, so in any order); every group has settled before the file is closed.
  const cs = c.snap.root.chunkSize;
  const group = Math.max(1, Math.floor((c.opts.readAhead ?? 8) / 2));
  const inflight: Array<Promise<void>> = [];
  let failure: { err: unknown } | null = null;
  const fetchGroup = async (indexes: number[]): Promise<void> => {
    const ids = indexes.map((i) => e.chunks[i]!.toString('hex'));
    const written: Array<Promise<void>> = [];
    const each = (k: number, data: Buffer | null): void => {
      if (failure !== null) return;
      const i = indexes[k]!;
      const expected = Math.min(cs, e.size - i * cs);
      const pool = workerFor(c);
      if (pool !== null && data !== null) {
        written.push(pool.chunk(e.chunks[i]!, data, expected, fd, i * cs).then(() => void (c.result.bytes += expected)));
        return;
      }
      c.fs.write(fd, openChunk(c.repo.keys, e.chunks[i]!, data, expected, c.z), i * cs);
      c.result.bytes += expected;
    };
    await getObjects(c.snap.reader, ids, each).catch((err: unknown) => {
      failure ??= { err };
    });
    for (const r of await Promise.allSettled(written)) if (r.status === 'rejected') failure ??= { err: r.reason };
  };
  try {
    let indexes: number[] = [];
    for (let i = 0; i <= e.chunks.length && failure === null; i++) {
      const id = e.chunks[i];
      if (id !== undefined && !id.equals(ZERO_CHUNK)) indexes.push(i); // (ZERO_CHUNKs stay holes)
      if (indexes.length === group || (i === e.chunks.length && indexes.length > 0)) {
        if (inflight.length >= 2) await inflight.shift();
        inflight.push(fetchGroup(indexes));
        indexes = [];
      }
    }
    await Promise.all(inflight);
    if (failure !== null) throw (failure as { err: unknown }).err;
    c.fs.truncate(fd, e.size);
    ok = true;
  } finally {
    await Promise.all(inflight);
    c.fs.close(fd);
    if (!ok) c.fs.remove(tmp);
  }
  renameIntoPlace(c.fs, tmp, dest);
  c.result.files++;
  queueMeta(c, dest, e);
  progress(c);
}

function progress(c: Ctx): void {
  if (!c.opts.onProgress) return;
  const now = Date.now();
  if (now - c.lastProgress > 200) {
    c.lastProgress = now;
    c.opts.onProgress({ files: c.result.files, bytes: c.result.bytes, bytesTotal: null });
  }
}

/** What writeSmallFile needs to know of a file of at most one chunk. */
function smallFile(c: Ctx, job: FileJob): SmallFile {
  const { dest, e } = job;
  return { dest, tmp: job.fresh ? null : partialName(c, dest), size: e.size, mode: e.mode, uid: e.uid, gid: e.gid, mtimeNs: e.mtimeNs, byPath: e.xattrs.length > 0 };
}

/**
 * A file of at most one chunk whose content (null: none, all zeros) is authenticated, written on the
 * main thread (restore-write.ts).
 */
function writeSmall(c: Ctx, job: FileJob, plain: Buffer | null): void {
  smallWritten(c, job, writeSmallFile(c.fs, smallFile(c, job), plain), plain?.length ?? 0);
}

/** After a file of at most one chunk is written: its count, and what is set by path (xattrs, mode, times). */
function smallWritten(c: Ctx, job: FileJob, timesSet: boolean, bytes: number): void {
  const { dest, e } = job;
  c.result.files++;
  c.result.bytes += bytes;
  if (e.xattrs.length === 0) {
    if (!timesSet) c.pending.push(c.fs.setTimes(dest, e.mtimeNs, e.mtimeNs).catch((err: unknown) => fail(c, dest, err)));
  } else {
    c.pending.push(setXattrsModeTimes(c, dest, e).catch((err: unknown) => fail(c, dest, err)));
  }
  progress(c);
}

async function setXattrsModeTimes(c: Ctx, p: Buffer, e: TreeEntry): Promise<void> {
  for (const x of e.xattrs) await c.fs.setXattr(p, x);
  c.fs.chmod(p, e.mode);
  await c.fs.setTimes(p, e.mtimeNs, e.mtimeNs);
}

/** Runs action once every file batched so far is written (at once when none is waiting). */
function afterBatched(c: Ctx, action: () => void): void {
  if (c.batch.jobs.length > 0) c.batch.after.push(action);
  else if (c.inflight.length > 0) c.inflight[c.inflight.length - 1]!.after.push(action);
  else action();
}

/** Adds a file of one chunk to the batch; sends the batch when it is full. */
async function addToBatch(c: Ctx, job: FileJob): Promise<void> {
  const b = c.batch;
  b.ids.push(job.e.chunks[0]!.toString('hex'));
  b.jobs.push(job);
  b.bytes += job.e.size;
  if (b.jobs.length >= BATCH_FILES || b.bytes >= BATCH_BYTES) await sendBatch(c);
}

/** Starts fetching the batch; waits while too many are being fetched. */
async function sendBatch(c: Ctx): Promise<void> {
  const b = c.batch;
  if (b.jobs.length === 0) return;
  c.batch = newBatch();
  const handled = new Uint8Array(b.jobs.length);
  const failed = (job: FileJob, err: unknown): void => {
    if (job.first) job.first.failure = err;
    fail(c, job.dest, err);
  };
  const written: Array<Promise<void>> = [];
  const each = (i: number, data: Buffer | null): void => {
    handled[i] = 1;
    const job = b.jobs[i]!;
    try {
      const pool = workerFor(c);
      if (pool !== null && data !== null) {
        const size = job.e.size;
        written.push(pool.file(job.e.chunks[0]!, data, smallFile(c, job)).then((timesSet) => smallWritten(c, job, timesSet, size), (err: unknown) => failed(job, err)));
        return;
      }
      writeSmall(c, job, openChunk(c.repo.keys, job.e.chunks[0]!, data, job.e.size, c.z));
    } catch (err) {
      failed(job, err);
    }
  };
  const fetched = getObjects(c.snap.reader, b.ids, each).catch((err: unknown) => {
    const missing = err instanceof SnapError && err.code === 'not-found' ? new IntegrityError('', err.message) : err;
    for (const [i, job] of b.jobs.entries()) if (!handled[i]) failed(job, missing);
  });
  // done once every file of the batch is written or failed (the files handed to the workers are
  // known once the fetch is done); rejects with the first error fail() threw
  const done = (async () => {
    let thrown: { err: unknown } | null = null;
    await fetched.catch((err: unknown) => void (thrown = { err }));
    for (const r of await Promise.allSettled(written)) if (r.status === 'rejected') thrown ??= { err: r.reason };
    if (thrown !== null) throw (thrown as { err: unknown }).err;
  })();
  c.inflight.push({ done, after: b.after });
  await settleBatches(c, BATCHES_IN_FLIGHT - 1);
}

/** Waits until at most `most` batches are being fetched, running what waited for each. */
async function settleBatches(c: Ctx, most: number): Promise<void> {
  while (c.inflight.length > most) {
    const f = c.inflight.shift()!;
    await f.done;
    for (const action of f.after) action();
  }
}

/**
 * A temporary name beside dest, in the same directory (for an atomic rename): short, so that it stays
 * within NAME_MAX however long the final name is, and unique per process and file.
 */
function partialName(c: Ctx, dest: Buffer): Buffer {
  const slash = dest.lastIndexOf(0x2f);
  return Buffer.concat([dest.subarray(0, slash + 1), Buffer.from(`.snapcrypt-partial-${process.pid}-${c.tmpSeq++}`)]);
}

/** Restores one entry into dest; `fresh`: its directory was created by this restore, or found empty. */
async function restoreEntry(c: Ctx, dest: Buffer, e: TreeEntry, fresh: boolean): Promise<void> {
  try {
    switch (e.kind) {
      case NodeKind.dir: {
        const st = fresh ? null : c.fs.lstat(dest);
        let empty = true;
        if (st === null) c.fs.mkdir(dest);
        else if (st.kind !== NodeKind.dir) throw new SnapError('io', `Cannot restore directory ${dest.toString('utf8')}: a file is in the way`);
        else {
          // restoring over an earlier restore: a read-only directory must take its entries (its own mode comes last)
          if (!c.fs.isRoot && (st.mode & 0o700) !== 0o700) c.fs.chmod(dest, (st.mode & 0o7777) | 0o700);
          empty = c.fs.isEmptyDir(dest);
        }
        c.result.dirs++;
        let tree: TreeEntry[];
        try {
          tree = await c.repo.loadTree(c.snap.reader, e.subtree!);
        } catch (err) {
          fail(c, dest, err);
          return;
        }
        await restoreTree(c, dest, tree, empty);
        afterBatched(c, () => queueMeta(c, dest, e));
        return;
      }
      case NodeKind.file: {
        let first: FirstName | null = null;
        if (e.nlink > 1) {
          const key = linkKey(e);
          const earlier = c.links.get(key);
          if (earlier) {
            afterBatched(c, () => linkTo(c, earlier, dest, fresh));
            return;
          }
          first = { path: dest, failure: null };
          c.links.set(key, first);
        }
        if (e.chunks.length === 1 && !e.chunks[0]!.equals(ZERO_CHUNK)) return await addToBatch(c, { dest, e, fresh, first });
        if (e.chunks.every((id) => id.equals(ZERO_CHUNK)) && e.chunks.length <= 1) {
          try {
            writeSmall(c, { dest, e, fresh, first }, null);
          } catch (err) {
            if (first) first.failure = err;
            throw err;
          }
          return;
        }
        await restoreFile(c, dest, e, first);
        return;
      }
      case NodeKind.symlink:
        if (!fresh) replaceExisting(c.fs, dest);
        c.fs.symlink(e.target ?? Buffer.alloc(0), dest);
        queueMeta(c, dest, e);
        return;
      case NodeKind.fifo:
        if (!fresh) replaceExisting(c.fs, dest);
        await c.fs.mkfifo(dest, e.mode);
        queueMeta(c, dest, e);
        return;
      default:
        c.opts.onWarning?.(dest.toString('utf8'), 'device nodes and sockets are not restored');
    }
  } catch (err) {
    fail(c, dest, err);
  }
}

/** A later name of a hard-linked inode, once its first name is written. */
function linkTo(c: Ctx, first: FirstName, dest: Buffer, fresh: boolean): void {
  try {
    if (first.failure !== null) throw first.failure;
    if (!fresh) replaceExisting(c.fs, dest);
    c.fs.link(first.path, dest);
    c.result.files++;
  } catch (err) {
    fail(c, dest, err);
  }
}

/**
 * Files of one chunk are fetched BATCH_FILES (or BATCH_BYTES of content) at a time, BATCHES_IN_FLIGHT
 * batches at once: one after the other they would each wait for a round trip to the server (over
 * SSH, most of a restore's time). Larger files have their own read-ahead.
 */
const BATCH_FILES = 256;
const BATCH_BYTES = 2 * 1024 * 1024;
const BATCHES_IN_FLIGHT = 4;
/** Metadata requests queued before the restore waits for them (each holds its entry and path). */
const MAX_PENDING_META = 4096;

async function restoreTree(c: Ctx, dir: Buffer, tree: TreeEntry[], fresh: boolean): Promise<void> {
  for (const e of tree) {
    if (c.pending.length >= MAX_PENDING_META) await Promise.all(c.pending.splice(0));
    await restoreEntry(c, join(dir, e.name), e, fresh);
  }
}

/**
 * Restore `subpath` of a snapshot (null or "/" = everything) into opts.target. The whole snapshot
 * lands as target/<original absolute path>; a chosen path lands as target/<its base name>.
 */
export async function restore(repo: Repository, snap: SnapshotRecord, subpath: Buffer | null, opts: RestoreOptions): Promise<RestoreResult> {
  const result: RestoreResult = { files: 0, dirs: 0, bytes: 0, errors: [] };
  const threads = opts.threads ?? Math.min(availableParallelism() - 1, 3);
  const workerFs = threads > 0 ? (opts.fs.workerFs?.() ?? null) : null;
  const pool = workerFs ? repo.restorePool(workerFs, threads) : null;
  const c: Ctx = { repo, snap, opts, fs: opts.fs, result, links: new Map(), pending: [], lastProgress: 0, tmpSeq: 0, batch: newBatch(), inflight: [], pool, opened: 0, z: new Decompressor() };
  const st = opts.fs.lstat(opts.target);
  if (st === null) opts.fs.mkdir(opts.target);
  else if (st.kind !== NodeKind.dir) throw new SnapError('usage', `Restore target ${opts.target.toString('utf8')} is not a directory`);
  const fresh = st === null || opts.fs.isEmptyDir(opts.target);
  const { entry, tree } = await lookup(repo, snap, subpath ?? Buffer.alloc(0));
  try {
    if (entry === null) await restoreTree(c, opts.target, tree, fresh);
    else await restoreEntry(c, join(opts.target, entry.name), entry, fresh);
    await sendBatch(c);
    await settleBatches(c, 0);
  } finally {
    await Promise.allSettled(c.inflight.map((f) => f.done));
    await Promise.allSettled(c.pending);
    await pool?.close();
  }
  await Promise.all(c.pending);
  await opts.fs.finish();
  return result;
}
