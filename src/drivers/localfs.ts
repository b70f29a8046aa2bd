/** The local file system as a backup source and a restore target (node:fs plus the fsmeta helper). */
import fs from 'node:fs';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { type NodeKindCode, type Xattr, NodeKind } from '../core/format.js';
import type { SourceFs, SourceStat, TargetFs } from '../engine/source.js';
import type { DirectWriterSpec } from '../storage/types.js';
import { FsMeta } from './fsmeta.js';

const execFileAsync = promisify(execFile);
const S_IFMT = 0o170000;
const NS_PER_S = 1_000_000_000n;
/** Whole seconds that fs.futimes passes on exactly (a double, and libuv's conversion to a timespec). */
const MAX_EXACT_SECONDS = BigInt(Number.MAX_SAFE_INTEGER);
const MKFIFO = 'POSIX::mkfifo(pack("H*", $ARGV[0]), oct($ARGV[1])) or die "mkfifo: $!\\n"';

function kindOfMode(mode: number): NodeKindCode {
  switch (mode & S_IFMT) {
    case 0o100000:
      return NodeKind.file;
    case 0o040000:
      return NodeKind.dir;
    case 0o120000:
      return NodeKind.symlink;
    case 0o010000:
      return NodeKind.fifo;
    case 0o020000:
      return NodeKind.chardev;
    case 0o060000:
      return NodeKind.blockdev;
    default:
      return NodeKind.socket;
  }
}

function toStat(s: fs.BigIntStats): SourceStat {
  const mode = Number(s.mode);
  return {
    kind: kindOfMode(mode),
    mode,
    uid: Number(s.uid),
    gid: Number(s.gid),
    size: Number(s.size),
    mtimeNs: s.mtimeNs,
    ctimeNs: s.ctimeNs,
    dev: Number(s.dev),
    ino: Number(s.ino),
    nlink: Number(s.nlink),
    rdev: Number(s.rdev),
  };
}

export class LocalSourceFs implements SourceFs {
  private meta: FsMeta | null = null;
  private get fsmeta(): FsMeta {
    this.meta ??= FsMeta.start();
    return this.meta;
  }
  lstat(p: Buffer): SourceStat {
    return toStat(fs.lstatSync(p, { bigint: true }));
  }
  readdir(p: Buffer): Buffer[] {
    // read as latin1 strings and encode back: byte-exact (each byte is one code point below 256),
    // and about half the time of `encoding: 'buffer'`, which gives every name an ArrayBuffer of its
    // own; Buffer.from puts the small copies in Node's shared pool
    return fs.readdirSync(p, { encoding: 'latin1' }).map((n) => Buffer.from(n, 'latin1'));
  }
  readlink(p: Buffer): Buffer {
    return fs.readlinkSync(p, { encoding: 'buffer' });
  }
  open(p: Buffer): number {
    return fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  }
  read(fd: number, buf: Buffer, position: number): number {
    return fs.readSync(fd, buf, 0, buf.length, position);
  }
  close(fd: number): void {
    fs.closeSync(fd);
  }
  // node:fs's callback call: far less CPU per call than node:fs/promises' FileHandles
  readAsync(fd: number, buf: Buffer, position: number): Promise<number> {
    return new Promise((resolve, reject) => {
      fs.read(fd, buf, 0, buf.length, position, (err, n) => (err ? reject(err) : resolve(n)));
    });
  }
  workerReader(): DirectWriterSpec {
    return { module: import.meta.url, arg: null };
  }
  xattrs(p: Buffer): Promise<Xattr[]> {
    return this.fsmeta.listXattrs(p);
  }
  async finish(): Promise<void> {
    await this.meta?.close();
    this.meta = null;
  }
}

export class LocalTargetFs implements TargetFs {
  readonly isRoot = process.getuid?.() === 0;
  private meta: FsMeta | null = null;
  private get fsmeta(): FsMeta {
    this.meta ??= FsMeta.start();
    return this.meta;
  }
  lstat(p: Buffer): SourceStat | null {
    try {
      return toStat(fs.lstatSync(p, { bigint: true }));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  }
  mkdir(p: Buffer): void {
    fs.mkdirSync(p, { mode: 0o700 });
  }
  create(p: Buffer): number {
    return fs.openSync(p, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
  }
  write(fd: number, buf: Buffer, position: number): void {
    let off = 0;
    while (off < buf.length) off += fs.writeSync(fd, buf, off, buf.length - off, position + off);
  }
  truncate(fd: number, size: number): void {
    fs.ftruncateSync(fd, size);
  }
  close(fd: number): void {
    fs.closeSync(fd);
  }
  rename(from: Buffer, to: Buffer): void {
    fs.renameSync(from, to);
  }
  unlink(p: Buffer): void {
    fs.unlinkSync(p);
  }
  remove(p: Buffer): void {
    fs.rmSync(p, { force: true, recursive: true });
  }
  symlink(target: Buffer, p: Buffer): void {
    fs.symlinkSync(target, p);
  }
  link(existing: Buffer, p: Buffer): void {
    fs.linkSync(existing, p);
  }
  /**
   * node:fs has no mkfifo; perl's POSIX::mkfifo (perl-base, like the fsmeta helper) makes it. The path
   * goes in hex: arguments are passed as UTF-8 text, which cannot carry every name. The mode is set
   * exactly afterwards with the rest of the metadata (mkfifo applies the umask).
   */
  async mkfifo(p: Buffer, mode: number): Promise<void> {
    try {
      await execFileAsync('perl', ['-MPOSIX', '-e', MKFIFO, p.toString('hex'), (mode & 0o777).toString(8)], {
        env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', LC_ALL: 'C' },
      });
    } catch (err) {
      const detail = (err as { stderr?: string }).stderr?.trim() || String(err);
      throw new Error(`cannot make fifo ${p.toString('utf8')}: ${detail}`, { cause: err });
    }
  }
  chown(p: Buffer, uid: number, gid: number): void {
    fs.lchownSync(p, uid, gid);
  }
  chmod(p: Buffer, mode: number): void {
    fs.chmodSync(p, mode);
  }
  /** Skipped when the file already has that owner (an fstat costs far less than a chown on btrfs). */
  fchown(fd: number, uid: number, gid: number): void {
    const st = fs.fstatSync(fd);
    if (st.uid !== uid || st.gid !== gid) fs.fchownSync(fd, uid, gid);
  }
  fchmod(fd: number, mode: number): void {
    fs.fchmodSync(fd, mode);
  }
  setTimesOpen(fd: number, atimeNs: bigint, mtimeNs: bigint): boolean {
    const exact = (ns: bigint) => ns >= 0n && ns % NS_PER_S === 0n && ns / NS_PER_S <= MAX_EXACT_SECONDS;
    if (!exact(atimeNs) || !exact(mtimeNs)) return false;
    fs.futimesSync(fd, Number(atimeNs / NS_PER_S), Number(mtimeNs / NS_PER_S));
    return true;
  }
  isEmptyDir(p: Buffer): boolean {
    const dir = fs.opendirSync(p);
    try {
      return dir.readSync() === null;
    } finally {
      dir.closeSync();
    }
  }
  setXattr(p: Buffer, x: Xattr): Promise<void> {
    return this.fsmeta.setXattr(p, x.name, x.value);
  }
  setTimes(p: Buffer, atimeNs: bigint, mtimeNs: bigint): Promise<void> {
    return this.fsmeta.setTimes(p, atimeNs, mtimeNs);
  }
  async finish(): Promise<void> {
    await this.meta?.close();
    this.meta = null;
  }
  /** Restore worker threads load this module and call createTargetFs. */
  workerFs(): DirectWriterSpec {
    return { module: import.meta.url, arg: null };
  }
}

/** Reads a LocalSourceFs's descriptors on another thread (SourceFs.workerReader). */
export function createReader(): (fd: number, buf: Buffer, position: number) => number {
  return (fd, buf, position) => fs.readSync(fd, buf, 0, buf.length, position);
}

/** A LocalTargetFs for a restore worker thread (TargetFs.workerFs); it uses only the synchronous calls. */
export function createTargetFs(): LocalTargetFs {
  return new LocalTargetFs();
}
