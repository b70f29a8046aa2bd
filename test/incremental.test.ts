/**
 * I7 Only changes travel, through the CLI:
 * - a second backup with nothing changed reads no file and stores only the new snapshot root (and the
 *   trees of the directories above the backed-up path, whose metadata may have changed meanwhile);
 * - 100 bytes changed in the middle of a 40 MiB file cost one chunk (plus the trees on its path and
 *   the root), not the file;
 * - with the local cache deleted, the next backup is still correct (restores exactly) and stores no
 *   chunk again, though it may read files again.
 * What a backup stored is checked twice: by its own --json summary and by the objects that appeared in
 * the repository's current/objects.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { tempDir } from './env.js';
import { openStorage } from '../src/drivers/open.js';
import { openTreeCache } from '../src/drivers/cachedir.js';
import { LocalSourceFs } from '../src/drivers/localfs.js';
import { Repository } from '../src/engine/repository.js';
import { backup as engineBackup } from '../src/engine/backup.js';
import { assertSameTree, countingCalls, expectExit, jsonLines, makeRepo, runCli, treeSnapshot, type TestRepo } from './cli-helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BIG_SIZE = 40 * MiB;
/** Where the 100 bytes change: well inside the 21st chunk (chunks are 1 MiB). */
const CHANGE_AT = 20 * MiB + 300 * KiB;
/**
 * Objects a backup stores besides changed chunks: the snapshot root, the source directory's tree and
 * the trees of its ancestors (/ and /tmp, whose mtimes other processes may change).
 */
const TREES_AND_ROOT = 4;

interface Summary {
  files: number;
  filesRead: number;
  bytesRead: number;
  objectsAdded: number;
  bytesAdded: number;
  id: string;
}

function objects(repo: TestRepo): Set<string> {
  const out = new Set<string>();
  const dir = path.join(repo.repo, 'current', 'objects');
  for (const prefix of fs.readdirSync(dir)) {
    if (!/^[0-9a-f]{2}$/.test(prefix)) continue;
    for (const name of fs.readdirSync(path.join(dir, prefix))) if (/^[0-9a-f]{64}$/.test(name)) out.add(name);
  }
  return out;
}

/** A backup that must succeed; returns its summary and the objects it added to current. */
async function backup(repo: TestRepo, src: string, what: string): Promise<{ s: Summary; added: string[] }> {
  const before = objects(repo);
  const r = await runCli(['backup', '--repo', repo.repo, '--json', src], { env: repo.env });
  expectExit(r, `backup ${what}`);
  const line = jsonLines(r.stdout).find((l) => l['type'] === 'summary');
  assert.ok(line, `backup ${what} printed no summary`);
  const s = line as unknown as Summary;
  const added = [...objects(repo)].filter((id) => !before.has(id));
  assert.equal(s.objectsAdded, added.length, `backup ${what}: summary's objectsAdded vs new objects in current`);
  return { s, added };
}

async function assertRestores(repo: TestRepo, src: string, what: string): Promise<void> {
  const target = await tempDir('incr-restore');
  const r = await runCli(['restore', '--repo', repo.repo, '--json', `latest:${src}`, '--target', target], { env: repo.env });
  expectExit(r, `restore ${what}`);
  assertSameTree(await treeSnapshot(path.join(target, path.basename(src))), await treeSnapshot(src), `restore ${what}`);
  fs.rmSync(target, { recursive: true, force: true });
}

test('only changes travel: unchanged files are not read, a small change costs one chunk, a lost cache costs no upload (I7)', async (t) => {
  const repo = await makeRepo();
  // The source is a temp dir of its own, so nothing is created beside it between backups.
  const src = await tempDir('incr-src');
  fs.writeFileSync(path.join(src, 'big.bin'), randomBytes(BIG_SIZE));
  for (const d of ['a', 'b', path.join('b', 'c')]) {
    fs.mkdirSync(path.join(src, d));
    for (let i = 0; i < 20; i++) fs.writeFileSync(path.join(src, d, `f${i}`), randomBytes(100 + i * 97));
  }
  fs.writeFileSync(path.join(src, 'empty'), '');
  fs.symlinkSync('big.bin', path.join(src, 'link'));

  const first = await backup(repo, src, 'first');
  assert.equal(first.s.filesRead, first.s.files, 'the first backup reads every file');
  assert.ok(first.s.bytesAdded > BIG_SIZE, 'the first backup stores the data');
  t.diagnostic(`first backup: ${first.s.files} files, ${first.s.objectsAdded} objects, ${first.s.bytesAdded} bytes`);

  // --- nothing changed: nothing read, only the new root (+ ancestor trees) stored
  const second = await backup(repo, src, 'with nothing changed');
  assert.equal(second.s.filesRead, 0, 'no file is read when nothing changed');
  assert.equal(second.s.bytesRead, 0);
  assert.ok(second.s.objectsAdded >= 1 && second.s.objectsAdded <= TREES_AND_ROOT - 1, `stored ${second.s.objectsAdded} objects: the root and at most the ancestor trees`);
  assert.ok(second.added.includes(second.s.id), 'the new snapshot root is one of the added objects');
  assert.ok(second.s.bytesAdded < 10 * KiB, `stored ${second.s.bytesAdded} bytes, expected < 10 KiB`);
  t.diagnostic(`unchanged: ${second.s.objectsAdded} objects, ${second.s.bytesAdded} bytes`);

  // --- 100 bytes in the middle of the 40 MiB file: one chunk, the trees above it, the root
  const fd = fs.openSync(path.join(src, 'big.bin'), 'r+');
  fs.writeSync(fd, randomBytes(100), 0, 100, CHANGE_AT);
  fs.closeSync(fd);
  const third = await backup(repo, src, 'after changing 100 bytes');
  assert.equal(third.s.filesRead, 1, 'only the changed file is read');
  assert.equal(third.s.bytesRead, BIG_SIZE);
  assert.ok(third.s.objectsAdded >= 2 && third.s.objectsAdded <= 1 + TREES_AND_ROOT, `stored ${third.s.objectsAdded} objects: one chunk, the trees on its path, the root`);
  assert.ok(third.s.bytesAdded < 1.2 * MiB + 8 * KiB, `stored ${third.s.bytesAdded} bytes, expected about one 1 MiB chunk`);
  t.diagnostic(`100 bytes changed in ${BIG_SIZE / MiB} MiB: ${third.s.objectsAdded} objects, ${third.s.bytesAdded} bytes`);
  await assertRestores(repo, src, 'after changing 100 bytes');

  // --- the local cache is lost (and one small file changes): still correct, no chunk stored again
  assert.ok(fs.existsSync(repo.cacheDir), `the backups used the cache ${repo.cacheDir}`);
  fs.rmSync(repo.cacheDir, { recursive: true, force: true });
  fs.writeFileSync(path.join(src, 'a', 'f3'), randomBytes(333));
  const fourth = await backup(repo, src, 'without the local cache');
  assert.ok(fourth.s.filesRead >= 1, 'the changed file is read');
  // the changed file's chunk, its directory's tree, and the trees above it and the root
  assert.ok(fourth.s.objectsAdded <= 2 + TREES_AND_ROOT, `stored ${fourth.s.objectsAdded} objects: the changed file's chunk, the trees on its path, the root`);
  assert.ok(fourth.s.bytesAdded < 16 * KiB, `stored ${fourth.s.bytesAdded} bytes: no chunk of the unchanged files is stored again`);
  t.diagnostic(`without the cache: read ${fourth.s.filesRead} files, stored ${fourth.s.objectsAdded} objects, ${fourth.s.bytesAdded} bytes`);
  await assertRestores(repo, src, 'without the local cache');

  const v = await runCli(['verify', '--repo', repo.repo, '--read-data'], { env: repo.env });
  expectExit(v, 'verify --read-data at the end');
});

test('a backup takes what current holds from the index it committed last, and lists current when that index is out of date', async (t) => {
  const repo = await makeRepo();
  const src = await tempDir('incr-index-src');
  for (let i = 0; i < 30; i++) fs.writeFileSync(path.join(src, `f${i}`), randomBytes(2000 + i));
  const first = await backup(repo, src, 'first');
  const repoId = (fs.readFileSync(path.join(repo.repo, 'current', 'config'), 'latin1').match(/[0-9a-f]{32}/) ?? [''])[0];
  const kept = path.join(repo.cacheDir, repoId, 'index');
  assert.ok(fs.existsSync(kept), `the committed index is kept in the cache (${kept})`);

  // In-process, with the storage's listObjects counted: an unchanged backup does not list current.
  const storage = await openStorage(repo.repo);
  let listings = 0;
  const counted = new Proxy(storage, {
    get(target, prop, receiver) {
      if (prop === 'listObjects') {
        return () => {
          listings++;
          return target.listObjects();
        };
      }
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
  const r = await Repository.open(counted, Buffer.from(repo.env['SNAPCRYPT_PASSWORD'] ?? ''), openTreeCache(repo.cacheDir));
  const source = new LocalSourceFs();
  const run = () => engineBackup(r, { paths: [src], source, host: 'h', user: 'u' });
  const unchanged = await run();
  assert.equal(listings, 0, 'an unchanged backup after this workstation\'s commit does not list current');
  assert.equal(unchanged.root.stats.filesRead, 0);

  // An object current has lost since (removed on the server): the kept index is wrong, the commit is
  // refused, and the backup lists current and sends what is missing, in the same run.
  // (a chunk: over 1000 bytes; the first run's trees of / and /tmp may have been replaced since)
  const objectFile = (id: string): string => path.join(repo.repo, 'current', 'objects', id.slice(0, 2), id);
  const chunk = first.added.find((id) => id !== first.s.id && fs.existsSync(objectFile(id)) && fs.statSync(objectFile(id)).size > 1000);
  assert.ok(chunk, 'a chunk of the first backup');
  fs.rmSync(objectFile(chunk));
  const healed = await run();
  assert.equal(listings, 1, 'the refused commit made the backup list current once');
  assert.ok(healed.root.stats.filesRead >= 1, 'the file whose chunk was lost is read again');
  assert.ok(fs.existsSync(objectFile(chunk)), 'the lost chunk is stored again');

  // A run that uploads and does not commit leaves objects that no kept index lists: the next one lists.
  fs.writeFileSync(path.join(src, 'new'), randomBytes(5000));
  const crashed = engineBackup(r, { paths: [src], source, host: 'h', user: 'u', onStep: (s) => { if (s === 'commit') throw new Error('stopped before commit'); } });
  await assert.rejects(crashed, /stopped before commit/);
  assert.ok(!fs.existsSync(kept), 'a run that may upload forgets the kept index until it commits');
  const resumed = await run();
  assert.equal(listings, 2, 'the next run lists current');
  // what the stopped run uploaded (the new file's 5000-byte chunk, the trees) is not sent again: only
  // the new snapshot root, and the trees of / and /tmp if their metadata changed meanwhile
  assert.equal(resumed.root.stats.filesRead, 1, 'the new file is read again (no snapshot lists it yet), its chunk is found in current');
  assert.ok(resumed.root.stats.objectsAdded <= TREES_AND_ROOT - 1, `stored ${resumed.root.stats.objectsAdded} objects`);
  assert.ok(resumed.root.stats.bytesAdded < 4000, `stored ${resumed.root.stats.bytesAdded} bytes: not the new file's chunk again`);
  await source.finish();
  await storage.close();
  t.diagnostic(`listings: ${listings}`);
  await assertRestores(repo, src, 'after the refused commit');
  expectExit(await runCli(['verify', '--repo', repo.repo, '--read-data'], { env: repo.env }), 'verify --read-data');
});

test('a directory renamed within its parent is compared with its old tree: its files are not read again', async () => {
  const repo = await makeRepo();
  const src = await tempDir('incr-rename-src');
  fs.mkdirSync(path.join(src, 'docs', 'sub'), { recursive: true });
  for (let i = 0; i < 10; i++) fs.writeFileSync(path.join(src, 'docs', i < 5 ? '' : 'sub', `f${i}`), randomBytes(3000 + i));
  await backup(repo, src, 'first');
  fs.renameSync(path.join(src, 'docs'), path.join(src, 'docs-renamed'));
  // a new directory that takes the old name is not confused with the renamed one
  fs.mkdirSync(path.join(src, 'docs'));
  fs.writeFileSync(path.join(src, 'docs', 'f0'), randomBytes(100));
  const renamed = await backup(repo, src, 'after the rename');
  assert.equal(renamed.s.filesRead, 1, 'only the new file under the old name is read; the renamed directory\'s files are not');
  await assertRestores(repo, src, 'after the rename');
  // a file changed under the renamed directory is still read
  fs.appendFileSync(path.join(src, 'docs-renamed', 'sub', 'f7'), 'more');
  fs.renameSync(path.join(src, 'docs-renamed'), path.join(src, 'docs-again'));
  const changed = await backup(repo, src, 'after a change and another rename');
  assert.equal(changed.s.filesRead, 1, 'the changed file is read');
  await assertRestores(repo, src, 'after a change and another rename');
});

test('a symlink whose inode, times and length are unchanged keeps its target without a readlink; a new one is read', async () => {
  const repo = await makeRepo();
  const src = await tempDir('incr-symlink-src');
  fs.writeFileSync(path.join(src, 'file'), 'x');
  for (let i = 0; i < 5; i++) fs.symlinkSync(`target-${i}`, path.join(src, `link${i}`));
  const storage = await openStorage(repo.repo);
  const r = await Repository.open(storage, Buffer.from(repo.env['SNAPCRYPT_PASSWORD'] ?? ''), openTreeCache(repo.cacheDir));
  const local = new LocalSourceFs();
  let readlinks = 0;
  const source = countingCalls(local, 'readlink', () => readlinks++);
  const run = () => engineBackup(r, { paths: [src], source, host: 'h', user: 'u' });
  await run();
  assert.equal(readlinks, 5, 'the first backup reads every symlink');
  // the directory changes (a file), and one symlink is replaced by one of the same length: only the new one is read
  fs.writeFileSync(path.join(src, 'file'), 'yy');
  fs.rmSync(path.join(src, 'link3'));
  fs.symlinkSync('target-X', path.join(src, 'link3'));
  readlinks = 0;
  const second = await run();
  assert.equal(readlinks, 1, 'only the replaced symlink is read');
  assert.equal(second.root.stats.symlinks, 5);
  await local.finish();
  await storage.close();
  await assertRestores(repo, src, 'after a symlink was replaced'); // (the targets compared too)
});

test('a committed backup drops the trees it replaced from the tree cache, and keeps the ones it still lists', async () => {
  const repo = await makeRepo();
  const src = await tempDir('incr-cache-src');
  for (const d of ['a/b/c', 'd/e', 'f']) {
    fs.mkdirSync(path.join(src, d), { recursive: true });
    for (let i = 0; i < 3; i++) fs.writeFileSync(path.join(src, d, `file${i}`), randomBytes(300 + i));
  }
  await backup(repo, src, 'first');
  const repoId = (fs.readFileSync(path.join(repo.repo, 'current', 'config'), 'latin1').match(/[0-9a-f]{32}/) ?? [''])[0]!;
  const treesDir = path.join(repo.cacheDir, repoId, 'trees');
  const cached = (): string[] => (fs.existsSync(treesDir) ? fs.readdirSync(treesDir, { recursive: true, encoding: 'utf8' }).map((f) => path.basename(f)).filter((f) => /^[0-9a-f]{64}$/.test(f)) : []);
  const listed = (): Set<string> => {
    const index = fs.readFileSync(path.join(repo.repo, 'current', 'index'));
    const out = new Set<string>();
    for (let o = 0; o < index.length; o += 32) out.add(index.subarray(o, o + 32).toString('hex'));
    return out;
  };
  // a restore loads every tree of the snapshot into the cache
  await assertRestores(repo, src, 'the first snapshot');
  const before = cached();
  assert.ok(before.length >= 7, `the first snapshot's trees are in the cache: ${before.length}`);

  fs.appendFileSync(path.join(src, 'a', 'b', 'c', 'file0'), 'changed');
  await backup(repo, src, 'after a change three levels down');
  const now = listed();
  const after = cached();
  const gone = before.filter((id) => !after.includes(id));
  assert.ok(gone.length >= 4, `the trees of c, b, a and the source directory left the cache: ${gone.length}`);
  for (const id of gone) assert.ok(!now.has(id), `a dropped tree is not listed by the new snapshot: ${id}`);
  for (const id of after) assert.ok(now.has(id), `every tree left in the cache is listed by the new snapshot: ${id}`);
  assert.ok(after.length >= 3, `the trees of d, e and f stay: ${after.length}`);
  // the earlier snapshot is still whole: its trees come from the repository again
  const target = await tempDir('incr-cache-restore');
  const first = jsonLines((await runCli(['snapshots', '--repo', repo.repo, '--json'], { env: repo.env })).stdout).filter((o) => o['type'] === 'snapshot')[0]!;
  expectExit(await runCli(['restore', '--repo', repo.repo, `${String(first['id']).slice(0, 8)}:${src}`, '--target', target], { env: repo.env }), 'restore of the first snapshot');
  assert.equal(fs.readFileSync(path.join(target, path.basename(src), 'a', 'b', 'c', 'file0')).length, 300, 'the first version');
});
