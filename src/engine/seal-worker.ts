/**
 * Worker thread of SealPool: compresses and encrypts batches of objects with keys from workerData,
 * and, when the storage offers a direct writer, stores them itself.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { deriveKeys, type ObjectTypeCode } from '../core/crypto.js';
import { compressAndSeal, type SealDone, type SealJob, type SealWorkerData } from './seal.js';
import { errnoCode } from '../core/errors.js';

const data = workerData as SealWorkerData;
const keys = deriveKeys(Buffer.from(data.master));
const port = parentPort!;
type Write = (id: string, bytes: Uint8Array) => void;
const writer: Promise<Write | null> = data.writer
  ? import(data.writer.module).then((m: { createWriter: (arg: unknown) => Write }) => m.createWriter(data.writer!.arg))
  : Promise.resolve(null);

port.on('message', async (jobs: SealJob[]) => {
  let write: Write | null = null;
  let setupError: string | null = null;
  try {
    write = await writer;
  } catch (err) {
    setupError = `cannot load the object writer: ${err instanceof Error ? err.message : String(err)}`;
  }
  const replies: SealDone[] = [];
  const transfer: ArrayBuffer[] = [];
  for (const job of jobs) {
    try {
      if (setupError) throw new Error(setupError);
      const plain = Buffer.from(job.plain.buffer, job.plain.byteOffset, job.plain.byteLength);
      const id = Buffer.from(job.id);
      const sealed = compressAndSeal(keys, job.type as ObjectTypeCode, id, plain);
      const back = job.recycle ? { plain: job.plain } : {};
      if (job.recycle) transfer.push(job.plain.buffer as ArrayBuffer);
      if (write) {
        write(id.toString('hex'), sealed);
        replies.push({ seq: job.seq, written: sealed.length, ...back });
      } else {
        replies.push({ seq: job.seq, sealed, ...back });
        // sealed objects are allocated whole, so they move without a copy
        if (sealed.byteOffset === 0 && sealed.byteLength === sealed.buffer.byteLength) transfer.push(sealed.buffer as ArrayBuffer);
      }
    } catch (err) {
      const errno = errnoCode(err);
      const back = job.recycle && !transfer.includes(job.plain.buffer as ArrayBuffer) ? { plain: job.plain } : {};
      if (back.plain) transfer.push(job.plain.buffer as ArrayBuffer);
      replies.push({ seq: job.seq, error: err instanceof Error ? err.message : String(err), ...(typeof errno === 'string' ? { errno } : {}), ...back });
    }
  }
  port.postMessage(replies, transfer);
});
