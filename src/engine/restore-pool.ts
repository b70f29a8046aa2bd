/**
 * Worker threads for a restore: they decrypt, decompress and authenticate chunks and write them into
 * the target (a file of one chunk whole, with its owner, mode and times; a chunk of a larger file at
 * its offset in the file the main thread opened). The main thread only receives objects, walks the
 * trees and sends the work on: a restore's CPU is spread over the cores, as restic's is.
 *
 * Objects are copied from the received frames into packs (2 MiB buffers moved to a worker without a
 * copy, with the jobs for them, and sent back for reuse). Each worker loads the target's synchronous
 * calls from the module the TargetFs names (TargetFs.workerFs), as the seal workers load the storage's
 * writer.
 */
import { Worker } from 'node:worker_threads';
import type { IdHashCode } from '../core/crypto.js';
import { type ErrorCode, IntegrityError, SnapError } from '../core/errors.js';
import { release } from '../core/memory.js';
import type { DirectWriterSpec } from '../storage/types.js';
import type { SmallFile } from './restore-write.js';

/** A job for a worker: the object at [off, off + len) of its batch's pack, and what to do with it. */
export type RestoreJob = {
  readonly seq: number;
  readonly id: Uint8Array;
  readonly off: number;
  readonly len: number;
  readonly expected: number;
} & ({ readonly kind: 'file'; readonly file: SmallFile } | { readonly kind: 'chunk'; readonly fd: number; readonly position: number });

export interface RestoreBatch {
  readonly pack: ArrayBuffer;
  readonly jobs: RestoreJob[];
}

/** What failed in a worker, in a form that crosses threads (errors lose their class there). */
export interface JobError {
  readonly message: string;
  /** The object id of an IntegrityError. */
  readonly integrity?: string;
  readonly code?: ErrorCode;
  readonly hint?: string;
  readonly errno?: string;
}

export interface RestoreDone {
  readonly seq: number;
  /** For a file: whether its times were set (else the main thread sets them by path). */
  readonly timesSet?: boolean;
  readonly error?: JobError;
}

export interface RestoreReply {
  readonly pack: ArrayBuffer;
  readonly done: RestoreDone[];
}

export interface RestoreWorkerData {
  readonly master: Uint8Array;
  /** The repository's id function (chunks are checked against their ids). */
  readonly idHash: IdHashCode;
  readonly fs: DirectWriterSpec;
}

export function toJobError(err: unknown): JobError {
  if (err instanceof IntegrityError) return { message: err.message, integrity: err.objectId };
  if (err instanceof SnapError) return { message: err.message, code: err.code, ...(err.hint === undefined ? {} : { hint: err.hint }) };
  const errno = (err as { code?: unknown } | null)?.code;
  return { message: err instanceof Error ? err.message : String(err), ...(typeof errno === 'string' ? { errno } : {}) };
}

function fromJobError(e: JobError): Error {
  if (e.integrity !== undefined) return new IntegrityError(e.integrity, e.message);
  if (e.code !== undefined) return new SnapError(e.code, e.message, e.hint === undefined ? undefined : { hint: e.hint });
  return Object.assign(new Error(e.message), e.errno === undefined ? {} : { code: e.errno });
}

/** Bytes of a pack; a larger object gets a pack of its own size (freed when it comes back). */
const PACK_BYTES = 512 * 1024;
/** Jobs per batch at most. */
const MAX_BATCH = 256;
/** Packs kept for reuse. */
const FREE_PACKS = 8;
/** Batches a worker is given before it answers the first: one to work on, one waiting. */
const BATCHES_PER_WORKER = 2;

type Settle = { resolve: (done: RestoreDone) => void; reject: (err: Error) => void };

export class RestorePool {
  private readonly workers: Worker[] = [];
  /** Batches sent to each worker and not answered yet. */
  private readonly load: number[] = [];
  private readonly waiting = new Map<number, Settle>();
  private readonly free: ArrayBuffer[] = [];
  private pack: Buffer | null = null;
  private used = 0;
  private jobs: RestoreJob[] = [];
  private flushScheduled = false;
  private seq = 0;
  private failed: Error | null = null;
  private closing = false;
  private readonly data: RestoreWorkerData;
  private readonly threads: number;

  constructor(master: Buffer, idHash: IdHashCode, fs: DirectWriterSpec, threads: number) {
    this.data = { master, idHash, fs };
    this.threads = Math.max(1, threads);
  }

  /** Writes a file of one chunk from its stored bytes; resolves with whether its times were set. */
  async file(id: Buffer, data: Buffer, file: SmallFile): Promise<boolean> {
    const done = await this.submit(id, data, file.size, { kind: 'file', file });
    return done.timesSet === true;
  }

  /** Writes a chunk of `expected` bytes from its stored bytes at `position` of the open file fd. */
  async chunk(id: Buffer, data: Buffer, expected: number, fd: number, position: number): Promise<void> {
    await this.submit(id, data, expected, { kind: 'chunk', fd, position });
  }

  private submit(
    id: Buffer, data: Buffer, expected: number, what: { kind: 'file'; file: SmallFile } | { kind: 'chunk'; fd: number; position: number },
  ): Promise<RestoreDone> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.workers.length === 0) this.start();
    if (this.pack !== null && this.used + data.length > this.pack.length) this.flush();
    if (this.pack === null) {
      const size = Math.max(PACK_BYTES, data.length);
      const ab = size === PACK_BYTES ? this.free.pop() : undefined;
      this.pack = ab ? Buffer.from(ab) : Buffer.allocUnsafeSlow(size);
      this.used = 0;
    }
    data.copy(this.pack, this.used);
    const seq = this.seq++;
    this.jobs.push({ seq, id: new Uint8Array(id), off: this.used, len: data.length, expected, ...what });
    this.used += data.length;
    const promise = new Promise<RestoreDone>((resolve, reject) => this.waiting.set(seq, { resolve, reject }));
    if (this.jobs.length >= MAX_BATCH) this.flush();
    else this.scheduleFlush();
    return promise;
  }

  /**
   * Sends the batch being gathered once this turn of the event loop is done (what arrives in one read
   * goes together), if a worker has room for it; else it grows until a worker answers.
   */
  private scheduleFlush(): void {
    if (this.flushScheduled || Math.min(...this.load) >= BATCHES_PER_WORKER) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private start(): void {
    for (let i = 0; i < this.threads; i++) {
      const w = new Worker(new URL('./restore-worker.js', import.meta.url), { workerData: this.data, resourceLimits: { maxYoungGenerationSizeMb: 4 } });
      w.on('message', (reply: RestoreReply) => this.onReply(i, reply));
      w.on('error', (err) => this.fail(err));
      w.on('exit', (code) => {
        if (!this.closing) this.fail(new Error(`a restore worker thread stopped (exit code ${code})`));
      });
      this.workers.push(w);
      this.load.push(0);
    }
  }

  private flush(): void {
    const pack = this.pack;
    if (pack === null || this.jobs.length === 0) return;
    const jobs = this.jobs;
    this.pack = null;
    this.jobs = [];
    let best = 0;
    for (let i = 1; i < this.load.length; i++) if (this.load[i]! < this.load[best]!) best = i;
    this.load[best]!++;
    const ab = pack.buffer as ArrayBuffer;
    const batch: RestoreBatch = { pack: ab, jobs };
    this.workers[best]!.postMessage(batch, [ab]);
  }

  private onReply(worker: number, reply: RestoreReply): void {
    if (reply.pack.byteLength === PACK_BYTES && this.free.length < FREE_PACKS) this.free.push(reply.pack);
    else release(new Uint8Array(reply.pack));
    this.load[worker]!--;
    for (const d of reply.done) {
      const w = this.waiting.get(d.seq);
      if (!w) continue;
      this.waiting.delete(d.seq);
      if (d.error) w.reject(fromJobError(d.error));
      else w.resolve(d);
    }
    if (this.jobs.length > 0) this.scheduleFlush();
  }

  private fail(err: Error): void {
    this.failed ??= err;
    for (const w of this.waiting.values()) w.reject(this.failed);
    this.waiting.clear();
  }

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }
}
