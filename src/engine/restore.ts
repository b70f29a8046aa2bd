/**
 * Restore: one file, one directory or a whole snapshot, straight from the snapshot's own trees and
 * chunks (no chains). Every chunk is authenticated before a byte of it is written, and a file is
 * written under a temporary name and renamed only once all of it authenticated (I3). Metadata is set
 * in the order that keeps it: owner, xattrs, mode, then times; directories after their contents (I10).
 */
import { createHash } from 'node:crypto';
import { type TreeEntry, NodeKind, ZERO_CHUNK } from '../core/format.js';
import { ObjectType } from '../core/crypto.js';
import { SnapError, IntegrityError } from '../core/errors.js';
import type { Repository, SnapshotRecord } from './repository.js';
import type { TargetFs } from './source.js';

export interface RestoreOptions {
  readonly target: Buffer;
  readonly fs: TargetFs;
  readonly onWarning?: (path: string, message: string) => void;
  readonly onProgress?: ((p: { files: number; bytes: number; bytesTotal: number | null }) => void) | undefined;
  /** Chunks fetched ahead of the one being written. */
  readonly readAhead?: number;
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
  /** linkKey() -> restored path, for entries with nlink > 1 */
  readonly links: Map<string, Buffer>;
  readonly pending: Array<Promise<void>>;
  lastProgress: number;
  /** Counter for temporary file names. */
  tmpSeq: number;
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

async function restoreFile(c: Ctx, dest: Buffer, e: TreeEntry): Promise<void> {
  if (e.nlink > 1) {
    const first = c.links.get(linkKey(e));
    if (first) {
      replaceExisting(c, dest);
      c.fs.link(first, dest);
      c.result.files++;
      return;
    }
  }
  const tmp = partialName(c, dest);
  c.fs.remove(tmp);
  const fd = c.fs.create(tmp);
  let ok = false;
  try {
    const cs = c.snap.root.chunkSize;
    const ahead = c.opts.readAhead ?? 8;
    const fetches: Array<Promise<Buffer> | null> = [];
    const fetch = (i: number): Promise<Buffer> | null => {
      const id = e.chunks[i];
      if (!id || id.equals(ZERO_CHUNK)) return null;
      return c.snap.reader.getObject(id.toString('hex')).catch((err: unknown) => {
        if (err instanceof SnapError && err.code === 'not-found') throw new IntegrityError(id.toString('hex'), `Chunk ${id.toString('hex')} is missing`);
        throw err;
      });
    };
    for (let i = 0; i < Math.min(ahead, e.chunks.length); i++) fetches.push(fetch(i));
    for (let i = 0; i < e.chunks.length; i++) {
      const id = e.chunks[i]!;
      const pending = fetches[i] ?? null;
      if (i + ahead < e.chunks.length) fetches.push(fetch(i + ahead));
      if (pending === null) continue; // a hole
      pending.catch(() => {});
      const plain = c.repo.openData(id, ObjectType.data, await pending);
      const expected = Math.min(cs, e.size - i * cs);
      if (plain.length !== expected) throw new IntegrityError(id.toString('hex'), `Chunk ${id.toString('hex')} has ${plain.length} bytes, expected ${expected}`);
      c.fs.write(fd, plain, i * cs);
      c.result.bytes += plain.length;
      fetches[i] = null;
    }
    for (const f of fetches) f?.catch(() => {});
    c.fs.truncate(fd, e.size);
    ok = true;
  } finally {
    c.fs.close(fd);
    if (!ok) c.fs.remove(tmp);
  }
  replaceExisting(c, dest);
  c.fs.rename(tmp, dest);
  if (e.nlink > 1) c.links.set(linkKey(e), dest);
  c.result.files++;
  queueMeta(c, dest, e);
  const now = Date.now();
  if (c.opts.onProgress && now - c.lastProgress > 200) {
    c.lastProgress = now;
    c.opts.onProgress({ files: c.result.files, bytes: c.result.bytes, bytesTotal: null });
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

/** Make room for a non-directory at dest: an existing file or link is replaced; a directory is not. */
function replaceExisting(c: Ctx, dest: Buffer): void {
  const st = c.fs.lstat(dest);
  if (st === null) return;
  if (st.kind === NodeKind.dir) throw new SnapError('io', `Cannot restore ${dest.toString('utf8')}: a directory is in the way`);
  c.fs.unlink(dest);
}

async function restoreEntry(c: Ctx, dest: Buffer, e: TreeEntry): Promise<void> {
  try {
    switch (e.kind) {
      case NodeKind.dir: {
        const st = c.fs.lstat(dest);
        if (st === null) c.fs.mkdir(dest);
        else if (st.kind !== NodeKind.dir) throw new SnapError('io', `Cannot restore directory ${dest.toString('utf8')}: a file is in the way`);
        // restoring over an earlier restore: a read-only directory must take its entries (its own mode comes last)
        else if (!c.fs.isRoot && (st.mode & 0o700) !== 0o700) c.fs.chmod(dest, (st.mode & 0o7777) | 0o700);
        c.result.dirs++;
        let tree: TreeEntry[];
        try {
          tree = await c.repo.loadTree(c.snap.reader, e.subtree!);
        } catch (err) {
          fail(c, dest, err);
          return;
        }
        await restoreTree(c, dest, tree);
        queueMeta(c, dest, e);
        return;
      }
      case NodeKind.file:
        await restoreFile(c, dest, e);
        return;
      case NodeKind.symlink:
        replaceExisting(c, dest);
        c.fs.symlink(e.target ?? Buffer.alloc(0), dest);
        queueMeta(c, dest, e);
        return;
      case NodeKind.fifo:
        replaceExisting(c, dest);
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

/**
 * Files of at most one chunk restored at once. Each needs one object from the storage, so restored one
 * after the other they wait for one round trip each (over SSH, most of a restore's time); larger files
 * have their own read-ahead and go alone, as do hard links (their first name must be written before
 * the others link to it) and directories (their metadata is set after their contents).
 */
const PARALLEL_FILES = 32;
/** Metadata requests queued before the restore waits for them (each holds its entry and path). */
const MAX_PENDING_META = 4096;

async function restoreTree(c: Ctx, dir: Buffer, tree: TreeEntry[]): Promise<void> {
  const running = new Set<Promise<void>>();
  let failure: { err: unknown } | null = null;
  const settle = async (most: number): Promise<void> => {
    while (running.size > most) await Promise.race(running);
  };
  for (const e of tree) {
    if (c.pending.length >= MAX_PENDING_META) await Promise.all(c.pending.splice(0));
    const dest = join(dir, e.name);
    if (e.kind === NodeKind.file && e.nlink <= 1 && e.chunks.length <= 1) {
      const task = restoreEntry(c, dest, e).catch((err: unknown) => {
        failure ??= { err };
      });
      running.add(task);
      void task.finally(() => running.delete(task));
      await settle(PARALLEL_FILES - 1);
    } else {
      await settle(0);
      if (failure === null) await restoreEntry(c, dest, e);
    }
    if (failure !== null) break;
  }
  await settle(0);
  if (failure !== null) throw (failure as { err: unknown }).err;
}

/**
 * Restore `subpath` of a snapshot (null or "/" = everything) into opts.target. The whole snapshot
 * lands as target/<original absolute path>; a chosen path lands as target/<its base name>.
 */
export async function restore(repo: Repository, snap: SnapshotRecord, subpath: Buffer | null, opts: RestoreOptions): Promise<RestoreResult> {
  const result: RestoreResult = { files: 0, dirs: 0, bytes: 0, errors: [] };
  const c: Ctx = { repo, snap, opts, fs: opts.fs, result, links: new Map(), pending: [], lastProgress: 0, tmpSeq: 0 };
  const st = opts.fs.lstat(opts.target);
  if (st === null) opts.fs.mkdir(opts.target);
  else if (st.kind !== NodeKind.dir) throw new SnapError('usage', `Restore target ${opts.target.toString('utf8')} is not a directory`);
  const { entry, tree } = await lookup(repo, snap, subpath ?? Buffer.alloc(0));
  if (entry === null) await restoreTree(c, opts.target, tree);
  else await restoreEntry(c, join(opts.target, entry.name), entry);
  await Promise.all(c.pending);
  await opts.fs.finish();
  return result;
}
