/**
 * Worker thread of RestorePool: opens (decrypts, decompresses, authenticates) the chunks of a batch
 * and writes them into the target, with the target's synchronous calls loaded from the module that
 * TargetFs.workerFs named. The batch's pack goes back to the main thread for reuse.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { deriveKeys } from '../core/crypto.js';
import { Decompressor, openChunk } from './open.js';
import { writeSmallFile, type FileWriterFs } from './restore-write.js';
import { type RestoreBatch, type RestoreDone, type RestoreWorkerData, toJobError } from './restore-pool.js';

const data = workerData as RestoreWorkerData;
const keys = deriveKeys(Buffer.from(data.master), data.idHash);
const port = parentPort!;
const target: Promise<FileWriterFs> = import(data.fs.module).then((m: { createTargetFs: (arg: unknown) => FileWriterFs }) => m.createTargetFs(data.fs.arg));
const z = new Decompressor();
const buf = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

port.on('message', async ({ pack, jobs }: RestoreBatch) => {
  const done: RestoreDone[] = [];
  let fs: FileWriterFs | null = null;
  let setupError: unknown = null;
  try {
    fs = await target;
  } catch (err) {
    setupError = new Error(`cannot load the restore target's writer: ${err instanceof Error ? err.message : String(err)}`);
  }
  for (const job of jobs) {
    try {
      if (fs === null) throw setupError;
      const plain = openChunk(keys, buf(job.id), Buffer.from(pack, job.off, job.len), job.expected, z);
      if (job.kind === 'file') {
        const f = job.file;
        const timesSet = writeSmallFile(fs, { ...f, dest: buf(f.dest), tmp: f.tmp === null ? null : buf(f.tmp) }, plain);
        done.push({ seq: job.seq, timesSet });
      } else {
        fs.write(job.fd, plain, job.position);
        done.push({ seq: job.seq });
      }
    } catch (err) {
      done.push({ seq: job.seq, error: toJobError(err) });
    }
  }
  port.postMessage({ pack, done }, [pack]);
});
