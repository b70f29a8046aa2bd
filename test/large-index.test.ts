/**
 * A commit whose index is larger than one protocol frame (MAX_PAYLOAD): 1.1 million ids (35 MB) whose
 * objects all exist, committed through RemoteStorage and the real serve loop on in-process streams, on
 * a LocalDirStorage (so the presence check, the pruning and the hard-link seal all run over the whole
 * index). Slow by nature (a million files are made, linked and removed: about a minute on tmpfs), so
 * it lives apart from the quick protocol tests.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ExitStatus, isSnapError } from '../src/core/errors.js';
import { MAX_PAYLOAD } from '../src/core/protocol.js';
import { LocalDirStorage } from '../src/drivers/localdir.js';
import type { Storage } from '../src/storage/types.js';
import { tempDir } from './env.js';
import { inProcessRemote } from './in-process-remote.js';

/**
 * A temp directory for a million small files: on /dev/shm (tmpfs: no journal, several times faster to
 * fill, link and empty) when it has room, else in the system temp dir.
 */
async function manyFilesDir(prefix: string): Promise<string> {
  const st = await fsp.statfs('/dev/shm').catch(() => null);
  const roomy = st !== null && st.ffree > 2_000_000 && st.bavail * st.bsize > 2 * 1024 ** 3;
  return roomy ? tempDir(prefix, '/dev/shm') : tempDir(prefix);
}

describe('large index', () => {
  it('commits an index of 1.1 million ids (35 MB, more than one frame) through the serve loop, staged on disk', { timeout: 20 * 60_000 }, async (t) => {
    const N = 1_100_000;
    const dir = join(await manyFilesDir('big-index'), 'repo');
    const local = new LocalDirStorage(dir);
    await local.init(Buffer.from('c'));
    // N ids in ascending order, spread evenly over the 256 prefixes
    const index = Buffer.alloc(N * 32);
    for (let i = 0; i < N; i++) {
      index.writeUInt32BE(Math.floor((i * 2 ** 32) / N), i * 32);
      index.writeUInt32BE(i, i * 32 + 28);
    }
    assert.ok(index.length > MAX_PAYLOAD);
    // Every indexed object exists in current, as a file where putObject would have put it (empty: the
    // storage never looks inside objects). Written directly: a million PUT_OBJECT round trips would
    // only test what the conformance suite tests already.
    let started = Date.now();
    const objects = join(dir, 'current', 'objects');
    for (let p = 0; p < 256; p++) await fsp.mkdir(join(objects, p.toString(16).padStart(2, '0')), { recursive: true });
    for (let i = 0; i < N; i++) {
      const hex = index.toString('hex', i * 32, i * 32 + 32);
      fs.closeSync(fs.openSync(join(objects, hex.slice(0, 2), hex), 'wx', 0o400));
    }
    const createMs = Date.now() - started;

    // The server's storage as it is, except that the whole-Buffer commit is refused (the index must
    // arrive through stageIndex) and the staged parts are counted.
    let parts = 0;
    const storage: Storage = Object.assign(Object.create(local) as LocalDirStorage, {
      commit: async () => {
        throw new Error('the server assembled the index in memory');
      },
      stageIndex: async () => {
        const staged = await local.stageIndex();
        return {
          get length() {
            return staged.length;
          },
          append: async (ids: Buffer) => {
            parts++;
            await staged.append(ids);
          },
          commit: (head: Buffer) => staged.commit(head),
          discard: () => staged.discard(),
        };
      },
    });
    const { remote, served } = await inProcessRemote(storage, dir);
    const head = Buffer.from(`${index.toString('hex', 0, 32)}\n`);
    started = Date.now();
    const info = await remote.commit(head, index);
    const commitMs = Date.now() - started;
    const sentParts = parts;
    assert.ok(sentParts > 1, `${sentParts} parts`);
    assert.deepEqual(await remote.listSnapshots(), [info]);
    assert.ok((await fsp.readFile(join(dir, 'current', 'index'))).equals(index), 'current/index is the index sent');
    assert.ok((await fsp.readFile(join(dir, 'snapshots', info.name, 'index'))).equals(index), 'the snapshot holds it too');
    assert.deepEqual(await remote.readFile('head'), head);

    // The presence check runs over the whole staged index: one object gone, and the commit is refused.
    const last = index.toString('hex', index.length - 32);
    await fsp.rm(join(objects, last.slice(0, 2), last));
    started = Date.now();
    await assert.rejects(remote.commit(head, index), (err: unknown) => isSnapError(err, 'integrity') && err.message.includes(last));
    const refusedMs = Date.now() - started;
    assert.deepEqual(await remote.listSnapshots(), [info]);
    await remote.close();
    assert.equal(await served, ExitStatus.ok);
    assert.deepEqual((await fsp.readdir(dir)).filter((n) => n.startsWith('.tmp-')), [], 'no staged index left');
    t.diagnostic(
      `${N} ids (${index.length} bytes) in ${sentParts} parts; objects created in ${(createMs / 1000).toFixed(1)} s on ${dir}; ` +
        `commit ${(commitMs / 1000).toFixed(1)} s; refused commit ${(refusedMs / 1000).toFixed(1)} s; rss ${process.memoryUsage().rss >> 20} MiB`,
    );
  });
});
