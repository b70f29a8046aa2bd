/**
 * The storage conformance suite: every contract of src/storage/types.ts, run against every driver.
 * The btrfs run needs SNAPCRYPT_TEST_BTRFS (a btrfs mount); it is skipped without it, except in CI.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { isSnapError } from '../src/core/errors.js';
import type { ErrorCode } from '../src/core/errors.js';
import { BtrfsStorage } from '../src/drivers/btrfs.js';
import { INDEX_CHUNK, LocalDirStorage, ReadAheadGate, scanIndex, sortedIdsDiff, sortedIdsSince } from '../src/drivers/localdir.js';
import { openStorage } from '../src/drivers/open.js';
import { RemoteStorage } from '../src/drivers/ssh.js';
import { readObjectsInto } from '../src/storage/types.js';
import type { ObjectReader, ObjectSink, Storage } from '../src/storage/types.js';
import { btrfsTempDir, btrfsTestDir, tempDir } from './env.js';
import { inProcessRemote } from './in-process-remote.js';

/** Makes a storage for a fresh, not yet initialized area with the given clock. */
type Factory = (clock: () => number) => Promise<Storage>;

interface DriverChecks {
  /** The storage runs in another process (its locks name that process's pid). */
  otherProcess?: boolean;
  /** The storage keeps its own clock: the factory's clock is not used (skips the clock test). */
  ownClock?: boolean;
  /** Driver-specific checks of a freshly sealed snapshot directory. */
  sealed?(snapshotDir: string, storage: Storage): Promise<void>;
}

const T0 = Date.UTC(2026, 10, 26, 23, 15, 2, 123);
const CONFIG = Buffer.from('snapcrypt-test-config v1\n');

function idOf(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function indexOf(ids: Iterable<string>): Buffer {
  return Buffer.concat([...new Set(ids)].sort().map((id) => Buffer.from(id, 'hex')));
}

function headOf(id: string): Buffer {
  return Buffer.from(`${id}\n`);
}

async function rejectsWith(p: Promise<unknown>, code: ErrorCode, match?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isSnapError(err, code), `expected SnapError('${code}'), got ${String(err)}`);
    if (match) assert.match(err.message, match);
    return true;
  });
}

async function collect(reader: ObjectReader): Promise<string[]> {
  const ids: string[] = [];
  for await (const id of reader.listObjects()) ids.push(id);
  return ids.sort();
}

/** A storage with an adjustable clock, initialized, holding some objects. */
async function setup(factory: Factory, objects = 3) {
  let now = T0;
  const clock = { set: (t: number) => (now = t) };
  const storage = await factory(() => now);
  await storage.init(CONFIG);
  const blobs = Array.from({ length: objects }, (_, i) => Buffer.from(`object ${i}`));
  const ids = blobs.map(idOf);
  for (const [i, id] of ids.entries()) await storage.putObject(id, blobs[i]!);
  return { storage, clock, blobs, ids };
}

/**
 * readObjectsInto(reader, ids) through a sink that checks its contract: objects placed in order, each
 * filled once in the memory it was given; some placements wait, so reads finish in varied orders.
 */
async function readAllInto(reader: ObjectReader, ids: readonly string[]): Promise<{ data: Array<Buffer | null>; placed: number; err: unknown }> {
  const data: Array<Buffer | null> = [];
  const filled = new Set<number>();
  let placed = 0;
  const sink: ObjectSink = {
    async place(i, size) {
      assert.equal(i, placed++, 'placed in order');
      if (i % 3 === 0) await new Promise((resolve) => setImmediate(resolve));
      data[i] = Buffer.alloc(size, 0xee);
      return data[i];
    },
    async absent(i) {
      assert.equal(i, placed++, 'placed in order');
      data[i] = null;
    },
    filled(i) {
      assert.ok(data[i] && !filled.has(i), `object ${i} filled once, after it was placed`);
      filled.add(i);
    },
  };
  let err: unknown = null;
  try {
    await readObjectsInto(reader, ids, sink, 4);
  } catch (e) {
    err = e;
  }
  const done = data.filter((d, i) => d === null || filled.has(i));
  return { data: err === null ? data : done, placed, err };
}

function storageConformance(driver: string, factory: Factory | null, checks: DriverChecks = {}): void {
  const skip = factory === null ? `${driver} is not available here` : false;
  const make: Factory = factory ?? (() => Promise.reject(new Error('skipped')));

  describe(`storage conformance: ${driver}`, { skip, concurrency: true }, () => {
    it('init creates an area once; a second init fails with exists', async () => {
      const storage = await make(() => T0);
      assert.equal(await storage.exists(), false);
      await storage.init(CONFIG);
      assert.equal(await storage.exists(), true);
      assert.deepEqual(await storage.readFile('config'), CONFIG);
      assert.deepEqual(await storage.listKeys(), []);
      assert.deepEqual(await collect(storage), []);
      assert.deepEqual(await storage.listSnapshots(), []);
      await rejectsWith(storage.init(Buffer.from('other')), 'exists');
      assert.deepEqual(await storage.readFile('config'), CONFIG);
    });

    it('putObject then getObject returns the same bytes; putting an existing id is a no-op', async () => {
      const { storage } = await setup(make, 0);
      const big = Buffer.alloc(1 << 20, 7);
      const empty = Buffer.alloc(0);
      for (const data of [big, empty]) {
        await storage.putObject(idOf(data), data);
        assert.deepEqual(await storage.getObject(idOf(data)), data);
      }
      await storage.putObject(idOf(big), Buffer.from('different bytes'));
      assert.deepEqual(await storage.getObject(idOf(big)), big);
      assert.deepEqual(await collect(storage), [idOf(big), idOf(empty)].sort());
    });

    it('getObject of an absent object fails with not-found', async () => {
      const { storage } = await setup(make, 1);
      await rejectsWith(storage.getObject('ab'.repeat(32)), 'not-found', /abab/);
    });

    it('rejects invalid object ids and file names with usage', async () => {
      const { storage, ids } = await setup(make, 1);
      const good = ids[0]!;
      for (const id of ['', good.toUpperCase(), good.slice(1), `${good}0`, `../${good.slice(3)}`, `${good.slice(0, 63)}/`]) {
        await rejectsWith(storage.getObject(id), 'usage');
        await rejectsWith(storage.putObject(id, Buffer.from('x')), 'usage');
      }
      for (const name of ['', 'lock', 'objects', '../config', 'keys/../config', 'keys/..', 'keys/.', 'keys/', 'keys/a/b', 'current/config']) {
        await rejectsWith(storage.readFile(name), 'usage');
        await rejectsWith(storage.writeFile(name, Buffer.from('x')), 'usage');
      }
      for (const name of ['head', 'index', 'keys/.tmp-x']) {
        await rejectsWith(storage.writeFile(name, Buffer.from('x')), 'usage');
      }
      assert.deepEqual(await collect(storage), [good]);
    });

    it('writeFile replaces config and key files; listKeys and readFile see them', async () => {
      const { storage } = await setup(make, 0);
      await storage.writeFile('keys/b', Buffer.from('key b'));
      await storage.writeFile('keys/a.key', Buffer.from('key a'));
      await storage.writeFile('keys/b', Buffer.from('key b2'));
      await storage.writeFile('config', Buffer.from('config 2'));
      assert.deepEqual(await storage.listKeys(), ['a.key', 'b']);
      assert.deepEqual(await storage.readFile('keys/b'), Buffer.from('key b2'));
      assert.deepEqual(await storage.readFile('config'), Buffer.from('config 2'));
      assert.equal(await storage.readFile('keys/none'), null);
      assert.equal(await storage.readFile('head'), null);
    });

    it('listObjects yields every stored id once', async () => {
      const { storage, ids } = await setup(make, 40);
      assert.deepEqual(await collect(storage), [...ids].sort());
    });

    it('commit refuses an index that lists a missing object and changes nothing', async () => {
      const { storage, ids } = await setup(make, 3);
      const first = await storage.commit(headOf(ids[0]!), indexOf(ids));
      const absent = 'ee'.repeat(32);
      await rejectsWith(storage.commit(headOf(ids[1]!), indexOf([ids[1]!, absent])), 'integrity', new RegExp(absent));
      assert.deepEqual(await storage.listSnapshots(), [first]);
      assert.deepEqual(await storage.readFile('head'), headOf(ids[0]!));
      assert.deepEqual(await storage.readFile('index'), indexOf(ids));
      assert.deepEqual(await collect(storage), [...ids].sort(), 'nothing pruned');
    });

    it('commit rejects a malformed index or head with integrity', async () => {
      const { storage, ids } = await setup(make, 3);
      const sorted = [...ids].sort();
      const [a, b] = [Buffer.from(sorted[0]!, 'hex'), Buffer.from(sorted[1]!, 'hex')];
      const head = headOf(sorted[0]!);
      const bad: [Buffer, Buffer][] = [
        [head, Buffer.concat([a, b.subarray(1)])], // not a multiple of 32 bytes
        [head, Buffer.concat([b, a])], // unsorted
        [head, Buffer.concat([a, a])], // duplicate
        [head, Buffer.from('garbage')],
        [headOf(sorted[2]!), Buffer.concat([a, b])], // head not listed
        [Buffer.from(sorted[0]!), Buffer.concat([a, b])], // head without newline
        [Buffer.from('not hex\n'), Buffer.concat([a, b])],
      ];
      for (const [h, index] of bad) await rejectsWith(storage.commit(h, index), 'integrity');
      assert.deepEqual(await storage.listSnapshots(), []);
      assert.equal(await storage.readFile('head'), null);
      assert.deepEqual(await collect(storage), sorted);
    });

    it('commit takes the index in parts, read as if concatenated, and checks it across their borders', async () => {
      const { storage, ids } = await setup(make, 40);
      const sorted = [...ids].sort();
      const kept = sorted.filter((_, i) => i % 3 !== 1);
      const whole = indexOf(kept);
      const cuts = [0, 32, 5 * 32, 6 * 32, whole.length]; // parts of 1, 4, 1 and the rest of the ids
      const parts = cuts.slice(1).map((end, i) => whole.subarray(cuts[i]!, end));
      const swapped = [parts[1]!, parts[0]!, ...parts.slice(2)]; // sorted within each part, not across
      await rejectsWith(storage.commit(headOf(kept[0]!), swapped), 'integrity');
      const missing = [...parts.slice(0, 3), indexOf([kept[6]!, 'ff'.repeat(32)])];
      await rejectsWith(storage.commit(headOf(kept[0]!), missing), 'integrity', /f{64}/);
      assert.deepEqual(await storage.listSnapshots(), []);
      await storage.commit(headOf(kept[0]!), parts);
      assert.deepEqual(await storage.readFile('index'), whole);
      assert.deepEqual(await collect(storage), kept, 'the ids that no part lists are pruned');
    });

    it('commit takes the index from an IndexSource, read in pieces (a client\'s kept index file), and checks it', async () => {
      const { storage, ids } = await setup(make, 40);
      const kept = [...ids].sort().filter((_, i) => i % 4 !== 2);
      const source = (whole: Buffer) => ({
        length: whole.length,
        // into the scratch, as a file would be read: a piece stays valid only until the next read
        read: async (pos: number, n: number, scratch: Buffer): Promise<Buffer> => {
          whole.copy(scratch, 0, pos, pos + n);
          return scratch.subarray(0, n);
        },
      });
      const missing = indexOf([...kept, 'ff'.repeat(32)]);
      await rejectsWith(storage.commit(headOf(kept[0]!), source(missing)), 'integrity', /f{64}/);
      const unsorted = indexOf(kept);
      const first = Buffer.from(unsorted.subarray(0, 32));
      unsorted.copy(unsorted, 0, 32, 64);
      first.copy(unsorted, 32);
      await rejectsWith(storage.commit(headOf(kept[0]!), source(unsorted)), 'integrity', /sorted/);
      assert.deepEqual(await storage.listSnapshots(), []);
      await storage.commit(headOf(kept[0]!), source(indexOf(kept)));
      assert.deepEqual(await storage.readFile('index'), indexOf(kept));
      assert.deepEqual(await collect(storage), kept, 'the ids the source does not list are pruned');
    });

    it('commit writes head and index, prunes unlisted objects; the earlier snapshot keeps them', async () => {
      const { storage, ids, blobs } = await setup(make, 3);
      const first = await storage.commit(headOf(ids[0]!), indexOf(ids));
      const index = indexOf([ids[0]!, ids[2]!]);
      await storage.commit(headOf(ids[0]!), index);
      assert.deepEqual(await storage.readFile('head'), headOf(ids[0]!));
      assert.deepEqual(await storage.readFile('index'), index);
      assert.deepEqual(await collect(storage), [ids[0]!, ids[2]!].sort());
      await rejectsWith(storage.getObject(ids[1]!), 'not-found');
      const old = await storage.openSnapshot(first.name);
      assert.deepEqual(await collect(old), [...ids].sort());
      assert.deepEqual(await old.getObject(ids[1]!), blobs[1]);
      assert.deepEqual(await old.readFile('index'), indexOf(ids));
    });

    if (checks.ownClock === true) {
      // a server in another process names snapshots by its own clock: check order, uniqueness, time
      it('snapshots are listed oldest first, with unique names from the storage clock', async () => {
        const { storage, ids } = await setup(make, 1);
        const before = Date.now();
        const a = await storage.commit(headOf(ids[0]!), indexOf(ids));
        const b = await storage.commit(headOf(ids[0]!), indexOf(ids));
        const after = Date.now();
        assert.ok(a.name < b.name, `${a.name} < ${b.name}`);
        assert.deepEqual(await storage.listSnapshots(), [a, b]);
        for (const s of [a, b]) {
          assert.equal(new Date(s.time).toISOString(), s.name);
          assert.ok(s.time >= before - 5000 && s.time <= after + 5000, `${s.name} is near the local clock`);
        }
      });
    }

    if (checks.ownClock !== true) it('snapshots are listed oldest first, with unique names from the clock', async () => {
      const { storage, clock, ids } = await setup(make, 1);
      const commit = () => storage.commit(headOf(ids[0]!), indexOf(ids));
      const a = await commit();
      const b = await commit(); // same clock reading: bumped by 1 ms
      clock.set(T0 + 3_600_000);
      const c = await commit();
      assert.deepEqual(a, { name: '2026-11-26T23:15:02.123Z', time: T0 });
      assert.deepEqual(b, { name: '2026-11-26T23:15:02.124Z', time: T0 + 1 });
      assert.deepEqual(c, { name: '2026-11-27T00:15:02.123Z', time: T0 + 3_600_000 });
      clock.set(T0 - 1000); // a clock that went back still gives a unique, correctly sorted name
      const d = await commit();
      await fsp.mkdir(join(storage.location, 'snapshots', 'junk'));
      await fsp.mkdir(join(storage.location, 'snapshots', '.tmp-2026-11-26T23:15:02.999Z'));
      assert.deepEqual(await storage.listSnapshots(), [d, a, b, c]);
    });

    it('a snapshot is unaffected by later writes and commits to current', async () => {
      const { storage, ids, blobs } = await setup(make, 2);
      await storage.writeFile('keys/main', Buffer.from('key 1'));
      const snap = await storage.commit(headOf(ids[0]!), indexOf(ids));
      const reader = await storage.openSnapshot(snap.name);
      const before = {
        objects: await collect(reader),
        keys: await reader.listKeys(),
        files: await Promise.all(['config', 'head', 'index', 'keys/main'].map((f) => reader.readFile(f))),
      };
      await storage.writeFile('keys/main', Buffer.from('key 2'));
      await storage.writeFile('keys/other', Buffer.from('key 3'));
      await storage.writeFile('config', Buffer.from('config 2'));
      const extra = Buffer.from('later object');
      await storage.putObject(idOf(extra), extra);
      await storage.commit(headOf(idOf(extra)), indexOf([idOf(extra)]));
      const again = await storage.openSnapshot(snap.name);
      assert.deepEqual(
        {
          objects: await collect(again),
          keys: await again.listKeys(),
          files: await Promise.all(['config', 'head', 'index', 'keys/main'].map((f) => again.readFile(f))),
        },
        before,
      );
      assert.deepEqual(before.files, [CONFIG, headOf(ids[0]!), indexOf(ids), Buffer.from('key 1')]);
      for (const [i, id] of ids.entries()) assert.deepEqual(await again.getObject(id), blobs[i]);
      await rejectsWith(again.getObject(idOf(extra)), 'not-found');
    });

    it('openSnapshot rejects path tricks and unknown names', async () => {
      const { storage, ids } = await setup(make, 1);
      const snap = await storage.commit(headOf(ids[0]!), indexOf(ids));
      for (const name of ['../x', '..', '.', '', '/', 'current', `${snap.name}/..`, `../snapshots/${snap.name}`, `.tmp-${snap.name}`, `${snap.name} `, '2026-02-30T00:00:00.000Z', '2026-11-26T23:15:02Z']) {
        await rejectsWith(storage.openSnapshot(name), 'usage');
      }
      await rejectsWith(storage.openSnapshot('2020-01-01T00:00:00.000Z'), 'not-found');
      const reader = await storage.openSnapshot(snap.name);
      await rejectsWith(reader.getObject('../../current'), 'usage');
      await rejectsWith(reader.readFile('../lock'), 'usage');
    });

    it('leftovers of an interrupted run are ignored by readers and removed by the next commit', async () => {
      const { storage, ids } = await setup(make, 1);
      const current = join(storage.location, 'current');
      const objDir = join(current, 'objects', ids[0]!.slice(0, 2));
      const leftovers = [join(objDir, '.tmp-0123'), join(current, '.tmp-4567'), join(current, 'keys', '.tmp-89ab')];
      for (const f of leftovers) await fsp.writeFile(f, 'partial');
      const halfSealed = join(storage.location, 'snapshots', '.tmp-2026-11-26T23:15:02.123Z');
      await fsp.mkdir(join(halfSealed, 'objects'), { recursive: true });
      await fsp.chmod(join(halfSealed, 'objects'), 0o500);
      assert.deepEqual(await collect(storage), ids);
      assert.deepEqual(await storage.listKeys(), []);
      assert.deepEqual(await storage.listSnapshots(), []);
      const snap = await storage.commit(headOf(ids[0]!), indexOf(ids));
      for (const f of [...leftovers, halfSealed]) assert.equal(await fsp.stat(f).catch(() => null), null, f);
      assert.deepEqual(await storage.listSnapshots(), [snap]);
      assert.deepEqual(await collect(await storage.openSnapshot(snap.name)), ids);
    });

    it('lock is exclusive until released', async () => {
      const { storage } = await setup(make, 0);
      const lock = await storage.lock('first');
      const pid = checks.otherProcess ? '\\d+' : String(process.pid);
      await rejectsWith(storage.lock('second'), 'locked', new RegExp(`"first" \\(pid ${pid} on host `));
      await lock.release();
      const again = await storage.lock('second');
      await again.release();
      await again.release(); // idempotent
    });

    it('a lock left by a dead process on this host is taken over', async () => {
      const { storage } = await setup(make, 0);
      const dead = { owner: 'crashed', host: hostname(), pid: 2_000_000_000, time: new Date(T0).toISOString() };
      await fsp.writeFile(join(storage.location, 'lock'), JSON.stringify(dead));
      const lock = await storage.lock('new');
      await rejectsWith(storage.lock('third'), 'locked', /"new"/);
      await lock.release();
    });

    it('a lock held on another host is refused, naming the holder and how to remove it', async () => {
      const { storage } = await setup(make, 0);
      const other = { owner: 'laptop backup', host: 'elsewhere.example', pid: 1, time: '2026-11-26T20:00:00.000Z' };
      const path = join(storage.location, 'lock');
      await fsp.writeFile(path, JSON.stringify(other));
      await rejectsWith(storage.lock('me'), 'locked', /pid 1 on host elsewhere\.example.*2026-11-26T20:00:00\.000Z.*delete .*lock/);
      await fsp.writeFile(path, 'not json');
      await rejectsWith(storage.lock('me'), 'locked', /unreadable/);
    });

    it('readObjectsInto places every object in order (absent ones as absent) and fills each; a failure stops it at its object', async () => {
      const { storage, ids, blobs } = await setup(make, 40);
      await storage.putObject(idOf(Buffer.alloc(300_000, 5)), Buffer.alloc(300_000, 5));
      ids.push(idOf(Buffer.alloc(300_000, 5)));
      blobs.push(Buffer.alloc(300_000, 5));
      const absent = 'ab'.repeat(32);
      const want = ids.flatMap((id, i) => (i % 4 === 1 ? [absent, id] : [id]));
      const expected = want.map((id) => (id === absent ? null : blobs[ids.indexOf(id)]!));
      const snap = await storage.openSnapshot((await storage.commit(headOf(ids[0]!), indexOf(ids))).name);
      // (the directory drivers' factories make them read ahead)
      for (const reader of [storage, snap]) {
        const r = await readAllInto(reader, want);
        assert.equal(r.err, null);
        assert.deepEqual(r.data, expected);
      }
      const bad = [...want.slice(0, 10), 'not an id', ...want.slice(10)];
      for (const reader of [storage, snap]) {
        const r = await readAllInto(reader, bad);
        assert.ok(isSnapError(r.err, 'usage'), String(r.err));
        assert.equal(r.placed, 10, 'nothing after the failed object is placed');
        assert.deepEqual(r.data, expected.slice(0, 10), 'the objects before it were read');
      }
    });

    if (checks.sealed) {
      const sealed = checks.sealed;
      it('driver: a sealed snapshot is protected', async () => {
        const { storage, ids } = await setup(make, 2);
        const snap = await storage.commit(headOf(ids[0]!), indexOf(ids));
        await sealed(join(storage.location, 'snapshots', snap.name), storage);
      });
    }
  });
}

storageConformance('LocalDirStorage', async (clock) => new LocalDirStorage(join(await tempDir('localdir'), 'repo'), { clock, readAhead: true }), {
  async sealed(dir, storage) {
    // The fallback's snapshot objects are hard links of current's (same inode), never copies.
    for await (const id of storage.listObjects()) {
      const a = await fsp.stat(join(dir, 'objects', id.slice(0, 2), id));
      const b = await fsp.stat(join(storage.location, 'current', 'objects', id.slice(0, 2), id));
      assert.equal(a.ino, b.ino);
    }
    assert.deepEqual((await fsp.readdir(join(storage.location, 'snapshots'))).filter((n) => n.startsWith('.tmp-')), []);
  },
});

const btrfsDir = btrfsTestDir();
storageConformance(
  'BtrfsStorage',
  btrfsDir === null
    ? null
    : async (clock) => {
        const dir = await btrfsTempDir('conformance');
        assert.ok(dir !== null);
        return new BtrfsStorage(join(dir, 'repo'), { clock, readAhead: true });
      },
  {
    async sealed(dir) {
      assert.ok(await BtrfsStorage.isSubvolume(dir));
      assert.ok(await BtrfsStorage.isSubvolume(join(dir, '..', '..', 'current')));
      assert.equal(execFileSync('btrfs', ['property', 'get', '-ts', dir, 'ro'], { encoding: 'utf8' }).trim(), 'ro=true');
      await assert.rejects(fsp.writeFile(join(dir, 'new-file'), 'x'), { code: 'EROFS' });
      await assert.rejects(fsp.writeFile(join(dir, 'config'), 'x'), { code: 'EROFS' });
      await assert.rejects(fsp.rm(join(dir, 'objects'), { recursive: true }), { code: 'EROFS' });
    },
  },
);

// The same contracts through the protocol: an in-process server loop on stream pairs (with the test's
// clock), and the real server program spawned as a child process (with its own clock).
const remotes: Storage[] = [];
after(async () => {
  for (const r of remotes) await r.close().catch(() => undefined);
});

storageConformance('RemoteStorage (in-process serve)', async (clock) => {
  const dir = join(await tempDir('remote'), 'repo');
  const local = new LocalDirStorage(dir, { clock });
  const { remote } = await inProcessRemote(local, dir);
  remotes.push(remote);
  return remote;
});

const SERVER_PATH = fileURLToPath(new URL('../src/programs/snapcrypt-server.js', import.meta.url));
storageConformance(
  'RemoteStorage (spawned snapcrypt-server serve)',
  async () => {
    const dir = join(await tempDir('remote-spawn'), 'repo');
    const remote = await RemoteStorage.spawn(process.execPath, [SERVER_PATH, 'serve', '--area', dir], dir);
    remotes.push(remote);
    return remote;
  },
  { otherProcess: true, ownClock: true },
);

describe('openStorage', () => {
  it('picks LocalDirStorage off btrfs', async () => {
    const dir = await tempDir('open');
    if (await BtrfsStorage.isBtrfs(dir)) return; // the temp dir itself is on btrfs: nothing to check
    assert.ok((await openStorage(join(dir, 'new', 'repo'))) instanceof LocalDirStorage);
  });

  it('picks BtrfsStorage on btrfs, unless current is a plain directory', { skip: btrfsDir === null }, async () => {
    const dir = await btrfsTempDir('open');
    assert.ok(dir !== null);
    const fresh = await openStorage(join(dir, 'a', 'b'));
    assert.ok(fresh instanceof BtrfsStorage);
    await fresh.init(CONFIG);
    assert.ok((await openStorage(join(dir, 'a', 'b'))) instanceof BtrfsStorage);
    await new LocalDirStorage(join(dir, 'plain')).init(CONFIG);
    assert.ok((await openStorage(join(dir, 'plain'))) instanceof LocalDirStorage);
  });
});

describe('object files of the directory storages (dirwriter.ts)', () => {
  it('an object is created 0400 under its name; one left incomplete (0200) is refused to writers and removed by the next lock', async () => {
    const dir = join(await tempDir('incomplete'), 'repo');
    const storage = new LocalDirStorage(dir, { clock: () => T0 });
    await storage.init(CONFIG);
    const blobs = ['kept', 'listed', 'torn', 'torn too'].map((s) => Buffer.from(`object ${s}`));
    const [kept, listed, torn, tornToo] = blobs.map(idOf) as [string, string, string, string];
    const file = (id: string) => join(dir, 'current', 'objects', id.slice(0, 2), id);
    await storage.putObject(listed, blobs[1]!);
    await storage.commit(headOf(listed), indexOf([listed]));
    await storage.putObject(kept, blobs[0]!);
    assert.equal((await fsp.stat(file(kept))).mode & 0o777, 0o400, 'a complete object is 0400');
    assert.deepEqual((await fsp.readdir(join(dir, 'current', 'objects', kept.slice(0, 2)))).filter((n) => n.startsWith('.')), [], 'no temp file');

    // What a process killed while writing leaves: its object under its name, mode 0200, cut short.
    for (const [id, data] of [[torn, blobs[2]!], [tornToo, blobs[3]!]] as const) {
      await fsp.mkdir(dirname(file(id)), { recursive: true });
      await fsp.writeFile(file(id), data.subarray(0, 3), { mode: 0o200 });
    }
    // A writer that does not hold the lock must not take it for stored, nor replace it.
    await rejectsWith(storage.putObject(torn, blobs[2]!), 'io', /incomplete/);
    assert.equal((await fsp.stat(file(torn))).size, 3);

    // The next holder of the lock (the only writer) removes incomplete objects, and only those.
    const next = new LocalDirStorage(dir, { clock: () => T0 });
    const lock = await next.lock('next');
    assert.deepEqual(await collect(next), [kept, listed].sort(), 'the incomplete objects are gone; the complete ones stay');
    await next.putObject(torn, blobs[2]!);
    assert.deepEqual(await next.getObject(torn), blobs[2]);
    await lock.release();

    // Without the marker of an uncommitted session the lock looks at no object.
    await next.commit(headOf(listed), indexOf([listed, torn].sort()));
    await fsp.mkdir(dirname(file(tornToo)), { recursive: true });
    await fsp.writeFile(file(tornToo), 'x', { mode: 0o200 });
    const again = await new LocalDirStorage(dir, { clock: () => T0 }).lock('again');
    assert.ok(existsSync(file(tornToo)), 'no uncommitted session, no scan');
    await again.release();
  });
});

describe('sortedIdsDiff (a commit against a prefix directory)', () => {
  const id = (first: number, last: number): Buffer => Buffer.concat([Buffer.from([0x5a, first]), Buffer.alloc(29), Buffer.from([last])]);
  const hex = (b: Buffer): string => b.toString('hex');
  it('finds the ids with no object and the objects no id lists, walking both sorted lists together', () => {
    const [a, b, c, d, e, f] = [id(1, 0), id(2, 0), id(2, 1), id(3, 0), id(4, 9), id(255, 255)];
    const r = sortedIdsDiff(Buffer.concat([a, c, e, f]), [b, c, d, f].map(hex));
    assert.equal(r.missing, 2);
    assert.equal(r.firstMissing, hex(a));
    assert.deepEqual(r.unlisted, [b, d].map(hex));
    const none = sortedIdsDiff(Buffer.concat([a, b]), [a, b].map(hex));
    assert.deepEqual([none.missing, none.firstMissing, none.unlisted], [0, undefined, []]);
    const empty = sortedIdsDiff(Buffer.alloc(0), [hex(a), hex(f)]);
    assert.deepEqual([empty.missing, empty.unlisted], [0, [hex(a), hex(f)]]);
    const noDir = sortedIdsDiff(Buffer.concat([b, d]), []);
    assert.deepEqual([noDir.missing, noDir.firstMissing, noDir.unlisted], [2, hex(b), []]);
    // names of 64 characters that are not ids (upper case, not hex) match nothing and are not unlisted
    const odd = [hex(b).toUpperCase(), hex(c).slice(0, 63) + 'g'].sort();
    const mixed = sortedIdsDiff(Buffer.concat([c, d]), [...odd, hex(c), hex(e)].sort());
    assert.deepEqual([mixed.missing, mixed.firstMissing, mixed.unlisted], [1, hex(d), [hex(e)]]);
    // more ids than one hex string holds (32): every third missing, objects between and after them
    const many = Array.from({ length: 100 }, (_, i) => id(10 + i, 0));
    const between = Array.from({ length: 100 }, (_, i) => id(10 + i, 1));
    const names = [...many.filter((_, i) => i % 3 !== 0), ...between.filter((_, i) => i % 7 === 0), id(200, 0)].map(hex).sort();
    const runs = sortedIdsDiff(Buffer.concat(many), names);
    assert.equal(runs.missing, 34);
    assert.equal(runs.firstMissing, hex(many[0]!));
    assert.deepEqual(runs.unlisted, [...between.filter((_, i) => i % 7 === 0), id(200, 0)].map(hex));
  });
});

describe('scanIndex (a commit checks that its index is sorted and lists the head)', () => {
  // ids that share their first four bytes (ordered by the rest), around a chunk boundary of the reads
  const id = (first: number, rest: number): Buffer => {
    const b = Buffer.alloc(32, 0x11);
    b.writeUInt32BE(first, 0);
    b.writeUInt32BE(rest, 28);
    return b;
  };
  const source = (ids: Buffer[]) => {
    const buf = Buffer.concat(ids);
    return { length: buf.length, read: async (pos: number, n: number) => buf.subarray(pos, pos + n) };
  };
  const perChunk = INDEX_CHUNK / 32;
  const sorted = Array.from({ length: perChunk + 50 }, (_, i) => id(0x80000000 + Math.floor(i / 3), i % 3));
  it('passes a sorted index, whose ids often share their first four bytes, also across its reads', async () => {
    assert.deepEqual(await scanIndex(source(sorted), null), { unsortedAt: null, headListed: false });
    assert.deepEqual(await scanIndex(source([]), null), { unsortedAt: null, headListed: false });
    assert.deepEqual(await scanIndex(source([id(0, 0)]), null), { unsortedAt: null, headListed: false });
  });
  it('finds the first id not above the one before: a later byte lower, a first byte lower, a repeat', async () => {
    for (const at of [5, perChunk - 1, perChunk, perChunk + 1]) {
      const laterByte = [...sorted];
      laterByte[at] = id(Math.floor((at - 1) / 3) + 0x80000000, 0); // same first four bytes as at - 1, rest not above
      if ((at - 1) % 3 === 0) laterByte[at - 1] = id(Math.floor((at - 1) / 3) + 0x80000000, 1);
      assert.equal((await scanIndex(source(laterByte), null)).unsortedAt, at, `later byte at ${at}`);
      const firstByte = [...sorted];
      firstByte[at] = id(0x7fffffff, 9);
      assert.equal((await scanIndex(source(firstByte), null)).unsortedAt, at, `first byte at ${at}`);
      const repeat = [...sorted];
      repeat[at] = repeat[at - 1]!;
      assert.equal((await scanIndex(source(repeat), null)).unsortedAt, at, `repeat at ${at}`);
    }
  });
  it('says whether the head is listed before any disorder; an id with the same first four bytes is not the head', async () => {
    const head = sorted[perChunk + 7]!;
    assert.deepEqual(await scanIndex(source(sorted), head.toString('hex')), { unsortedAt: null, headListed: true });
    const without = sorted.filter((b) => b !== head);
    assert.equal((await scanIndex(source(without), head.toString('hex'))).headListed, false);
    const after = [...sorted];
    after[10] = id(0, 0);
    assert.deepEqual(await scanIndex(source(after), head.toString('hex')), { unsortedAt: 10, headListed: false });
  });
});

describe('commit reads the object directories once to check and to prune (LocalDirStorage)', () => {
  it('prunes the objects the new index drops, also more than the list kept between the two (10,000), and no name that is not an id', async () => {
    const dir = join(await tempDir('prune-once'), 'repo');
    const storage = new LocalDirStorage(dir, { clock: () => T0 });
    await storage.init(CONFIG);
    const objects = (from: number, n: number): string[] => Array.from({ length: n }, (_, i) => idOf(Buffer.from(`object ${from + i}`)));
    const write = async (ids: readonly string[]): Promise<void> => {
      for (const id of ids) await storage.putObject(id, Buffer.from(id));
    };
    const kept = objects(0, 20);
    const fewDropped = objects(20, 30);
    const manyDropped = objects(100, 10_050);
    await write([...kept, ...fewDropped]);
    // names in the object directories that are not ids (64 characters, or an id's temp file)
    const prefixDir = join(dir, 'current', 'objects', kept[0]!.slice(0, 2));
    const foreign = [kept[0]!.slice(0, 2) + 'G'.repeat(62), kept[0]!.toUpperCase().replace(/^../, kept[0]!.slice(0, 2))];
    for (const name of foreign) await fsp.writeFile(join(prefixDir, name), 'not an object');
    await fsp.writeFile(join(prefixDir, `.tmp-${kept[0]!}`), 'torn');
    await storage.commit(headOf(kept[0]!), indexOf([...kept, ...fewDropped]));
    assert.deepEqual(await collect(storage), [...kept, ...fewDropped].sort(), 'listed objects all kept');
    // fewer unlisted than the list holds: pruned from the one reading
    await storage.commit(headOf(kept[0]!), indexOf(kept));
    assert.deepEqual(await collect(storage), [...kept].sort());
    const left = (await fsp.readdir(prefixDir)).filter((n) => !kept.includes(n)).sort();
    assert.deepEqual(left, [...foreign].sort(), 'names that are not ids are left, temp files removed');
    // more than the list holds: read again, all pruned all the same
    await write(manyDropped);
    await storage.commit(headOf(kept[0]!), indexOf([...kept, ...manyDropped]));
    assert.equal((await collect(storage)).length, kept.length + manyDropped.length);
    await storage.commit(headOf(kept[0]!), indexOf(kept));
    assert.deepEqual(await collect(storage), [...kept].sort(), 'every dropped object pruned');
    assert.deepEqual((await fsp.readdir(prefixDir)).filter((n) => !kept.includes(n)).sort(), [...foreign].sort());
  });
});

describe('commit over a prefix larger than the index is read in (LocalDirStorage)', () => {
  it('checks and prunes the ids of one prefix that spans several 256 KiB reads of the index', async () => {
    const dir = join(await tempDir('one-prefix'), 'repo');
    const storage = new LocalDirStorage(dir, { clock: () => T0 });
    await storage.init(CONFIG);
    // 20,000 ids that all start with 00: 640,000 bytes of index in one prefix, read in three pieces
    const ids = Array.from({ length: 20_000 }, (_, i) => `00${createHash('sha256').update(`id ${i}`).digest('hex').slice(2)}`).sort();
    for (const id of ids) await storage.putObject(id, Buffer.from('x'));
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    const kept = ids.filter((_, i) => i % 2 === 0);
    await storage.commit(headOf(ids[0]!), indexOf(kept));
    assert.deepEqual(await collect(storage), kept, 'the other half pruned, every listed id found');
    await fsp.rm(join(dir, 'current', 'objects', '00', kept[kept.length - 1]!));
    await rejectsWith(storage.commit(headOf(ids[0]!), indexOf(kept)), 'integrity', new RegExp(kept[kept.length - 1]!));
  });
});

describe('sortedIdsSince (a commit against the last index, for a directory that did not change)', () => {
  const id = (first: number, last: number): Buffer => Buffer.concat([Buffer.from([0x5a, first]), Buffer.alloc(29), Buffer.from([last])]);
  const hex = (b: Buffer): string => b.toString('hex');
  it('finds the new ids the last index did not list and the ones the new index drops', () => {
    const [a, b, c, d, e, f] = [id(1, 0), id(2, 0), id(2, 1), id(3, 0), id(4, 9), id(255, 255)];
    assert.deepEqual(sortedIdsSince(Buffer.concat([a, c, e, f]), Buffer.concat([b, c, d, f])), { missing: 2, firstMissing: hex(a), unlisted: [b, d].map(hex) });
    assert.deepEqual(sortedIdsSince(Buffer.concat([a, b]), Buffer.concat([a, b])), { missing: 0, firstMissing: undefined, unlisted: [] });
    assert.deepEqual(sortedIdsSince(Buffer.alloc(0), Buffer.concat([a, f])), { missing: 0, firstMissing: undefined, unlisted: [a, f].map(hex) });
    assert.deepEqual(sortedIdsSince(Buffer.concat([b, d]), Buffer.alloc(0)), { missing: 2, firstMissing: hex(b), unlisted: [] });
    // ids that differ only in their last four bytes
    assert.deepEqual(sortedIdsSince(Buffer.concat([b]), Buffer.concat([b, c])), { missing: 0, firstMissing: undefined, unlisted: [hex(c)] });
  });
  it('refuses a last index that is not strictly ascending, where a merge would call a listed id unlisted', () => {
    const [a, b, c] = [id(1, 0), id(2, 0), id(3, 0)];
    assert.equal(sortedIdsSince(Buffer.concat([a, b]), Buffer.concat([a, a, b])), null, 'a repeated id');
    assert.equal(sortedIdsSince(Buffer.concat([a, b, c]), Buffer.concat([a, c, b])), null, 'two ids swapped');
    assert.equal(sortedIdsSince(Buffer.concat([a]), Buffer.concat([a, c, b])), null, 'out of order after the last new id');
  });
});

describe('commit reads only the object directories that changed since the last commit (objects-state)', () => {
  const objects = (from: number, n: number): string[] => Array.from({ length: n }, (_, i) => idOf(Buffer.from(`object ${from + i}`)));
  const prefixes = (ids: readonly string[]): number => new Set(ids.map((id) => id.slice(0, 2))).size;
  /** A storage with 300 objects committed twice, 30 ms apart: every directory's stamp is recorded. */
  async function committed(name: string) {
    const dir = join(await tempDir(name), 'repo');
    const storage = new LocalDirStorage(dir, { clock: () => T0 });
    await storage.init(CONFIG);
    const ids = objects(0, 300);
    for (const id of ids) await storage.putObject(id, Buffer.from(id));
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    // the directories changed within the recording's tick of the file system's clock are not trusted:
    // the next commit reads them, and records them as they are once that tick is past
    await new Promise((r) => setTimeout(r, 30));
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    const file = (id: string): string => join(dir, 'current', 'objects', id.slice(0, 2), id);
    return { dir, storage, ids, file };
  }
  const dirsRead = async (storage: LocalDirStorage, commit: () => Promise<unknown>): Promise<number> => {
    const before = storage.objectDirsRead;
    await commit();
    return storage.objectDirsRead - before;
  };

  it('reads none when nothing changed, only the new objects\' when some are added, and prunes the dropped ones from the last index', async () => {
    const { dir, storage, ids } = await committed('state-same');
    const state = JSON.parse(await fsp.readFile(join(dir, 'objects-state'), 'utf8')) as { head: string; dirs: (string | null)[] };
    assert.equal(state.head, ids[0]);
    assert.equal(await dirsRead(storage, () => storage.commit(headOf(ids[0]!), indexOf(ids))), 0, 'no directory read');
    const added = objects(1000, 3);
    for (const id of added) await storage.putObject(id, Buffer.from(id));
    const kept = ids.slice(40);
    const n = await dirsRead(storage, () => storage.commit(headOf(ids[100]!), indexOf([...kept, ...added])));
    assert.equal(n, prefixes(added), 'only the directories that the new objects went to');
    assert.deepEqual(await collect(storage), [...kept, ...added].sort(), 'the dropped objects pruned, the new ones kept');
    // without the file (or with one of another head), every directory is read
    await new Promise((r) => setTimeout(r, 30));
    await fsp.rm(join(dir, 'objects-state'));
    assert.equal(await dirsRead(storage, () => storage.commit(headOf(ids[100]!), indexOf([...kept, ...added]))), 256);
  });

  it('still finds an object removed and one added from outside since (their directories changed)', async () => {
    const { storage, ids, file } = await committed('state-outside');
    await fsp.rm(file(ids[7]!));
    await rejectsWith(storage.commit(headOf(ids[0]!), indexOf(ids)), 'integrity', new RegExp(`${ids[7]!}.*missing`));
    await storage.putObject(ids[7]!, Buffer.from(ids[7]!));
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    // an object no index lists, written by something else than a commit's session
    const stray = objects(2000, 1)[0]!;
    await fsp.mkdir(join(file(stray), '..'), { recursive: true });
    await fsp.writeFile(file(stray), 'stray', { mode: 0o400 });
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    assert.deepEqual(await collect(storage), [...ids].sort(), 'the stray object pruned');
  });

  it('reads the directories when the last index is damaged (an id repeated, two swapped), and deletes no listed object', async () => {
    const { dir, storage, ids } = await committed('state-damaged');
    const indexPath = join(dir, 'current', 'index');
    const sorted = [...ids].sort();
    // two ids of one prefix next to each other
    const at = sorted.findIndex((id, i) => i > 0 && id.slice(0, 2) === sorted[i - 1]!.slice(0, 2));
    const damage = async (bytes: Buffer): Promise<void> => {
      // in place (same inode), and objects-state made to name the damaged file, as if it were the last commit's
      await fsp.chmod(indexPath, 0o600);
      await fsp.writeFile(indexPath, bytes);
      const st = await fsp.lstat(indexPath, { bigint: true });
      const statePath = join(dir, 'objects-state');
      const state = JSON.parse(await fsp.readFile(statePath, 'utf8')) as Record<string, unknown>;
      state['index'] = `${st.ino}:${st.size}:${st.ctimeNs}`;
      await fsp.writeFile(statePath, JSON.stringify(state));
    };
    const repeated = [...sorted];
    repeated[at] = repeated[at - 1]!; // the id at `at` disappears, the one before it is listed twice
    await damage(Buffer.concat(repeated.map((id) => Buffer.from(id, 'hex'))));
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    assert.deepEqual(await collect(storage), [...ids].sort(), 'no listed object deleted');
    await new Promise((r) => setTimeout(r, 30));
    await storage.commit(headOf(ids[0]!), indexOf(ids));
    const swapped = [...sorted];
    [swapped[at - 1], swapped[at]] = [swapped[at]!, swapped[at - 1]!];
    await damage(Buffer.concat(swapped.map((id) => Buffer.from(id, 'hex'))));
    const n = await dirsRead(storage, () => storage.commit(headOf(ids[0]!), indexOf(ids)));
    assert.equal(n, 256, 'the commit went back to reading every directory, and was not refused');
    assert.deepEqual(await collect(storage), [...ids].sort());
  });
});

describe('ReadAheadGate', () => {
  it('reads ahead for a while once timed reads waited long on average while blocks came from a disk', () => {
    let blocks = 0;
    const gate = new ReadAheadGate(() => blocks);
    /** 512 synchronous reads (one measurement), of which the timed ones waited waitUs (and read a block when fromDisk). */
    const reads = (waitUs: number, fromDisk: boolean) => {
      for (let i = 0; i < 512; i++) {
        if (!gate.timing()) continue;
        if (fromDisk) blocks++;
        gate.waited(waitUs);
      }
    };
    reads(5_000, false); // long waits without reads from a disk (a busy machine): one by one
    assert.equal(gate.take(256), false);
    reads(40, true); // reads from a disk that hardly wait: one by one
    assert.equal(gate.take(256), false);
    reads(2_000, true); // reads that wait for a disk: the next 4096 objects are read ahead
    for (let i = 0; i < 16; i++) assert.equal(gate.take(256), true);
    assert.equal(gate.take(256), false, 'then reads are measured again');
  });
});
