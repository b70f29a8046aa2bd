/**
 * Writing one restored file of at most one chunk, once its content is authenticated: the part of the
 * restore that runs on the main thread or on a restore worker thread (restore-pool.ts) alike.
 */
import { NodeKind } from '../core/format.js';
import { SnapError } from '../core/errors.js';
import type { TargetFs } from './source.js';

/** The synchronous calls of a TargetFs that writing a file needs (all a restore worker thread has). */
export type FileWriterFs = Pick<
  TargetFs,
  'create' | 'write' | 'truncate' | 'close' | 'fchown' | 'fchmod' | 'setTimesOpen' | 'remove' | 'rename' | 'lstat' | 'unlink' | 'isRoot'
>;

/** A file of at most one chunk to write: where, and the metadata set on the open file. */
export interface SmallFile {
  readonly dest: Buffer;
  /**
   * null: dest is in a directory this restore created or found empty, so nothing is in the way and
   * the file is created under its final name (O_EXCL). Else a temporary name beside dest, renamed
   * over what is there once the file is complete.
   */
  readonly tmp: Buffer | null;
  readonly size: number;
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  readonly mtimeNs: bigint;
  /** The entry has xattrs: mode and times are set by path after them (the caller does), not here. */
  readonly byPath: boolean;
}

/** Make room for a non-directory at dest: an existing file or link is replaced; a directory is not. */
export function replaceExisting(fs: FileWriterFs, dest: Buffer): void {
  const st = fs.lstat(dest);
  if (st === null) return;
  if (st.kind === NodeKind.dir) throw new SnapError('io', `Cannot restore ${dest.toString('utf8')}: a directory is in the way`);
  fs.unlink(dest);
}

/**
 * Writes a file whose content (null: none, all zeros) is authenticated. Owner and mode are set on the
 * open file (owner first: chown clears setuid/setgid), then its times when they can be set exactly
 * that way. Returns whether the times were set (else the caller sets them by path). A file that
 * fails is removed (also from its temporary name).
 */
export function writeSmallFile(fs: FileWriterFs, f: SmallFile, plain: Buffer | null): boolean {
  const name = f.tmp ?? f.dest;
  if (f.tmp) fs.remove(name);
  const fd = fs.create(name);
  let ok = false;
  let timesSet = false;
  try {
    if (plain !== null && plain.length > 0) fs.write(fd, plain, 0);
    if ((plain?.length ?? 0) !== f.size) fs.truncate(fd, f.size);
    if (fs.isRoot) fs.fchown(fd, f.uid, f.gid);
    if (!f.byPath) {
      fs.fchmod(fd, f.mode);
      timesSet = fs.setTimesOpen(fd, f.mtimeNs, f.mtimeNs);
    }
    ok = true;
  } finally {
    fs.close(fd);
    if (!ok) fs.remove(name);
  }
  if (f.tmp) renameIntoPlace(fs, f.tmp, f.dest);
  return timesSet;
}

/** Renames a complete file from its temporary name to dest, replacing what is there; on failure it is removed. */
export function renameIntoPlace(fs: FileWriterFs, tmp: Buffer, dest: Buffer): void {
  try {
    replaceExisting(fs, dest);
    fs.rename(tmp, dest);
  } catch (err) {
    fs.remove(tmp);
    throw err;
  }
}
