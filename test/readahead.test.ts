/**
 * Files read ahead of the walk (engine/readahead.ts) on the real file system:
 * - ReadAhead keeps at most its limits of files and bytes in flight, hands each file's first chunk
 *   over, and closes what is dropped (no descriptor left open);
 * - a backup whose files change between the walk's lstat and their read (grown, shrunk, replaced by a
 *   symlink) stores what the file holds when it is read, or warns and skips it, as the synchronous
 *   reads did; the snapshot restores exactly.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { tempDir } from './env.js';
import { openStorage } from '../src/drivers/open.js';
import { LocalSourceFs } from '../src/drivers/localfs.js';
import { Repository } from '../src/engine/repository.js';
import { backup as engineBackup } from '../src/engine/backup.js';
import { ReadAhead } from '../src/engine/readahead.js';
import { assertSameTree, expectExit, makeRepo, runCli, treeSnapshot } from './cli-helpers.js';

const MiB = 1024 * 1024;

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

test('ReadAhead: bounded files and bytes in flight, first chunks in order, dropped files closed', async () => {
  const dir = await tempDir('readahead-unit');
  const sizes = Array.from({ length: 100 }, (_, i) => (i % 10 === 9 ? 300_000 : 1 + i * 37));
  const contents = sizes.map((n) => randomBytes(n));
  contents.forEach((c, i) => fs.writeFileSync(path.join(dir, `f${i}`), c));

  let reading = 0;
  let maxReading = 0;
  const local = new LocalSourceFs();
  const source = {
    open: (p: Buffer) => local.open(p),
    readAsync: async (fd: number, buf: Buffer, pos: number) => {
      reading++;
      maxReading = Math.max(maxReading, reading);
      try {
        return await local.readAsync(fd, buf, pos);
      } finally {
        reading--;
      }
    },
    close: (fd: number) => local.close(fd),
  };
  let held = 0;
  let maxHeld = 0;
  const memory = {
    take: (n: number) => {
      held += n;
      maxHeld = Math.max(maxHeld, held);
      return Buffer.alloc(n);
    },
    give: (b: Uint8Array) => {
      held -= b.buffer.byteLength;
    },
  };
  const before = openFds();
  const ahead = new ReadAhead(source, memory, 8, 512 * 1024);
  const files = sizes.map((n, i) => ahead.request(Buffer.from(path.join(dir, `f${i}`)), Math.min(n, 256 * 1024)));
  const missing = ahead.request(Buffer.from(path.join(dir, 'absent')), 10);
  for (let i = 0; i < 60; i++) {
    const first = await ahead.take(files[i]!);
    assert.equal(first.n, Math.min(sizes[i]!, 256 * 1024), `f${i}: bytes read ahead`);
    assert.ok(first.data.subarray(0, first.n).equals(contents[i]!.subarray(0, first.n)), `f${i}: its first bytes`);
    memory.give(first.data);
    fs.closeSync(first.fd);
  }
  await assert.rejects(ahead.take(files[60]!).then(() => ahead.take(files[60]!)), /taken twice/);
  for (const f of files.slice(61)) await ahead.drop(f); // started and queued ones alike
  await assert.rejects(ahead.take(missing), { code: 'ENOENT' });
  assert.ok(maxReading > 1 && maxReading <= 8, `several files and at most 8 read at once (${maxReading})`);
  // the limit in bytes holds beyond one file taken before its turn
  assert.ok(maxHeld <= 512 * 1024 + 256 * 1024, `bytes read ahead stay within the limit (${maxHeld})`);
  const took = await ahead.take(files[60]!).catch(() => null); // taken above already: refused, nothing leaks
  assert.equal(took, null);
  assert.equal(openFds(), before + 1, 'only f60 (taken, not closed here) is open');
});

test('a backup stores what a file holds when it is read: grown, shrunk or replaced after the walk stat it', async () => {
  const repo = await makeRepo();
  const src = await tempDir('readahead-src');
  // many small files (read ahead in batches), files around the chunk size, a large one read chunk by chunk
  for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(src, `small-${String(i).padStart(3, '0')}`), randomBytes(i * 13));
  fs.writeFileSync(path.join(src, 'big'), randomBytes(5 * MiB + 12345));
  fs.writeFileSync(path.join(src, 'chunk'), randomBytes(MiB));
  fs.writeFileSync(path.join(src, 'grows'), randomBytes(1000));
  fs.writeFileSync(path.join(src, 'grows-big'), randomBytes(2 * MiB));
  fs.writeFileSync(path.join(src, 'shrinks'), randomBytes(3 * MiB + 7));
  fs.writeFileSync(path.join(src, 'replaced'), randomBytes(500));
  fs.mkdirSync(path.join(src, 'sub'));
  for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(src, 'sub', `s${i}`), randomBytes(100 + i));

  // Changes made right after the walk's lstat of the file, before its read (which the read-ahead may
  // already have started: it is asked for only after the whole directory was stat'ed).
  let openedAhead = 0;
  class Changing extends LocalSourceFs {
    override readAsync(fd: number, buf: Buffer, pos: number) {
      if (pos === 0) openedAhead++;
      return super.readAsync(fd, buf, pos);
    }
    override lstat(p: Buffer) {
      const st = super.lstat(p);
      const name = path.basename(p.toString());
      if (name === 'grows') fs.appendFileSync(p, randomBytes(3000));
      if (name === 'grows-big') fs.appendFileSync(p, randomBytes(MiB + 5));
      if (name === 'shrinks') fs.truncateSync(p, MiB + 3);
      if (name === 'replaced') {
        fs.rmSync(p);
        fs.symlinkSync('elsewhere', p);
      }
      return st;
    }
  }
  const storage = await openStorage(repo.repo);
  const r = await Repository.open(storage, Buffer.from(repo.env['SNAPCRYPT_PASSWORD'] ?? ''), null);
  const warnings: string[] = [];
  const source = new Changing();
  const fdsBefore = openFds();
  const result = await engineBackup(r, { paths: [src], source, host: 'h', user: 'u', onWarning: (p, m) => warnings.push(`${path.basename(p)}: ${m}`) });
  await source.finish();
  assert.equal(openFds(), fdsBefore, 'no descriptor is left open');
  assert.deepEqual(warnings, ['replaced: ELOOP'], 'the file replaced by a symlink is reported (O_NOFOLLOW) and skipped');
  assert.equal(result.root.stats.errors, 1);
  assert.equal(openedAhead, 299 + 5 + 40, 'every file but the empty one and the replaced one (which failed to open: ELOOP) was read ahead');

  const target = await tempDir('readahead-restore');
  expectExit(await runCli(['restore', '--repo', repo.repo, `latest:${src}`, '--target', target], { env: repo.env }), 'restore');
  const expected = await treeSnapshot(src);
  delete expected['replaced'];
  const got = await treeSnapshot(path.join(target, path.basename(src)));
  // the changed files as they were read, after their change; their mtimes (and the directory's) are
  // the ones lstat saw before it
  for (const k of ['.', 'grows', 'grows-big', 'shrinks']) {
    assert.ok(got[k] && expected[k], k);
    got[k]!.mtimeNs = expected[k]!.mtimeNs = 0n;
  }
  assertSameTree(got, expected);
  assert.equal(fs.statSync(path.join(target, path.basename(src), 'grows')).size, 4000);
  assert.equal(fs.statSync(path.join(target, path.basename(src), 'grows-big')).size, 3 * MiB + 5);
  assert.equal(fs.statSync(path.join(target, path.basename(src), 'shrinks')).size, MiB + 3);
});
