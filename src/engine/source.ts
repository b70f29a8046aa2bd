/**
 * What the backup engine needs from the file system it reads, and the restore engine from the one it
 * writes. The drivers in src/drivers/localfs.ts implement them on node:fs.
 */
import type { NodeKindCode, Xattr } from '../core/format.js';
import type { DirectWriterSpec } from '../storage/types.js';

export interface SourceStat {
  readonly kind: NodeKindCode;
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  readonly size: number;
  readonly mtimeNs: bigint;
  readonly ctimeNs: bigint;
  readonly dev: number;
  readonly ino: number;
  readonly nlink: number;
  readonly rdev: number;
}

/** Paths are Buffers: names may be any bytes. Sync calls throw Node errno errors (err.code). */
export interface SourceFs {
  /** path may lie in a buffer that the caller reuses after the call: not to be kept. */
  lstat(path: Buffer): SourceStat;
  /** Entry names of a directory (not sorted); the walk keeps them, so small ones should share memory. */
  readdir(path: Buffer): Buffer[];
  readlink(path: Buffer): Buffer;
  open(path: Buffer): number;
  /** Read into buf at the given file position; returns bytes read (0 at end of file). */
  read(fd: number, buf: Buffer, position: number): number;
  close(fd: number): void;
  /** read off the main thread (optional): a backup then reads files ahead (engine/readahead.ts). */
  readAsync?(fd: number, buf: Buffer, position: number): Promise<number>;
  /**
   * Optional: the module (exporting createReader(arg), which returns a synchronous
   * (fd, buf, position) => bytes read) with which another thread of this process reads this file
   * system's open descriptors. A backup then reads large files on a seal worker thread.
   */
  workerReader?(): DirectWriterSpec;
  xattrs(path: Buffer): Promise<Xattr[]>;
}

export interface TargetFs {
  lstat(path: Buffer): SourceStat | null;
  mkdir(path: Buffer): void;
  /** Create (exclusively) a new file for writing; returns fd. */
  create(path: Buffer): number;
  write(fd: number, buf: Buffer, position: number): void;
  truncate(fd: number, size: number): void;
  close(fd: number): void;
  rename(from: Buffer, to: Buffer): void;
  unlink(path: Buffer): void;
  /** Remove a file, symlink or directory tree. */
  remove(path: Buffer): void;
  symlink(target: Buffer, path: Buffer): void;
  link(existing: Buffer, path: Buffer): void;
  mkfifo(path: Buffer, mode: number): Promise<void>;
  /** Owner (only when running as root), then mode, then xattrs. */
  chown(path: Buffer, uid: number, gid: number): void;
  chmod(path: Buffer, mode: number): void;
  /** Owner and mode of an open file. */
  fchown(fd: number, uid: number, gid: number): void;
  fchmod(fd: number, mode: number): void;
  /**
   * atime and mtime of an open file, if they can be set exactly that way (else false, and nothing is
   * set): node:fs takes seconds as a double, exact for whole seconds only.
   */
  setTimesOpen(fd: number, atimeNs: bigint, mtimeNs: bigint): boolean;
  /** Whether a directory has no entries. */
  isEmptyDir(path: Buffer): boolean;
  setXattr(path: Buffer, x: Xattr): Promise<void>;
  /** atime and mtime with nanoseconds, not following symlinks. */
  setTimes(path: Buffer, atimeNs: bigint, mtimeNs: bigint): Promise<void>;
  readonly isRoot: boolean;
  finish(): Promise<void>;
  /**
   * Optional: the module (exporting createTargetFs(arg)) that gives a restore's worker threads this
   * file system's synchronous calls; without it, a restore writes everything on the main thread.
   */
  workerFs?(): DirectWriterSpec;
}
