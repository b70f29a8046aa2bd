/**
 * Storage in a local directory: the shared machinery of every file-system driver (DirStorage) and the
 * portable driver (LocalDirStorage) whose snapshots are directories of hard links.
 *
 * Layout under the root (see storage/types.ts): current/{config,keys/*,objects/xx/<id>,head,index,lock}
 * and snapshots/<name>/. Directories are created 0700 and files 0400: a repository is private by
 * default and no file is ever written in place (new content always arrives by rename or link).
 *
 * How each write is made safe:
 * - putObject creates the object under its final name with O_EXCL and mode 0200, writes it, then gives
 *   it mode 0400 (dirwriter.ts): an existing object is left alone, and as long as the kernel runs a
 *   name with mode 0400 only ever holds a complete object. A process that dies while writing leaves
 *   that object at mode 0200; the next holder of the lock (the only writer) removes such objects before
 *   it writes or lists anything (lock(), removeIncomplete()). Objects are not fsynced one by one: the first
 *   put of a session writes the `unsynced` marker (the kernel's boot id), and commit flushes the whole
 *   file system (syncfs) before it writes index and head, then removes the marker. A session that finds
 *   the marker from another boot (a power loss after unsynced writes) first deletes every object the
 *   last index does not list, since those may be torn; the client then sends them again.
 * - writeFile (config, keys/*) and commit's head and index use temp + fsync + rename + fsync of the
 *   directory: readers see the old or the new file.
 * - commit: (1) validates head and index and checks that every listed object is in current (reading
 *   only the object directories that changed since the last commit recorded them, objects-state);
 *   on failure nothing at all is changed; (2) flushes the file system, then writes index, then head; (3)
 *   deletes objects the index does not list and stale temp files; (4) removes
 *   leftover `snapshots/.tmp-*`; (5) seals.
 * - LocalDirStorage seals by building `snapshots/.tmp-<name>` (a hard link of every object, copies of
 *   config, keys/*, head, index; directories made 0500), flushing the file system, then renaming it to
 *   `snapshots/<name>` and fsyncing `snapshots/`.
 *
 * What a crash leaves:
 * - during putObject: at most one object of mode 0200 (unreadable to its owner, never listed by an
 *   index, removed when the lock is next taken). After a power loss, unlisted objects are deleted by
 *   recover() (see above) and sent again.
 * - during commit steps 1-2: current unchanged, or a new index with the old head (every object of both
 *   is still present, since nothing is deleted before head is written).
 * - during step 3: the new head and index, plus some unreferenced objects that the next commit deletes.
 * - during sealing: current complete, no new snapshot (a partial `.tmp-<name>` directory is ignored by
 *   listSnapshots and deleted by the next commit). A snapshot exists completely or not at all; the
 *   client commits again. Earlier snapshots are never touched.
 *
 * Limits of the hard-link fallback: a snapshot's objects share their inodes with current and with the
 * other snapshots, so objects MUST be immutable: an in-place write, chmod or chown of one object file
 * changes it in every snapshot (the drivers never do that; objects are 0400). Sealed snapshots are
 * protected from this interface only, not from the file system's owner. A file system's link limit
 * (65000 on ext4) bounds how many snapshots can share one object.
 */
import fs, { constants } from 'node:fs';
import { promisify } from 'node:util';
import * as fsp from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { IntegrityError, ioFailure, SnapError } from '../core/errors.js';
import { mapInLanes } from '../core/lanes.js';
import { release } from '../core/memory.js';
import { indexParts, isIndexSource, isValidFileName, isValidObjectId, readObjectsOneByOne } from '../storage/types.js';
import { DIR_MODE, INCOMPLETE_MODE, writeObjectFile } from './dirwriter.js';
import type { DirectWriterSpec, IndexBytes, IndexSource, Lock, ObjectReader, ObjectSink, SnapshotInfo, StagedIndex, Storage } from '../storage/types.js';
export type { IndexSource } from '../storage/types.js';

export interface DirStorageOptions {
  /** Source of snapshot names and times (ms since the epoch); Date.now by default. */
  readonly clock?: () => number;
  /**
   * Where the parts of the area are, when not at the default places under the root (current/,
   * snapshots/, the lock beside current/): used by the SSH server's per-user areas (server/area.ts).
   */
  readonly layout?: DirLayout;
  /**
   * Whether readObjectsInto reads ahead: always (true), never (false), or, by default, when a
   * ReadAheadGate finds that reads wait for a disk long enough to be worth it.
   */
  readonly readAhead?: boolean;
}

/**
 * Objects of at most this many bytes are read on the main thread by readAhead once open: btrfs keeps a
 * file this small inside its metadata (max_inline, 2 KiB by default), next to the inode that the open
 * has just read, so the read does not wait for the disk and costs less than a round trip to the
 * thread pool.
 */
const INLINE_SIZE = 2048;

/** Reads buf.length bytes from the start of fd into buf. */
function readAllSync(id: string, fd: number, buf: Buffer, label: string): void {
  for (let off = 0; off < buf.length; ) {
    const n = fs.readSync(fd, buf, off, buf.length - off, off);
    if (n === 0) throw new SnapError('io', `Object ${id} in ${label} ended after ${off} of ${buf.length} bytes`);
    off += n;
  }
}

/** Closes a file that was only read (a failure to close it changes nothing that was read). */
function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    // (EBADF cannot happen for an fd this module opened and closes once; EIO/EINTR lose nothing read)
  }
}

/** Blocks this process has read from disks (counted by the kernel for every thread, whatever the file system). */
function blockInput(): number {
  return process.resourceUsage().fsRead;
}

/**
 * Time (µs) this thread has spent running or waiting to run, from /proc/thread-self/schedstat (its CPU
 * time plus its time in the run queue), or null where there is no such file: what a stretch of wall
 * time has beyond it, the thread slept (for a disk, here); being preempted on a busy machine is not
 * counted. The file is opened once per thread and read again at offset 0.
 */
function runnableUs(): number | null {
  if (schedstat === undefined) {
    try {
      schedstat = fs.openSync('/proc/thread-self/schedstat', 'r');
    } catch {
      schedstat = null;
    }
  }
  if (schedstat === null) return null;
  const n = fs.readSync(schedstat, schedstatBuf, 0, schedstatBuf.length, 0);
  const [cpu, queued] = schedstatBuf.toString('latin1', 0, n).split(' ');
  return (Number(cpu) + Number(queued)) / 1000;
}
let schedstat: number | null | undefined;
const schedstatBuf = Buffer.alloc(96);

/** Every how many synchronous reads one is timed. */
const TIME_EVERY = 32;
/** Timed reads that make one measurement. */
const SAMPLES = 16;
/**
 * Average wait of a timed read (µs) from which reading ahead pays: a disk that makes each read wait
 * several times what the server spends on an object (about 60-100 µs of CPU, framing and sending
 * included). With 100 µs, restores from btrfs on a loop device read ahead for part of the objects and
 * took 1-9 s longer (DESIGN.md section 13).
 */
const WAIT_US = 500;
/** Objects read ahead before reads are measured again. */
const AHEAD_OBJECTS = 4096;

/**
 * Decides when DirReader.readObjectsInto reads ahead. Reading ahead costs CPU: a round trip to the
 * thread pool costs more than the synchronous call it carries when the page cache has the data
 * (DESIGN.md section 13), and on a busy machine that CPU is taken from other work (the client, in a
 * restore on one machine). It pays only where reads wait for a disk well beyond that cost. So objects
 * are read one by one with synchronous calls, every TIME_EVERY-th timed: what it waited is its wall
 * time less the time the thread ran or waited to run (runnableUs: being preempted on a busy machine is
 * no wait for the disk). When SAMPLES timed reads waited WAIT_US on average and the process read
 * blocks from a disk meanwhile, the next AHEAD_OBJECTS objects are read ahead; then reads are timed
 * again. Where the kernel does not tell (no /proc/thread-self/schedstat), objects are read one by one.
 */
export class ReadAheadGate {
  private reads = 0;
  private samples = 0;
  private waitedUs = 0;
  private blocks: number;
  private ahead = 0;
  private readonly blockInput: () => number;

  constructor(blockInputCounter: () => number = blockInput) {
    this.blockInput = blockInputCounter;
    this.blocks = blockInputCounter();
  }

  /** Whether to read the next `count` objects ahead (they are counted against what is left to read ahead). */
  take(count: number): boolean {
    if (this.ahead <= 0) return false;
    this.ahead -= count;
    if (this.ahead <= 0) this.restart();
    return true;
  }

  /** Whether the next synchronous read is to be timed. */
  timing(): boolean {
    return ++this.reads % TIME_EVERY === 0;
  }

  /** A timed read waited this long (µs). */
  waited(us: number): void {
    this.waitedUs += Math.max(0, us);
    if (++this.samples < SAMPLES) return;
    if (this.waitedUs / this.samples >= WAIT_US && this.blockInput() > this.blocks) this.ahead = AHEAD_OBJECTS;
    this.restart();
  }

  private restart(): void {
    this.samples = 0;
    this.waitedUs = 0;
    this.blocks = this.blockInput();
  }
}

/** Paths of an area's parts (absolute, or relative to the working directory). */
export interface DirLayout {
  /** The directory holding config, keys/, objects/, head, index. */
  readonly current: string;
  /** The directory whose entries are the sealed snapshots. */
  readonly snapshots: string;
  /** A writable directory outside current that holds the writer lock (and its temp files). */
  readonly lockDir: string;
  /** Relative path of the sealed state inside each snapshot (e.g. "repo"); the snapshot itself if absent. */
  readonly snapshotState?: string;
}

export { DIR_MODE };
const FILE_MODE = 0o400;
const SEALED_DIR_MODE = 0o500;
const TMP_PREFIX = '.tmp-';
export const ID_BYTES = 32;
const SNAPSHOT_NAME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const PREFIX_NAME = /^[0-9a-f]{2}$/;

/** A snapshot name is exactly what Date.toISOString() gives for some time (no path tricks possible). */
export function isSnapshotName(name: string): boolean {
  if (!SNAPSHOT_NAME.test(name)) return false;
  const time = Date.parse(name);
  return Number.isFinite(time) && new Date(time).toISOString() === name;
}

function errnoOf(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string'
    ? err.code
    : undefined;
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function ioError(what: string, err: unknown): SnapError {
  return ioFailure(what, err);
}

/** A user-supplied string, quoted and shortened for an error message. */
function quote(s: string): string {
  return JSON.stringify(s.length > 80 ? `${s.slice(0, 80)}...` : s);
}

function checkId(id: string): void {
  if (!isValidObjectId(id)) {
    throw new SnapError('usage', `Invalid object id ${quote(id)}: expected 64 lower-case hex digits`);
  }
}

/** isValidFileName, minus key names starting with a dot ("keys/..", "keys/.tmp-x"). */
function checkFileName(name: string): void {
  if (!isValidFileName(name) || name.startsWith('keys/.')) {
    throw new SnapError(
      'usage',
      `Invalid repository file name ${quote(name)}: expected config, head, index or keys/NAME (NAME of letters, digits, "._-", not starting with ".")`,
    );
  }
}

function isKeyName(name: string): boolean {
  return !name.startsWith('.') && isValidFileName(`keys/${name}`);
}

/**
 * A fresh temp name: 16 random hex digits. Math.random (seeded per isolate by V8 from the system's
 * entropy) is enough, as the names only have to differ between concurrent writers of one private
 * directory. node:crypto is not loaded for this: it would add about 1.5 MB to the RSS of the server
 * (snapcrypt-server serve), which needs it for nothing else.
 */
function tmpName(): string {
  const hex8 = () => Math.floor(Math.random() * 0x100000000).toString(16).padStart(8, '0');
  return TMP_PREFIX + hex8() + hex8();
}

/** Deletes a file; one that is already gone is not an error. */
async function removeFile(path: string): Promise<void> {
  try {
    await fsp.unlink(path);
  } catch (err) {
    if (errnoOf(err) !== 'ENOENT') throw err;
  }
}

/**
 * How many files a commit deletes (or the ledger's walk stats) at once. One at a time, each deletion
 * (an lstat for the ledger and an unlink, each a trip through libuv's thread pool) waited for the one
 * before: the commit after the benchmark's mutation spent most of a second there. 16 keeps the pool's
 * 4 threads busy.
 */
const PRUNE_LANES = 16;

/** Directory entries, or [] if the directory does not exist. */
async function readdirOrEmpty(dir: string): Promise<string[]> {
  try {
    return await fsp.readdir(dir);
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return [];
    throw err;
  }
}

async function pathExists(path: string): Promise<boolean> {
  try {
    await fsp.lstat(path);
    return true;
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return false;
    throw err;
  }
}

async function readText(path: string): Promise<string | null> {
  try {
    return await fsp.readFile(path, 'utf8');
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return null;
    throw err;
  }
}

/**
 * The usage ledger, `<lockDir>/usage`: the bytes of the objects in current as of the commit whose head
 * it names. Written after each commit by a process that counted every object it added and pruned
 * (DirStorage.currentBytes), removed before the first object write of a session, so a ledger whose head
 * is current's head is exact. Not fsynced: a lost or torn ledger only costs one walk of current.
 */
const LEDGER_FILE = 'usage';

function parseLedger(text: string | null): { head: string; objectBytes: number } | null {
  if (text === null) return null;
  try {
    const v = JSON.parse(text) as Record<string, unknown>;
    const { version, head, objectBytes } = v;
    if (version !== 1 || typeof head !== 'string' || !/^[0-9a-f]{64}$/.test(head)) return null;
    if (typeof objectBytes !== 'number' || !Number.isSafeInteger(objectBytes) || objectBytes < 0) return null;
    return { head, objectBytes };
  } catch {
    return null;
  }
}

/** The bytes of the objects in an area's current from its ledger, or null when there is no valid one. */
export async function readUsageLedger(lockDir: string, current: string): Promise<number | null> {
  const [ledger, head] = await Promise.all([readText(join(lockDir, LEDGER_FILE)), readText(join(current, 'head'))]);
  const saved = parseLedger(ledger);
  return saved !== null && head !== null && head.trim() === saved.head ? saved.objectBytes : null;
}

/** The sum of the sizes of the objects under current/objects (one lstat per object). */
export async function objectBytesOf(current: string): Promise<number> {
  let total = 0;
  const objects = join(current, 'objects');
  for (const prefix of (await readdirOrEmpty(objects)).filter((n) => PREFIX_NAME.test(n))) {
    const dir = join(objects, prefix);
    const names = (await readdirOrEmpty(dir)).filter((name) => isValidObjectId(name) && name.startsWith(prefix));
    // 16 at a time, as prune() deletes (each lstat is a trip through libuv's pool)
    await mapInLanes(names, PRUNE_LANES, async (name) => {
      const st = await fsp.lstat(join(dir, name)).catch((err: unknown) => {
        if (errnoOf(err) === 'ENOENT') return null;
        throw err;
      });
      if (st?.isFile()) total += st.size;
    });
  }
  return total;
}

/**
 * The object directories as the last commit left them, `<lockDir>/objects-state`: for each prefix
 * directory its inode and ctime, recorded once the commit had pruned it (so that it held exactly the
 * ids of that prefix in the index), with the head and the index file it belongs to. A directory that
 * still has that inode and ctime holds the same names (adding or removing a name changes its ctime),
 * so the next commit compares the new index with the last one for it instead of reading it. Not
 * fsynced, like the usage ledger: a lost or torn file only costs one reading of the directories.
 */
const OBJECTS_STATE_FILE = 'objects-state';

/** objects-state's stamp of a prefix directory that does not exist (no objects of that prefix). */
const NO_DIR = 'none';

/**
 * A prefix directory's stamp in objects-state: its inode and ctime (nanoseconds), NO_DIR when it does
 * not exist, null when it cannot be trusted (not a directory, lstat failed, or, when `before` is
 * given, a ctime not older than that). Synchronous on purpose: 256 lstats through libuv's pool, one
 * after another, kept a commit waiting 30-60 ms on a busy machine; each takes a few µs here.
 */
function dirStamp(path: string, before?: bigint): string | null {
  let st: fs.BigIntStats | undefined;
  try {
    st = fs.lstatSync(path, { bigint: true, throwIfNoEntry: false });
  } catch {
    return null;
  }
  if (st === undefined) return NO_DIR;
  if (!st.isDirectory() || (before !== undefined && st.ctimeNs >= before)) return null;
  return `${st.ino}:${st.ctimeNs}`;
}

/** The identity of the index file that objects-state belongs to: inode, size and ctime; null if it cannot be read. */
function indexStamp(path: string): string | null {
  try {
    const st = fs.lstatSync(path, { bigint: true });
    return `${st.ino}:${st.size}:${st.ctimeNs}`;
  } catch {
    return null;
  }
}

function parseObjectsState(text: string | null): { head: string; index: string; dirs: (string | null)[] } | null {
  if (text === null) return null;
  try {
    const v = JSON.parse(text) as Record<string, unknown>;
    const { version, head, index, dirs } = v;
    if (version !== 1 || typeof head !== 'string' || !/^[0-9a-f]{64}$/.test(head) || typeof index !== 'string') return null;
    if (!Array.isArray(dirs) || dirs.length !== 256 || !dirs.every((d) => d === null || typeof d === 'string')) return null;
    return { head, index, dirs: dirs as (string | null)[] };
  } catch {
    return null;
  }
}

/**
 * Order of two ids (32 bytes at offsets ai of a and bi of b): eight 32-bit words compared as numbers.
 * Buffer.compare with offsets checks its arguments in JavaScript on every call (about 1 µs; 80 ms for
 * the 65,000 ids of the benchmark's index).
 */
function compareIds(a: Buffer, ai: number, b: Buffer, bi: number): number {
  for (let k = 0; k < ID_BYTES; k += 4) {
    const x = a.readUInt32BE(ai + k);
    const y = b.readUInt32BE(bi + k);
    if (x !== y) return x < y ? -1 : 1;
  }
  return 0;
}

/**
 * Compares the ids of one prefix in a new index (sorted: checked by scanIndex) with those of the same
 * prefix in the last index, which an unchanged directory holds exactly (objects-state): the new ids
 * that are not there (their count and the first) and the old ids the new index drops. null when the
 * old ids are not strictly ascending (a damaged index: the caller reads the directory instead, since
 * a merge with an unsorted side could call a listed id unlisted, and prune would delete it).
 */
export function sortedIdsSince(ids: Buffer, before: Buffer): { missing: number; firstMissing: string | undefined; unlisted: string[] } | null {
  // the common case, nothing of this prefix changed: one memcmp (ids is sorted, so before is too)
  if (ids.equals(before)) return { missing: 0, firstMissing: undefined, unlisted: [] };
  let missing = 0;
  let firstMissing: string | undefined;
  const unlisted: string[] = [];
  let i = 0;
  let j = 0;
  let checked = 0; // before's ids up to here are known to be ascending
  const ascending = (): boolean => {
    if (j >= checked) {
      if (j > 0 && compareIds(before, j - ID_BYTES, before, j) >= 0) return false;
      checked = j + ID_BYTES;
    }
    return true;
  };
  while (i < ids.length) {
    if (j < before.length) {
      if (!ascending()) return null;
      const c = compareIds(ids, i, before, j);
      if (c === 0) {
        i += ID_BYTES;
        j += ID_BYTES;
        continue;
      }
      if (c > 0) {
        unlisted.push(before.toString('hex', j, j + ID_BYTES));
        j += ID_BYTES;
        continue;
      }
    }
    missing++;
    firstMissing ??= ids.toString('hex', i, i + ID_BYTES);
    i += ID_BYTES;
  }
  for (; j < before.length; j += ID_BYTES) {
    if (!ascending()) return null;
    unlisted.push(before.toString('hex', j, j + ID_BYTES));
  }
  return { missing, firstMissing, unlisted };
}

async function fsyncPath(path: string): Promise<void> {
  const fh = await fsp.open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Runs a program, node:child_process loaded at the first call: a server that only reads (a restore)
 * never loads it (about 0.6 MiB of its RSS, docs/SERVER.md "Resources").
 */
export async function execFileAsync(cmd: string, args: string[], opts: { encoding: 'utf8'; timeout: number } = { encoding: 'utf8', timeout: 0 }): Promise<void> {
  const { execFile } = await import('node:child_process');
  await promisify(execFile)(cmd, args, opts);
}

/** Flush the whole file system holding path (syncfs(2) through coreutils' `sync -f`). */
export async function syncFileSystem(path: string): Promise<void> {
  try {
    await execFileAsync('sync', ['-f', path]);
  } catch (err) {
    throw new SnapError('io', `Cannot flush the file system of ${path} (sync -f): ${messageOf(err)}`, { cause: err });
  }
}

/** Identifies the running kernel: page-cache contents survive a process crash, not a reboot. */
function bootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

/**
 * Write data to a fresh temp file in dir, fsync it and give it its final name: by rename (replacing)
 * or by link (never replacing; returns false if the name already existed).
 */
async function writeDurable(dir: string, name: string, data: Buffer | IndexSource, replace: boolean): Promise<boolean> {
  const tmp = join(dir, tmpName());
  try {
    const fh = await fsp.open(tmp, 'wx', FILE_MODE);
    try {
      if (Buffer.isBuffer(data)) await fh.writeFile(data);
      else {
        let pos = 0;
        for await (const chunk of indexChunks(data)) {
          await writeAll(fh, chunk, pos);
          pos += chunk.length;
        }
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (replace) {
      await fsp.rename(tmp, join(dir, name));
      return true;
    }
    try {
      await fsp.link(tmp, join(dir, name));
      return true;
    } catch (err) {
      if (errnoOf(err) === 'EEXIST') return false;
      throw err;
    }
  } finally {
    await fsp.rm(tmp, { force: true }).catch(() => undefined);
  }
}

/** rm -rf that also copes with read-only (0500) directories left by an interrupted seal. */
async function removeTree(path: string): Promise<void> {
  try {
    await fsp.rm(path, { recursive: true, force: true });
  } catch (err) {
    const code = errnoOf(err);
    if (code !== 'EACCES' && code !== 'EPERM') throw err;
    await makeWritable(path);
    await fsp.rm(path, { recursive: true, force: true });
  }
}

async function makeWritable(path: string): Promise<void> {
  const st = await fsp.lstat(path).catch(() => null);
  if (!st?.isDirectory()) return;
  await fsp.chmod(path, DIR_MODE);
  for (const name of await fsp.readdir(path)) await makeWritable(join(path, name));
}

/** Writes all of buf at position pos of the file. */
async function writeAll(fh: fsp.FileHandle, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) off += (await fh.write(buf, off, buf.length - off, pos + off)).bytesWritten;
}

/**
 * Bytes of an index read at once: 8 Ki ids (a whole number of ids). Each pass of a commit reads through
 * its own buffer of this size, which lives until V8 collects it: kept small, so that the server's peak
 * RSS does not carry several of them (bench/server-rss.sh).
 */
export const INDEX_CHUNK = 256 * 1024;

function bufferSource(buf: Buffer): IndexSource {
  return { length: buf.length, read: async (pos, n) => buf.subarray(pos, pos + n) };
}

/** Parts read as if concatenated; a read that spans parts is copied into scratch. */
function partsSource(parts: readonly Buffer[]): IndexSource {
  if (parts.length === 1) return bufferSource(parts[0]!);
  const starts: number[] = [];
  let length = 0;
  for (const p of parts) {
    starts.push(length);
    length += p.length;
  }
  return {
    length,
    read: async (pos, n, scratch) => {
      let i = starts.findLastIndex((s) => s <= pos);
      if (pos + n <= starts[i]! + parts[i]!.length) return parts[i]!.subarray(pos - starts[i]!, pos - starts[i]! + n);
      for (let done = 0; done < n; i++) {
        const from = pos + done - starts[i]!;
        done += parts[i]!.copy(scratch, done, from, Math.min(parts[i]!.length, from + n - done));
      }
      return scratch.subarray(0, n);
    },
  };
}

export function fileSource(fh: fsp.FileHandle, length: number, label: string): IndexSource {
  return {
    length,
    async read(pos, n, scratch) {
      const buf = scratch.subarray(0, n);
      let off = 0;
      try {
        while (off < n) {
          const { bytesRead } = await fh.read(buf, off, n - off, pos + off);
          if (bytesRead === 0) throw new SnapError('io', `${label} ended after ${pos + off} bytes, ${length} expected`);
          off += bytesRead;
        }
      } catch (err) {
        throw ioError(`Cannot read ${label}`, err);
      }
      return buf;
    },
  };
}

/** A read buffer for one pass over an index: so a pass allocates one chunk, not one per read. */
function scratchFor(src: IndexSource): Buffer {
  return Buffer.allocUnsafe(Math.min(INDEX_CHUNK, src.length));
}

/** The index in chunks of INDEX_CHUNK bytes (the last one shorter), in order; each valid until the next. */
async function* indexChunks(src: IndexSource): AsyncGenerator<Buffer> {
  const scratch = scratchFor(src);
  for (let pos = 0; pos < src.length; pos += INDEX_CHUNK) yield await src.read(pos, Math.min(INDEX_CHUNK, src.length - pos), scratch);
}

/**
 * Reads an index (a whole number of ids) once: the first entry that is not strictly above the one
 * before it (null when the index is sorted), and whether headId is listed before that entry (never
 * when headId is null).
 */
export async function scanIndex(index: IndexSource, headId: string | null): Promise<{ unsortedAt: number | null; headListed: boolean }> {
  const headBytes = headId === null ? null : Buffer.from(headId, 'hex');
  // ids are compared by their first four bytes as a number, and by a Buffer compare only when those
  // are equal (rarely: ids are uniform). A compare of every pair with offsets (four checked in
  // JavaScript per call) took 80 ms of the server's CPU for a commit of the corpus's 65,000 ids.
  const headFirst = headBytes === null ? -1 : headBytes.readUInt32BE(0);
  let headListed = false;
  let prev: Buffer | null = null;
  let prevFirst = -1;
  let entry = 0;
  for await (const chunk of indexChunks(index)) {
    for (let pos = 0; pos < chunk.length; pos += ID_BYTES, entry++) {
      const first = chunk.readUInt32BE(pos); // big-endian: the number's order is the bytes' order
      let order = prevFirst < first ? -1 : prevFirst > first ? 1 : 0;
      if (order === 0 && prevFirst !== -1) {
        // compare(target, targetStart, targetEnd, sourceStart, sourceEnd): previous id against this one
        order = pos === 0 ? prev!.compare(chunk, 0, ID_BYTES) : chunk.compare(chunk, pos, pos + ID_BYTES, pos - ID_BYTES, pos);
      }
      if (order >= 0) return { unsortedAt: entry, headListed };
      if (first === headFirst && !headListed && headBytes!.compare(chunk, pos, pos + ID_BYTES) === 0) headListed = true;
      prevFirst = first;
    }
    prev = Buffer.from(chunk.subarray(chunk.length - ID_BYTES));
  }
  return { unsortedAt: null, headListed };
}

/** Runs fn on the index file at path, read in chunks (an empty index when there is no file). */
async function withIndexFile<T>(path: string, fn: (index: IndexSource) => Promise<T>): Promise<T> {
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(path, 'r');
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return fn(bufferSource(Buffer.alloc(0)));
    throw err;
  }
  try {
    const size = (await fh.stat()).size;
    return await fn(fileSource(fh, size - (size % ID_BYTES), path));
  } finally {
    await fh.close();
  }
}

/**
 * Walks a sorted index prefix by prefix (00..ff), giving the hex ids under each; holds one chunk. It
 * may start at a byte offset (a whole number of ids) where an earlier cursor stopped, and read into a
 * scratch buffer of at least INDEX_CHUNK bytes that the caller reuses.
 */
class IndexCursor {
  private chunk: Buffer = Buffer.alloc(0);
  private pos = 0;
  private next: number;
  private readonly index: IndexSource;
  private readonly scratch: Buffer;
  constructor(index: IndexSource, start = 0, scratch: Buffer = scratchFor(index)) {
    this.index = index;
    this.next = start;
    this.scratch = scratch;
  }

  /** The byte offset of the first id not taken yet. */
  get offset(): number {
    return this.next - this.chunk.length + this.pos;
  }

  /** Where takeBytes() puts a prefix's ids, grown as needed and reused for every prefix. */
  private out: Buffer = Buffer.alloc(0);

  /**
   * The ids of one prefix (the next in the index) as one Buffer of whole ids, in index order: no
   * string per id (a commit compares them with a directory listing, sortedIdsDiff). The Buffer is
   * the cursor's own and valid until the next call: a copy per prefix made 32 MB of ArrayBuffers
   * for a commit of 1,000,000 ids, which V8 frees late, and the server's peak rose with them.
   */
  async takeBytes(prefix: number): Promise<Buffer> {
    let n = 0;
    for (;;) {
      if (this.pos >= this.chunk.length) {
        if (this.next >= this.index.length) break;
        this.chunk = await this.index.read(this.next, Math.min(INDEX_CHUNK, this.index.length - this.next), this.scratch);
        this.next += this.chunk.length;
        this.pos = 0;
      }
      if (this.chunk[this.pos] !== prefix) break;
      let end = this.pos + ID_BYTES;
      while (end < this.chunk.length && this.chunk[end] === prefix) end += ID_BYTES;
      if (n + end - this.pos > this.out.length) {
        const grown = Buffer.allocUnsafeSlow(Math.max(2 * this.out.length, n + end - this.pos, 64 * 1024));
        this.out.copy(grown, 0, 0, n);
        release(this.out);
        this.out = grown;
      }
      n += this.chunk.copy(this.out, n, this.pos, end); // a copy: the scratch is read into again
      this.pos = end;
    }
    return this.out.subarray(0, n);
  }

  /** The ids of one prefix (the next in the index) as hex strings. */
  async take(prefix: number): Promise<Set<string>> {
    const bytes = await this.takeBytes(prefix);
    const ids = new Set<string>();
    for (let off = 0; off < bytes.length; off += ID_BYTES) ids.add(bytes.toString('hex', off, off + ID_BYTES));
    return ids;
  }
}

/**
 * One prefix's ids from an index file that is read in order, a prefix at a time (as the server does
 * with the indexes of many snapshots at once): from byte offset `at` of its `length` whole ids, through
 * fh when the caller keeps the file open, else through a handle opened for this call only, so that no
 * limit on open files applies. Returns the ids and the offset where the next prefix starts.
 */
export async function takeIndexPrefix(
  path: string,
  length: number,
  at: number,
  prefix: number,
  scratch: Buffer,
  fh: fsp.FileHandle | null = null,
): Promise<{ ids: Set<string>; next: number }> {
  if (at >= length) return { ids: new Set(), next: at };
  const handle = fh ?? (await fsp.open(path, 'r'));
  try {
    const cursor = new IndexCursor(fileSource(handle, length, path), at, scratch);
    const ids = await cursor.take(prefix);
    return { ids, next: cursor.offset };
  } finally {
    if (fh === null) await handle.close();
  }
}

/** One prefix directory of current against the index: what sortedIdsDiff finds, as paths, and the temp files. */
interface PrefixDiff {
  readonly temps: string[];
  readonly unlisted: string[];
  readonly missing: number;
  readonly firstMissing: string | undefined;
}

/** The last index and objects-state's stamps of the directories (DirStorage.checkPresent). */
interface Since {
  readonly last: IndexSource;
  readonly dirs: readonly (string | null)[];
}

/** The last index is not sorted: a commit compares the new one with the directories themselves. */
class StaleObjectsState extends Error {}

/** What a commit prunes from current's objects: paths of objects no id lists, and of temp files. */
interface Unlisted {
  readonly objects: string[];
  readonly temps: string[];
}

/**
 * checkPresent() keeps at most this many paths for prune() (about 120 bytes each: 1.2 MB); a commit
 * that drops more objects reads the directories a second time instead.
 */
const PRUNE_LIST_MAX = 10_000;

/**
 * Those of a prefix directory's names that may be object ids of that prefix (64 characters, the
 * prefix's two first), sorted. sortedIdsDiff checks the rest: a name that an index id matches is one,
 * and it passes only the unmatched names that are ids as unlisted. (A regular expression per name
 * cost the server 0.8 µs, 0.1 s for a commit of the benchmark's 62,000 objects.)
 */
function objectNamesOf(names: string[], prefix: number): string[] {
  const p = prefixName(prefix);
  return names.filter((name) => name.length === 64 && name.startsWith(p)).sort();
}

/** Ids turned into one hex string at a time by sortedIdsDiff (4 KiB of hex). */
const HEX_RUN = 32;

/**
 * Compares the ids of one prefix from an index (whole 32-byte ids, sorted) with the names of its
 * directory (sorted; names that are not ids may be among them), walking both together: the ids with
 * no object (their count and the first), and the objects (names that are ids) no id lists. Neither
 * side becomes a set of strings: a commit of 1,000,000 ids made two per id, promoted to the old
 * generation while the directory was read, and the server's heap grew by about 20 MB. The ids are
 * turned into hex HEX_RUN at a time, and a name is matched where its id lies in that string
 * (startsWith at a position: no string per id); only a name that does not match is compared for its
 * order with a string of the id. One hex string per id cost a commit of 1,000,000 ids 0.4 CPU-s.
 */
export function sortedIdsDiff(ids: Buffer, names: readonly string[]): { missing: number; firstMissing: string | undefined; unlisted: string[] } {
  let missing = 0;
  let firstMissing: string | undefined;
  const unlisted: string[] = [];
  const count = Math.floor(ids.length / ID_BYTES);
  const HEX = 2 * ID_BYTES;
  let hex = '';
  let j = 0;
  for (let i = 0; i < count; i++) {
    const run = i % HEX_RUN;
    if (run === 0) hex = ids.toString('hex', i * ID_BYTES, Math.min(count, i + HEX_RUN) * ID_BYTES);
    const at = run * HEX;
    let found = false;
    while (j < names.length) {
      const name = names[j]!;
      if (name.length === HEX && hex.startsWith(name, at)) {
        found = true;
        j++;
        break;
      }
      if (name < hex.slice(at, at + HEX)) {
        unlisted.push(name);
        j++;
      } else break;
    }
    if (!found) {
      missing++;
      firstMissing ??= hex.slice(at, at + HEX);
    }
  }
  while (j < names.length) unlisted.push(names[j++]!);
  return { missing, firstMissing, unlisted: unlisted.filter(isValidObjectId) };
}

export function prefixName(p: number): string {
  return p.toString(16).padStart(2, '0');
}

/** Read access to one state directory (current or a sealed snapshot). */
class DirReader implements ObjectReader {
  protected readonly dir: string;
  /** Names this state in messages, e.g. "/srv/repo/current". */
  protected readonly label: string;

  /** DirStorageOptions.readAhead. */
  protected readonly readAheadMode: boolean | undefined;
  private readonly gate = new ReadAheadGate();

  constructor(dir: string, opts?: DirStorageOptions) {
    this.dir = dir;
    this.label = dir;
    this.readAheadMode = opts?.readAhead;
  }

  /** Path of an object (the id checked): a plain concatenation, far cheaper per object than path.join. */
  private objectPath(id: string): string {
    checkId(id);
    return `${this.objectsDir}/${id.slice(0, 2)}/${id}`;
  }
  protected get objectsDir(): string {
    return (this.objectsDirCache ??= join(this.dir, 'objects'));
  }
  private objectsDirCache: string | undefined;

  async getObject(id: string): Promise<Buffer> {
    const path = this.objectPath(id);
    try {
      return fs.readFileSync(path); // sync: far cheaper per object than fsp
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') throw new SnapError('not-found', `Object ${id} is not in ${this.label}`);
      throw ioError(`Cannot read object ${id} in ${this.label}`, err);
    }
  }

  /** open, fstat, read into the caller's memory, close: no Buffer of its own per object. */
  async readObjectInto(id: string, into: (size: number) => Promise<Buffer>): Promise<void> {
    const path = this.objectPath(id);
    // (every few reads: how long the calls below slept, for the ReadAheadGate)
    const start = this.readAheadMode === undefined && this.gate.timing() ? runnableUs() : null;
    const timed = start !== null;
    let slept = timed ? start - performance.now() * 1000 : 0;
    let fd: number;
    try {
      fd = fs.openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') throw new SnapError('not-found', `Object ${id} is not in ${this.label}`);
      throw ioError(`Cannot read object ${id} in ${this.label}`, err);
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (timed) slept += performance.now() * 1000 - runnableUs()!;
      const buf = await into(size);
      if (timed) slept += runnableUs()! - performance.now() * 1000;
      readAllSync(id, fd, buf, this.label);
    } catch (err) {
      if (err instanceof SnapError) throw err;
      throw ioError(`Cannot read object ${id} in ${this.label}`, err);
    } finally {
      fs.closeSync(fd);
    }
    if (timed) this.gate.waited(slept + performance.now() * 1000 - runnableUs()!);
  }

  /**
   * One after the other with synchronous calls (readObjectInto), the cheapest per object, or, when the
   * caller allows more than one at once, read ahead (readAhead) while the ReadAheadGate finds that
   * reads wait for a disk long enough to be worth it.
   */
  async readObjectsInto(ids: readonly string[], sink: ObjectSink, ahead: number): Promise<void> {
    if (this.readAheadMode ?? (ahead > 1 && this.gate.take(ids.length))) return this.readAhead(ids, sink, ahead);
    return readObjectsOneByOne(this, ids, sink);
  }

  /**
   * Up to `ahead` objects at once: each is opened on the thread pool (fs.open with a callback: the
   * promise API costs several times the CPU per object), fstat'ed and, once the sink placed it, read
   * into the sink's memory on the thread pool (fs.read), then closed. fstat and close run on this
   * thread: once a file is open its inode is in memory, so neither waits for the disk, and each saves a
   * round trip to the thread pool; so does the read of an object of at most INLINE_SIZE bytes (on
   * other file systems than btrfs that read may wait for the disk, as every read did before). So the
   * disk sees several requests at once, and this thread frames and sends objects meanwhile.
   */
  private async readAhead(ids: readonly string[], sink: ObjectSink, ahead: number): Promise<void> {
    const opening: Array<Promise<number | null | { err: unknown }> | undefined> = new Array(ids.length);
    let next = 0; // the next object to open
    let held = 0; // objects being opened, or open and not yet read and closed
    let stopped = false;
    let failure: { index: number; err: unknown } | null = null;
    let wake: (() => void) | null = null;
    const fail = (index: number, err: unknown): void => {
      if (failure === null || index < failure.index) {
        failure = { index, err: err instanceof SnapError ? err : ioError(`Cannot read object ${ids[index]} in ${this.label}`, err) };
      }
    };
    const openAhead = (): void => {
      while (!stopped && failure === null && next < ids.length && held < Math.max(1, ahead)) {
        held++;
        opening[next] = this.openObject(ids[next]!);
        next++;
      }
    };
    const settle = (): void => {
      held--;
      openAhead();
      const w = wake;
      wake = null;
      w?.();
    };
    try {
      for (let i = 0; i < ids.length && failure === null; i++) {
        openAhead();
        while (opening[i] === undefined && failure === null) {
          await new Promise<void>((resolve) => (wake = resolve)); // every file held is being read
          openAhead();
        }
        const pending = opening[i];
        if (pending === undefined) break;
        opening[i] = undefined;
        let fd: number | null = null;
        let reading = false;
        try {
          const opened = await pending;
          if (opened !== null && typeof opened === 'object') throw opened.err;
          fd = opened;
          if (fd === null) {
            await sink.absent(i);
          } else {
            const buf = await sink.place(i, fs.fstatSync(fd).size);
            const file = fd;
            if (buf.length <= INLINE_SIZE) {
              // Held in the file system's metadata (btrfs: max_inline), which the open has read.
              readAllSync(ids[i]!, file, buf, this.label);
              sink.filled(i);
              continue; // (closed by finally)
            }
            reading = true;
            this.readAll(ids[i]!, file, buf, (err) => {
              closeQuietly(file);
              if (err === null) {
                try {
                  sink.filled(i);
                } catch (e) {
                  fail(i, e);
                }
              } else {
                fail(i, err);
              }
              settle();
            });
          }
        } catch (err) {
          fail(i, err);
        } finally {
          if (!reading) {
            if (fd !== null) closeQuietly(fd);
            settle();
          }
        }
      }
    } finally {
      // Files opened ahead but not placed are closed; the call ends once nothing of it runs.
      stopped = true;
      for (const pending of opening) {
        if (pending === undefined) continue;
        void pending.then((fd) => {
          if (typeof fd === 'number') closeQuietly(fd);
          settle();
        });
      }
      while (held > 0) await new Promise<void>((resolve) => (wake = resolve));
    }
    const failed = failure as { index: number; err: unknown } | null;
    if (failed !== null) throw failed.err;
  }

  /**
   * Opens an object on the thread pool: its fd, null when it is absent, or the failure (never a
   * rejection: a promise opened ahead may fail long before anyone awaits it).
   */
  private openObject(id: string): Promise<number | null | { err: unknown }> {
    return new Promise((resolve) => {
      let path: string;
      try {
        path = this.objectPath(id);
      } catch (err) {
        resolve({ err });
        return;
      }
      fs.open(path, constants.O_RDONLY | constants.O_NOFOLLOW, (err, fd) => {
        if (err === null) resolve(fd);
        else if (err.code === 'ENOENT') resolve(null);
        else resolve({ err });
      });
    });
  }

  /** Reads buf.length bytes from the start of fd into buf on the thread pool. */
  private readAll(id: string, fd: number, buf: Buffer, done: (err: unknown) => void): void {
    let off = 0;
    const step = (): void => {
      if (off === buf.length) return done(null);
      fs.read(fd, buf, off, buf.length - off, off, (err, n) => {
        if (err !== null) return done(err);
        if (n === 0) return done(new SnapError('io', `Object ${id} in ${this.label} ended after ${off} of ${buf.length} bytes`));
        off += n;
        step();
      });
    };
    step();
  }

  async readFile(name: string): Promise<Buffer | null> {
    checkFileName(name);
    try {
      return await fsp.readFile(join(this.dir, name));
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return null;
      throw ioError(`Cannot read ${name} in ${this.label}`, err);
    }
  }

  async listKeys(): Promise<string[]> {
    try {
      return (await readdirOrEmpty(join(this.dir, 'keys'))).filter(isKeyName).sort();
    } catch (err) {
      throw ioError(`Cannot list the key files in ${this.label}`, err);
    }
  }

  async *listObjects(): AsyncIterable<string> {
    let prefixes: string[];
    try {
      prefixes = (await readdirOrEmpty(join(this.dir, 'objects'))).filter((n) => PREFIX_NAME.test(n));
    } catch (err) {
      throw ioError(`Cannot list the objects in ${this.label}`, err);
    }
    for (const prefix of prefixes) {
      // one readdir per prefix directory: several times faster than iterating an opendir handle
      let names: string[];
      try {
        names = await fsp.readdir(join(this.dir, 'objects', prefix));
      } catch (err) {
        const code = errnoOf(err);
        if (code === 'ENOENT' || code === 'ENOTDIR') continue;
        throw ioError(`Cannot list the objects in ${this.label}`, err);
      }
      for (const name of names) {
        if (isValidObjectId(name) && name.startsWith(prefix)) yield name;
      }
    }
  }
}

interface LockHolder {
  readonly owner: string;
  readonly host: string;
  readonly pid: number;
  readonly time: string;
}

function parseLock(text: string): LockHolder | null {
  try {
    const v: unknown = JSON.parse(text);
    if (typeof v !== 'object' || v === null) return null;
    const { owner, host, pid, time } = v as Record<string, unknown>;
    if (typeof owner !== 'string' || typeof host !== 'string' || typeof time !== 'string') return null;
    if (typeof pid !== 'number' || !Number.isSafeInteger(pid) || pid <= 0) return null;
    return { owner, host, pid, time };
  } catch {
    return null;
  }
}

/** Whether a process of this host with that pid exists (a lock's holder). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errnoOf(err) === 'EPERM'; // exists, but belongs to someone else
  }
}

/**
 * Everything a directory-backed storage does, except creating `current` and sealing it: the part that
 * differs between the hard-link fallback and btrfs.
 */
export abstract class DirStorage extends DirReader implements Storage {
  readonly location: string;
  protected readonly root: string;
  protected readonly current: string;
  protected readonly snapshotsDir: string;
  protected readonly lockDir: string;
  protected readonly snapshotState: string | undefined;
  protected readonly clock: () => number;

  constructor(root: string, opts?: DirStorageOptions) {
    const abs = resolve(root);
    const layout = opts?.layout;
    const current = layout ? resolve(layout.current) : join(abs, 'current');
    super(current, opts);
    this.location = abs;
    this.root = abs;
    this.current = current;
    this.snapshotsDir = layout ? resolve(layout.snapshots) : join(abs, 'snapshots');
    this.lockDir = layout ? resolve(layout.lockDir) : abs;
    this.snapshotState = layout?.snapshotState;
    this.clock = opts?.clock ?? Date.now;
  }

  /** Create `current` itself (plain directory or subvolume); it may exist after an interrupted init. */
  protected abstract createCurrent(): Promise<void>;
  /** Turn the durable, pruned `current` into snapshots/<name> (which does not exist), all or nothing. */
  protected abstract seal(name: string): Promise<void>;

  /**
   * The last step of commit, once current is durable and pruned: pick a name from the clock and seal.
   * A storage whose snapshots are named and taken by someone else (the server's root helper) overrides
   * this and returns the name it was given.
   */
  protected async sealCurrent(): Promise<SnapshotInfo> {
    const info = await this.newSnapshotName();
    await this.seal(info.name);
    return info;
  }

  protected notARepository(): SnapError {
    return new SnapError(
      'not-a-repository',
      `No repository at ${this.location}: ${join(this.current, 'config')} is missing; initialize the repository first`,
    );
  }

  /** Errors of an operation inside current: a missing area is named as such, the rest is 'io'. */
  protected async failure(what: string, err: unknown): Promise<SnapError> {
    if (err instanceof SnapError) return err;
    if (errnoOf(err) === 'ENOENT' && !(await this.exists().catch(() => true))) return this.notARepository();
    return ioError(what, err);
  }

  protected async syncDir(dir: string): Promise<void> {
    await fsyncPath(dir);
  }

  async exists(): Promise<boolean> {
    try {
      return await pathExists(join(this.current, 'config'));
    } catch (err) {
      throw ioError(`Cannot check for a repository at ${this.location}`, err);
    }
  }

  async init(config: Buffer): Promise<void> {
    const existsError = new SnapError('exists', `Cannot create a repository at ${this.location}: one already exists there`);
    if (await this.exists()) throw existsError;
    try {
      await fsp.mkdir(this.root, { recursive: true, mode: DIR_MODE });
      await this.createCurrent();
      for (const dir of [join(this.current, 'objects'), join(this.current, 'keys'), this.snapshotsDir]) {
        await fsp.mkdir(dir, { recursive: true, mode: DIR_MODE });
      }
      await this.syncDir(this.current);
      await this.syncDir(this.root);
      // config last, and never replacing: a half-done init can be run again, a concurrent one fails.
      if (!(await writeDurable(this.current, 'config', config, false))) throw existsError;
      await this.syncDir(this.current);
    } catch (err) {
      throw ioError(`Cannot create a repository at ${this.location}`, err);
    }
  }

  async writeFile(name: string, data: Buffer): Promise<void> {
    checkFileName(name);
    if (name !== 'config' && !name.startsWith('keys/')) {
      throw new SnapError('usage', `Cannot write ${name} directly: only config and keys/NAME are writable (head and index are written by commit)`);
    }
    const path = join(this.current, name);
    const dir = join(path, '..');
    try {
      await writeDurable(dir, name.slice(name.lastIndexOf('/') + 1), data, true);
      await this.syncDir(dir);
    } catch (err) {
      throw await this.failure(`Cannot write ${path}`, err);
    }
  }

  /**
   * Objects are written without fsync (one fsync per object would cost most of a backup's time),
   * created under their final name with mode 0200 and given mode 0400 once complete (dirwriter.ts
   * writeObjectFile). A process that dies while writing leaves that one object incomplete (0200); the
   * next holder of the lock removes it (lock()). A power loss may leave any unsynced object torn, so
   * before the first object of a session the `unsynced` marker records the kernel's boot id; commit
   * flushes the file system and removes the marker. A later session that finds the marker with another
   * boot id deletes every object the last index does not list (see recover()).
   */
  async putObject(id: string, data: Buffer): Promise<void> {
    checkId(id);
    try {
      await this.recover();
      this.marking ??= this.markUnsynced();
      await this.marking;
      // Synchronous calls on purpose: per object they cost a fifth of the CPU of the promise API.
      if (writeObjectFile(this.objectsDir, id, data) && this.ledger !== null) this.ledger += data.length;
    } catch (err) {
      throw await this.failure(`Cannot store object ${id} in ${this.current}`, err);
    }
  }

  /** Worker threads write objects with dirwriter.js (see Storage.directWriter). */
  async directWriter(): Promise<DirectWriterSpec> {
    this.ledger = null; // the workers' writes are not counted
    this.ledgerLoad = Promise.reject(new SnapError('internal', 'currentBytes() after directWriter(): the workers\' objects are not counted'));
    this.ledgerLoad.catch(() => undefined);
    await this.recover();
    this.marking ??= this.markUnsynced();
    await this.marking;
    return { module: new URL('./dirwriter.js', import.meta.url).href, arg: { objectsDir: join(this.dir, 'objects') } };
  }

  private marking: Promise<void> | null = null;
  private recovering: Promise<void> | null = null;

  /** Bytes of the objects in current, once currentBytes() loaded them; then kept up to date. */
  private ledger: number | null = null;
  private ledgerLoad: Promise<void> | null = null;

  /**
   * The bytes of the objects in current: from the usage ledger when it is valid, else by one walk of
   * current; from then on this process keeps the count as it adds and prunes objects, and each commit
   * writes it back to the ledger. Call it before the session's first putObject (the SSH server does),
   * so that every object written is counted. Not available once directWriter() was used.
   */
  async currentBytes(): Promise<number> {
    this.ledgerLoad ??= (async () => {
      await this.recover();
      this.ledger = (await readUsageLedger(this.lockDir, this.current)) ?? (await objectBytesOf(this.current));
    })().catch((err: unknown) => {
      throw ioError(`Cannot count the bytes in ${this.current}`, err);
    });
    await this.ledgerLoad;
    return this.ledger!;
  }

  async freeSpace(): Promise<{ available: number; total: number }> {
    try {
      const st = await fsp.statfs(this.current);
      return { available: st.bavail * st.bsize, total: st.blocks * st.bsize };
    } catch (err) {
      throw ioError(`Cannot read the free space of ${this.current}`, err);
    }
  }

  /** Writes the ledger for the head just committed (only when every object of this process was counted). */
  private async saveLedger(head: Buffer): Promise<void> {
    if (this.ledger === null) return;
    const text = JSON.stringify({ version: 1, head: head.toString('latin1').trim(), objectBytes: this.ledger }) + '\n';
    const tmp = join(this.lockDir, tmpName());
    try {
      await fsp.writeFile(tmp, text, { mode: 0o600, flag: 'wx' });
      await fsp.rename(tmp, join(this.lockDir, LEDGER_FILE));
    } catch {
      await fsp.rm(tmp, { force: true }).catch(() => undefined); // only costs a walk next time
    }
  }

  /**
   * Records objects-state once a commit has pruned current: each object directory's inode and ctime,
   * unless its ctime is not older than the file system's clock now (read from the new file's mtime):
   * a name added later within the same tick of a coarse clock would leave that ctime as it is.
   */
  private async saveObjectsState(head: Buffer): Promise<void> {
    const tmp = join(this.lockDir, tmpName());
    try {
      const fh = await fsp.open(tmp, 'wx', 0o600);
      try {
        const now = (await fh.stat({ bigint: true })).mtimeNs;
        const dirs: (string | null)[] = [];
        for (let p = 0; p < 256; p++) dirs.push(dirStamp(join(this.current, 'objects', prefixName(p)), now));
        const index = indexStamp(join(this.current, 'index'));
        if (index === null) throw new Error('no index');
        await fh.writeFile(JSON.stringify({ version: 1, head: head.toString('latin1').trim(), index, dirs }) + '\n');
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, join(this.lockDir, OBJECTS_STATE_FILE));
    } catch {
      await fsp.rm(tmp, { force: true }).catch(() => undefined); // only costs a reading of the directories
    }
  }

  /** objects-state's directory stamps, if it belongs to current's head and index; else null. */
  private async recordedObjectDirs(): Promise<(string | null)[] | null> {
    const index = indexStamp(join(this.current, 'index'));
    const [text, head] = await Promise.all([
      readText(join(this.lockDir, OBJECTS_STATE_FILE)).catch(() => null),
      readText(join(this.current, 'head')),
    ]);
    const saved = parseObjectsState(text);
    if (saved === null || head === null || head.trim() !== saved.head || index === null || index !== saved.index) return null;
    return saved.dirs;
  }

  /** How many object directories this storage's commits (and recoveries) have listed: for tests and benchmarks. */
  objectDirsRead = 0;

  private async markUnsynced(): Promise<void> {
    await fsp.rm(join(this.lockDir, LEDGER_FILE), { force: true }); // this session's writes change the count
    await writeDurable(this.current, 'unsynced', Buffer.from(bootId() + '\n'), true);
    await this.syncDir(this.current);
  }

  /**
   * Removes the incomplete objects (mode 0200, dirwriter.ts) that a process which died while writing
   * left under their names. Called by the new holder of the lock, the only writer, so none of them is
   * being written now; only after a session that wrote and did not commit (the `unsynced` marker is
   * there), and only among the objects the last index does not list (a listed one is complete).
   */
  private async removeIncomplete(): Promise<void> {
    if ((await readText(join(this.current, 'unsynced'))) === null) return;
    await withIndexFile(join(this.current, 'index'), (index) =>
      this.eachUnlisted(index, async (path) => {
        const st = fs.lstatSync(path, { throwIfNoEntry: false });
        if (st === undefined || !st.isFile() || (st.mode & 0o777) !== INCOMPLETE_MODE) return;
        fs.rmSync(path, { force: true });
        if (this.ledger !== null) this.ledger -= st.size;
      }),
    );
  }

  /**
   * Calls `each` with the path of every object in current that the index does not list, and `temp`
   * (if given) with every leftover temp file among the objects.
   */
  private async eachUnlisted(index: IndexSource, each: (path: string) => Promise<void>, temp?: (path: string) => Promise<void>): Promise<void> {
    for await (const { temps, unlisted } of this.prefixDiffs(index)) {
      if (temp) await mapInLanes(temps, PRUNE_LANES, temp);
      await mapInLanes(unlisted, PRUNE_LANES, each);
    }
  }

  /**
   * current's object directories, one prefix at a time in order, each compared with the index's ids
   * of that prefix (sortedIdsDiff): the paths of the objects no id lists and of the temp files, and
   * the listed ids with no object.
   */
  private async *prefixDiffs(index: IndexSource, since: Since | null = null): AsyncGenerator<PrefixDiff> {
    const cursor = new IndexCursor(index);
    const last = since === null ? null : new IndexCursor(since.last);
    for (let p = 0; p < 256; p++) {
      const listed = await cursor.takeBytes(p);
      const before = last === null ? null : await last.takeBytes(p);
      const diff = before === null ? null : this.prefixSince(p, listed, before, since!.dirs[p] ?? null);
      yield diff ?? (await this.prefixDiff(p, listed));
    }
    // an id out of order in the last index stops its cursor early: what it gave is not to be trusted
    if (last !== null && last.offset !== since!.last.length) throw new StaleObjectsState();
  }

  /**
   * One prefix of prefixDiffs from the last index, when its directory is as the last commit left it
   * (the inode and ctime that objects-state recorded): null when it is not, and it must be read.
   */
  private prefixSince(p: number, listed: Buffer, before: Buffer, stamp: string | null): PrefixDiff | null {
    if (stamp === null) return null;
    const dir = join(this.current, 'objects', prefixName(p));
    if (dirStamp(dir) !== stamp) return null;
    const r = sortedIdsSince(listed, before);
    if (r === null) throw new StaleObjectsState();
    return { temps: [], unlisted: r.unlisted.map((name) => join(dir, name)), missing: r.missing, firstMissing: r.firstMissing };
  }

  /**
   * One prefix of prefixDiffs, in a function of its own so that the directory's names (about 350 KB
   * of strings per prefix for 1,000,000 objects) are not held by the generator's frame while the next
   * directory is read. (Measured: the server's peak for a commit of 1,000,000 ids moved by less than
   * its run-to-run spread, 67.6-69.2 against 68.9-69.3 MiB; DESIGN.md section 13.)
   */
  private async prefixDiff(p: number, listed: Buffer): Promise<PrefixDiff> {
    const dir = join(this.current, 'objects', prefixName(p));
    this.objectDirsRead++;
    const names = await readdirOrEmpty(dir);
    const { missing, firstMissing, unlisted } = sortedIdsDiff(listed, objectNamesOf(names, p));
    const temps = names.filter((name) => name.startsWith(TMP_PREFIX)).map((name) => join(dir, name));
    return { temps, unlisted: unlisted.map((name) => join(dir, name)), missing, firstMissing };
  }

  /**
   * If objects were written by a session of an earlier boot that never committed, the ones the last
   * index does not list may be torn by the power loss: delete them (the client sends them again).
   */
  recover(): Promise<void> {
    this.recovering ??= (async () => {
      const marker = await readText(join(this.current, 'unsynced'));
      if (marker === null || marker.trim() === bootId()) return;
      await withIndexFile(join(this.current, 'index'), (index) => this.prune(index));
      await syncFileSystem(this.current);
      await fsp.rm(join(this.current, 'unsynced'), { force: true });
    })();
    return this.recovering;
  }

  async commit(head: Buffer, index: IndexBytes | IndexSource): Promise<SnapshotInfo> {
    return this.commitIndex(head, isIndexSource(index) ? index : partsSource(indexParts(index)));
  }

  /**
   * A commit whose index arrives in parts (the SSH server's INDEX_PART frames): the parts go to a temp
   * file in lockDir (outside current, so never part of a snapshot) that is unlinked as soon as it is
   * open, so nothing is left behind however the stage or the process ends; commit reads it back in
   * INDEX_CHUNK pieces. Appends and the commit must not overlap (the server runs them one at a time).
   */
  async stageIndex(): Promise<StagedIndex> {
    const path = join(this.lockDir, `${tmpName()}.index`);
    let fh: fsp.FileHandle | null;
    try {
      fh = await fsp.open(path, 'wx+', 0o600);
    } catch (err) {
      throw await this.failure(`Cannot stage an index in ${this.lockDir}`, err);
    }
    try {
      await fsp.unlink(path);
    } catch (err) {
      await fh.close();
      throw ioError(`Cannot stage an index in ${this.lockDir}`, err);
    }
    let length = 0;
    const closed = (): SnapError => new SnapError('usage', 'This staged index was committed or discarded already');
    const discard = async (): Promise<void> => {
      const f = fh;
      fh = null;
      await f?.close();
    };
    return {
      get length() {
        return length;
      },
      append: async (ids: Buffer): Promise<void> => {
        if (fh === null) throw closed();
        if (ids.length % ID_BYTES !== 0) throw new SnapError('usage', `An index part of ${ids.length} bytes is not a whole number of 32-byte ids`);
        try {
          await writeAll(fh, ids, length);
        } catch (err) {
          throw await this.failure(`Cannot stage an index in ${this.lockDir}`, err);
        }
        length += ids.length;
      },
      commit: async (head: Buffer): Promise<SnapshotInfo> => {
        if (fh === null) throw closed();
        try {
          return await this.commitIndex(head, fileSource(fh, length, 'the staged index'));
        } finally {
          await discard();
        }
      },
      discard,
    };
  }

  private async commitIndex(head: Buffer, index: IndexSource): Promise<SnapshotInfo> {
    await this.checkCommitInput(head, index);
    if (!(await this.exists())) throw this.notARepository();
    try {
      await this.recover();
      const unlisted = await this.checkPresent(index);
      await syncFileSystem(this.current); // every object of this session is durable from here on
      await writeDurable(this.current, 'index', index, true);
      await writeDurable(this.current, 'head', head, true);
      await fsp.rm(join(this.current, 'unsynced'), { force: true });
      await this.syncDir(this.current);
      this.marking = null;
      await this.prune(index, unlisted);
      await this.saveLedger(head);
      await this.saveObjectsState(head);
      for (const name of await readdirOrEmpty(this.snapshotsDir)) {
        if (name.startsWith(TMP_PREFIX)) await removeTree(join(this.snapshotsDir, name));
      }
      return await this.sealCurrent();
    } catch (err) {
      throw await this.failure(`Cannot commit to ${this.location}`, err);
    }
  }

  /** Validates head (64 hex + "\n") and index (sorted unique 32-byte ids listing head), reading it once. */
  private async checkCommitInput(head: Buffer, index: IndexSource): Promise<void> {
    const text = head.toString('latin1');
    if (!/^[0-9a-f]{64}\n$/.test(text)) {
      throw new SnapError('integrity', `Cannot commit to ${this.location}: head must be 64 lower-case hex digits and a newline`);
    }
    const headId = text.slice(0, 64);
    if (index.length % ID_BYTES !== 0) {
      throw new SnapError('integrity', `Cannot commit to ${this.location}: index of ${index.length} bytes is not a whole number of 32-byte ids`);
    }
    const { unsortedAt, headListed } = await scanIndex(index, headId);
    if (unsortedAt !== null) {
      throw new SnapError('integrity', `Cannot commit to ${this.location}: index is not sorted strictly ascending at entry ${unsortedAt}`);
    }
    if (!headListed) {
      throw new IntegrityError(headId, `Cannot commit to ${this.location}: the head object ${headId} is not listed in the index`);
    }
  }

  /**
   * Every indexed id must be in current. Returns what prune() is to remove once the index is
   * committed (the session that commits writes no object meanwhile), so that the commit reads the
   * object directories once: the objects no id lists and the temp files among them, or null when
   * there are more than PRUNE_LIST_MAX (prune() then reads the directories again).
   */
  private async checkPresent(index: IndexSource): Promise<Unlisted | null> {
    const dirs = await this.recordedObjectDirs();
    if (dirs !== null) {
      try {
        return await withIndexFile(join(this.current, 'index'), (last) => this.checkPresentSince(index, { last, dirs }));
      } catch (err) {
        if (!(err instanceof StaleObjectsState)) throw err;
      }
    }
    return this.checkPresentSince(index, null);
  }

  /** checkPresent, reading only the directories that changed since the last commit when since is given. */
  private async checkPresentSince(index: IndexSource, since: Since | null): Promise<Unlisted | null> {
    let missing = 0;
    let first: string | undefined;
    let found: Unlisted | null = { objects: [], temps: [] };
    for await (const diff of this.prefixDiffs(index, since)) {
      missing += diff.missing;
      first ??= diff.firstMissing;
      if (found === null) continue;
      for (const path of diff.temps) found.temps.push(path);
      for (const path of diff.unlisted) found.objects.push(path); // (no spread: a prefix may drop very many)
      if (found.objects.length + found.temps.length > PRUNE_LIST_MAX) found = null;
    }
    if (first !== undefined) {
      throw new IntegrityError(
        first,
        `Cannot commit to ${this.location}: object ${first} listed in the index is missing from current (${missing} missing); upload it again`,
      );
    }
    return found;
  }

  /**
   * Deletes unlisted objects and stale temp files from current (those of `found`, when checkPresent
   * listed them, else those a walk of the object directories finds); fsyncs what changed.
   */
  private async prune(index: IndexSource, found: Unlisted | null = null): Promise<void> {
    const removeObject = async (path: string): Promise<void> => {
      if (this.ledger !== null) {
        // (the size first: `this.ledger -= await ...` would read the ledger before the await, and
        // deletions run side by side)
        const size = (await fsp.lstat(path).catch(() => null))?.size ?? 0;
        this.ledger -= size;
      }
      await removeFile(path);
    };
    if (found === null) await this.eachUnlisted(index, removeObject, removeFile);
    else {
      await mapInLanes(found.temps, PRUNE_LANES, removeFile);
      await mapInLanes(found.objects, PRUNE_LANES, removeObject);
    }
    for (const dir of [this.current, join(this.current, 'keys')]) {
      for (const name of await readdirOrEmpty(dir)) {
        if (name.startsWith(TMP_PREFIX)) await fsp.rm(join(dir, name), { force: true });
      }
    }
  }

  /** The clock's time as a name; bumped by 1 ms while a snapshot of that name exists. */
  private async newSnapshotName(): Promise<SnapshotInfo> {
    let time = this.clock();
    if (!Number.isSafeInteger(time) || Number.isNaN(new Date(time).getTime())) {
      throw new SnapError('internal', `The storage clock gave an invalid time: ${time}`);
    }
    while (await pathExists(join(this.snapshotsDir, new Date(time).toISOString()))) time++;
    return { name: new Date(time).toISOString(), time };
  }

  async listSnapshots(): Promise<SnapshotInfo[]> {
    let names: string[];
    try {
      names = (await readdirOrEmpty(this.snapshotsDir)).filter(isSnapshotName).sort();
    } catch (err) {
      throw ioError(`Cannot list the snapshots in ${this.location}`, err);
    }
    return names.map((name) => ({ name, time: Date.parse(name) }));
  }

  async openSnapshot(name: string): Promise<ObjectReader> {
    if (!isSnapshotName(name)) {
      throw new SnapError('usage', `Invalid snapshot name ${quote(name)}: expected a time like 2026-11-26T23:15:02.123Z`);
    }
    const dir = join(this.snapshotsDir, name);
    const st = await fsp.stat(dir).catch((err: unknown) => {
      if (errnoOf(err) === 'ENOENT') return null;
      throw ioError(`Cannot open snapshot ${name} in ${this.location}`, err);
    });
    if (!st?.isDirectory()) throw new SnapError('not-found', `No snapshot ${name} in ${this.location}`);
    return new DirReader(this.snapshotState === undefined ? dir : join(dir, this.snapshotState), this.readAheadMode === undefined ? {} : { readAhead: this.readAheadMode });
  }

  async lock(owner: string): Promise<Lock> {
    // The lock lives beside current, not in it: it names the host and pid, which a sealed snapshot
    // (a btrfs snapshot takes the whole subvolume) must not carry.
    if (!(await this.exists())) throw this.notARepository();
    const path = join(this.lockDir, 'lock');
    const mine = `${JSON.stringify({ owner, host: hostname(), pid: process.pid, time: new Date(this.clock()).toISOString() })}\n`;
    for (let attempt = 0; attempt < 5; attempt++) {
      let held: string | null;
      try {
        // link() of a complete temp file: as exclusive as O_EXCL, and never an empty lock file.
        if (await writeDurable(this.lockDir, 'lock', Buffer.from(mine), false)) {
          try {
            await this.recover();
            await this.removeIncomplete();
          } catch (err) {
            await this.unlock(path, mine).catch(() => undefined);
            throw err;
          }
          return { release: () => this.unlock(path, mine) };
        }
        held = await readText(path);
      } catch (err) {
        if (errnoOf(err) === 'ENOENT' && (await this.exists())) continue; // temp removed by a commit
        throw await this.failure(`Cannot lock ${this.location}`, err);
      }
      if (held === null) continue; // released meanwhile
      const holder = parseLock(held);
      if (holder === null || holder.host !== hostname() || processAlive(holder.pid)) {
        throw this.lockedError(path, holder);
      }
      await this.removeStaleLock(path, held);
    }
    throw new SnapError('locked', `Cannot lock ${this.location}: ${path} keeps changing; another process is competing for it, try again`);
  }

  private lockedError(path: string, holder: LockHolder | null): SnapError {
    const who =
      holder === null
        ? `an unreadable lock file ${path}`
        : `${quote(holder.owner)} (pid ${holder.pid} on host ${holder.host}, since ${holder.time})`;
    return new SnapError(
      'locked',
      `Repository ${this.location} is locked by ${who}; if no snapcrypt process holds it any more, delete ${path}`,
    );
  }

  /** Moves the lock aside, checks it is still the stale one we judged, deletes it (or puts it back). */
  private async removeStaleLock(path: string, stale: string): Promise<void> {
    const aside = join(this.lockDir, tmpName());
    try {
      await fsp.rename(path, aside);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return;
      throw ioError(`Cannot remove the stale lock ${path}`, err);
    }
    if ((await readText(aside)) !== stale) await fsp.link(aside, path).catch(() => undefined);
    await fsp.rm(aside, { force: true });
  }

  private async unlock(path: string, mine: string): Promise<void> {
    try {
      if ((await readText(path)) === mine) await fsp.rm(path, { force: true });
    } catch (err) {
      throw ioError(`Cannot release the lock ${path}`, err);
    }
  }

  async close(): Promise<void> {}
}

/** The portable driver: snapshots are directories of hard links to current's immutable objects. */
export class LocalDirStorage extends DirStorage {
  protected override async createCurrent(): Promise<void> {
    await fsp.mkdir(this.current, { recursive: true, mode: DIR_MODE });
  }

  protected override async seal(name: string): Promise<void> {
    const tmp = join(this.snapshotsDir, TMP_PREFIX + name);
    await fsp.mkdir(tmp, { mode: DIR_MODE });
    const objects = join(tmp, 'objects');
    await fsp.mkdir(objects, { mode: DIR_MODE });
    for (const prefix of await readdirOrEmpty(join(this.current, 'objects'))) {
      if (!PREFIX_NAME.test(prefix)) continue;
      const ids = (await readdirOrEmpty(join(this.current, 'objects', prefix))).filter(
        (n) => isValidObjectId(n) && n.startsWith(prefix),
      );
      if (ids.length === 0) continue;
      const dir = join(objects, prefix);
      await fsp.mkdir(dir, { mode: DIR_MODE });
      // synchronous: tens of thousands of link() calls are much faster without a thread-pool hop each
      for (const id of ids) fs.linkSync(join(this.current, 'objects', prefix, id), join(dir, id));
      await fsp.chmod(dir, SEALED_DIR_MODE);
    }
    await fsp.chmod(objects, SEALED_DIR_MODE);
    const keys = join(tmp, 'keys');
    await fsp.mkdir(keys, { mode: DIR_MODE });
    for (const key of (await readdirOrEmpty(join(this.current, 'keys'))).filter(isKeyName)) {
      await copyFile(join(this.current, 'keys', key), join(keys, key));
    }
    await fsp.chmod(keys, SEALED_DIR_MODE);
    for (const file of ['config', 'head', 'index']) {
      await copyFile(join(this.current, file), join(tmp, file));
    }
    await fsp.chmod(tmp, SEALED_DIR_MODE);
    await syncFileSystem(tmp); // the whole snapshot is durable before it gets its name
    await fsp.rename(tmp, join(this.snapshotsDir, name));
    await this.syncDir(this.snapshotsDir);
  }
}

/** Copy for a snapshot under construction (made durable by the syncfs before it is named). */
async function copyFile(src: string, dst: string): Promise<void> {
  await fsp.copyFile(src, dst, constants.COPYFILE_EXCL);
  await fsp.chmod(dst, FILE_MODE);
}
