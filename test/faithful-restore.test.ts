/**
 * I10 Faithful restore, end to end through the CLI: back up a tree holding every kind of entry and
 * metadata snapcrypt promises to keep, restore it (whole, one file, one directory) and compare the
 * trees exactly: content, types, modes incl. setuid, owners (as root), ns mtimes (directories too),
 * xattrs, symlink targets, hard-link groups, holes of sparse files, raw-byte and very long names.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { FsMeta } from '../src/drivers/fsmeta.js';
import { LocalSourceFs } from '../src/drivers/localfs.js';
import { openStorage } from '../src/drivers/open.js';
import { backup } from '../src/engine/backup.js';
import { Repository } from '../src/engine/repository.js';
import type { SourceStat } from '../src/engine/source.js';
import { tempDir } from './env.js';
import {
  type TestRepo, type TreeSnapshot, assertSameTree, escapeBytes, expectExit, jsonLines, makeRepo, runCli, treeSnapshot, unescapeBytes,
} from './cli-helpers.js';

const isRoot = process.getuid?.() === 0;
const MiB = 1024 * 1024;
const b = (s: string): Buffer => Buffer.from(s);
/** Join name parts (strings or raw bytes) with '/'. */
const join = (...parts: Array<string | Buffer>): Buffer =>
  Buffer.concat(parts.flatMap((p, i) => (i === 0 ? [Buffer.from(p)] : [b('/'), Buffer.from(p)])));

const NON_UTF8 = Buffer.from([0x66, 0xff, 0xfe]);
const LATIN1_DIR = Buffer.from([0x64, 0xe9, 0x6a, 0xe0]); // "déjà" in latin1
/** Every byte a name may hold (1-255 but "/"), 254 bytes: names are read as latin1 and encoded back. */
const ALL_BYTES = Buffer.from(Array.from({ length: 255 }, (_, i) => i + 1).filter((c) => c !== 0x2f));
const LONG_NAMES = Array.from({ length: 5 }, (_, i) => `${i}`.repeat(3) + 'L'.repeat(240)); // 5 x 243 bytes
const NAME_MAX_NAME = 'n'.repeat(255);
const SPARSE_SIZE = 50 * MiB;
const SPARSE_DATA_AT = [1, 7, 23]; // MiB offsets of 1 MiB of data each; the rest (also the end) is a hole
const BIG_SIZE = 20_000_000; // not a multiple of the chunk size

let src: string; // the directory that holds the tree
let root: string; // the tree that is backed up
let repo: TestRepo;
let expected: TreeSnapshot;
let firstId: string;

/** Build the tree. Times are set last, children before their directory. */
async function buildTree(dir: string): Promise<void> {
  const meta = FsMeta.start();
  try {
    const p = (...parts: Array<string | Buffer>): Buffer => join(dir, ...parts);
    fs.mkdirSync(dir);
    for (const d of ['a', 'a/b', 'a/b/c', 'empty-dir', 'ro-dir', 'sticky', 'setgid-dir']) fs.mkdirSync(p(d));
    fs.writeFileSync(p('hello.txt'), 'hello, world\n');
    fs.writeFileSync(p('a/empty'), '');
    fs.writeFileSync(p('a/b/c/deep.txt'), 'deep\n'.repeat(1000));
    fs.writeFileSync(p('a/b/c/secret'), 'mode 0600\n', { mode: 0o600 });
    fs.writeFileSync(p('a/tool'), '#!/bin/sh\necho tool\n');
    fs.writeFileSync(p('a/b/suid'), '#!/bin/sh\necho suid\n');
    fs.writeFileSync(p('ro-dir/inside'), 'in a read-only directory\n');
    fs.writeFileSync(p('setgid-dir/f'), 'x');
    fs.writeFileSync(p('big.bin'), randomBytes(BIG_SIZE));
    fs.writeFileSync(p('two-chunks.bin'), randomBytes(2 * MiB)); // exactly two chunks

    // sparse: holes at the start, between the data and at the end
    const fd = fs.openSync(p('sparse.img'), 'w');
    fs.ftruncateSync(fd, SPARSE_SIZE);
    for (const at of SPARSE_DATA_AT) fs.writeSync(fd, randomBytes(MiB), 0, MiB, at * MiB);
    fs.closeSync(fd);

    // hard links: three names for one inode, across directories
    fs.writeFileSync(p('a/hl1'), 'one inode, three names\n');
    fs.linkSync(p('a/hl1'), p('a/b/hl2'));
    fs.linkSync(p('a/hl1'), p('hl3'));
    // a second group of two, with the pair in the same directory
    fs.writeFileSync(p('pair1'), 'pair\n');
    fs.linkSync(p('pair1'), p('pair2'));

    // symlinks: to a file, to a directory, dangling (relative and absolute), with non-UTF-8 target
    fs.symlinkSync('hello.txt', p('link-to-file'));
    fs.symlinkSync('a/b', p('link-to-dir'));
    fs.symlinkSync('does/not/exist', p('dangling'));
    fs.symlinkSync('/nonexistent/snapcrypt/target', p('dangling-abs'));
    fs.symlinkSync(Buffer.concat([b('../'), NON_UTF8]), p('a/link-raw'));

    // odd names
    fs.writeFileSync(p(NON_UTF8), 'non-UTF-8 name\n');
    fs.mkdirSync(p(LATIN1_DIR));
    fs.writeFileSync(p(LATIN1_DIR, NON_UTF8), 'inside a latin1 directory\n');
    fs.writeFileSync(p(LATIN1_DIR, ALL_BYTES), 'every byte in its name\n');
    fs.writeFileSync(p('with\nnewline'), 'newline\n');
    fs.writeFileSync(p(' spaces  in name '), 'spaces\n');
    fs.writeFileSync(p('tab\tand\\backslash'), 'tab\n');
    fs.writeFileSync(p('ünïcödé ✓'), 'utf-8\n');
    fs.writeFileSync(p(NAME_MAX_NAME), '255 bytes\n');
    fs.writeFileSync(p('__proto__'), 'a name that is special to JavaScript objects\n');

    // a path longer than 1,000 bytes
    let deep = p();
    for (const n of LONG_NAMES) {
      deep = join(deep, n);
      fs.mkdirSync(deep);
    }
    fs.writeFileSync(join(deep, 'leaf.txt'), 'far down\n');
    assert.ok(join(deep, 'leaf.txt').length - Buffer.byteLength(dir) > 1000);

    execFileSync('mkfifo', ['--', p('a/fifo').toString()]);
    execFileSync('mkfifo', ['--', p('fifo-tmp').toString()]); // a fifo with a non-UTF-8 name in a non-UTF-8 directory:
    fs.renameSync(p('fifo-tmp'), p(LATIN1_DIR, Buffer.concat([b('fifo-'), NON_UTF8])));

    // xattrs, binary values too, on files, directories and a hard-linked inode
    const xattrs: Array<[Buffer, string, Buffer]> = [
      [p('hello.txt'), 'user.text', b('hello')],
      [p('hello.txt'), 'user.binary', Buffer.from(Array.from({ length: 256 }, (_, i) => i))],
      [p('hello.txt'), 'user.empty', Buffer.alloc(0)],
      [p('a/b/suid'), 'user.big', randomBytes(1500)],
      [p('a'), 'user.dir', b('on a directory')],
      [p('empty-dir'), 'user.dir', Buffer.from([0, 1, 2, 0xff])],
      [p('a/hl1'), 'user.linked', b('shared by all names')],
      [p(NON_UTF8), 'user.raw', Buffer.from([0xc3, 0x28])],
      [p('sparse.img'), 'user.sparse', b('yes')],
      [p(), 'user.root', b('the top directory')],
      [p('ro-dir'), 'user.ro', b('on a directory that ends up 0500')],
      [p('ro-dir/inside'), 'user.ro', b('on a file that ends up 0444')],
    ];
    for (const [f, n, v] of xattrs) await meta.setXattr(f, n, v);

    // owners (root only); before the modes, as chown clears setuid
    if (isRoot) {
      fs.chownSync(p('hello.txt'), 1234, 5678);
      fs.chownSync(p('a/b'), 4321, 8765);
      fs.chownSync(p('a/b/suid'), 1000, 1000);
      fs.chownSync(p('a/hl1'), 2000, 3000);
      fs.lchownSync(p('link-to-file'), 2222, 3333);
      fs.chownSync(p('a/b/c/secret'), 3_000_000_000, 4_000_000_000); // above 2^31
      fs.chownSync(p(NON_UTF8), 65534, 65534);
      fs.chownSync(p('empty-dir'), 77, 88);
    }

    fs.chmodSync(p('a/b/c/secret'), 0o600);
    fs.chmodSync(p('a/tool'), 0o755);
    fs.chmodSync(p('a/b/suid'), 0o4755);
    fs.chmodSync(p('sticky'), 0o1777);
    fs.chmodSync(p('setgid-dir'), 0o2750);
    fs.chmodSync(p('hello.txt'), 0o644);
    fs.chmodSync(p(NON_UTF8), 0o640);
    fs.chmodSync(p('a/fifo'), 0o620);
    fs.chmodSync(p('ro-dir/inside'), 0o444);
    fs.chmodSync(p('ro-dir'), 0o500);
    fs.chmodSync(p(), 0o750);

    // ns mtimes on everything, post-order so that no later change touches them
    let i = 0;
    const times = [1700000000123456789n, -86400n * 1_000_000_000n - 1n /* 1969 */, 4102444800999999999n /* 2100 */];
    const setAll = async (q: Buffer): Promise<void> => {
      const st = fs.lstatSync(q);
      if (st.isDirectory()) for (const n of fs.readdirSync(q, { encoding: 'buffer' })) await setAll(join(q, n));
      // every fourth a whole second (a restore sets those on the open file, the others through the helper)
      const t = i % 4 === 3 ? (1_600_000_000n + BigInt(i)) * 1_000_000_000n : times[i % times.length]! + BigInt(i) * 1_000_000_007n;
      i++;
      await meta.setTimes(q, t + 1n, t);
    };
    await setAll(p());
  } finally {
    await meta.close();
  }
}

/**
 * Temp dirs are removed here rather than only by env.ts: its exit-time removal lists directories as
 * strings, so it cannot remove entries whose names are not UTF-8.
 */
const made: string[] = [];
async function scratch(prefix: string): Promise<string> {
  const d = await tempDir(prefix);
  made.push(d);
  return d;
}
/** One backup of paths into r's repository through the engine, reading with source (then finished). */
async function backupWith(r: TestRepo, source: LocalSourceFs, paths: string[]): Promise<void> {
  const storage = await openStorage(r.repo);
  try {
    const repo = await Repository.open(storage, Buffer.from(r.env['SNAPCRYPT_PASSWORD']!), null);
    await backup(repo, { paths, source, host: 'test', user: 'test' });
  } finally {
    await source.finish();
    await storage.close();
  }
}
function removeTree(p: Buffer): void {
  const st = fs.lstatSync(p, { throwIfNoEntry: false });
  if (st === undefined) return;
  if (st.isDirectory()) {
    fs.chmodSync(p, 0o700);
    for (const n of fs.readdirSync(p, { encoding: 'buffer' })) removeTree(join(p, n));
    fs.rmdirSync(p);
  } else {
    fs.unlinkSync(p);
  }
}

after(() => {
  for (const d of made) removeTree(Buffer.from(d));
});

const cli = (args: string[]): ReturnType<typeof runCli> => runCli(args, { env: repo.env });

before(async () => {
  src = await scratch('faithful-src');
  root = path.join(src, 'tree');
  await buildTree(root);
  expected = await treeSnapshot(root);
  repo = await makeRepo();
  const r = await cli(['backup', '--repo', repo.repo, '--json', root]);
  expectExit(r, 'snapcrypt backup');
  const summary = jsonLines(r.stdout).find((o) => o['type'] === 'summary');
  assert.ok(summary, 'backup prints a JSON summary');
  assert.equal(summary['errors'], 0);
  firstId = String(summary['id']);
});

test('the tree description sees what the test built (guards the comparison itself)', () => {
  const e = (...parts: Array<string | Buffer>): NonNullable<TreeSnapshot[string]> => {
    const key = parts.map((x) => escapeBytes(Buffer.from(x))).join('/');
    const d = expected[key];
    assert.ok(d, `entry ${key} is described`);
    return d;
  };
  assert.equal(e('a/b/suid').mode, '4755');
  assert.equal(e('ro-dir').mode, '500');
  assert.equal(e('a/fifo').type, 'fifo');
  assert.equal(e(LATIN1_DIR, Buffer.concat([b('fifo-'), NON_UTF8])).type, 'fifo');
  assert.equal(e('link-to-dir').type, 'symlink');
  assert.equal(e('__proto__').size, 45);
  assert.deepEqual(e('a/hl1').hardLinks, ['a/b/hl2', 'a/hl1', 'hl3']);
  assert.deepEqual(e('pair1').hardLinks, ['pair1', 'pair2']);
  assert.deepEqual(e('sparse.img').dataMap, SPARSE_DATA_AT.map((at) => [at * MiB, (at + 1) * MiB]));
  assert.equal(e('big.bin').dataMap, undefined);
  assert.equal(e('hello.txt').xattrs['user.binary']?.length, 512);
  assert.equal(e(NON_UTF8).xattrs['user.raw'], 'c328');
  assert.equal(e(LATIN1_DIR, ALL_BYTES).size, 23);
  assert.equal(e('a/b/c').mtimeNs % 1_000_000_000n !== 0n, true);
  assert.ok(Object.values(expected).some((d) => d.mtimeNs < 0n), 'a time before 1970');
  if (isRoot) {
    assert.equal(e('a/b/c/secret').uid, 3_000_000_000);
    assert.equal(e('link-to-file').gid, 3333);
  }
  assert.ok(Object.keys(expected).length > 40);
});

test('backup does not change the source', async () => {
  assertSameTree(await treeSnapshot(root), expected);
});

test('restoring the whole snapshot gives back the same tree, metadata included (twice into one place)', async () => {
  const target = path.join(await scratch('faithful-all'), 'out');
  const restoredRoot = path.join(target, root);
  for (const run of [1, 2]) {
    // the second run restores over the first: every entry is replaced by itself
    const r = await cli(['restore', '--repo', repo.repo, '--json', 'latest', '--target', target]);
    expectExit(r, `snapcrypt restore (run ${run})`);
    assertSameTree(await treeSnapshot(restoredRoot), expected, `run ${run}`);
  }

  // still sparse: only the data chunks are allocated
  const st = fs.statSync(path.join(restoredRoot, 'sparse.img'));
  assert.equal(st.size, SPARSE_SIZE);
  assert.ok(st.blocks * 512 <= (SPARSE_DATA_AT.length + 1) * MiB, `allocated ${st.blocks * 512} bytes of ${st.size}`);

  // the directories above the backed-up path carry their original mode and mtime
  const srcSt = fs.lstatSync(src, { bigint: true });
  const resSt = fs.lstatSync(path.join(target, src), { bigint: true });
  assert.equal(resSt.mode, srcSt.mode);
  assert.equal(resSt.mtimeNs, srcSt.mtimeNs);
  if (isRoot) assert.deepEqual([resSt.uid, resSt.gid], [srcSt.uid, srcSt.gid]);
});

test('restoring one file gives back that file, metadata included', async () => {
  const target = await scratch('faithful-file');
  for (const rel of ['a/b/suid', 'big.bin', 'sparse.img']) {
    const r = await cli(['restore', '--repo', repo.repo, `latest:${root}/${rel}`, '--target', target]);
    expectExit(r, `snapcrypt restore ${rel}`);
    const name = path.basename(rel);
    assertSameTree(await treeSnapshot(path.join(target, name)), await treeSnapshot(path.join(root, rel)), rel);
  }
  assert.deepStrictEqual(fs.readdirSync(target).sort(), ['big.bin', 'sparse.img', 'suid']);
});

test('restoring one directory gives back that subtree, twice into the same place', async () => {
  const target = await scratch('faithful-dir');
  const want = await treeSnapshot(path.join(root, 'a'));
  assert.deepEqual(want['hl1']?.hardLinks, ['b/hl2', 'hl1'], 'the hard link outside the directory is not in the group');
  for (let run = 0; run < 2; run++) {
    const r = await cli(['restore', '--repo', repo.repo, `latest:${root}/a`, '--target', target]);
    expectExit(r, `snapcrypt restore dir (run ${run + 1})`);
    assertSameTree(await treeSnapshot(path.join(target, 'a')), want, `run ${run + 1}`);
  }
  // a long path
  const longRel = LONG_NAMES.join('/');
  const r = await cli(['restore', '--repo', repo.repo, `latest:${root}/${longRel}`, '--target', target]);
  expectExit(r, 'snapcrypt restore long path');
  const last = LONG_NAMES[LONG_NAMES.length - 1]!;
  assertSameTree(await treeSnapshot(path.join(target, last)), await treeSnapshot(path.join(root, longRel)), 'long path');
});

test('ls --json lists every entry with its kind, mode and size', async () => {
  const r = await cli(['ls', '--repo', repo.repo, '--json', `latest:${root}`]);
  expectExit(r, 'snapcrypt ls');
  const nodes = jsonLines(r.stdout).filter((o) => o['type'] === 'node');
  const keys = Object.keys(expected).filter((k) => k !== '.');
  assert.equal(nodes.length, keys.length, 'one node per entry');
  const byPath = new Map(nodes.map((n) => [n['path'], n]));
  // Names that are valid UTF-8 must come back exactly (with their whole path).
  let checked = 0;
  let notUtf8 = 0;
  for (const k of keys) {
    const raw = unescapeBytes(k);
    const text = raw.toString('utf8');
    if (!Buffer.from(text).equals(raw)) {
      notUtf8++;
      continue;
    }
    const n = byPath.get(`${root}/${text}`);
    assert.ok(n, `ls lists ${JSON.stringify(text)}`);
    const d = expected[k]!;
    const kind = d.type;
    assert.equal(n['kind'], kind, text);
    assert.equal((n['mode'] as number).toString(8), d.mode, text);
    if (kind === 'file') assert.equal(n['size'], d.size, text);
    if (isRoot) assert.deepEqual([n['uid'], n['gid']], [d.uid, d.gid], text);
    checked++;
  }
  assert.equal(notUtf8, 5, 'the entries whose path is not UTF-8'); // their JSON path cannot be exact
  assert.equal(checked + notUtf8, keys.length);
  for (const want of ['with\nnewline', ' spaces  in name ', 'ünïcödé ✓', 'link-to-dir', 'a/b/c/deep.txt', NAME_MAX_NAME]) {
    assert.ok(byPath.has(`${root}/${want}`), `ls lists ${JSON.stringify(want)}`);
  }
});

test('after changes, a second backup restores the new tree and the first snapshot still the old one', async () => {
  const p = (...parts: Array<string | Buffer>): Buffer => join(root, ...parts);
  const meta = FsMeta.start();
  try {
    // same size and mtime, other content: only ctime tells (the backup must read it again)
    const hello = fs.lstatSync(p('hello.txt'), { bigint: true });
    fs.writeFileSync(p('hello.txt'), 'HELLO, WORLD\n');
    await meta.setTimes(p('hello.txt'), hello.atimeNs, hello.mtimeNs);
    fs.chmodSync(p('a/tool'), 0o700);
    await meta.setXattr(p('a/empty'), 'user.new', b('added later'));
    fs.unlinkSync(p('pair2'));
    fs.linkSync(p('a/hl1'), p('a/b/c/hl4'));
    const fd = fs.openSync(p('sparse.img'), 'r+');
    fs.writeSync(fd, randomBytes(MiB), 0, MiB, 40 * MiB);
    fs.closeSync(fd);
    fs.renameSync(p('dangling'), p('dangling-renamed'));
    if (isRoot) fs.lchownSync(p('link-to-dir'), 4242, 4343);
    await meta.setTimes(p('a/b/c'), 1n, 1_234_567_890_123_456_789n);
  } finally {
    await meta.close();
  }
  const expected2 = await treeSnapshot(root);
  assert.equal(expected2['a/hl1']?.hardLinks?.length, 4);
  assert.equal(expected2['pair1']?.hardLinks, undefined);
  assert.notEqual(expected2['hello.txt']?.sha256, expected['hello.txt']?.sha256);

  const r = await cli(['backup', '--repo', repo.repo, '--json', root]);
  expectExit(r, 'second snapcrypt backup');
  const summary = jsonLines(r.stdout).find((o) => o['type'] === 'summary');
  assert.ok(summary);
  assert.ok((summary['filesRead'] as number) < 10, `unchanged files are not read again (read ${String(summary['filesRead'])})`);

  const t2 = await scratch('faithful-second');
  expectExit(await cli(['restore', '--repo', repo.repo, 'latest', '--target', t2]), 'restore latest');
  assertSameTree(await treeSnapshot(path.join(t2, root)), expected2, 'second snapshot');

  const t1 = await scratch('faithful-first');
  expectExit(await cli(['restore', '--repo', repo.repo, firstId, '--target', t1]), 'restore the first snapshot');
  assertSameTree(await treeSnapshot(path.join(t1, root)), expected, 'first snapshot');
});

test('hard links on two file systems that reuse an inode number stay apart', async () => {
  // Trees record inode numbers without the device. Two backup paths on different file systems can
  // hold unrelated hard-linked files with the same inode number; a source that says so stands in here.
  const base = await scratch('faithful-devs');
  const x = path.join(base, 'x');
  const y = path.join(base, 'y');
  fs.mkdirSync(x);
  fs.mkdirSync(y);
  fs.writeFileSync(path.join(x, 'a1'), 'content of the inode on device X\n');
  fs.linkSync(path.join(x, 'a1'), path.join(x, 'a2'));
  fs.writeFileSync(path.join(y, 'b1'), 'content of another inode, on device Y\n');
  fs.linkSync(path.join(y, 'b1'), path.join(y, 'b2'));
  const xIno = fs.lstatSync(path.join(x, 'a1')).ino;
  class TwoDevices extends LocalSourceFs {
    override lstat(p: Buffer): SourceStat {
      const st = super.lstat(p);
      return p.toString().startsWith(y + '/') && st.kind === 1 ? { ...st, dev: st.dev + 1, ino: xIno } : st;
    }
  }
  const r2 = await makeRepo();
  await backupWith(r2, new TwoDevices(), [x, y]);
  const target = await scratch('faithful-devs-out');
  expectExit(await runCli(['restore', '--repo', r2.repo, 'latest', '--target', target], { env: r2.env }), 'restore');
  assertSameTree(await treeSnapshot(path.join(target, x)), await treeSnapshot(x), 'x');
  assertSameTree(await treeSnapshot(path.join(target, y)), await treeSnapshot(y), 'y');
});

test('the xattrs of a directory above the backed-up path: kept while its ctime is the same, read again once they change', async () => {
  // base/upper is an ancestor of the path backed up (base/upper/data): its entry is built by the
  // backup, not walked. A backup with nothing changed reads no xattrs (no helper process) of base or
  // anything in it; base's own parent (the temp directory) changes as other tests run.
  const base = await scratch('faithful-ancestor');
  const upper = path.join(base, 'upper');
  const data = path.join(upper, 'data');
  fs.mkdirSync(data, { recursive: true });
  fs.writeFileSync(path.join(data, 'f.txt'), 'content\n');
  const meta = FsMeta.start();
  class Counting extends LocalSourceFs {
    reads: string[] = [];
    override xattrs(p: Buffer) {
      this.reads.push(p.toString());
      return super.xattrs(p);
    }
  }
  const r = await makeRepo();
  const run = async (): Promise<string[]> => {
    const source = new Counting();
    await backupWith(r, source, [data]);
    return source.reads.filter((p) => p === base || p.startsWith(base + '/'));
  };
  const restoredValue = async (): Promise<string | undefined> => {
    const target = await scratch('faithful-ancestor-out');
    expectExit(await runCli(['restore', '--repo', r.repo, 'latest', '--target', target], { env: r.env }), 'restore');
    const list = await meta.listXattrs(Buffer.from(path.join(target, upper)));
    return list.find((x) => x.name.toString() === 'user.anc')?.value.toString();
  };
  try {
    await meta.setXattr(Buffer.from(upper), 'user.anc', Buffer.from('one'));
    assert.ok((await run()).includes(upper), 'the first backup reads the ancestor\'s xattrs');
    assert.equal(await restoredValue(), 'one');
    assert.deepEqual(await run(), [], 'nothing changed: no xattrs read');
    await meta.setXattr(Buffer.from(upper), 'user.anc', Buffer.from('two')); // (changes upper's ctime)
    assert.deepEqual(await run(), [upper], 'only the changed ancestor is read again');
    assert.equal(await restoredValue(), 'two');
  } finally {
    await meta.close();
  }
});

test('a file that grew after lstat is stored whole (short, exactly one chunk, and longer)', async () => {
  // The race (a file appended to between lstat and read) cannot be timed from outside; a source whose
  // lstat reports the sizes from before the append stands in for it. The content read is real.
  const base = await scratch('faithful-grew');
  const chunk = 1024 * 1024;
  const sizes: Record<string, [number, number]> = {
    'small.txt': [10, 25], // short chunk, then more within the chunk
    'edge.bin': [chunk - 3, chunk + 5], // short chunk, then more past the chunk boundary
    'exact.bin': [chunk, chunk + 100], // exactly one chunk, then more
    'two.bin': [2 * chunk, 3 * chunk + 7], // whole chunks, then more than a chunk
  };
  const reported = new Map<string, number>();
  for (const [name, [before, after]] of Object.entries(sizes)) {
    const p = path.join(base, name);
    fs.writeFileSync(p, randomBytes(after));
    reported.set(p, before);
  }
  class Grew extends LocalSourceFs {
    override lstat(p: Buffer): SourceStat {
      const st = super.lstat(p);
      const size = reported.get(p.toString());
      return size === undefined ? st : { ...st, size };
    }
  }
  const r = await makeRepo();
  await backupWith(r, new Grew(), [base]);
  const target = await scratch('faithful-grew-out');
  expectExit(await runCli(['restore', '--repo', r.repo, 'latest', '--target', target], { env: r.env }), 'restore');
  for (const name of Object.keys(sizes)) {
    assert.ok(fs.readFileSync(path.join(target, base, name)).equals(fs.readFileSync(path.join(base, name))), name);
  }
});
