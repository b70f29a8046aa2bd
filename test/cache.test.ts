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
import { DirTreeCache } from '../src/drivers/cachedir.js';
import { IdList } from '../src/core/idset.js';

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
