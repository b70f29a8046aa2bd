/**
 * Object writing for directory storages, loaded by the backup's worker threads (see
 * Storage.directWriter): each worker writes the objects it sealed, so the main thread only reads files.
 * Same rules as DirStorage.putObject: temp file, link() to the final name (an existing id is left
 * alone), unlink the temp; no per-object fsync (the commit flushes the file system).
 */
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';

const DIR_MODE = 0o700;
const FILE_MODE = 0o400;

export interface DirWriterArg {
  /** The area's objects directory (current/objects). */
  readonly objectsDir: string;
}

function errno(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | null)?.code;
}

function writeNew(path: string, data: Uint8Array): void {
  const fd = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, FILE_MODE);
  try {
    let off = 0;
    while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
  } finally {
    fs.closeSync(fd);
  }
}

export function createWriter(arg: DirWriterArg): (id: string, data: Uint8Array) => void {
  const prefix = randomBytes(6).toString('hex');
  let n = 0;
  return (id, data) => {
    if (!/^[0-9a-f]{64}$/.test(id)) throw new Error(`invalid object id ${id}`);
    const dir = join(arg.objectsDir, id.slice(0, 2));
    const tmp = join(dir, `.tmp-${prefix}${(n++).toString(16).padStart(4, '0')}`);
    try {
      try {
        writeNew(tmp, data);
      } catch (err) {
        if (errno(err) !== 'ENOENT') throw err;
        try {
          fs.mkdirSync(dir, { mode: DIR_MODE });
        } catch (e) {
          if (errno(e) !== 'EEXIST') throw e;
        }
        writeNew(tmp, data);
      }
      try {
        fs.linkSync(tmp, join(dir, id));
      } catch (err) {
        if (errno(err) !== 'EEXIST') throw err;
      }
    } finally {
      try {
        fs.unlinkSync(tmp);
      } catch {
        /* not created */
      }
    }
  };
}
