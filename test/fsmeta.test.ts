import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import type { TestContext } from 'node:test';
import { FsMeta, fsMetaErrno } from '../src/drivers/fsmeta.js';
import type { Xattr } from '../src/drivers/fsmeta.js';
import { isSnapError } from '../src/core/errors.js';

const CI = process.env['CI'] === 'true';
let dir: string;
let meta: FsMeta;
let xattrSupport: string | undefined; // undefined = supported, else why not

const b = (s: string): Buffer => Buffer.from(s);
const join = (...parts: Array<string | Buffer>): Buffer =>
  Buffer.concat(parts.flatMap((p, i) => (i === 0 ? [Buffer.from(p)] : [b('/'), Buffer.from(p)])));
const mtimeNs = (p: string | Buffer): bigint => fs.lstatSync(p, { bigint: true }).mtimeNs;
const atimeNs = (p: string | Buffer): bigint => fs.lstatSync(p, { bigint: true }).atimeNs;
const sorted = (xs: Xattr[]): Array<[string, string]> =>
  xs.map((x): [string, string] => [x.name.toString('latin1'), x.value.toString('hex')]).sort((p, q) => (p[0] < q[0] ? -1 : 1));
const userOnly = (xs: Xattr[]): Xattr[] => xs.filter((x) => x.name.toString('latin1').startsWith('user.'));

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapcrypt-fsmeta-'));
  meta = FsMeta.start();
  const probe = path.join(dir, 'probe');
  fs.writeFileSync(probe, '');
  try {
    await meta.setXattr(probe, 'user.snapcrypt.probe', b('1'));
  } catch (err) {
    const code = fsMetaErrno(err);
    if (code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw err;
    xattrSupport = `${os.tmpdir()} does not support user xattrs (${code})`;
  }
});

after(async () => {
  await meta.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Skips (with a visible reason) when user xattrs are unsupported, except in CI where that fails. */
function needXattrs(t: TestContext): boolean {
  if (xattrSupport === undefined) return true;
  if (CI) assert.fail(`CI=true but ${xattrSupport}`);
  t.diagnostic(xattrSupport);
  t.skip(xattrSupport);
  return false;
}

test('nanosecond times round-trip on a file, a directory and a symlink (not its target)', async () => {
  const file = path.join(dir, 'times-file');
  const sub = path.join(dir, 'times-dir');
  const link = path.join(dir, 'times-link');
  fs.writeFileSync(file, 'x');
  fs.mkdirSync(sub);
  fs.symlinkSync('times-file', link);
  const cases: Array<[string, bigint, bigint]> = [
    [file, 1_600_000_000_000_000_001n, 1_700_000_000_123_456_789n],
    [sub, 1_500_000_000_999_999_999n, 1_234_567_890_000_000_007n],
    [link, 1_000_000_000_000_000_000n, 1_111_111_111_111_111_111n],
  ];
  await Promise.all(cases.map(([p, a, m]) => meta.setTimes(p, a, m)));
  for (const [p, a, m] of cases) {
    assert.equal(mtimeNs(p), m, p);
    assert.equal(atimeNs(p), a, p);
  }
  // The symlink's own times changed; the target kept the file's times.
  assert.equal(mtimeNs(file), 1_700_000_000_123_456_789n);
  // Before 1970, and a far future beyond 2038.
  await meta.setTimes(file, -1n, -1_234_567_890_123_456_789n);
  assert.equal(atimeNs(file), -1n);
  assert.equal(mtimeNs(file), -1_234_567_890_123_456_789n);
  await meta.setTimes(file, 0n, 4_102_444_800_000_000_001n);
  assert.equal(mtimeNs(file), 4_102_444_800_000_000_001n);
});

test('relative paths resolve against the current directory at call time', async () => {
  const cwd = process.cwd();
  fs.writeFileSync(path.join(dir, 'rel'), '');
  process.chdir(dir);
  try {
    await meta.setTimes('rel', 5n, 42_000_000_042n);
  } finally {
    process.chdir(cwd);
  }
  assert.equal(mtimeNs(path.join(dir, 'rel')), 42_000_000_042n);
});

test('xattrs round-trip: binary values, empty values, file and directory', async (t) => {
  if (!needXattrs(t)) return;
  const file = path.join(dir, 'xa-file');
  const sub = path.join(dir, 'xa-dir');
  fs.writeFileSync(file, '');
  fs.mkdirSync(sub);
  const values: Array<[string, Buffer]> = [
    ['user.nul', Buffer.from([0, 1, 0, 255, 0])],
    ['user.empty', Buffer.alloc(0)],
    ['user.text', b('hello world')],
    ['user.\xe9\xff', Buffer.from([0x80])], // non-UTF-8 name bytes (latin1-encoded below)
  ];
  for (const p of [file, sub]) {
    for (const [name, value] of values) await meta.setXattr(p, Buffer.from(name, 'latin1'), value);
    const got = userOnly(await meta.listXattrs(p));
    assert.deepEqual(sorted(got), sorted(values.map(([name, value]) => ({ name: Buffer.from(name, 'latin1'), value }))));
  }
  // Replacing a value.
  await meta.setXattr(file, 'user.text', b('v2'));
  const text = userOnly(await meta.listXattrs(file)).find((x) => x.name.equals(b('user.text')));
  assert.deepEqual(text?.value, b('v2'));
  // A file without xattrs.
  const plain = path.join(dir, 'xa-plain');
  fs.writeFileSync(plain, '');
  assert.deepEqual(userOnly(await meta.listXattrs(plain)), []);
});

test('xattrs are read from the symlink itself, never its target', async (t) => {
  if (!needXattrs(t)) return;
  const target = path.join(dir, 'xa-target');
  const link = path.join(dir, 'xa-link');
  fs.writeFileSync(target, '');
  fs.symlinkSync('xa-target', link);
  await meta.setXattr(target, 'user.on-target', b('t'));
  assert.deepEqual(userOnly(await meta.listXattrs(link)), []);
  // Linux forbids user.* xattrs on symlinks; the call must fail on the link, not set it on the target.
  await assert.rejects(meta.setXattr(link, 'user.on-link', b('l')), (err) => isSnapError(err, 'io') && fsMetaErrno(err) === 'EPERM');
  assert.deepEqual(sorted(userOnly(await meta.listXattrs(target))), [['user.on-target', b('t').toString('hex')]]);
});

test('long (1000+ byte) and non-UTF-8 paths', async (t) => {
  // Build a path of more than 1000 bytes from 200-byte components.
  let deep: Buffer = Buffer.from(dir);
  for (let i = 0; i < 6; i++) {
    deep = join(deep, 'd'.repeat(199) + String(i));
    fs.mkdirSync(deep);
  }
  const long = join(deep, 'leaf');
  fs.writeFileSync(long, '');
  assert.ok(long.length > 1000);
  const odd = join(dir, Buffer.from([0x6f, 0xff, 0xfe, 0x80, 0x0a, 0x20, 0x5c]));
  fs.writeFileSync(odd, '');
  for (const p of [long, odd]) {
    await meta.setTimes(p, 7n, 1_234_567_890_987_654_321n);
    assert.equal(mtimeNs(p), 1_234_567_890_987_654_321n);
  }
  if (!needXattrs(t)) return;
  for (const p of [long, odd]) {
    await meta.setXattr(p, 'user.k', Buffer.from([0, 0xff]));
    assert.deepEqual(sorted(userOnly(await meta.listXattrs(p))), [['user.k', '00ff']]);
  }
});

test('values and name lists larger than the initial 4 KiB buffers (ERANGE growth)', async (t) => {
  if (!needXattrs(t)) return;
  const big = Buffer.alloc(20_000, 0xab);
  big[0] = 0;
  const names = Array.from({ length: 60 }, (_, i) => `user.${String(i).padStart(3, '0')}${'n'.repeat(100)}`);
  // ext4 keeps all xattrs of an inode in one 4 KiB block; tmpfs has no such limit.
  for (const base of [dir, '/dev/shm']) {
    let d: string;
    try {
      d = fs.mkdtempSync(path.join(base, 'snapcrypt-fsmeta-big-'));
    } catch {
      continue;
    }
    try {
      const p = path.join(d, 'f');
      fs.writeFileSync(p, '');
      try {
        await meta.setXattr(p, 'user.big', big);
        for (const n of names) await meta.setXattr(p, n, b(n));
      } catch (err) {
        const code = fsMetaErrno(err);
        if (code === 'ENOSPC' || code === 'E2BIG' || code === 'ENOTSUP') continue;
        throw err;
      }
      const got = userOnly(await meta.listXattrs(p));
      assert.equal(got.length, 61);
      assert.deepEqual(got.find((x) => x.name.equals(b('user.big')))?.value, big);
      for (const n of names) assert.deepEqual(got.find((x) => x.name.equals(b(n)))?.value, b(n));
      return;
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  }
  t.diagnostic('no filesystem here holds 20 KB of xattrs; ERANGE growth not exercised');
});

test('an error rejects only its own request, naming the path', async () => {
  const ok = path.join(dir, 'err-ok');
  fs.writeFileSync(ok, '');
  const missing = path.join(dir, 'no', 'such', 'file');
  const results = await Promise.allSettled([
    meta.setTimes(ok, 1n, 2n),
    meta.setTimes(missing, 1n, 2n),
    meta.listXattrs(missing),
    meta.setXattr(missing, 'user.x', b('y')),
    meta.listXattrs(ok),
    meta.setTimes(ok, 3n, 4n),
  ]);
  assert.deepEqual(results.map((r) => r.status), ['fulfilled', 'rejected', 'rejected', 'rejected', 'fulfilled', 'fulfilled']);
  for (const r of results) {
    if (r.status !== 'rejected') continue;
    assert.ok(isSnapError(r.reason, 'io'));
    assert.equal(fsMetaErrno(r.reason), 'ENOENT');
    assert.match((r.reason as Error).message, /no\/such\/file/);
  }
  assert.equal(mtimeNs(ok), 4n);
  // Invalid arguments are rejected without reaching the helper.
  await assert.rejects(meta.setTimes(join(dir, Buffer.from([0x61, 0, 0x62])), 0n, 0n), (err) => isSnapError(err, 'io'));
  await assert.rejects(meta.setXattr(ok, '', b('')), (err) => isSnapError(err, 'io'));
  // Non-UTF-8 bytes show up escaped in messages.
  await assert.rejects(meta.setTimes(join(dir, Buffer.from([0x78, 0xff])), 0n, 0n), /x\\xff/);
});

test('20,000 pipelined requests complete quickly and in order', async (t) => {
  const files = Array.from({ length: 100 }, (_, i) => path.join(dir, `many-${i}`));
  for (const f of files) fs.writeFileSync(f, '');
  const start = performance.now();
  const promises: Array<Promise<unknown>> = [];
  const value = (i: number): bigint => 1_000_000_000n * BigInt(i) + BigInt(i);
  for (let i = 0; i < 10_000; i++) {
    const f = files[i % files.length]!;
    promises.push(meta.setTimes(f, BigInt(i), value(i)), meta.listXattrs(f));
  }
  await Promise.all(promises);
  const ms = performance.now() - start;
  t.diagnostic(`${promises.length} requests in ${ms.toFixed(0)} ms`);
  // The last setTimes on each file wins, which shows they ran in order.
  files.forEach((f, k) => assert.equal(mtimeNs(f), value(10_000 - files.length + k)));
  assert.ok(ms < 15_000, `too slow: ${ms} ms`);
});

test('close() finishes requests in flight; later calls reject; an unused instance spawns nothing', async () => {
  const m = FsMeta.start();
  await m.close(); // never started: nothing to wait for
  await assert.rejects(m.listXattrs(dir), (err) => isSnapError(err, 'internal'));

  const m2 = FsMeta.start();
  const f = path.join(dir, 'close');
  fs.writeFileSync(f, '');
  const pending = m2.setTimes(f, 1n, 99n);
  await m2.close();
  await pending;
  assert.equal(mtimeNs(f), 99n);
});
