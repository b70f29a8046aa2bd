/**
 * Worker thread of SealPool: compresses and encrypts batches of objects with keys from workerData,
 * and, when the storage offers a direct writer, stores them itself. Memory is reused, not left to the
 * garbage collector: sealed objects go into the Sealer's buffers (written here, or sent to the main
 * thread, which sends them back once stored), and plain buffers are sent back (SealJob.recycle) or
 * freed as soon as they are sealed. It also reads large files itself (FileJob), between batches.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { deriveKeys, objectId, ObjectType, type ObjectTypeCode } from '../core/crypto.js';
import { release } from '../core/memory.js';
import { isZero, Sealer, type FileAnswer, type FileAsk, type FileEnd, type FileJob, type FileSealed, type SealBatch, type SealDone, type SealWorkerData, type ToWorker } from './seal.js';
import { errnoCode } from '../core/errors.js';
import { readFullSync } from './readahead.js';
import { ID_BYTES } from '../core/idset.js';

const data = workerData as SealWorkerData;
const keys = deriveKeys(Buffer.from(data.master), data.idHash);
const sealer = new Sealer(keys, data.chunkSize);
const port = parentPort!;
type Write = (id: string, bytes: Uint8Array) => void;
const writer: Promise<Write | null> = data.writer
  ? import(data.writer.module).then((m: { createWriter: (arg: unknown) => Write }) => m.createWriter(data.writer!.arg))
  : Promise.resolve(null);

port.on('message', (m: ToWorker) => {
  if (!('kind' in m)) void sealBatch(m);
  else if (m.kind === 'file') void readFile(m);
  else if (m.kind === 'answer') answer(m);
  else files.get(m.job)?.cancel();
});

async function sealBatch({ jobs, ids, stored }: SealBatch): Promise<void> {
  for (const b of stored) sealer.reuse(b);
  let write: Write | null = null;
  let setupError: string | null = null;
  try {
    write = await writer;
  } catch (err) {
    setupError = `cannot load the object writer: ${err instanceof Error ? err.message : String(err)}`;
  }
  const replies: SealDone[] = [];
  const transfer: ArrayBuffer[] = [];
  for (const [k, job] of jobs.entries()) {
    try {
      if (setupError) throw new Error(setupError);
      const id = Buffer.from(ids.buffer, ids.byteOffset + k * ID_BYTES, ID_BYTES);
      const sealed = sealer.seal(job.type as ObjectTypeCode, id, job.plain);
      const back = job.recycle ? { plain: job.plain } : {};
      if (job.recycle) transfer.push(job.plain.buffer as ArrayBuffer);
      else release(job.plain); // moved or copied here: nobody else has it
      if (write) {
        const written = sealed.length;
        try {
          write(id.toString('hex'), sealed);
        } finally {
          sealer.reuse(sealed);
        }
        replies.push({ seq: job.seq, written, ...back });
      } else {
        replies.push({ seq: job.seq, sealed, ...back });
        // sealed objects lie in buffers of their own, so they move without a copy
        transfer.push(sealed.buffer as ArrayBuffer);
      }
    } catch (err) {
      const errno = errnoCode(err);
      const back = job.recycle && !transfer.includes(job.plain.buffer as ArrayBuffer) ? { plain: job.plain } : {};
      if (back.plain) transfer.push(job.plain.buffer as ArrayBuffer);
      replies.push({ seq: job.seq, error: err instanceof Error ? err.message : String(err), ...(typeof errno === 'string' ? { errno } : {}), ...back });
    }
  }
  release(ids);
  port.postMessage(replies, transfer);
}

/**
 * Chunks of one file that may wait for the main thread's answer at once (each holds its chunk), and
 * free chunk buffers kept per file.
 */
const ASKED_AHEAD = 2;
const FREE_KEPT = 1;

type ReadAt = (fd: number, buf: Buffer, position: number) => number;
const readers = new Map<string, Promise<ReadAt>>();

/** A file being read (FileJob). */
interface Reading {
  /** Chunks asked about and not answered yet: their bytes, and their ids. */
  readonly asked: Map<number, { plain: Buffer; id: Buffer }>;
  /** Buffers of chunk size to read into again. */
  readonly free: Buffer[];
  wake: (() => void) | null;
  cancelled: boolean;
  cancel(): void;
}
const files = new Map<number, Reading>();

function reply(m: FileAsk | FileSealed | FileEnd, transfer: ArrayBuffer[] = []): void {
  port.postMessage(m, transfer);
}

/**
 * Reads a file at offsets 0, C, 2C, ... to its real end (as the main thread's readFileChunks does),
 * one chunk per turn of this thread's event loop, so that batches to seal are not held up by it.
 */
async function readFile(job: FileJob): Promise<void> {
  const cs = data.chunkSize;
  const r: Reading = {
    asked: new Map(), free: [], wake: null, cancelled: false,
    cancel() {
      this.cancelled = true;
      this.wake?.();
    },
  };
  files.set(job.job, r);
  let ids = Buffer.allocUnsafeSlow(64 * ID_BYTES);
  let k = 0;
  let pos = 0;
  const settle = async (): Promise<void> => {
    await new Promise<void>((resolve) => (r.wake = resolve));
    r.wake = null;
  };
  let failure: unknown = null;
  try {
    let read = readers.get(job.reader.module);
    if (read === undefined) {
      read = import(job.reader.module).then((m: { createReader: (arg: unknown) => ReadAt }) => m.createReader(job.reader.arg));
      readers.set(job.reader.module, read);
    }
    const readAt = await read;
    for (;;) {
      while (r.asked.size >= ASKED_AHEAD && !r.cancelled) await settle();
      if (r.cancelled) throw new Error('cancelled');
      const buf = r.free.pop() ?? Buffer.allocUnsafeSlow(cs);
      const n = readFullSync(readAt, job.fd, buf, pos);
      if (n === 0) {
        r.free.push(buf);
        break;
      }
      if ((k + 1) * ID_BYTES > ids.length) {
        const more = Buffer.allocUnsafeSlow(ids.length * 2);
        ids.copy(more);
        release(ids);
        ids = more;
      }
      const plain = buf.subarray(0, n);
      const at = k * ID_BYTES;
      if (isZero(plain)) {
        ids.fill(0, at, at + ID_BYTES); // ZERO_CHUNK
        r.free.push(buf);
      } else {
        const id = objectId(keys, ObjectType.data, plain);
        id.copy(ids, at);
        const before = at + ID_BYTES <= job.prev.length ? Buffer.from(job.prev.buffer, job.prev.byteOffset + at, ID_BYTES) : null;
        if (before !== null && before.equals(id)) {
          r.free.push(buf); // the previous version's chunk at this place, which current has
        } else {
          r.asked.set(k, { plain, id });
          reply({ kind: 'ask', job: job.job, chunk: k, id });
        }
      }
      pos += n;
      k++;
      if (n < cs) break;
      await nextTurn(); // batches and answers that came meanwhile
    }
  } catch (err) {
    failure = err;
  }
  try {
    // the chunks the main thread has been asked about are answered (and sealed, if admitted) first,
    // also after a read error: it counts on them, and a file that cannot be read is only a warning
    while (r.asked.size > 0 && !r.cancelled) await settle();
    if (r.cancelled) failure ??= new Error('cancelled');
    if (failure === null) {
      const out = Buffer.allocUnsafeSlow(k * ID_BYTES);
      ids.copy(out, 0, 0, k * ID_BYTES);
      reply({ kind: 'end', job: job.job, ids: out, size: pos }, [out.buffer as ArrayBuffer]);
    } else {
      const errno = errnoCode(failure);
      reply({ kind: 'end', job: job.job, error: failure instanceof Error ? failure.message : String(failure), ...(typeof errno === 'string' ? { errno } : {}) });
    }
  } finally {
    files.delete(job.job);
    release(ids);
    for (const b of r.free) release(b);
    for (const a of r.asked.values()) release(new Uint8Array(a.plain.buffer));
  }
}

/** The main thread's answer about an asked chunk: sealed and sent back, or dropped. */
function answer(m: FileAnswer): void {
  const r = files.get(m.job);
  const a = r?.asked.get(m.chunk);
  if (r === undefined || a === undefined) return;
  r.asked.delete(m.chunk);
  if (m.store) {
    try {
      const sealed = sealer.seal(ObjectType.data, a.id, a.plain);
      reply({ kind: 'sealed', job: m.job, chunk: m.chunk, sealed }, [sealed.buffer as ArrayBuffer]);
    } catch (err) {
      reply({ kind: 'sealed', job: m.job, chunk: m.chunk, error: err instanceof Error ? err.message : String(err) });
    }
  }
  if (r.free.length < FREE_KEPT) r.free.push(Buffer.from(a.plain.buffer, 0, a.plain.buffer.byteLength));
  else release(new Uint8Array(a.plain.buffer));
  r.wake?.();
}
