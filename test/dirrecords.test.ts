/**
 * The walk's directory records (engine/dirrecords.ts, DESIGN section 10). A backup after the one that
 * wrote them takes an unchanged directory from its lstat results and its record alone: no previous
 * tree is loaded and no file read. Every kind of change below is still seen, checked two ways:
 * - the snapshot restores to exactly the source (contents, metadata, links);
 * - a backup made right after it without records (the file deleted, so it compares with the previous
 *   trees, as before records existed) gives the same root tree id: same entries, same metadata.
 * A damaged or cut records file is not used past the damage, and the backup is still right.
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
import { type BackupResult, backup as engineBackup } from '../src/engine/backup.js';
import type { TreeCache } from '../src/engine/cache.js';
import { StatLine, walkOrder } from '../src/engine/dirrecords.js';
import { NO_CHUNKS, NO_XATTRS, NodeKind } from '../src/core/format.js';
import { assertSameTree, countingCalls, expectExit, makeRepo, runCli, treeSnapshot, type TestRepo } from './cli-helpers.js';

const MiB = 1024 * 1024;

function write(p: string, data: string | Buffer): void {
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, data);
}

/** A tree with depth, several kinds, a hard link, a file of three chunks with a zero chunk, an empty dir. */
function makeSource(src: string): void {
  for (let i = 0; i < 5; i++) {
    for (let j = 0; j < 4; j++) {
      for (let k = 0; k < 6; k++) write(path.join(src, `d${i}`, `e${j}`, `f${k}.txt`), `file ${i}/${j}/${k} ${randomBytes(8).toString('hex')}\n`);
      fs.mkdirSync(path.join(src, `d${i}`, `e${j}`, 'deep', 'deeper'), { recursive: true });
      write(path.join(src, `d${i}`, `e${j}`, 'deep', 'deeper', 'leaf'), randomBytes(300));
    }
  }
  // sparse, as its restore will be: the middle chunk is a hole (a zero chunk, stored as none)
  const fd = fs.openSync(path.join(src, 'big.bin'), 'w');
  fs.writeSync(fd, randomBytes(MiB), 0, MiB, 0);
  fs.writeSync(fd, randomBytes(MiB / 2), 0, MiB / 2, 2 * MiB);
  fs.closeSync(fd);
  fs.linkSync(path.join(src, 'd0', 'e0', 'f0.txt'), path.join(src, 'd0', 'hardlink'));
  fs.symlinkSync('d1/e1/f1.txt', path.join(src, 'link'));
  fs.mkdirSync(path.join(src, 'empty'));
  write(path.join(src, 'a-b', 'x'), 'a-b');
  write(path.join(src, 'a', 'z'), 'a/z'); // "a/z" walks before "a-b"
}

interface Harness {
  repo: TestRepo;
  src: string;
  recordsFile: string;
  /** Trees the backup asked the cache for (each a previous tree loaded). */
  treeLoads: number;
  /** The id of the backed-up directory's tree in a snapshot (the root tree also holds / and /tmp, whose metadata others change). */
  srcTree(res: BackupResult): Promise<string>;
  run(): Promise<BackupResult>;
  close(): Promise<void>;
}

async function harness(): Promise<Harness> {
  const repo = await makeRepo();
  const src = await tempDir('dirrec-src');
  makeSource(src);
  const storage = await openStorage(repo.repo);
  const cacheOf = openTreeCache(repo.cacheDir)!;
  const h: Harness = {
    repo, src, recordsFile: '', treeLoads: 0,
    srcTree: async (res) => {
      const loads = h.treeLoads;
      let id: Buffer = Buffer.from(res.root.tree, 'hex');
      // (that snapshot's own objects: current, and the tree cache, keep only the latest's)
      const reader = await storage.openSnapshot(res.snapshot.name);
      for (const part of src.split('/').filter((x) => x.length > 0)) {
        const e = (await r.loadTree(reader, id)).find((x) => x.name.toString() === part);
        assert.ok(e?.subtree, `${part} in the snapshot`);
        id = e.subtree;
      }
      h.treeLoads = loads;
      return id.toString('hex');
    },
    run: () => engineBackup(r, { paths: [src], source, host: 'h', user: 'u' }),
    close: async () => {
      await source.finish();
      await storage.close();
    },
  };
  const counted = (id: string): TreeCache | null => {
    const c = cacheOf(id)!;
    h.recordsFile = path.join(repo.cacheDir, id, 'dirs');
    return countingCalls(c, 'get', () => h.treeLoads++);
  };
  const r = await Repository.open(storage, Buffer.from(repo.env['SNAPCRYPT_PASSWORD'] ?? ''), counted);
  const source = new LocalSourceFs();
  return h;
}

/** The latest snapshot restores to exactly the source. */
async function assertRestores(h: Harness, what: string): Promise<void> {
  const target = await tempDir('dirrec-restore');
  expectExit(await runCli(['restore', '--repo', h.repo.repo, `latest:${h.src}`, '--target', target], { env: h.repo.env }), `restore ${what}`);
  assertSameTree(await treeSnapshot(path.join(target, path.basename(h.src))), await treeSnapshot(h.src), `restore ${what}`);
  fs.rmSync(target, { recursive: true, force: true });
}

/** A backup with records, then one without them (same source): both describe the source alike. */
async function checkedBackup(h: Harness, what: string): Promise<BackupResult> {
  const withRecords = await h.run();
  await assertRestores(h, what);
  fs.rmSync(h.recordsFile);
  const without = await h.run();
  assert.equal(await h.srcTree(withRecords), await h.srcTree(without), `${what}: the tree with records is the one without`);
  assert.equal(without.root.stats.filesRead, 0, `${what}: the backup after it (without records) reads no file: every entry matched`);
  const keys = ['files', 'dirs', 'symlinks', 'others', 'bytes'] as const;
  for (const k of keys) assert.equal(withRecords.root.stats[k], without.root.stats[k], `${what}: stats.${k}`);
  return withRecords;
}

test('walk order: a directory before what is below it, then its later siblings', () => {
  const sorted = ['/a', '/a/z', '/a/z/q', '/a-b', '/a0', '/b'].map((s) => Buffer.from(s));
  for (let i = 0; i < sorted.length; i++) {
    for (let j = 0; j < sorted.length; j++) {
      assert.equal(Math.sign(walkOrder(sorted[i]!, sorted[j]!)), Math.sign(i - j), `${sorted[i]} vs ${sorted[j]}`);
    }
  }
});

test('a stat line holds each time as 8 bytes, little-endian and signed, also once it outgrows its first buffer', () => {
  const line = new StatLine();
  const times = [0n, 1n, -1n, 1_764_400_000_123_456_789n, -86_400_000_000_001n, 2n ** 63n - 1n, -(2n ** 63n)];
  const name = Buffer.alloc(3000, 0x61); // 22 entries of about 3 KB: past the first 64 KiB
  for (let i = 0; i < 22; i++) {
    const m = times[i % times.length]!;
    const c = times[(i + 3) % times.length]!;
    line.addEntry({
      kind: NodeKind.file, name, mode: 0o644, uid: i, gid: 7, mtimeNs: m, ctimeNs: c, inode: 1000 + i, nlink: 1,
      xattrs: NO_XATTRS, size: 5 * i, chunks: NO_CHUNKS, subtree: null, target: null, rdev: 0,
    });
  }
  const v = line.view();
  let o = 0;
  for (let i = 0; i < 22; i++) {
    assert.equal(v.readUInt16LE(o), name.length);
    o += 2 + name.length + 1 + 2 + 4 + 4 + 8; // name, kind, mode, uid, gid, size
    assert.equal(v.readBigInt64LE(o), times[i % times.length], `entry ${i}: mtime`);
    assert.equal(v.readBigInt64LE(o + 8), times[(i + 3) % times.length], `entry ${i}: ctime`);
    o += 16;
    assert.equal(v.readDoubleLE(o), 1000 + i, `entry ${i}: inode after the times`);
    o += 8 + 4 + 8; // inode, nlink, rdev
  }
  assert.equal(o, v.length);
});

test('an unchanged directory is taken from its record: no tree loaded, no file read, the same snapshot', async () => {
  const h = await harness();
  try {
    const first = await h.run();
    assert.ok(fs.existsSync(h.recordsFile), 'the backup kept its directory records');
    const raw = fs.readFileSync(h.recordsFile);
    for (const secret of ['f0.txt', 'deeper', 'hardlink']) assert.ok(!raw.includes(secret), `the records file holds no name in the clear (${secret})`);
    h.treeLoads = 0;
    const second = await h.run();
    assert.equal(second.root.stats.filesRead, 0);
    // the same records again, sealed under a new file key (a fresh salt): block numbers repeat as
    // nonces only under different keys, and equal records do not show as equal bytes
    const again = fs.readFileSync(h.recordsFile);
    assert.notDeepEqual(again.subarray(16, 48), raw.subarray(16, 48), 'a fresh salt for each records file');
    assert.notDeepEqual(again.subarray(112, 112 + 4096), raw.subarray(112, 112 + 4096), 'equal records seal to other bytes');
    // only the trees above the backed-up path (/ and /tmp) are loaded: the walk from src down none
    assert.ok(h.treeLoads <= 3, `previous trees loaded: ${h.treeLoads}`);
    assert.equal(await h.srcTree(second), await h.srcTree(first), 'same tree');
    for (const k of ['files', 'dirs', 'symlinks', 'others', 'bytes'] as const) assert.equal(second.root.stats[k], first.root.stats[k], `stats.${k}`);
    // the commit's index lists everything the snapshot needs: nothing it references was pruned
    expectExit(await runCli(['verify', '--repo', h.repo.repo, '--read-data'], { env: h.repo.env }), 'verify --read-data');
    await assertRestores(h, 'unchanged');

    // without records (deleted), the same backup loads every tree
    fs.rmSync(h.recordsFile);
    h.treeLoads = 0;
    await h.run();
    assert.ok(h.treeLoads > 40, `without records, previous trees loaded: ${h.treeLoads}`);
  } finally {
    await h.close();
  }
});

test('every kind of change below an unchanged directory is seen', async () => {
  const h = await harness();
  try {
    await checkedBackup(h, 'first');
    const s = h.src;
    const steps: Array<[string, () => void]> = [
      ['a file deep down changes (same size)', () => {
        const f = path.join(s, 'd2', 'e3', 'deep', 'deeper', 'leaf');
        fs.writeFileSync(f, randomBytes(300));
      }],
      ['a file changes and gets its old mtime back', () => {
        const f = path.join(s, 'd1', 'e1', 'f2.txt');
        const st = fs.statSync(f);
        fs.writeFileSync(f, 'X'.repeat(st.size));
        fs.utimesSync(f, st.atime, st.mtime);
      }],
      ['a file is added deep down', () => write(path.join(s, 'd3', 'e0', 'deep', 'new.txt'), 'new')],
      ['a directory is removed', () => fs.rmSync(path.join(s, 'd4', 'e2'), { recursive: true })],
      ['a directory is renamed', () => fs.renameSync(path.join(s, 'd0', 'e1'), path.join(s, 'd0', 'e9'))],
      ['a directory moves elsewhere', () => fs.renameSync(path.join(s, 'd0', 'e9'), path.join(s, 'd4', 'moved'))],
      ['a mode changes', () => fs.chmodSync(path.join(s, 'd3', 'e3', 'f5.txt'), 0o600)],
      ['a symlink is retargeted', () => {
        fs.rmSync(path.join(s, 'link'));
        fs.symlinkSync('big.bin', path.join(s, 'link'));
      }],
      ['a file becomes a directory of the same name', () => {
        fs.rmSync(path.join(s, 'd2', 'e2', 'f0.txt'));
        write(path.join(s, 'd2', 'e2', 'f0.txt', 'inside'), 'inside');
      }],
      ['a hard-linked file changes through its other name', () => fs.appendFileSync(path.join(s, 'd0', 'hardlink'), 'more')],
      ['the zero chunk of the large file gets data', () => {
        const fd = fs.openSync(path.join(s, 'big.bin'), 'r+');
        fs.writeSync(fd, randomBytes(MiB), 0, MiB, MiB);
        fs.closeSync(fd);
      }],
      ['an empty directory gets a file, and a new top-level directory appears', () => {
        write(path.join(s, 'empty', 'now'), 'now');
        write(path.join(s, 'a0', 'b', 'c'), 'c');
      }],
      ['several directories change at once', () => {
        for (let i = 0; i < 4; i++) write(path.join(s, `d${i}`, 'e3', 'deep', `n${i}`), `n${i}`);
        fs.rmSync(path.join(s, 'a', 'z'));
      }],
    ];
    for (const [what, change] of steps) {
      change();
      const res = await checkedBackup(h, what);
      // (a directory moved to another parent is read again: 7 files)
      assert.ok(res.root.stats.filesRead <= 8, `${what}: files read ${res.root.stats.filesRead}`);
    }
    expectExit(await runCli(['verify', '--repo', h.repo.repo, '--read-data'], { env: h.repo.env }), 'verify --read-data');
  } finally {
    await h.close();
  }
});

test('a damaged, cut or foreign records file is not used, and the backup is still right', async () => {
  const h = await harness();
  try {
    await h.run();
    const cases: Array<[string, (b: Buffer) => Buffer]> = [
      ['a flipped byte in the middle', (b) => {
        const c = Buffer.from(b);
        c[Math.floor(c.length / 2)]! ^= 1;
        return c;
      }],
      ['cut in the middle', (b) => b.subarray(0, Math.floor(b.length / 2))],
      ['the header of another head', (b) => {
        const c = Buffer.from(b);
        c[16 + 32]! ^= 1;
        return c;
      }],
      ['empty', () => Buffer.alloc(0)],
    ];
    for (const [what, damage] of cases) {
      write(path.join(h.src, 'd1', 'e2', 'deep', 'deeper', 'leaf'), randomBytes(300)); // a change to see
      const before = await h.run(); // (writes good records of the state just backed up)
      fs.writeFileSync(h.recordsFile, damage(fs.readFileSync(h.recordsFile)));
      write(path.join(h.src, 'd1', 'e2', 'f3.txt'), randomBytes(50));
      h.treeLoads = 0;
      const after = await h.run();
      assert.ok(h.treeLoads > 40, `${what}: the previous trees are loaded instead (${h.treeLoads})`);
      assert.equal(after.root.stats.files, before.root.stats.files, `${what}: files`);
      await assertRestores(h, what);
    }
  } finally {
    await h.close();
  }
});

test('a block that does not open ends the reading there: the directories before it still use their records', async () => {
  const h = await harness();
  try {
    // about 600 KB of records: several blocks of 256 KiB
    for (let i = 0; i < 40; i++) for (let j = 0; j < 120; j++) write(path.join(h.src, 'many', `m${String(i).padStart(2, '0')}`, `file-with-a-long-name-${j}`), `${i}/${j}`);
    const first = await h.run();
    const good = fs.readFileSync(h.recordsFile);
    const firstLen = good.readUInt32BE(112) & 0x7fffffff;
    const second = 112 + 4 + firstLen;
    assert.ok(second + 4 < good.length && (good.readUInt32BE(112) & 0x80000000) === 0, 'the records span more than one block');
    const damaged = Buffer.from(good);
    damaged[second + 4 + 100]! ^= 1;
    fs.writeFileSync(h.recordsFile, damaged);
    h.treeLoads = 0;
    const res = await h.run();
    const dirs = first.root.stats.dirs;
    // those recorded in the first block took no tree; the others (and the path down to them) did
    assert.ok(h.treeLoads > 10 && h.treeLoads < dirs - 20, `trees loaded: ${h.treeLoads} of ${dirs} directories`);
    assert.equal(res.root.stats.filesRead, 0);
    assert.equal(await h.srcTree(res), await h.srcTree(first), 'same tree');
    expectExit(await runCli(['verify', '--repo', h.repo.repo, '--read-data'], { env: h.repo.env }), 'verify --read-data');
  } finally {
    await h.close();
  }
});
