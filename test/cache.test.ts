/**
 * The workstation's cache (drivers/cachedir.ts): the kept index is searched in its file, not loaded
 * (KeptIndex), and is used only when whole and for the head asked for.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { tempDir } from './env.js';
import { execFileSync } from 'node:child_process';
import { DirTreeCache, fileRunStore } from '../src/drivers/cachedir.js';
import { IdList, RefRuns } from '../src/core/idset.js';

const HEAD = 'ab'.repeat(32);

/** Sorted unique ids: random ones, and a run of ids that share their first 6 bytes across bucket borders. */
function someIds(n: number): Buffer[] {
  const ids = Array.from({ length: n }, () => randomBytes(32));
  const prefix = randomBytes(6);
  for (let i = 0; i < 200; i++) {
    const t = randomBytes(32);
    prefix.copy(t);
    ids.push(t);
  }
  return ids.sort(Buffer.compare);
}

describe('kept index', () => {
  const ids = someIds(20_000);
  const index = Buffer.concat(ids);

  it('finds every id it lists, and none it does not, reading its file; the file may be unlinked meanwhile', async () => {
    const dir = await tempDir('cache');
    const cache = new DirTreeCache(dir, 'repo');
    const list = new IdList();
    for (const id of ids) list.push(id);
    cache.putIndex(HEAD, list.sortedParts()); // in parts, as a backup gives it
    const kept = cache.getIndex(HEAD);
    assert.ok(kept, 'the index just kept is used');
    cache.dropIndex(); // a backup forgets it at its start; the open file stays readable
    assert.equal(kept.count, ids.length);
    for (const id of ids) assert.ok(kept.has(id), id.toString('hex'));
    for (const id of ids.slice(0, 5_000)) {
      for (const byte of [31, 6, 0]) {
        const other = Buffer.from(id);
        other[byte] = other[byte]! ^ 1;
        if (!ids.some((x) => x.equals(other))) assert.equal(kept.has(other), false);
      }
    }
    assert.equal(kept.has(Buffer.alloc(32, 0)), false, 'below the first');
    assert.equal(kept.has(Buffer.alloc(32, 0xff)), false, 'above the last');
    kept.dispose();
    kept.dispose(); // twice: no error
    assert.throws(() => kept.has(ids[0]!), /kept index/);
    assert.equal(cache.getIndex(HEAD), null, 'dropped');
  });

  it('is not used for another head, nor when torn or altered', async () => {
    const dir = await tempDir('cache');
    const cache = new DirTreeCache(dir, 'repo');
    cache.putIndex(HEAD, index);
    assert.equal(cache.getIndex('cd'.repeat(32)), null, 'another head');
    const file = fs.readdirSync(dir, { recursive: true, encoding: 'utf8' }).map((f) => path.join(dir, f)).find((f) => path.basename(f) === 'index')!;
    const whole = fs.readFileSync(file);
    fs.writeFileSync(file, whole.subarray(0, whole.length - 32 * 7));
    assert.equal(cache.getIndex(HEAD), null, 'torn');
    const altered = Buffer.from(whole);
    altered[whole.length - 32 * 40] = altered[whole.length - 32 * 40]! ^ 1;
    fs.writeFileSync(file, altered);
    assert.equal(cache.getIndex(HEAD), null, 'altered');
    fs.writeFileSync(file, whole);
    const kept = cache.getIndex(HEAD);
    assert.ok(kept?.has(ids[123]!));
    kept?.dispose();
  });

  it('an empty index is found empty', async () => {
    const cache = new DirTreeCache(await tempDir('cache'), 'repo');
    cache.putIndex(HEAD, []);
    const kept = cache.getIndex(HEAD);
    assert.ok(kept);
    assert.equal(kept.count, 0);
    assert.equal(kept.has(ids[0]!), false);
    kept.dispose();
  });
});

describe('a backup\'s references in sorted runs in the cache (RefRuns, refRuns, writeIndex)', () => {
  const BLOCK_IDS = 32_768;
  // three full runs and part of a fourth, with repeats within and across runs
  const ids = Array.from({ length: 3 * BLOCK_IDS + 5_000 }, () => randomBytes(32));
  const pushed = [...ids, ...ids.filter((_, i) => i % 50 === 0), ...ids.slice(0, 100)];
  const expected = [...new Set(pushed.map((b) => b.toString('hex')))].sort().join('');
  const merged = (refs: RefRuns): string => {
    const out: string[] = [];
    refs.merge((part) => out.push(part.toString('hex')));
    return out.join('');
  };

  it('holds at most one block while ids are pushed, merges the runs sorted and unique, again if asked, and leaves no file', async () => {
    const dir = await tempDir('runs');
    const cache = new DirTreeCache(dir, 'repo');
    const refs = new RefRuns(cache.refRuns());
    assert.deepEqual(fs.readdirSync(path.join(dir, 'repo')), [], 'the runs\' file is unlinked once open');
    let most = 0;
    for (const id of pushed) {
      refs.push(id);
      most = Math.max(most, refs.inMemory);
    }
    assert.equal(most, BLOCK_IDS - 1, 'less than one block in memory');
    assert.equal(refs.spilled, true);
    assert.equal(refs.length, pushed.length);
    assert.equal(merged(refs), expected);
    assert.equal(merged(refs), expected, 'a second merge gives the same');
    assert.throws(() => refs.sortedInMemory(), /merge/);
    const fds = fs.readdirSync('/proc/self/fd').length;
    refs.dispose();
    assert.equal(fs.readdirSync('/proc/self/fd').length, fds - 1, 'its descriptor closed');
  });

  it('takes ids a directory\'s block at a time (pushAll) as it takes them one by one, across the runs\' ends', async () => {
    const all = Buffer.concat(pushed);
    // blocks of 0 to 1,999 ids, so that some end exactly at a run's end and others cross it
    const blocks: Buffer[] = [];
    for (let at = 0, k = 0; at < all.length; k++) {
      const n = k % 7 === 0 ? 0 : k % 5 === 0 ? 1_999 : (k * 37) % 1_000;
      blocks.push(all.subarray(at, Math.min(all.length, at + n * 32)));
      at += n * 32;
    }
    blocks.push(all.subarray(0, BLOCK_IDS * 32)); // one run's worth at once, again
    const once = [...pushed, ...ids.slice(0, BLOCK_IDS)];
    const want = [...new Set(once.map((b) => b.toString('hex')))].sort().join('');
    const dir = await tempDir('runs-all');
    for (const store of [new DirTreeCache(dir, 'repo').refRuns(), null, fileRunStore(fs.openSync('/dev/full', 'r+'), '/dev/full')]) {
      const refs = new RefRuns(store);
      let most = 0;
      for (const b of blocks) {
        refs.pushAll(b);
        most = Math.max(most, refs.inMemory);
      }
      assert.equal(refs.length, once.length);
      if (store !== null && refs.spilled) assert.ok(most < BLOCK_IDS, `less than one block in memory: ${most}`);
      assert.equal(refs.spilled ? merged(refs) : Buffer.concat(refs.sortedInMemory()).toString('hex'), want);
      refs.dispose();
    }
  });

  it('keeps every id in memory without a store, or when the store refuses the first run (a full disk)', () => {
    for (const store of [null, fileRunStore(fs.openSync('/dev/full', 'r+'), '/dev/full')]) {
      const refs = new RefRuns(store);
      for (const id of pushed) refs.push(id);
      assert.equal(refs.spilled, false);
      assert.equal(refs.inMemory, pushed.length);
      assert.equal(Buffer.concat(refs.sortedInMemory()).toString('hex'), expected);
    }
  });

  it('merges the runs stored before the disk filled with the ones held after', { skip: process.getuid?.() !== 0 && process.env['CI'] !== 'true' ? 'needs root to mount a small tmpfs' : false }, async () => {
    const dir = await tempDir('runs-full');
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', dir]);
    try {
      const refs = new RefRuns(new DirTreeCache(dir, 'repo').refRuns());
      for (const id of pushed) refs.push(id);
      assert.equal(refs.spilled, true, 'the first runs went to the file');
      assert.ok(refs.inMemory > BLOCK_IDS, `then the disk was full: ${refs.inMemory} ids in memory`);
      assert.equal(merged(refs), expected);
      refs.dispose();
    } finally {
      execFileSync('umount', [dir]);
    }
  });

  it('writes the kept index as the runs are merged; the commit reads it from the file; kept only by keep()', async () => {
    const dir = await tempDir('runs-index');
    const cache = new DirTreeCache(dir, 'repo');
    const refs = new RefRuns(cache.refRuns());
    for (const id of pushed) refs.push(id);
    fs.mkdirSync(path.join(dir, 'repo'), { recursive: true });
    fs.writeFileSync(path.join(dir, 'repo', 'index.999999.tmp'), 'left by a backup killed in its commit');
    const writer = cache.writeIndex(HEAD);
    assert.ok(writer);
    assert.ok(!fs.existsSync(path.join(dir, 'repo', 'index.999999.tmp')), 'an old temp index removed');
    refs.merge((part) => assert.ok(writer.append(part)));
    const source = writer.finish();
    assert.ok(source);
    assert.equal(source.length, expected.length / 2);
    const back: string[] = [];
    const scratch = Buffer.alloc(100_000 * 32);
    for (let pos = 0; pos < source.length; pos += scratch.length) {
      back.push((await source.read(pos, Math.min(scratch.length, source.length - pos), scratch)).toString('hex'));
    }
    assert.equal(back.join(''), expected, 'the ids read back');
    assert.equal(cache.getIndex(HEAD), null, 'not the kept index before keep()');
    writer.keep();
    const kept = cache.getIndex(HEAD);
    assert.ok(kept, 'a whole kept index after keep()');
    assert.equal(kept.count, expected.length / 64);
    for (const id of ids.slice(0, 1000)) assert.ok(kept.has(id));
    kept.dispose();
    const other = cache.writeIndex('cd'.repeat(32))!;
    other.append(Buffer.alloc(32, 1));
    other.discard();
    assert.ok(cache.getIndex(HEAD), 'a discarded one leaves the kept index as it was');
    assert.deepEqual(fs.readdirSync(path.join(dir, 'repo')).sort(), ['index'], 'no temp file left');
    refs.dispose();
  });
});

describe('tree cache entries (DirTreeCache put, get, drop)', () => {
  const entryFile = (dir: string, id: Buffer): string => path.join(dir, 'repo', 'trees', id.toString('hex').slice(0, 2), id.toString('hex'));

  it('writes an entry once under its final name, leaves an existing one alone, and is written again after a drop', async () => {
    const dir = await tempDir('trees');
    const cache = new DirTreeCache(dir, 'repo');
    const id = randomBytes(32);
    const bytes = randomBytes(5000);
    cache.put(id, bytes);
    assert.deepEqual(cache.get(id), bytes);
    assert.deepEqual(fs.readdirSync(path.dirname(entryFile(dir, id))), [id.toString('hex')], 'no temp file beside it');
    // an entry cut short (a crash while it was written) stays as it is until it is dropped
    fs.truncateSync(entryFile(dir, id), 1000);
    cache.put(id, bytes);
    assert.equal(cache.get(id)!.length, 1000, 'an existing entry is left alone');
    const other = randomBytes(32);
    cache.put(other, bytes);
    assert.deepEqual(cache.get(other), bytes, 'the cache still works after an existing entry');
    cache.drop(id); // what the repository does with an entry that fails its authentication
    assert.equal(cache.get(id), null);
    cache.put(id, bytes);
    assert.deepEqual(cache.get(id), bytes, 'written again');
  });

  it('leaves no partial entry when the disk fills, and stops writing for the run', { skip: process.getuid?.() !== 0 && process.env['CI'] !== 'true' ? 'needs root to mount a small tmpfs' : false }, async () => {
    const dir = await tempDir('trees-full');
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir]);
    try {
      const cache = new DirTreeCache(dir, 'repo');
      const ids = Array.from({ length: 8 }, () => randomBytes(32));
      for (const id of ids) cache.put(id, randomBytes(300_000));
      assert.equal(cache.get(ids[0]!), null, 'the cache is off for the rest of the run');
      const after = new DirTreeCache(dir, 'repo'); // the next run's
      const kept = ids.filter((id) => after.get(id) !== null);
      assert.ok(kept.length >= 1 && kept.length < ids.length, `some entries fit: ${kept.length}`);
      for (const id of kept) assert.equal(after.get(id)!.length, 300_000, 'every entry there is whole');
      const files = fs.readdirSync(path.join(dir, 'repo', 'trees'), { recursive: true, encoding: 'utf8' }).filter((f) => f.length > 2);
      assert.equal(files.length, kept.length, 'nothing else is left');
    } finally {
      execFileSync('umount', [dir]);
    }
  });
});
