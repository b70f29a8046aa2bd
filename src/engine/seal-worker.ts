/**
 * Worker thread of SealPool: compresses and encrypts batches of objects with keys from workerData,
 * and, when the storage offers a direct writer, stores them itself. Memory is reused, not left to the
 * garbage collector: sealed objects go into the Sealer's buffers (written here, or sent to the main
 * thread, which sends them back once stored), and plain buffers are sent back (SealJob.recycle) or
 * freed as soon as they are sealed.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { deriveKeys, type ObjectTypeCode } from '../core/crypto.js';
import { release } from '../core/memory.js';
import { Sealer, type SealBatch, type SealDone, type SealWorkerData } from './seal.js';
import { errnoCode } from '../core/errors.js';
import { ID_BYTES } from '../core/idset.js';

const data = workerData as SealWorkerData;
const sealer = new Sealer(deriveKeys(Buffer.from(data.master), data.idHash), data.chunkSize);
const port = parentPort!;
type Write = (id: string, bytes: Uint8Array) => void;
const writer: Promise<Write | null> = data.writer
  ? import(data.writer.module).then((m: { createWriter: (arg: unknown) => Write }) => m.createWriter(data.writer!.arg))
  : Promise.resolve(null);

port.on('message', async ({ jobs, ids, stored }: SealBatch) => {
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
});
