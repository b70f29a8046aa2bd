/**
 * A SourceFs reader module for worker threads (SourceFs.workerReader) that fails with EIO when asked
 * for the bytes at or after `failAt` (test/worker-read.test.ts): a disk that cannot read a large file.
 */
import fs from 'node:fs';

export function createReader(arg: { failAt: number }): (fd: number, buf: Buffer, position: number) => number {
  return (fd, buf, position) => {
    if (position >= arg.failAt) throw Object.assign(new Error(`EIO: i/o error, read (at ${position})`), { code: 'EIO' });
    return fs.readSync(fd, buf, 0, buf.length, position);
  };
}
