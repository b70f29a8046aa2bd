/**
 * Reading files ahead of the walk. A backup reads the files of a directory one after the other, and
 * with synchronous reads the main thread stood still for every read from the disk (16.5 of 51 s of a
 * first backup of the benchmark corpus with a cold page cache). The walk now names the files it will
 * read, in the order it will read them; ReadAhead opens them and reads their first chunk with the
 * source's asynchronous read (libuv's thread pool), a bounded number of files and bytes ahead, while
 * the main thread hashes and sends the earlier ones.
 */
import type { SourceFs } from './source.js';

/** The first chunk of a file, read ahead: its descriptor (open) and `n` bytes at the start of `data`. */
export interface FirstChunk {
  readonly fd: number;
  readonly data: Buffer;
  readonly n: number;
}

type Outcome = { readonly ok: FirstChunk } | { readonly error: unknown };

/** One file asked for: queued, then started (a read in flight or done), then taken or dropped. */
export class AheadFile {
  readonly path: Buffer;
  /** Bytes of its first read: min(chunk size, size by lstat), at least 1. */
  readonly want: number;
  started: Promise<Outcome> | null = null;
  /** Memory its buffer holds, while started and not yet taken. */
  held = 0;
  done = false;
  constructor(path: Buffer, want: number) {
    this.path = path;
    this.want = want;
  }
}

/** Buffers to read into: the backup's ReadBuffers. */
export interface ReadMemory {
  take(size: number): Buffer;
  give(view: Uint8Array): void;
}

/** Reads `buf.length` bytes at `pos` with a synchronous read, or fewer at the end of the file. */
export function readFullSync(read: (fd: number, buf: Buffer, position: number) => number, fd: number, buf: Buffer, pos: number): number {
  let n = 0;
  while (n < buf.length) {
    const r = read(fd, n === 0 ? buf : buf.subarray(n), pos + n);
    if (r === 0) break;
    n += r;
  }
  return n;
}

/** Reads `buf.length` bytes at `pos`, or fewer at the end of the file. */
export async function readFullAsync(fs: AsyncSource, fd: number, buf: Buffer, pos: number): Promise<number> {
  let n = 0;
  while (n < buf.length) {
    const r = await fs.readAsync(fd, n === 0 ? buf : buf.subarray(n), pos + n);
    if (r === 0) break;
    n += r;
  }
  return n;
}

export type AsyncSource = Required<Pick<SourceFs, 'readAsync'>> & Pick<SourceFs, 'open' | 'close'>;

/** Whether a source offers the asynchronous read that reading ahead needs. */
export function asyncSource(fs: SourceFs): AsyncSource | null {
  return fs.readAsync ? (fs as AsyncSource) : null;
}

/**
 * At most `maxFiles` files and `maxBytes` bytes of buffers are read ahead at once; the files asked for
 * beyond that wait in order, and start as earlier ones are taken. take() never waits for room, so the
 * walk cannot deadlock on it: a file taken before its turn is started at once.
 */
export class ReadAhead {
  private readonly fs: AsyncSource;
  private readonly memory: ReadMemory;
  private readonly maxFiles: number;
  private readonly maxBytes: number;
  private readonly queue: AheadFile[] = [];
  private head = 0;
  private files = 0;
  private bytes = 0;

  constructor(fs: AsyncSource, memory: ReadMemory, maxFiles = 32, maxBytes = 2 * 1024 * 1024) {
    this.fs = fs;
    this.memory = memory;
    this.maxFiles = maxFiles;
    this.maxBytes = maxBytes;
  }

  /** Asks for the first `want` bytes of a file, to be take()n (or drop()ped) later, in about this order. */
  request(path: Buffer, want: number): AheadFile {
    const f = new AheadFile(path, want);
    this.queue.push(f);
    this.pump();
    return f;
  }

  /** The file's first chunk (its descriptor is then the caller's to close); throws what open or read threw. */
  async take(f: AheadFile): Promise<FirstChunk> {
    if (f.done) throw new Error('a file read ahead was taken twice');
    if (!f.started) this.start(f);
    const outcome = await f.started!;
    this.finish(f);
    if ('error' in outcome) throw outcome.error;
    return outcome.ok;
  }

  /** Gives up a file asked for: its descriptor is closed and its buffer given back. */
  async drop(f: AheadFile): Promise<void> {
    if (f.done) return;
    if (!f.started) {
      f.done = true; // still queued: pump() skips it
      return;
    }
    const outcome = await f.started;
    this.finish(f);
    if ('ok' in outcome) {
      this.memory.give(outcome.ok.data);
      this.fs.close(outcome.ok.fd);
    }
  }

  private finish(f: AheadFile): void {
    f.done = true;
    this.files--;
    this.bytes -= f.held;
    f.held = 0;
    this.pump();
  }

  private pump(): void {
    while (this.head < this.queue.length) {
      const f = this.queue[this.head]!;
      if (f.started || f.done) {
        this.head++;
        continue;
      }
      if (this.files > 0 && (this.files >= this.maxFiles || this.bytes + f.want > this.maxBytes)) break;
      this.head++;
      this.start(f);
    }
    // files started are dropped from the queue soon: each one's path may keep a 64 KiB pool of Node's
    // small Buffers alive, and a walk that reads few files (a backup after a day's changes) took 9 MB
    // of them along before the queue reached 1024
    if (this.head > 32 && this.head * 2 > this.queue.length) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
  }

  private start(f: AheadFile): void {
    const data = this.memory.take(f.want);
    f.held = data.buffer.byteLength;
    this.files++;
    this.bytes += f.held;
    // open is synchronous: the walk's lstat just brought the inode into memory, so it does not wait
    // for the disk, and a call on the thread pool costs the main thread about as much as the syscall
    let fd: number;
    try {
      fd = this.fs.open(f.path);
    } catch (error) {
      this.memory.give(data);
      f.started = Promise.resolve({ error });
      return;
    }
    f.started = (async (): Promise<Outcome> => {
      try {
        return { ok: { fd, data, n: await readFullAsync(this.fs, fd, data, 0) } };
      } catch (error) {
        this.memory.give(data);
        try {
          this.fs.close(fd);
        } catch {
          /* the read's error is the one reported */
        }
        return { error };
      }
    })();
  }
}
