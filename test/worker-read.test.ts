/**
 * Large files are read on a seal worker thread while the walk goes on (engine/backup.ts
 * readFileOnWorker, DESIGN section 4): the worker reads and hashes them and seals only the chunks the
 * main thread says current lacks; the directories above such a file get their trees, and their
 * directory records, once it is done. Checked here:
 * - the main thread reads none of their bytes (the worker does), and the snapshot restores exactly:
 *   zero chunks, a chunk repeated within the file, several large files at once in nested directories;
 * - the directory records of the directories above them send the next backup to their previous trees,
 *   which it loads (no file is read); the records of every other directory are used as usual;
 * - a change of 100 bytes costs one chunk; a file that shrank is read to its new end;
 * - a large file that cannot be opened, or read to its end, is a warning; a storage failure while one
 *   is read stops the run with that failure, leaves no descriptor open, and the next run is complete.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { tempDir } from './env.js';
import { openStorage } from '../src/drivers/open.js';
import { openTreeCache } from '../src/drivers/cachedir.js';
import { LocalSourceFs } from '../src/drivers/localfs.js';
import { Repository } from '../src/engine/repository.js';
import { type BackupResult, backup as engineBackup } from '../src/engine/backup.js';
import type { TreeCache } from '../src/engine/cache.js';
import type { DirectWriterSpec, Storage } from '../src/storage/types.js';
import { assertSameTree, countingCalls, expectExit, makeRepo, runCli, treeSnapshot, type TestRepo } from './cli-helpers.js';

const MiB = 1024 * 1024;

function write(p: string, data: string | Buffer): void {
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, data);
}

/** A source that counts the bytes the main thread reads, per file, and can refuse to open one. */
class CountingSource extends LocalSourceFs {
  readonly readBytes = new Map<string, number>();
  private readonly paths = new Map<number, string>();
  refuse: string | null = null;
  /** Makes the worker threads' reads fail from this offset on (test/fail-reader.ts); null: they do not. */
  failReadsAt: number | null = null;
  override workerReader(): DirectWriterSpec {
    if (this.failReadsAt === null) return super.workerReader();
    return { module: new URL('./fail-reader.js', import.meta.url).href, arg: { failAt: this.failReadsAt } };
  }
  override open(p: Buffer): number {
    if (this.refuse !== null && p.toString() === this.refuse) throw Object.assign(new Error('ELOOP: refused by the test'), { code: 'ELOOP' });
    const fd = super.open(p);
    this.paths.set(fd, p.toString());
    return fd;
  }
  private count(fd: number, n: number): number {
    const p = this.paths.get(fd) ?? '?';
    this.readBytes.set(p, (this.readBytes.get(p) ?? 0) + n);
    return n;
  }
  override read(fd: number, buf: Buffer, position: number): number {
    return this.count(fd, super.read(fd, buf, position));
  }
  override async readAsync(fd: number, buf: Buffer, position: number): Promise<number> {
    return this.count(fd, await super.readAsync(fd, buf, position));
  }
  mainRead(p: string): number {
    return this.readBytes.get(p) ?? 0;
  }
}

interface Harness {
  repo: TestRepo;
  src: string;
  source: CountingSource;
  treeLoads: number;
  /** Makes putObject fail for objects of at least this size (null: never). */
  failPutsFrom: number | null;
  /** The warnings of the last run. */
  warnings: string[];
  run(): Promise<BackupResult>;
  srcTree(res: BackupResult): Promise<string>;
  close(): Promise<void>;
}

async function harness(src: string): Promise<Harness> {
  const repo = await makeRepo();
  const storage = await openStorage(repo.repo);
  const failing = new Proxy(storage, {
    get(target, prop, receiver) {
      if (prop === 'putObject') {
        return (id: string, data: Buffer) => (h.failPutsFrom !== null && data.length >= h.failPutsFrom ? Promise.reject(new Error('put refused by the test')) : target.putObject(id, data));
      }
      if (prop === 'directWriter') return undefined; // every object goes through putObject
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  }) as Storage;
  const cacheOf = openTreeCache(repo.cacheDir)!;
  const counted = (id: string): TreeCache | null => countingCalls(cacheOf(id)!, 'get', () => h.treeLoads++);
  const r = await Repository.open(failing, Buffer.from(repo.env['SNAPCRYPT_PASSWORD'] ?? ''), counted);
  const source = new CountingSource();
  const h: Harness = {
    repo, src, source, treeLoads: 0, failPutsFrom: null, warnings: [],
    run: () => {
      source.readBytes.clear();
      h.treeLoads = 0;
      h.warnings = [];
      return engineBackup(r, { paths: [src], source, host: 'h', user: 'u', onWarning: (p, msg) => h.warnings.push(`${p}: ${msg}`) });
    },
    srcTree: async (res) => {
      let id: Buffer = Buffer.from(res.root.tree, 'hex');
      // (that snapshot's own objects: current, and the tree cache, keep only the latest's)
      const reader = await storage.openSnapshot(res.snapshot.name);
      for (const part of src.split('/').filter((x) => x.length > 0)) {
        const e = (await r.loadTree(reader, id)).find((x) => x.name.toString() === part);
        assert.ok(e?.subtree, `${part} in the snapshot`);
        id = e.subtree;
      }
      return id.toString('hex');
    },
    close: async () => {
      await source.finish();
      await storage.close();
    },
  };
  return h;
}

async function assertRestores(h: Harness, what: string): Promise<void> {
  const target = await tempDir('wread-restore');
  expectExit(await runCli(['restore', '--repo', h.repo.repo, `latest:${h.src}`, '--target', target], { env: h.repo.env }), `restore ${what}`);
  assertSameTree(await treeSnapshot(path.join(target, path.basename(h.src))), await treeSnapshot(h.src), `restore ${what}`);
  fs.rmSync(target, { recursive: true, force: true });
}

function openDescriptors(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/**
 * 12 chunks: A, zeros, B, A again, zeros, then 7 random ones (the last one short). The zeros are
 * holes, as a restore makes them.
 */
function writePatterned(p: string): void {
  const a = randomBytes(MiB);
  const parts: [number, Buffer][] = [[0, a], [2 * MiB, randomBytes(MiB)], [3 * MiB, a], [5 * MiB, randomBytes(6 * MiB + 12345)]];
  fs.mkdirSync(path.dirname(p), { recursive: true });
  const fd = fs.openSync(p, 'w');
  for (const [at, data] of parts) fs.writeSync(fd, data, 0, data.length, at);
  fs.closeSync(fd);
}

/** With one core there is no seal worker (large files are read on the main thread): skipped, never in CI. */
function oneCore(t: TestContext): boolean {
  if (availableParallelism() >= 2) return false;
  assert.ok(process.env['CI'] !== 'true', 'CI machines have at least 2 cores');
  t.skip('one core: no seal worker');
  return true;
}

test('large files are read on a worker while the walk goes on: exact snapshots, one chunk per change, records the next backups use', async (t) => {
  if (oneCore(t)) return;
  const src = await tempDir('wread-src');
  const big = {
    first: path.join(src, 'big1.bin'),
    second: path.join(src, 'sub', 'big2.bin'),
    third: path.join(src, 'sub', 'deeper', 'big3.bin'),
    fourth: path.join(src, 'sub', 'deeper', 'big4.bin'),
  };
  writePatterned(big.first);
  write(big.second, randomBytes(9 * MiB));
  write(big.third, randomBytes(10 * MiB + 1));
  write(big.fourth, randomBytes(8 * MiB));
  for (let i = 0; i < 30; i++) write(path.join(src, 'sub', 'deeper', `small${i}`), randomBytes(1000 + i));
  for (let i = 0; i < 30; i++) write(path.join(src, 'zz-later', `n${i % 5}`, `s${i}`), randomBytes(2000 + i));
  write(path.join(src, 'a-small'), 'before the large file in name order');
  const h = await harness(src);
  try {
    const first = await h.run();
    assert.equal(first.root.stats.errors, 0);
    assert.equal(first.root.stats.filesRead, first.root.stats.files, 'the first backup reads every file');
    // at most two large files are read on workers at once: big1 and big2 come first, the two in
    // sub/deeper may come while those are still being read, and are then read on the main thread
    for (const p of [big.third, big.fourth]) assert.ok([0, fs.statSync(p).size].includes(h.source.mainRead(p)), `${p}: read on a worker or on the main thread, whole`);
    assert.equal(h.source.mainRead(big.first), 0, 'the main thread read none of big1.bin (a worker did)');
    assert.equal(h.source.mainRead(big.second), 0, 'the main thread read none of big2.bin (a worker did)');
    assert.equal(h.source.mainRead(path.join(src, 'a-small')), 'before the large file in name order'.length, 'small files are read on the main thread');
    // stored: big1's 9 distinct chunks that are not zeros (A once), the 9 + 11 + 8 chunks of the
    // others, 61 small files, 9 trees below the path and one per directory above it (/ and /tmp...),
    // the snapshot root
    const above = src.split('/').filter((x) => x.length > 0).length;
    assert.equal(first.root.stats.objectsAdded, 9 + 9 + 11 + 8 + 61 + 9 + above + 1, 'objects stored');
    await assertRestores(h, 'the first backup');

    // nothing changed: no file is read. The directories whose trees waited for a file read on a worker
    // (src, sub, sub/deeper) have records that send the next backup to their previous trees; the
    // other directories are taken from their records
    const second = await h.run();
    assert.equal(second.root.stats.filesRead, 0, 'nothing changed: no file read');
    assert.ok(h.treeLoads <= 3 + 3, `nothing changed: previous trees loaded ${h.treeLoads} (above the path, and src, sub, sub/deeper)`);
    assert.equal(await h.srcTree(second), await h.srcTree(first), 'the same tree');
    const third0 = await h.run();
    assert.equal(third0.root.stats.filesRead, 0);
    assert.ok(h.treeLoads <= 3, `and the backup after it loads only the trees above the path: ${h.treeLoads}`);

    // 100 bytes in big1's 7th chunk, and a small file in a later directory
    const fd = fs.openSync(big.first, 'r+');
    fs.writeSync(fd, randomBytes(100), 0, 100, 6 * MiB + 500);
    fs.closeSync(fd);
    write(path.join(src, 'zz-later', 'n3', 's8'), randomBytes(777));
    const third = await h.run();
    assert.equal(third.root.stats.filesRead, 2, 'the two changed files are read');
    assert.ok(third.root.stats.bytesAdded < MiB + 64 * 1024, `stored ${third.root.stats.bytesAdded} bytes: one chunk, a small file, trees`);
    await assertRestores(h, 'after 100 bytes changed');

    // big2 shrinks (still large): read to its new end
    fs.truncateSync(big.second, 8 * MiB + 4321);
    const fourth = await h.run();
    assert.equal(fourth.root.stats.filesRead, 1);
    assert.equal(fourth.root.stats.bytesRead, 8 * MiB + 4321);
    await assertRestores(h, 'after big2.bin shrank');
    const again = await h.run();
    assert.equal(again.root.stats.filesRead, 0, 'and nothing is read after that');
    expectExit(await runCli(['verify', '--repo', h.repo.repo, '--read-data'], { env: h.repo.env }), 'verify --read-data');
  } finally {
    await h.close();
  }
});

test('a large file that cannot be opened or read is a warning; a storage failure while one is read stops the run and leaves nothing open', async (t) => {
  if (oneCore(t)) return;
  const src = await tempDir('wread-fail-src');
  const bigPath = path.join(src, 'd', 'big.bin');
  write(bigPath, randomBytes(9 * MiB));
  for (let i = 0; i < 20; i++) write(path.join(src, 'd', 'e', `f${i}`), randomBytes(500 + i));
  const h = await harness(src);
  try {
    h.source.refuse = bigPath;
    const skipped = await h.run();
    assert.equal(skipped.root.stats.errors, 1, 'the file that cannot be opened is one error');
    const target = await tempDir('wread-fail-restore');
    expectExit(await runCli(['restore', '--repo', h.repo.repo, `latest:${src}`, '--target', target], { env: h.repo.env }), 'restore');
    assert.ok(!fs.existsSync(path.join(target, path.basename(src), 'd', 'big.bin')), 'the file is not in the snapshot');
    assert.equal(fs.readdirSync(path.join(target, path.basename(src), 'd', 'e')).length, 20, 'the other files are');
    fs.rmSync(target, { recursive: true, force: true });
    h.source.refuse = null;

    // a disk error in the file's second chunk, while the main thread is asked about the first (which it
    // admits, and the worker seals): a warning, and the rest of the backup is complete
    h.source.failReadsAt = MiB;
    const unreadable = await h.run();
    assert.equal(unreadable.root.stats.errors, 1, 'the file that cannot be read is one error');
    assert.match(h.warnings.join('\n'), /big\.bin: EIO/);
    h.source.failReadsAt = null;

    const fds = openDescriptors();
    h.failPutsFrom = 512 * 1024; // the large file's sealed chunks are refused
    await assert.rejects(h.run(), /put refused by the test/);
    assert.deepEqual(h.warnings, [], 'the failure is no warning about the file being read');
    assert.equal(openDescriptors(), fds, 'no descriptor is left open by the failed run');
    h.failPutsFrom = null;

    const complete = await h.run();
    assert.equal(complete.root.stats.errors, 0);
    assert.equal(complete.root.stats.files, 21);
    await assertRestores(h, 'after the failed run');
    const after = await h.run();
    assert.equal(after.root.stats.filesRead, 0, 'and its records are right');
  } finally {
    await h.close();
  }
});
