/**
 * File metadata that node:fs cannot handle: extended attributes (list/get/set on the link itself,
 * never following symlinks) and atime/mtime with exact nanosecond precision (fs.utimes takes
 * doubles and loses nanoseconds; fs.lutimes likewise).
 *
 * The work is done by one long-lived helper, `perl -e <HELPER>` (perl-base is Essential on Debian),
 * that calls the raw syscalls with perl's syscall(). It is spawned on the first request (so an unused
 * FsMeta costs nothing) and speaks a length-prefixed binary protocol over stdin/stdout:
 *
 *   request  = u32le length, u8 op, field*          field = u32le length, bytes
 *              op 1 list(path)  op 2 set(path, name, value)  op 3 times(path, timespec[2], timespec32[2])
 *   response = u32le length, u8 status, payload
 *              status 0: list -> (u32le nameLen, name, u32le valueLen, value)*; others -> empty
 *              status 1: u32le errno, field what (syscall name), field detail (xattr name or empty)
 *
 * Requests are pipelined: frames issued in the same tick are written with one write(), the helper
 * answers strictly in order, and responses are parsed incrementally; each request has its own promise,
 * and a failing request rejects only that promise (SnapError 'io' naming the path, with a
 * Node-style errno error as `cause`, see fsMetaErrno()).
 *
 * Paths and names are bytes (Buffer), may be non-UTF-8 and up to PATH_MAX; they must not contain NUL.
 * Relative paths are resolved against process.cwd() at call time (the helper never chdirs).
 * There is no backpressure: everything issued is buffered in memory until the helper takes it, so
 * callers issuing huge numbers of large setXattr values should bound their own concurrency.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { endianness } from 'node:os';
import type { Readable, Writable } from 'node:stream';
import { getSystemErrorMessage, getSystemErrorName } from 'node:util';
import { SnapError } from '../core/errors.js';

export interface Xattr {
  name: Buffer;
  value: Buffer;
}

export type MetaPath = Buffer | string;

/** Syscall numbers. `utimensat` always takes two 64-bit timespecs ({s64 sec, s64 nsec}: native
 * utimensat on 64-bit, utimensat_time64 on 32-bit); `utimensat32` (-1 if none) is the classic 32-bit
 * call with {s32 sec, s32 nsec}, used only when the kernel lacks utimensat_time64 (Linux < 5.1). */
interface SyscallTable {
  utimensat: number;
  utimensat32: number;
  lsetxattr: number;
  lgetxattr: number;
  llistxattr: number;
}

// asm-generic/unistd.h, shared by the newer 64-bit architectures.
const GENERIC64: SyscallTable = { utimensat: 88, utimensat32: -1, lsetxattr: 6, lgetxattr: 9, llistxattr: 12 };

const SYSCALLS: Partial<Record<NodeJS.Architecture, SyscallTable>> = {
  x64: { utimensat: 280, utimensat32: -1, lsetxattr: 189, lgetxattr: 192, llistxattr: 195 },
  arm64: GENERIC64,
  riscv64: GENERIC64,
  loong64: GENERIC64,
  // 32-bit: 412 is utimensat_time64 on every 32-bit architecture.
  arm: { utimensat: 412, utimensat32: 348, lsetxattr: 227, lgetxattr: 230, llistxattr: 233 }, // EABI
  ia32: { utimensat: 412, utimensat32: 320, lsetxattr: 227, lgetxattr: 230, llistxattr: 233 },
};

/*
 * The helper. Perl's syscall() passes an argument as an integer if it is numeric, else as a pointer to
 * its string buffer (forcing it writable, hence variables, never literals); perl strings are always
 * NUL-terminated, so a byte string is a valid C string. Output buffers are preallocated and reused;
 * on ERANGE the required size is queried and the buffer grown. Responses are flushed when no complete
 * request is left in the input (before blocking in read) or when 64 KiB have accumulated.
 */
const HELPER = String.raw`
use strict; use warnings; use Errno ();
my ($UT, $UT32, $LSET, $LGET, $LLIST) = map { 0 + $_ } @ARGV;
my ($FDCWD, $NOFOLLOW, $MAXBUF) = (-100, 0x100, 1 << 24);
binmode STDIN; binmode STDOUT;
my ($lbuf, $vbuf, $in, $out) = ("\0" x 4096, "\0" x 4096, '', '');

sub fail { return pack('CV', 1, 0 + $!) . pack('V/a*', $_[0]) . pack('V/a*', $_[1] // '') }

sub fetch {
  my ($nr, $bref, @args) = @_;
  for (;;) {
    my $n = syscall($nr, @args, $$bref, length $$bref);
    return substr($$bref, 0, $n) if $n >= 0;
    return undef unless $!{ERANGE};
    my $need = syscall($nr, @args, 0, 0);
    return undef if $need < 0;
    my $size = 2 * length $$bref;
    $size = $need if $size < $need;
    if ($size > $MAXBUF) { $! = Errno::E2BIG(); return undef }
    $$bref = "\0" x $size;
  }
}

sub list {
  my ($path) = @_;
  my $names = fetch($LLIST, \$lbuf, $path);
  return ($!{ENOTSUP} || $!{ENODATA}) ? "\0" : fail('llistxattr') unless defined $names;
  my $res = "\0";
  for my $name (split /\0/, $names) {
    my $value = fetch($LGET, \$vbuf, $path, $name);
    if (!defined $value) { next if $!{ENODATA} || $!{ENOTSUP}; return fail('lgetxattr', $name) }
    $res .= pack('V/a*', $name) . pack('V/a*', $value);
  }
  return $res;
}

sub setx {
  my ($path, $name, $value) = @_;
  return syscall($LSET, $path, $name, $value, length $value, 0) < 0 ? fail('lsetxattr', $name) : "\0";
}

sub utimes {
  my ($path, $ts, $ts32) = @_;
  my $r = syscall($UT, $FDCWD, $path, $ts, $NOFOLLOW);
  if ($r < 0 && $!{ENOSYS} && $UT32 >= 0) {
    if (length $ts32) { $r = syscall($UT32, $FDCWD, $path, $ts32, $NOFOLLOW) } else { $! = Errno::EOVERFLOW() }
  }
  return $r < 0 ? fail('utimensat') : "\0";
}

sub flush {
  while (length $out) {
    my $w = syswrite(STDOUT, $out);
    if (!defined $w) { next if $!{EINTR}; exit 1 }
    substr($out, 0, $w, '');
  }
}

for (;;) {
  my $got = sysread(STDIN, $in, 1 << 20, length $in);
  if (!defined $got) { next if $!{EINTR}; die "fsmeta: read: $!\n" }
  my ($p, $len) = (0, length $in);
  while ($len - $p >= 4) {
    my $flen = unpack('V', substr($in, $p, 4));
    last if $len - $p - 4 < $flen;
    my ($op, $q, $end, @f) = (ord(substr($in, $p + 4, 1)), $p + 5, $p + 4 + $flen);
    while ($q + 4 <= $end) {
      my $l = unpack('V', substr($in, $q, 4));
      push @f, substr($in, $q + 4, $l);
      $q += 4 + $l;
    }
    $p = $end;
    my $res = $op == 1 ? list(@f) : $op == 2 ? setx(@f) : $op == 3 ? utimes(@f) : die "fsmeta: bad op $op\n";
    $out .= pack('V', length $res) . $res;
    flush() if length $out >= 65536;
  }
  substr($in, 0, $p, '');
  flush();
  exit 0 unless $got;
}
`;

const OP_LIST = 1;
const OP_SET = 2;
const OP_TIMES = 3;

const NS_PER_S = 1_000_000_000n;
const I64_MIN = -(1n << 63n);
const I64_MAX = (1n << 63n) - 1n;
const I32_MIN = -(1n << 31n);
const I32_MAX = (1n << 31n) - 1n;
const LITTLE_ENDIAN = endianness() === 'LE';

type Helper = ChildProcessByStdio<Writable, Readable, Readable>;

interface Pending {
  path: Buffer;
  ok: (payload: Buffer) => void;
  fail: (err: Error) => void;
}

/** The errno code ('ENOENT', 'ENOTSUP', ...) of an error produced by FsMeta, if any. */
export function fsMetaErrno(err: unknown): string | undefined {
  if (!(err instanceof SnapError)) return undefined;
  const cause = err.cause as { code?: unknown } | undefined;
  return typeof cause?.code === 'string' ? cause.code : undefined;
}

export class FsMeta {
  private child: Helper | undefined;
  private closed = false;
  // FIFO of requests in flight, in the order the helper answers them.
  private queue: Array<Pending | undefined> = [];
  private head = 0;
  // Frames not yet written to the helper.
  private frames: Buffer[] = [];
  private framesLen = 0;
  private flushScheduled = false;
  // Response bytes received but not yet parsed; `need` = bytes required before parsing can progress.
  private chunks: Buffer[] = [];
  private buffered = 0;
  private need = 4;
  private stderrTail = '';

  private constructor() {}

  /** A handle on the helper; the helper process itself is started by the first request. */
  static start(): FsMeta {
    return new FsMeta();
  }

  /** All extended attributes of `path` (not following a final symlink); [] if unsupported there. */
  listXattrs(path: MetaPath): Promise<Xattr[]> {
    return this.request(OP_LIST, path, [], decodeXattrs);
  }

  /** Creates or replaces one extended attribute of `path` (not following a final symlink). */
  setXattr(path: MetaPath, name: MetaPath, value: Uint8Array): Promise<void> {
    const nameBuf = toBuffer(name);
    if (nameBuf.length === 0 || nameBuf.includes(0)) {
      return Promise.reject(new SnapError('io', `invalid extended attribute name for ${showBytes(toBuffer(path))}`));
    }
    return this.request(OP_SET, path, [nameBuf, Buffer.from(value.buffer, value.byteOffset, value.byteLength)], decodeVoid);
  }

  /** Sets atime and mtime of `path` (a symlink itself, not its target) to the exact nanosecond. */
  setTimes(path: MetaPath, atimeNs: bigint, mtimeNs: bigint): Promise<void> {
    let ts: [Buffer, Buffer];
    try {
      ts = encodeTimes(atimeNs, mtimeNs, this.table().utimensat32 >= 0);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.request(OP_TIMES, path, ts, decodeVoid);
  }

  /** Lets requests in flight finish, then stops the helper. Later calls reject. */
  async close(): Promise<void> {
    this.closed = true;
    const child = this.child;
    if (child === undefined) return;
    this.flush();
    setRef(child, true); // keep the event loop alive until the helper is gone
    const gone = new Promise<void>((resolve) => child.once('close', () => resolve()));
    child.stdin.end();
    await gone;
  }

  private table(): SyscallTable {
    const table = process.platform === 'linux' ? SYSCALLS[process.arch] : undefined;
    if (table === undefined) {
      throw new SnapError('io', `file metadata (xattrs, ns times) is not supported on ${process.platform}/${process.arch}`);
    }
    return table;
  }

  private request<T>(op: number, path: MetaPath, fields: Buffer[], decode: (payload: Buffer) => T): Promise<T> {
    let child: Helper;
    let abs: Buffer;
    try {
      abs = absolute(toBuffer(path));
      if (abs.includes(0)) throw new SnapError('io', `invalid path (contains NUL): ${showBytes(abs)}`);
      child = this.helper();
    } catch (err) {
      return Promise.reject(err);
    }
    const { promise, resolve, reject } = Promise.withResolvers<T>();
    const ok = (payload: Buffer): void => {
      let value: T;
      try {
        value = decode(payload);
      } catch (err) {
        reject(err);
        return;
      }
      resolve(value);
    };
    if (this.head === this.queue.length) setRef(child, true);
    this.queue.push({ path: abs, ok, fail: reject });
    this.enqueue(op, [abs, ...fields]);
    return promise;
  }

  private helper(): Helper {
    if (this.closed) throw new SnapError('internal', 'FsMeta is closed');
    if (this.child !== undefined) return this.child;
    const t = this.table();
    const args = [t.utimensat, t.utimensat32, t.lsetxattr, t.lgetxattr, t.llistxattr].map(String);
    const child = spawn('perl', ['-e', HELPER, '--', ...args], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', LC_ALL: 'C' },
    });
    this.child = child;
    this.stderrTail = '';
    this.chunks = [];
    this.buffered = 0;
    this.need = 4;
    child.stdout.on('data', (chunk: Buffer) => {
      if (this.child === child) this.onData(chunk);
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      this.stderrTail = (this.stderrTail + s).slice(-2000);
    });
    child.stdin.on('error', () => {}); // EPIPE etc.: reported by the 'close' handler
    child.on('error', (err) => this.onGone(child, `could not be run (${err.message})`));
    child.on('close', (code, signal) => this.onGone(child, `exited (${signal ?? `status ${code}`})`));
    return child;
  }

  private enqueue(op: number, fields: Buffer[]): void {
    let len = 1;
    for (const f of fields) len += 4 + f.length;
    const frame = Buffer.allocUnsafe(4 + len);
    frame.writeUInt32LE(len, 0);
    frame[4] = op;
    let pos = 5;
    for (const f of fields) {
      frame.writeUInt32LE(f.length, pos);
      pos += 4 + f.copy(frame, pos + 4);
    }
    this.frames.push(frame);
    this.framesLen += frame.length;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(() => this.flush());
    }
  }

  private flush(): void {
    this.flushScheduled = false;
    const child = this.child;
    if (child === undefined || this.frames.length === 0) return;
    const data = this.frames.length === 1 ? this.frames[0]! : Buffer.concat(this.frames, this.framesLen);
    this.frames = [];
    this.framesLen = 0;
    child.stdin.write(data);
  }

  private onData(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered < this.need) return;
    const buf = this.chunks.length === 1 ? chunk : Buffer.concat(this.chunks, this.buffered);
    let pos = 0;
    while (buf.length - pos >= 4) {
      const len = buf.readUInt32LE(pos);
      if (buf.length - pos - 4 < len) break;
      const body = buf.subarray(pos + 4, pos + 4 + len);
      pos += 4 + len;
      if (!this.dispatch(body)) return;
    }
    const rest = buf.subarray(pos);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.buffered = rest.length;
    this.need = rest.length >= 4 ? 4 + rest.readUInt32LE(0) : 4;
  }

  /** Settles the oldest request with one response; false if the helper was killed for a protocol error. */
  private dispatch(body: Buffer): boolean {
    const pending = this.queue[this.head];
    if (pending === undefined || body.length === 0) {
      this.child?.kill();
      this.onGone(this.child, 'sent an unexpected response');
      return false;
    }
    this.queue[this.head++] = undefined;
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
      if (this.child !== undefined && !this.closed) setRef(this.child, false);
    } else if (this.head >= 1024 && this.head * 2 >= this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    if (body[0] === 0) pending.ok(body.subarray(1));
    else pending.fail(helperError(pending.path, body));
    return true;
  }

  private onGone(child: Helper | undefined, reason: string): void {
    if (child === undefined || this.child !== child) return;
    this.child = undefined;
    this.frames = [];
    this.framesLen = 0;
    this.chunks = [];
    this.buffered = 0;
    const queue = this.queue.slice(this.head);
    this.queue = [];
    this.head = 0;
    if (queue.length === 0) return;
    const tail = this.stderrTail.trim();
    const err = new SnapError('io', `file metadata helper (perl) ${reason}${tail ? `: ${tail}` : ''}`);
    for (const p of queue) p?.fail(err);
  }
}

function setRef(child: Helper, on: boolean): void {
  for (const h of [child, child.stdin, child.stdout, child.stderr] as Array<{ ref?(): void; unref?(): void }>) {
    if (on) h.ref?.();
    else h.unref?.();
  }
}

function toBuffer(p: MetaPath): Buffer {
  return typeof p === 'string' ? Buffer.from(p) : p;
}

function absolute(path: Buffer): Buffer {
  return path[0] === 0x2f ? path : Buffer.concat([Buffer.from(process.cwd() + '/'), path]);
}

/** Two timespecs {s64, s64} in native byte order, and the classic 32-bit layout if wanted and in range. */
function encodeTimes(atimeNs: bigint, mtimeNs: bigint, with32: boolean): [Buffer, Buffer] {
  const ts = Buffer.allocUnsafe(32);
  let ts32 = Buffer.allocUnsafe(with32 ? 16 : 0);
  for (const [i, ns] of [atimeNs, mtimeNs].entries()) {
    let sec = ns / NS_PER_S;
    let nsec = ns % NS_PER_S;
    if (nsec < 0n) {
      sec -= 1n;
      nsec += NS_PER_S;
    }
    if (sec < I64_MIN || sec > I64_MAX) throw new SnapError('io', `time out of range: ${ns} ns`);
    if (LITTLE_ENDIAN) {
      ts.writeBigInt64LE(sec, i * 16);
      ts.writeBigInt64LE(nsec, i * 16 + 8);
    } else {
      ts.writeBigInt64BE(sec, i * 16);
      ts.writeBigInt64BE(nsec, i * 16 + 8);
    }
    if (ts32.length === 0) continue;
    if (sec < I32_MIN || sec > I32_MAX) {
      ts32 = Buffer.alloc(0); // the helper reports EOVERFLOW if it has to fall back to the 32-bit call
    } else if (LITTLE_ENDIAN) {
      ts32.writeInt32LE(Number(sec), i * 8);
      ts32.writeInt32LE(Number(nsec), i * 8 + 4);
    } else {
      ts32.writeInt32BE(Number(sec), i * 8);
      ts32.writeInt32BE(Number(nsec), i * 8 + 4);
    }
  }
  return [ts, ts32];
}

function decodeVoid(): void {}

function decodeXattrs(payload: Buffer): Xattr[] {
  const out: Xattr[] = [];
  let pos = 0;
  const take = (): Buffer => {
    if (payload.length - pos < 4) throw new SnapError('protocol', 'truncated xattr list from helper');
    const len = payload.readUInt32LE(pos);
    if (payload.length - pos - 4 < len) throw new SnapError('protocol', 'truncated xattr list from helper');
    // Copy: a view would pin the whole (up to 1 MiB) read chunk for as long as the caller keeps it.
    const b = Buffer.from(payload.subarray(pos + 4, pos + 4 + len));
    pos += 4 + len;
    return b;
  };
  while (pos < payload.length) {
    const name = take();
    out.push({ name, value: take() });
  }
  return out;
}

function helperError(path: Buffer, body: Buffer): SnapError {
  const errno = body.length >= 5 ? body.readUInt32LE(1) : 0;
  const fields: Buffer[] = [];
  for (let pos = 5; pos + 4 <= body.length && fields.length < 2; ) {
    const len = body.readUInt32LE(pos);
    fields.push(body.subarray(pos + 4, pos + 4 + len));
    pos += 4 + len;
  }
  const syscall = fields[0]?.toString('latin1') ?? '?';
  const name = fields[1] !== undefined && fields[1].length > 0 ? showBytes(fields[1]) : '';
  let code = `errno ${errno}`;
  let message = 'unknown error';
  try {
    code = getSystemErrorName(-errno);
    message = getSystemErrorMessage(-errno);
  } catch {
    // keep the numeric form
  }
  const shown = showBytes(path);
  const what =
    syscall === 'llistxattr' ? `cannot list extended attributes of ${shown}`
    : syscall === 'lgetxattr' ? `cannot read extended attribute ${name} of ${shown}`
    : syscall === 'lsetxattr' ? `cannot set extended attribute ${name} on ${shown}`
    : syscall === 'utimensat' ? `cannot set times of ${shown}`
    : `${syscall} ${shown}`;
  const cause = Object.assign(new Error(`${syscall}: ${message}`), { errno: -errno, code, syscall, path: shown });
  return new SnapError('io', `${what}: ${message} (${code})`, { cause });
}

/** Bytes as text for messages: UTF-8 if valid, else with \xNN escapes for the bytes >= 0x80. */
function showBytes(b: Buffer): string {
  const s = b.toString('utf8');
  if (!s.includes('\ufffd') || Buffer.from(s).equals(b)) return s;
  let out = '';
  for (const byte of b) out += byte >= 0x80 ? `\\x${byte.toString(16).padStart(2, '0')}` : String.fromCharCode(byte);
  return out;
}
