/**
 * `snapcrypt-server check`: without any key (I6), that every sealed snapshot of each user (and their
 * `current`) is whole: its clear-text index is well formed and lists the head, and every object it
 * lists is there as a non-empty regular file; with readData, that every such file can be read to its
 * end (btrfs verifies its block checksums on each read from the disk, so a damaged block is an I/O
 * error). It opens files for reading only and writes nothing.
 *
 * Memory stays bounded (I8): a user's snapshots are walked together prefix by prefix (00..ff), so what
 * is held at a time is one prefix's ids of one snapshot, the keys of the files read so far in that
 * prefix, one index chunk and one read buffer; each snapshot keeps only its counts, where its index
 * stopped, and its first few problems.
 */
import fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { fileSource, ID_BYTES, INDEX_CHUNK, isSnapshotName, prefixName, scanIndex, takeIndexPrefix } from '../drivers/localdir.js';
import { serverConfig, serverUsers } from './users.js';

/** How many problems of each snapshot are named with their ids and paths; the counts cover all. */
export const LISTED_PROBLEMS = 5;

/** Bytes read from an object file at once (objects are up to 16.5 MiB; one buffer serves them all). */
const READ_BUFFER = 1024 * 1024;

export interface ObjectProblem {
  readonly id: string;
  readonly path: string;
  /** "missing", "empty", "not a regular file" or "unreadable (EIO)" (the error's code). */
  readonly problem: string;
}

/** What check found in one snapshot, or in current. */
export interface StateReport {
  readonly user: string;
  /** The snapshot's name, or "current". */
  readonly name: string;
  /** Its repository directory. */
  readonly path: string;
  /** Ids its index lists. */
  objects: number;
  /** Whether its objects were checked (not when the index is unsorted or cannot be read). */
  checked: boolean;
  /** Listed objects with no file. */
  missing: number;
  /** Listed objects whose file is empty, not a regular file, or cannot be read. */
  unreadable: number;
  /** With readData: object files read to their end, and their bytes. */
  read: number;
  bytesRead: number;
  /** With readData: object files not read again, being the same file already read in an earlier snapshot. */
  shared: number;
  /** What is wrong with its index or head (empty when nothing). */
  readonly index: string[];
  /** current only: a backup replaced its index during the check, so what was found may be out of date. */
  changed: boolean;
  /** The first LISTED_PROBLEMS object problems. */
  readonly problems: ObjectProblem[];
}

export interface CheckOptions {
  readonly configFile: string;
  /** Only this user (default: every user with a snapshots directory). */
  readonly user?: string;
  /** Also read every object file to its end. */
  readonly readData: boolean;
  /** Called with each user's reports (snapshots oldest first, then current) once they are checked. */
  readonly report: (user: string, reports: readonly StateReport[]) => void;
  /** Called as a user's check advances (done of total steps). */
  readonly progress?: (user: string, done: number, total: number) => void;
}

/** A report that asks for attention (a current changed by a backup during the check does not). */
export function hasProblems(r: StateReport): boolean {
  return !r.changed && (r.missing > 0 || r.unreadable > 0 || r.index.length > 0);
}

function errnoOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Access refused to whoever runs the check: a problem of the command (exit 9), not of the data. */
function isDenied(err: unknown): boolean {
  const code = errnoOf(err);
  return code === 'EACCES' || code === 'EPERM';
}

function deniedError(path: string, user: string): SnapError {
  return new SnapError('io', `Cannot read ${path}: permission denied; run the check as root, or as ${user} with --user ${user}`);
}

/** A snapshot or current while it is checked: its report, and where its index goes on. */
interface State {
  readonly report: StateReport;
  /** Whole ids in the index, in bytes. */
  length: number;
  /** Byte offset of the first id of the next prefix. */
  offset: number;
  /** current only: its index, held open for the whole check so that one version of it is read. */
  live: { fh: fsp.FileHandle; ino: number; mtimeMs: number; size: number } | null;
}

function newReport(user: string, name: string, path: string): StateReport {
  return { user, name, path, objects: 0, checked: false, missing: 0, unreadable: 0, read: 0, bytesRead: 0, shared: 0, index: [], changed: false, problems: [] };
}

/** Reads the head; validates the index (length, order, head listed). Opens current's index for the rest of the check. */
async function openState(user: string, name: string, path: string, live: boolean): Promise<State> {
  const state: State = { report: newReport(user, name, path), length: 0, offset: 0, live: null };
  const r = state.report;
  const indexPath = join(path, 'index');
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(indexPath, 'r');
  } catch (err) {
    if (isDenied(err)) throw deniedError(indexPath, user);
    r.index.push(errnoOf(err) === 'ENOENT' ? 'the index is missing' : `the index cannot be opened (${errnoOf(err) ?? messageOf(err)})`);
    return state;
  }
  let keep = false;
  try {
    const st = await fh.stat();
    if (!st.isFile()) {
      r.index.push('the index is not a regular file');
      return state;
    }
    if (st.size % ID_BYTES !== 0) r.index.push(`the index of ${st.size} bytes is not a whole number of ${ID_BYTES}-byte ids`);
    state.length = st.size - (st.size % ID_BYTES);
    r.objects = state.length / ID_BYTES;
    let headId: string | null = null;
    try {
      const head = await fsp.readFile(join(path, 'head'), 'latin1');
      if (/^[0-9a-f]{64}\n$/.test(head)) headId = head.slice(0, 64);
      else r.index.push('the head is not 64 lower-case hex digits and a newline');
    } catch (err) {
      if (isDenied(err)) throw deniedError(join(path, 'head'), user);
      r.index.push(errnoOf(err) === 'ENOENT' ? 'the head is missing' : `the head cannot be read (${errnoOf(err) ?? messageOf(err)})`);
    }
    let scan;
    try {
      scan = await scanIndex(fileSource(fh, state.length, indexPath), headId);
    } catch (err) {
      r.index.push(`the index cannot be read (${errnoOf((err as Error).cause) ?? messageOf(err)}); its objects were not checked`);
      return state;
    }
    if (scan.unsortedAt !== null) {
      r.index.push(`the index is not sorted strictly ascending at entry ${scan.unsortedAt}; its objects were not checked`);
      return state;
    }
    if (headId !== null && !scan.headListed) r.index.push(`the head object ${headId} is not listed in the index`);
    r.checked = true;
    if (live) {
      state.live = { fh, ino: st.ino, mtimeMs: st.mtimeMs, size: st.size };
      keep = true;
    }
    return state;
  } finally {
    if (!keep) await fh.close();
  }
}

function addProblem(state: State, kind: 'missing' | 'unreadable', id: string, path: string, problem: string): void {
  state.report[kind]++;
  if (state.report.problems.length < LISTED_PROBLEMS) state.report.problems.push({ id, path, problem });
}

/** The ids of one prefix in a state's index, from where the previous prefix ended. */
async function takePrefix(state: State, prefix: number, scratch: Buffer): Promise<Set<string>> {
  const { ids, next } = await takeIndexPrefix(join(state.report.path, 'index'), state.length, state.offset, prefix, scratch, state.live?.fh ?? null);
  state.offset = next;
  return ids;
}

/** Reads a file to its end through buf; returns the bytes read. */
function readToEnd(path: string, buf: Buffer): number {
  const fd = fs.openSync(path, 'r');
  try {
    let total = 0;
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0; ) total += n;
    return total;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Checks one listed object. readKeys (with readData) holds "id ino size mtime" of the files already
 * read in this prefix by earlier snapshots of the user: a file with the same id, inode, size and
 * mtime in a later snapshot is the same file, sharing the same extents (a btrfs snapshot keeps inode
 * numbers and times), so reading it again would read the same blocks. This is sound enough because
 * objects are immutable and named by their id: nothing writes an object file in place, so a file that
 * looks the same is the same content; and an adversary who forged the times would gain nothing the
 * client's own `verify --read-data` does not catch.
 */
function checkObject(state: State, id: string, readKeys: Set<string> | null, buf: Buffer): void {
  const path = join(state.report.path, 'objects', id.slice(0, 2), id);
  let st: fs.Stats | undefined;
  try {
    st = fs.lstatSync(path, { throwIfNoEntry: false }); // sync: far cheaper per object than fsp
  } catch (err) {
    if (errnoOf(err) !== 'ENOTDIR') {
      if (isDenied(err)) throw deniedError(path, state.report.user);
      addProblem(state, 'unreadable', id, path, `unreadable (${errnoOf(err) ?? messageOf(err)})`);
      return;
    }
  }
  if (st === undefined) return addProblem(state, 'missing', id, path, 'missing');
  if (!st.isFile()) return addProblem(state, 'unreadable', id, path, 'not a regular file');
  if (st.size === 0) return addProblem(state, 'unreadable', id, path, 'empty');
  if (readKeys === null) return;
  const key = `${id} ${st.ino} ${st.size} ${st.mtimeMs}`;
  if (readKeys.has(key)) {
    state.report.shared++;
    return;
  }
  let n: number;
  try {
    n = readToEnd(path, buf);
  } catch (err) {
    return addProblem(state, 'unreadable', id, path, `unreadable (${errnoOf(err) ?? messageOf(err)})`);
  }
  if (n !== st.size) return addProblem(state, 'unreadable', id, path, `unreadable (${n} of ${st.size} bytes read)`);
  state.report.read++;
  state.report.bytesRead += n;
  readKeys.add(key);
}

/** The names of the user's sealed snapshots, oldest first; null when the user has no snapshots directory. */
async function snapshotNames(dir: string, user: string): Promise<string[] | null> {
  try {
    return (await fsp.readdir(dir)).filter(isSnapshotName).sort();
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return null;
    if (isDenied(err)) throw deniedError(dir, user);
    throw new SnapError('io', `Cannot list ${dir}: ${messageOf(err)}`);
  }
}

async function checkUser(root: string, user: string, opts: CheckOptions, scratch: Buffer, buf: Buffer): Promise<StateReport[]> {
  const snapDir = join(root, 'snapshots', user);
  const currentRepo = join(root, 'users', user, 'current', 'repo');
  const names = await snapshotNames(snapDir, user);
  const hasCurrent = await fsp.lstat(join(currentRepo, 'index')).then(
    () => true,
    (err: unknown) => {
      if (isDenied(err)) throw deniedError(currentRepo, user);
      return false;
    },
  );
  if (names === null && !hasCurrent && opts.user !== undefined) {
    throw new SnapError('not-found', `No user ${user} on this server (neither ${snapDir} nor ${join(currentRepo, 'index')} exists)`);
  }
  const states: State[] = [];
  try {
    for (const name of names ?? []) states.push(await openState(user, name, join(snapDir, name, 'repo'), false));
    if (hasCurrent) states.push(await openState(user, 'current', currentRepo, true));
    let usable = states.filter((s) => s.report.checked);
    for (let p = 0; p < 256; p++) {
      opts.progress?.(user, p, 256);
      const readKeys = opts.readData ? new Set<string>() : null;
      for (const state of usable) {
        let ids: Set<string>;
        try {
          ids = await takePrefix(state, p, scratch);
        } catch (err) {
          if (isDenied(err)) throw deniedError(join(state.report.path, 'index'), user);
          state.report.index.push(`the index cannot be read at prefix ${prefixName(p)} (${errnoOf((err as Error).cause) ?? messageOf(err)}); the rest of its objects were not checked`);
          state.report.checked = false;
          continue;
        }
        for (const id of ids) checkObject(state, id, readKeys, buf);
      }
      usable = usable.filter((s) => s.report.checked);
    }
    opts.progress?.(user, 256, 256);
  } finally {
    for (const s of states) await s.live?.fh.close();
  }
  for (const s of states) {
    if (s.live === null) continue;
    // a backup that committed meanwhile replaced the index (rename) and may have pruned objects
    const now = await fsp.lstat(join(s.report.path, 'index')).catch(() => null);
    s.report.changed = now === null || now.ino !== s.live.ino || now.mtimeMs !== s.live.mtimeMs || now.size !== s.live.size;
  }
  return states.map((s) => s.report);
}

export interface UserSummary {
  readonly user: string;
  /** Sealed snapshots checked. */
  readonly snapshots: number;
  /** Whether current was checked (it has an index). */
  readonly current: boolean;
  readonly objects: number;
  readonly missing: number;
  readonly unreadable: number;
  /** Snapshots (or current) whose index or head is wrong. */
  readonly badIndexes: number;
  readonly read: number;
  readonly bytesRead: number;
  readonly shared: number;
  /** Nothing needs attention (hasProblems of none). */
  readonly ok: boolean;
}

/** One user's reports added up. */
export function summarize(user: string, reports: readonly StateReport[]): UserSummary {
  const sum = (k: 'objects' | 'missing' | 'unreadable' | 'read' | 'bytesRead' | 'shared') => reports.reduce((n, r) => n + r[k], 0);
  return {
    user,
    snapshots: reports.filter((r) => r.name !== 'current').length,
    current: reports.some((r) => r.name === 'current'),
    objects: sum('objects'),
    missing: sum('missing'),
    unreadable: sum('unreadable'),
    badIndexes: reports.filter((r) => r.index.length > 0).length,
    read: sum('read'),
    bytesRead: sum('bytesRead'),
    shared: sum('shared'),
    ok: !reports.some(hasProblems),
  };
}

/** Checks each user's snapshots and current; returns whether anything needs attention (hasProblems). */
export async function check(opts: CheckOptions): Promise<boolean> {
  const config = await serverConfig(opts.configFile, false);
  const users = await serverUsers(config.root, opts.user, '; run it as root, or check your own snapshots with --user NAME');
  const scratch = Buffer.allocUnsafe(INDEX_CHUNK);
  const buf = Buffer.allocUnsafe(opts.readData ? READ_BUFFER : 0);
  let problems = false;
  for (const user of users) {
    const reports = await checkUser(config.root, user, opts, scratch, buf);
    if (reports.some(hasProblems)) problems = true;
    opts.report(user, reports);
  }
  return problems;
}
