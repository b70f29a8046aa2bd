/**
 * A restore with worker threads (engine/restore-pool.ts) on the real file system, against the same
 * restore on the main thread:
 * - small files, empty files, a file of several chunks (compressible and not), hard links, sub-second
 *   times, modes the umask would cut or with special bits, and a symlink restore exactly with 0, 1 and
 *   2 worker threads, into a fresh target and over an earlier restore (temporary names renamed into
 *   place);
 * - a damaged chunk of a one-chunk file and of a multi-chunk file is an integrity error for that path
 *   alone, whichever thread opens it; nothing of the file, and no temporary file, is left behind;
 * - a failure of the file system in a worker (a directory in the way) is reported for that path;
 * - a restore of one file opens it on the main thread: no worker thread is started for it.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { tempDir } from './env.js';
import { openStorage } from '../src/drivers/open.js';
import { LocalTargetFs } from '../src/drivers/localfs.js';
import { Repository, type SnapshotRecord } from '../src/engine/repository.js';
import { lookup, restore, type RestoreResult } from '../src/engine/restore.js';
import type { ObjectReader } from '../src/storage/types.js';
import { assertSameTree, expectExit, makeRepo, runCli, treeSnapshot } from './cli-helpers.js';

const MiB = 1024 * 1024;

async function setUp(): Promise<{ src: string; repo: Repository; snap: SnapshotRecord }> {
  const src = path.join(await tempDir('restore-pool-src'), 'src');
  fs.mkdirSync(path.join(src, 'small', 'deeper'), { recursive: true });
  for (let i = 0; i < 600; i++) {
    const dir = i % 3 === 0 ? path.join(src, 'small', 'deeper') : path.join(src, 'small');
    // compressible, incompressible and empty files
    const body = i % 4 === 0 ? randomBytes(i * 13) : Buffer.from(`file ${i} `.repeat(i));
    fs.writeFileSync(path.join(dir, `f${i}`), body);
  }
  // several chunks (1 MiB each): random, then compressible, with a short tail
  fs.writeFileSync(path.join(src, 'large'), Buffer.concat([randomBytes(2 * MiB), Buffer.alloc(MiB + 12345, 'x')]));
  fs.linkSync(path.join(src, 'small', 'f5'), path.join(src, 'hardlink-to-f5'));
  fs.symlinkSync('small/f7', path.join(src, 'link'));
  // a time with nanoseconds is set by path, after the worker wrote the file
  fs.utimesSync(path.join(src, 'small', 'f10'), 1_700_000_000.123456, 1_700_000_000.123456);
  fs.chmodSync(path.join(src, 'small', 'f11'), 0o640);
  // modes the umask would cut (the file is created with its mode, then given it by fchmod), read-only,
  // and with special bits (created 0600, then given its mode)
  const modes: Array<[string, number]> = [['f13', 0o777], ['f14', 0o444], ['f16', 0o604], ['f17', 0o4755], ['f19', 0o1644], ['f22', 0o2711]];
  for (const [name, mode] of modes) fs.chmodSync(path.join(src, 'small', name), mode);

  const r = await makeRepo();
  expectExit(await runCli(['backup', '--repo', r.repo, src], { env: r.env }), 'backup');
  const repo = await Repository.open(await openStorage(r.repo), Buffer.from(r.env['SNAPCRYPT_PASSWORD']!), null);
  return { src, repo, snap: await repo.resolveSnapshot('latest') };
}

async function restoreInto(repo: Repository, snap: SnapshotRecord, src: string, target: string, threads: number): Promise<RestoreResult> {
  const warnings: string[] = [];
  const result = await restore(repo, snap, Buffer.from(src), {
    target: Buffer.from(target),
    fs: new LocalTargetFs(),
    threads,
    inlineFirst: 0, // (else the first 64 chunks are opened on the main thread)
    onWarning: (p, m) => warnings.push(`${p}: ${m}`),
  });
  assert.equal(warnings.length, result.errors.length, `one warning per error: ${warnings.join('\n')}`);
  return result;
}

/** A snapshot whose reader hands out the object `bad` with one byte flipped. */
function damaged(snap: SnapshotRecord, bad: ReadonlySet<string>): SnapshotRecord {
  const reader = snap.reader;
  const flip = (id: string, data: Buffer | null): Buffer | null => {
    if (data === null || !bad.has(id)) return data;
    const copy = Buffer.from(data);
    copy[copy.length >> 1]! ^= 0x40;
    return copy;
  };
  const getObjects = reader.getObjects?.bind(reader);
  const wrapped: ObjectReader = {
    getObject: async (id) => flip(id, await reader.getObject(id))!,
    ...(getObjects ? { getObjects: (ids: readonly string[], each: (i: number, d: Buffer | null) => void) => getObjects(ids, (i, d) => each(i, flip(ids[i]!, d))) } : {}),
    readFile: (name) => reader.readFile(name),
    listKeys: () => reader.listKeys(),
    listObjects: () => reader.listObjects(),
  };
  return { ...snap, reader: wrapped };
}

function leftovers(dir: string): string[] {
  return (fs.readdirSync(dir, { recursive: true }) as string[]).filter((n) => path.basename(n).startsWith('.snapcrypt-partial'));
}

test('restore: the same tree with 0, 1 and 2 worker threads, fresh and over an earlier restore', async () => {
  const { src, repo, snap } = await setUp();
  const expected = await treeSnapshot(src);
  for (const threads of [0, 1, 2]) {
    const target = await tempDir(`restore-pool-${threads}`);
    for (const round of ['fresh', 'over the first']) {
      const r = await restoreInto(repo, snap, src, target, threads);
      assert.deepEqual(r.errors, [], `${threads} threads, ${round}`);
      assert.equal(r.files, 600 + 2, `${threads} threads, ${round}: files counted (the hard link too)`);
      assertSameTree(await treeSnapshot(path.join(target, 'src')), expected, `${threads} threads, restore ${round}`);
      assert.deepEqual(leftovers(target), []);
    }
  }
});

test('restore: a damaged chunk fails its file alone, on the main thread and in the workers', async () => {
  const { src, repo, snap } = await setUp();
  const chunkOf = async (rel: string, i = 0) => (await lookup(repo, snap, Buffer.from(path.join(src, rel)))).entry!.chunks[i]!.toString('hex');
  // stored uncompressed (random) and compressed
  const bad = new Set([await chunkOf('small/f4'), await chunkOf('small/deeper/f6'), await chunkOf('small/deeper/f9'), await chunkOf('large', 1), await chunkOf('large', 2)]);
  for (const threads of [0, 2]) {
    const expected = await treeSnapshot(src);
    const target = await tempDir(`restore-pool-bad-${threads}`);
    const r = await restoreInto(repo, damaged(snap, bad), src, target, threads);
    const failed = r.errors.map((e) => path.relative(path.join(target, 'src'), e.path)).sort();
    assert.deepEqual(failed, ['large', 'small/deeper/f6', 'small/deeper/f9', 'small/f4'], `${threads} threads: ${JSON.stringify(r.errors).slice(0, 2000)}`);
    assert.ok(r.errors.every((e) => e.integrity && /failed authentication/.test(e.message)), JSON.stringify(r.errors).slice(0, 2000));
    const got = await treeSnapshot(path.join(target, 'src'));
    for (const p of failed) {
      assert.equal(got[p], undefined, `${threads} threads: ${p} is not left behind`);
      delete expected[p];
    }
    assertSameTree(got, expected, `${threads} threads: everything else is restored`);
    assert.deepEqual(leftovers(target), []);
  }
});

test('restore: a file system failure in a worker thread names the path', async () => {
  const { src, repo, snap } = await setUp();
  const target = await tempDir('restore-pool-in-the-way');
  // an earlier restore left a directory where the snapshot has a file
  fs.mkdirSync(path.join(target, 'src', 'small', 'f8', 'sub'), { recursive: true });
  const r = await restoreInto(repo, snap, src, target, 2);
  assert.equal(r.errors.length, 1, JSON.stringify(r.errors));
  assert.equal(r.errors[0]!.path, path.join(target, 'src', 'small', 'f8'));
  assert.equal(r.errors[0]!.integrity, false);
  assert.match(r.errors[0]!.message, /a directory is in the way/);
  assert.equal(fs.readFileSync(path.join(target, 'src', 'small', 'f7'), 'utf8'), fs.readFileSync(path.join(src, 'small', 'f7'), 'utf8'));
  assert.deepEqual(leftovers(target), []);
});

test('restore: one file is opened on the main thread, without starting a worker', async () => {
  const { src, repo, snap } = await setUp();
  const target = await tempDir('restore-pool-one');
  const threadsNow = () => fs.readdirSync('/proc/self/task').length;
  const before = threadsNow();
  let most = before;
  const watch = setInterval(() => (most = Math.max(most, threadsNow())), 1);
  const result = await restore(repo, snap, Buffer.from(path.join(src, 'small', 'f7')), { target: Buffer.from(target), fs: new LocalTargetFs(), threads: 2 });
  clearInterval(watch);
  assert.deepEqual(result.errors, []);
  assert.equal(fs.readFileSync(path.join(target, 'f7'), 'utf8'), fs.readFileSync(path.join(src, 'small', 'f7'), 'utf8'));
  assert.equal(most, before, 'no thread was started');
});
