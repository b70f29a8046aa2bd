/**
 * Compress-then-encrypt of one object, and a pool of worker threads that does it off the main thread
 * (the main thread reads files, computes ids and stores objects; the workers compress and encrypt).
 */
import { randomBytes } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { ZstdCompress, zstdCompressSync, constants as zc } from 'node:zlib';
import { type IdHashCode, type Keys, type ObjectTypeCode, Compression, ObjectType, sealObject, sealedSize } from '../core/crypto.js';
import { release } from '../core/memory.js';
import type { DirectWriterSpec } from '../storage/types.js';
import { ID_BYTES } from '../core/idset.js';
import { SnapError, ioFailure } from '../core/errors.js';
import type { ZstdInternals } from './open.js';

/**
 * zstd level 2: on the benchmark corpus it costs 30% less CPU than level 3 for 3% more bytes on text
 * (the same on a disk image). Objects under 128 bytes, or that shrink by less than 3%, are stored
 * uncompressed.
 */
export const ZSTD_LEVEL = 2;
const MIN_COMPRESS = 128;
const ZSTD_OPTIONS = { params: { [zc.ZSTD_c_compressionLevel]: ZSTD_LEVEL } };

/**
 * zstd with one compression context and one output buffer for all calls. zstdCompressSync makes a
 * context (a few MB of native memory), output buffers of 16 KiB and their concatenation per call:
 * about 2 MB of allocations per chunk, most of it garbage that is freed late. This drives node:zlib's
 * native stream directly (one ZSTD_e_end call per object, which writes the same frame as the one-shot
 * function); should that internal interface be missing, it falls back to zstdCompressSync.
 */
export class Compressor {
  private stream: ZstdInternals | null = null;
  private error: Error | null = null;
  private out = Buffer.alloc(0);
  private fallback = false;

  /** The compressed bytes: a view of this compressor's buffer, valid until the next call. */
  compress(plain: Uint8Array): Buffer {
    const bound = plain.length + (plain.length >>> 7) + 4096; // > ZSTD_compressBound
    if (this.fallback) return zstdCompressSync(plain, { ...ZSTD_OPTIONS, chunkSize: bound });
    if (this.out.length < bound) {
      release(this.out);
      this.out = Buffer.allocUnsafeSlow(bound);
    }
    try {
      if (!this.stream) {
        const z = new ZstdCompress(ZSTD_OPTIONS) as ZstdInternals;
        z.on('error', (err: Error) => (this.error = err)); // the native side reports errors this way
        this.stream = z;
      }
      const { _handle: handle, _writeState: state } = this.stream;
      if (!handle || !state) {
        this.fallback = true;
        return this.compress(plain);
      }
      handle.writeSync(zc.ZSTD_e_end, plain, 0, plain.length, this.out, 0, this.out.length);
      const outLeft = state[0]!;
      if (this.error) throw this.error;
      if (state[1] !== 0 || outLeft === 0) throw new Error(`zstd did not finish an object of ${plain.length} bytes`);
      return this.out.subarray(0, this.out.length - outLeft);
    } catch (err) {
      this.stream = null; // a context in an unknown state is not used again
      this.error = null;
      throw err;
    }
  }
}

/** Objects of at least this size are sealed into pooled buffers (Sealer); smaller ones get their own. */
const POOLED_OBJECT = 64 * 1024;

/**
 * Chunk-sized sealed buffers a Sealer keeps free, and that the pool holds on their way back to a
 * worker: 2 each (4 each before; MAX_FREE_READ_BUFFERS in backup.ts has the measurement).
 */
const SEALED_BUFFERS_KEPT = 2;

/**
 * Compress-then-encrypt for one thread, with reused memory: one zstd context and output buffer
 * (Compressor), and a pool of output buffers for chunk-sized objects that come back (reuse) once
 * they are stored. `chunkSize` sizes the pooled buffers to hold any object sealed from a chunk.
 */
export class Sealer {
  private readonly keys: Keys;
  private readonly compressor = new Compressor();
  /** Size of each pooled output buffer. */
  readonly outputSize: number;
  private readonly free: Buffer[] = [];
  private readonly maxFree: number;

  constructor(keys: Keys, chunkSize: number, maxFree = SEALED_BUFFERS_KEPT) {
    this.keys = keys;
    // the stored payload is at most the chunk (else it is stored uncompressed)
    this.outputSize = sealedSize(chunkSize);
    this.maxFree = maxFree;
  }

  /**
   * The sealed object. It lies in a buffer of its own (whole, so that it can move to another thread
   * without a copy): a pooled one of outputSize bytes for large objects, to be given back with
   * reuse() once stored, else one of the object's size.
   */
  seal(type: ObjectTypeCode, id: Buffer, plain: Uint8Array): Buffer {
    const { payload, compression } = storedForm(plain, (p) => this.compressor.compress(p));
    const size = sealedSize(payload.length);
    const into = size >= POOLED_OBJECT && size <= this.outputSize ? (this.free.pop() ?? Buffer.allocUnsafeSlow(this.outputSize)) : Buffer.allocUnsafeSlow(size);
    return sealObject(this.keys, id, type, compression, payload, pooledRandom, into);
  }

  /** Takes back an object seal() returned, once it is stored; anything else is freed. */
  reuse(sealed: Uint8Array): void {
    const ab = sealed.buffer;
    if (ab instanceof ArrayBuffer && ab.byteLength === this.outputSize && sealed.byteOffset === 0 && this.free.length < this.maxFree) {
      this.free.push(Buffer.from(ab, 0, this.outputSize));
    } else if (sealed.byteOffset === 0 && (sealed.byteLength === ab.byteLength || ab.byteLength === this.outputSize)) {
      release(new Uint8Array(ab)); // its own buffer (never a view of a shared pool)
    }
  }
}

/** What is stored of plain: its zstd form (from compress) when that is at least 3% smaller, else plain. */
function storedForm(plain: Uint8Array, compress: (plain: Uint8Array) => Uint8Array): { payload: Uint8Array; compression: number } {
  if (plain.length >= MIN_COMPRESS) {
    const z = compress(plain);
    if (z.length < plain.length * 0.97) return { payload: z, compression: Compression.zstd };
  }
  return { payload: plain, compression: Compression.none };
}

const ZEROS = Buffer.alloc(64 * 1024);

/** Whether every byte is zero (such a chunk is not stored: ZERO_CHUNK). */
export function isZero(b: Uint8Array): boolean {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  for (let off = 0; off < buf.length; off += ZEROS.length) {
    const end = Math.min(buf.length, off + ZEROS.length);
    if (!buf.subarray(off, end).equals(ZEROS.subarray(0, end - off))) return false;
  }
  return true;
}

/** One object sealed without reused memory (objects written outside a backup's SealPool). */
export function compressAndSeal(keys: Keys, type: ObjectTypeCode, id: Buffer, plain: Buffer): Buffer {
  const { payload, compression } = storedForm(plain, (p) => zstdCompressSync(p, ZSTD_OPTIONS));
  return sealObject(keys, id, type, compression, payload, pooledRandom);
}

/**
 * Random bytes for salts and nonces, sliced from one 64 KiB draw of the system CSPRNG: a call into
 * OpenSSL per object cost 4.6 µs here, 20 times the bytes' own cost (0.6 CPU-s for the corpus). Each
 * slice is used once.
 */
let randomPool = Buffer.alloc(0);
let randomOffset = 0;
function pooledRandom(n: number): Buffer {
  if (randomOffset + n > randomPool.length) {
    release(randomPool); // its slices were copied where they were used (sealObject)
    randomPool = randomBytes(Math.max(65536, n));
    randomOffset = 0;
  }
  const out = randomPool.subarray(randomOffset, randomOffset + n);
  randomOffset += n;
  return out;
}

export interface SealJob {
  readonly seq: number;
  readonly type: ObjectTypeCode;
  readonly plain: Uint8Array;
  /** Send plain's buffer back with the reply, for the caller to read into again (BufferPool). */
  readonly recycle: boolean;
}

export interface SealDone {
  readonly seq: number;
  /** The sealed object, when the worker does not write it itself. */
  readonly sealed?: Uint8Array;
  /** Bytes written, when it does. */
  readonly written?: number;
  readonly error?: string;
  /** The errno code of a failed write (ENOSPC...), when the worker wrote the object itself. */
  readonly errno?: string;
  /** The job's plain bytes, back to the main thread (SealJob.recycle). */
  readonly plain?: Uint8Array;
}

/** What the main thread sends a worker: objects to seal, and sealed objects it has stored (Sealer.reuse). */
export interface SealBatch {
  readonly jobs: SealJob[];
  /**
   * The jobs' ids, ID_BYTES each and in the jobs' order, in one buffer that moves with the batch: a
   * Uint8Array per job would be copied into an ArrayBuffer of its own on each side, dead memory the
   * threads free late (see copyOut in core/crypto.ts).
   */
  readonly ids: Uint8Array;
  readonly stored: Uint8Array[];
}

/**
 * A file read on a worker thread (SealPool.readFile): the worker reads it through the source's
 * reader module, chunk by chunk, and computes each chunk's id. A chunk that is all zeros, or whose id
 * is the one at its position in `prev` (the previous version's ids, known to be in current), needs
 * nothing more. For any other the worker asks (FileAsk), holding the chunk, and seals it only when
 * the main thread answers that current lacks it (FileAnswer); the sealed object comes back
 * (FileSealed) and the main thread stores it.
 */
export interface FileJob {
  readonly kind: 'file';
  readonly job: number;
  readonly fd: number;
  readonly reader: DirectWriterSpec;
  /** ID_BYTES per chunk position; all zeros where there is nothing to compare with. */
  readonly prev: Uint8Array;
}
export interface FileAnswer {
  readonly kind: 'answer';
  readonly job: number;
  readonly chunk: number;
  readonly store: boolean;
}
export interface FileCancel {
  readonly kind: 'cancel';
  readonly job: number;
}
export type ToWorker = SealBatch | FileJob | FileAnswer | FileCancel;

export interface FileAsk {
  readonly kind: 'ask';
  readonly job: number;
  readonly chunk: number;
  readonly id: Uint8Array;
}
export interface FileSealed {
  readonly kind: 'sealed';
  readonly job: number;
  readonly chunk: number;
  readonly sealed?: Uint8Array;
  readonly error?: string;
}
export interface FileEnd {
  readonly kind: 'end';
  readonly job: number;
  /** ID_BYTES per chunk, ZERO_CHUNK (zeros) for a chunk of zeros; absent when the read failed. */
  readonly ids?: Uint8Array;
  readonly size?: number;
  readonly error?: string;
  readonly errno?: string;
}
export type FromWorker = SealDone[] | FileAsk | FileSealed | FileEnd;

/** What a file read on a worker gives: its chunk ids (ZERO_CHUNK for zeros) and the bytes read. */
export interface FileChunks {
  readonly chunks: Buffer[];
  readonly size: number;
}

/** Decides, on the main thread, whether a chunk of a file read on a worker must be stored (FileJob). */
export interface FileSink {
  /** True when current lacks the id: the chunk is then sealed, and its sealed form given to sealed(). */
  admit(id: Buffer): Promise<boolean>;
  sealed(id: Buffer, object: Promise<Buffer>): void;
}

export interface SealWorkerData {
  readonly master: Uint8Array;
  readonly idHash: IdHashCode;
  readonly chunkSize: number;
  readonly writer: DirectWriterSpec | null;
}

/** The ArrayBuffer of a view that owns all of it (else a copy that does), for a zero-copy transfer. */
export function ownedBuffer(b: Uint8Array): Uint8Array {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) return b;
  return new Uint8Array(b); // a pooled slice would otherwise clone the whole pool
}

const MAX_BATCH = 64;

/** A file read on a worker that the run's end cut short: a SnapError, since the run has failed already (no warning about the file). */
function stoppedReading(): SnapError {
  return new SnapError('interrupted', 'The backup stopped while a file was read on a seal worker');
}

interface FileState {
  readonly resolve: (r: FileChunks) => void;
  readonly reject: (e: unknown) => void;
  readonly worker: number;
  readonly sink: FileSink;
  /** Chunks admitted and not yet back sealed. */
  readonly sealed: Map<number, { resolve: (b: Buffer) => void; reject: (e: unknown) => void }>;
  /** The sink's failure, once it failed (the job is cancelled). */
  failure: unknown;
}

/**
 * Read buffers of one size, reused: each goes to a seal worker and comes back with its reply, so a
 * backup allocates a few dozen buffers instead of one per chunk. (Buffers that are dropped instead
 * become garbage that V8 frees only after tens of MB of it, per thread; that was most of a backup's
 * peak RSS.) The pool keeps at most `max` free buffers; it never makes anyone wait (the uploader
 * bounds what is in flight), so a buffer lost on an error path costs an allocation, not a deadlock.
 */
export class BufferPool {
  readonly size: number;
  private readonly max: number;
  private readonly free: Buffer[] = [];

  constructor(size: number, max: number) {
    this.size = size;
    this.max = max;
  }

  take(): Buffer {
    // never a slice of the shared pool: it moves to a worker whole
    return this.free.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  /** Takes back a buffer of this pool's size (whatever view of it; other sizes are ignored). */
  give(view: Uint8Array): void {
    if (!this.owns(view)) return;
    if (this.free.length >= this.max) release(new Uint8Array(view.buffer as ArrayBuffer)); // freed now, not when V8 collects
    else this.free.push(Buffer.from(view.buffer as ArrayBuffer, 0, this.size));
  }

  /** Whether a view lies in a whole ArrayBuffer of this pool's size (so give() keeps it). */
  owns(view: Uint8Array): boolean {
    return view.buffer instanceof ArrayBuffer && view.buffer.byteLength === this.size;
  }
}

/**
 * Seals objects in worker threads, one per core beside the main thread (at most 3); with one core it
 * seals inline. Jobs go to the least loaded worker in batches (one message per batch, buffers
 * transferred, not copied). Sealed objects that come back to the main thread (writesDirectly false)
 * should be handed to stored() once the storage is done with them: they go back to a worker, which
 * seals into them again, instead of becoming garbage.
 */
export class SealPool {
  private readonly workers: Worker[] = [];
  private readonly load: number[] = [];
  private readonly outbox: SealJob[][] = [];
  /** The ids of the outbox's jobs, in the same order. */
  private readonly outIds: Buffer[][] = [];
  /** Stored objects on their way back to the workers (with the next batch). */
  private readonly returning: Uint8Array[] = [];
  private readonly waiting = new Map<
    number,
    { resolve: (r: Buffer | number) => void; reject: (e: Error) => void; worker: number; recycle: ((plain: Uint8Array) => void) | null }
  >();
  /** Whether the workers store what they seal (Storage.directWriter), instead of returning it. */
  readonly writesDirectly: boolean;
  private seq = 0;
  private readonly keys: Keys;
  private failed: Error | null = null;
  private flushScheduled = false;

  private readonly master: Buffer;
  private readonly chunkSize: number;
  private readonly writer: DirectWriterSpec | null;
  private readonly threads: number;
  /** Seals inline when there are no worker threads. */
  private readonly inline: Sealer;

  constructor(
    master: Buffer, keys: Keys, chunkSize: number, writer: DirectWriterSpec | null = null, threads = Math.min(availableParallelism() - 1, 3),
  ) {
    this.keys = keys;
    this.master = master;
    this.chunkSize = chunkSize;
    this.writer = writer;
    this.threads = Math.max(0, threads);
    this.writesDirectly = writer !== null && this.threads >= 1;
    this.inline = new Sealer(keys, chunkSize);
  }

  /** Workers start with the first chunk to seal: a backup with no change needs none. */
  private start(): void {
    for (let i = 0; i < this.threads; i++) {
      const data: SealWorkerData = { master: this.master, idHash: this.keys.idHash, chunkSize: this.chunkSize, writer: this.writer };
      // a small young generation: garbage is freed sooner
      const w = new Worker(new URL('./seal-worker.js', import.meta.url), { workerData: data, resourceLimits: { maxYoungGenerationSizeMb: 4 } });
      w.on('message', (m: FromWorker) => {
        if (Array.isArray(m)) for (const d of m) this.done(i, d);
        else this.fileMessage(i, m);
      });
      w.on('error', (err) => this.fail(err));
      w.on('exit', (code) => {
        if (!this.closing) this.fail(new Error(`a seal worker thread stopped (exit code ${code})`));
      });
      this.workers.push(w);
      this.load.push(0);
      this.outbox.push([]);
      this.outIds.push([]);
      this.fileLoad.push(0);
    }
  }

  private done(worker: number, m: SealDone): void {
    const job = this.waiting.get(m.seq);
    if (!job) return;
    this.waiting.delete(m.seq);
    this.load[worker]!--;
    if (m.plain !== undefined) job.recycle?.(m.plain);
    if (m.sealed) job.resolve(Buffer.from(m.sealed.buffer, m.sealed.byteOffset, m.sealed.byteLength));
    else if (m.written !== undefined) job.resolve(m.written);
    else if (m.errno !== undefined) job.reject(ioFailure('Cannot store an object in the repository', Object.assign(new Error(m.error ?? m.errno), { code: m.errno })));
    else job.reject(new Error(m.error ?? 'seal worker failed'));
  }

  private fail(err: Error): void {
    this.failed = err;
    for (const job of this.waiting.values()) job.reject(err);
    this.waiting.clear();
    // (fatal, not a warning about the file: every seal fails from now on)
    const fatal = err instanceof SnapError ? err : new SnapError('internal', `A seal worker thread failed: ${err.message}`);
    for (const [job, f] of this.files) this.endFile(job, f, fatal);
  }

  /** Whether readFile can be used: there are worker threads. */
  get readsFiles(): boolean {
    return this.threads > 0;
  }

  /**
   * Reads a file on a worker thread (FileJob): its chunk ids and size. fd is open on the source that
   * reader reads, and must stay open until this settles. prev holds, per chunk position, an id that
   * current has (or zeros). The worker asks sink about every other chunk that is not all zeros, and
   * seals the ones sink admits. It rejects with the read's errno error, or with sink's failure.
   */
  readFile(fd: number, reader: DirectWriterSpec, prev: Uint8Array, sink: FileSink): Promise<FileChunks> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.workers.length === 0) this.start();
    // the worker with the fewest files, then the least loaded
    let best = 0;
    for (let i = 1; i < this.workers.length; i++) {
      const fb = this.fileLoad[best]!;
      const fi = this.fileLoad[i]!;
      if (fi < fb || (fi === fb && this.load[i]! < this.load[best]!)) best = i;
    }
    const job = this.seq++;
    this.fileLoad[best]!++;
    const msg: FileJob = { kind: 'file', job, fd, reader, prev };
    return new Promise<FileChunks>((resolve, reject) => {
      this.files.set(job, { resolve, reject, worker: best, sink, sealed: new Map(), failure: null });
      this.workers[best]!.postMessage(msg);
    });
  }

  private readonly fileLoad: number[] = [];
  private readonly files = new Map<number, FileState>();

  private fileMessage(worker: number, m: FileAsk | FileSealed | FileEnd): void {
    const f = this.files.get(m.job);
    if (f === undefined) return;
    if (m.kind === 'ask') {
      const id = Buffer.from(m.id);
      f.sink.admit(id).then(
        (store) => {
          if (!this.files.has(m.job)) {
            // the read ended meanwhile (the run is failing): the room taken for the chunk is given back
            if (store) f.sink.sealed(id, Promise.reject(f.failure ?? stoppedReading()));
            return;
          }
          if (store) f.sink.sealed(id, new Promise<Buffer>((resolve, reject) => f.sealed.set(m.chunk, { resolve, reject })));
          const answer: FileAnswer = { kind: 'answer', job: m.job, chunk: m.chunk, store };
          this.workers[worker]?.postMessage(answer);
        },
        (err: unknown) => {
          // the run failed (the uploader's failure): the worker stops reading
          f.failure ??= err;
          const cancel: FileCancel = { kind: 'cancel', job: m.job };
          this.workers[worker]?.postMessage(cancel);
        },
      );
    } else if (m.kind === 'sealed') {
      const s = f.sealed.get(m.chunk);
      if (s === undefined) return;
      f.sealed.delete(m.chunk);
      if (m.sealed) s.resolve(Buffer.from(m.sealed.buffer, m.sealed.byteOffset, m.sealed.byteLength));
      else s.reject(new Error(m.error ?? 'seal worker failed'));
    } else {
      let err: unknown = f.failure;
      if (err === null && m.ids === undefined) {
        err = Object.assign(new Error(m.error ?? 'cannot read the file'), m.errno ? { code: m.errno } : {});
      }
      if (err !== null) return this.endFile(m.job, f, err);
      const ids = m.ids!;
      const chunks: Buffer[] = [];
      for (let o = 0; o < ids.length; o += ID_BYTES) chunks.push(Buffer.from(ids.buffer, ids.byteOffset + o, ID_BYTES));
      this.endFile(m.job, f, null);
      f.resolve({ chunks, size: m.size ?? 0 });
    }
  }

  private endFile(job: number, f: FileState, err: unknown): void {
    this.files.delete(job);
    this.fileLoad[f.worker]!--;
    const lost = err ?? new Error('a file read on a worker thread ended before its chunks were sealed');
    for (const s of f.sealed.values()) s.reject(lost);
    f.sealed.clear();
    if (err !== null) f.reject(err);
  }

  private flush(): void {
    this.flushScheduled = false;
    this.outbox.forEach((jobs, i) => {
      if (jobs.length === 0) return;
      this.outbox[i] = [];
      const ids = Buffer.allocUnsafeSlow(jobs.length * ID_BYTES);
      this.outIds[i]!.forEach((id, k) => id.copy(ids, k * ID_BYTES, 0, ID_BYTES));
      this.outIds[i] = [];
      // as many stored objects back as this batch will seal, so that the worker need not allocate
      const stored = this.returning.splice(0, jobs.length);
      const batch: SealBatch = { jobs, ids, stored };
      this.workers[i]!.postMessage(batch, [
        ids.buffer,
        ...jobs.filter((j) => j.recycle || (j.plain.byteOffset === 0 && j.plain.byteLength === j.plain.buffer.byteLength)).map((j) => j.plain.buffer as ArrayBuffer),
        ...stored.map((b) => b.buffer as ArrayBuffer),
      ]);
    });
  }

  /**
   * Takes back a sealed object (from seal()) once the storage is done with it: its memory goes back
   * to a worker for the next objects, or is freed now.
   */
  stored(sealed: Buffer): void {
    if (this.workers.length === 0) return this.inline.reuse(sealed);
    const whole = sealed.buffer instanceof ArrayBuffer && sealed.byteOffset === 0 && !sealed.buffer.detached;
    if (!whole) return;
    // a whole buffer: its own ArrayBuffer, sent back as it is (pooled, or freed there)
    if (sealed.buffer.byteLength === this.inline.outputSize && this.returning.length < SEALED_BUFFERS_KEPT) this.returning.push(new Uint8Array(sealed.buffer));
    else release(new Uint8Array(sealed.buffer));
  }

  /**
   * Sealed bytes (writesDirectly false) or the number of bytes the worker stored (true). With recycle,
   * plain's whole buffer is handed to recycle once sealed (from the worker, which sends it back), for
   * the caller to reuse; without it, plain's buffer is given away (moved to the worker when it owns
   * all of it).
   */
  seal(type: ObjectTypeCode, id: Buffer, plain: Buffer, recycle: ((plain: Uint8Array) => void) | null = null): Promise<Buffer | number> {
    if (this.failed) return Promise.reject(this.failed);
    // Trees and roots before any chunk (a backup with nothing changed has only those) are sealed
    // inline: a few small objects are not worth starting the workers for.
    if (this.workers.length === 0 && this.threads > 0 && type === ObjectType.data) this.start();
    if (this.workers.length === 0) {
      try {
        return Promise.resolve(this.inline.seal(type, id, plain));
      } catch (err) {
        return Promise.reject(err as Error);
      } finally {
        recycle?.(plain);
      }
    }
    let best = 0;
    for (let i = 1; i < this.load.length; i++) if (this.load[i]! < this.load[best]!) best = i;
    const seq = this.seq++;
    this.load[best]!++;
    const box = this.outbox[best]!;
    // a recycled buffer moves whole, with its view; anything else moves when it owns its buffer
    box.push({ seq, type, plain: recycle ? plain : ownedBuffer(plain), recycle: recycle !== null });
    this.outIds[best]!.push(id);
    const promise = new Promise<Buffer | number>((resolve, reject) => this.waiting.set(seq, { resolve, reject, worker: best, recycle }));
    if (box.length >= MAX_BATCH) this.flush();
    else if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
    return promise;
  }

  private closing = false;

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
    // files still being read (the run failed): their workers are gone, so their descriptors may close
    for (const [job, f] of this.files) this.endFile(job, f, stoppedReading());
  }
}
