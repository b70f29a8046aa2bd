/** Worker thread of SealPool: compresses and encrypts batches of objects with keys from workerData. */
import { parentPort, workerData } from 'node:worker_threads';
import { deriveKeys, type ObjectTypeCode } from '../core/crypto.js';
import { compressAndSeal, type SealDone, type SealJob } from './seal.js';

const keys = deriveKeys(Buffer.from((workerData as { master: Uint8Array }).master));
const port = parentPort!;
port.on('message', (jobs: SealJob[]) => {
  const replies: SealDone[] = [];
  const transfer: ArrayBuffer[] = [];
  for (const job of jobs) {
    try {
      const plain = Buffer.from(job.plain.buffer, job.plain.byteOffset, job.plain.byteLength);
      const sealed = compressAndSeal(keys, job.type as ObjectTypeCode, Buffer.from(job.id), plain);
      replies.push({ seq: job.seq, sealed });
      // sealed objects are allocated whole (Buffer.alloc), so they move without a copy
      if (sealed.byteOffset === 0 && sealed.byteLength === sealed.buffer.byteLength) transfer.push(sealed.buffer as ArrayBuffer);
    } catch (err) {
      replies.push({ seq: job.seq, error: err instanceof Error ? err.message : String(err) });
    }
  }
  port.postMessage(replies, transfer);
});
