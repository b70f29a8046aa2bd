/**
 * The server's upload limits (src/server/limits.ts) and the usage ledger they rest on
 * (DirStorage.currentBytes): counted bytes equal a walk of current through puts, prunes and new
 * sessions; a quota or free-space floor stops an upload over the real protocol loop with a clear
 * error, nothing is committed, and the next session resumes once there is room. The same limits over
 * a real sshd and the CLI are in test/office.test.ts.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { isSnapError } from '../src/core/errors.js';
import { parseSize } from '../src/core/size.js';
import { LocalDirStorage, objectBytesOf, readUsageLedger } from '../src/drivers/localdir.js';
import { parseServerPolicy } from '../src/server/policy.js';
import type { UploadLimits } from '../src/server/limits.js';
import { tempDir } from './env.js';
import { inProcessRemote } from './in-process-remote.js';

const KiB = 1024;
const idOf = (data: Buffer) => createHash('sha256').update(data).digest('hex');
const indexOf = (ids: Iterable<string>) => Buffer.concat([...new Set(ids)].sort().map((id) => Buffer.from(id, 'hex')));
const headOf = (id: string) => Buffer.from(`${id}\n`);
const blobs = (n: number, size: number) => Array.from({ length: n }, () => randomBytes(size));

async function area(): Promise<{ dir: string; current: string; open: () => LocalDirStorage }> {
  const dir = await tempDir('limits');
  const open = () => new LocalDirStorage(dir);
  await open().init(Buffer.from('config\n'));
  return { dir, current: join(dir, 'current'), open };
}

describe('usage ledger', () => {
  it('counts what is put and pruned, equals a walk, and survives sessions only when valid', async () => {
    const a = await area();
    const s1 = a.open();
    assert.equal(await s1.currentBytes(), 0);
    const first = blobs(5, 10 * KiB);
    for (const b of first) await s1.putObject(idOf(b), b);
    await s1.putObject(idOf(first[0]!), first[0]!); // an existing id is a no-op and not counted again
    assert.equal(await s1.currentBytes(), 50 * KiB);
    assert.equal(await objectBytesOf(a.current), 50 * KiB);
    // commit keeps three of the five: two are pruned
    const kept = first.slice(0, 3).map(idOf);
    await s1.commit(headOf(kept[0]!), indexOf(kept));
    assert.equal(await s1.currentBytes(), 30 * KiB);
    assert.equal(await objectBytesOf(a.current), 30 * KiB);
    assert.equal(await readUsageLedger(a.dir, a.current), 30 * KiB, 'the commit wrote the ledger');

    // the next session starts from the ledger (proved by a ledger that is deliberately off by one)
    const ledger = join(a.dir, 'usage');
    const saved = JSON.parse(await fsp.readFile(ledger, 'utf8')) as { objectBytes: number };
    await fsp.writeFile(ledger, JSON.stringify({ ...saved, objectBytes: saved.objectBytes + 1 }));
    assert.equal(await a.open().currentBytes(), 30 * KiB + 1);
    await fsp.writeFile(ledger, JSON.stringify(saved));

    // a session that writes and dies before its commit leaves no ledger: the next one walks
    const s2 = a.open();
    const more = blobs(2, 7 * KiB);
    await s2.putObject(idOf(more[0]!), more[0]!);
    assert.equal(await readUsageLedger(a.dir, a.current), null, 'the first write of a session removes the ledger');
    const s3 = a.open();
    assert.equal(await s3.currentBytes(), 37 * KiB, 'counted by a walk');
    await s3.putObject(idOf(more[1]!), more[1]!);
    const all = [...kept, ...more.map(idOf)];
    await s3.commit(headOf(all[0]!), indexOf(all));
    assert.equal(await readUsageLedger(a.dir, a.current), 44 * KiB);
    assert.equal(await objectBytesOf(a.current), 44 * KiB);

    // a ledger of another head is not believed
    await fsp.writeFile(ledger, JSON.stringify({ ...saved, head: 'ab'.repeat(32) }));
    assert.equal(await readUsageLedger(a.dir, a.current), null);
  });

  it('a commit that prunes many objects at once counts each one (the deletions run side by side)', async () => {
    const a = await area();
    const s = a.open();
    await s.currentBytes();
    // 60 objects of 60 different sizes; the commit keeps 7 of them and deletes the other 53
    const data = Array.from({ length: 60 }, (_, i) => randomBytes(KiB + 17 * i));
    for (const b of data) await s.putObject(idOf(b), b);
    const kept = data.filter((_, i) => i % 9 === 0);
    const keptIds = kept.map(idOf);
    await s.commit(headOf(keptIds[0]!), indexOf(keptIds));
    const expected = kept.reduce((n, b) => n + b.length, 0);
    assert.equal(await objectBytesOf(a.current), expected, 'the unlisted objects are gone');
    assert.equal(await s.currentBytes(), expected);
    assert.equal(await readUsageLedger(a.dir, a.current), expected);
  });

  it('a session whose objects were written by workers (directWriter) writes no ledger', async () => {
    const a = await area();
    const s = a.open();
    await s.currentBytes();
    await s.directWriter();
    await assert.rejects(s.currentBytes(), /directWriter/);
    const b = randomBytes(KiB);
    await s.putObject(idOf(b), b);
    await s.commit(headOf(idOf(b)), indexOf([idOf(b)]));
    assert.equal(await readUsageLedger(a.dir, a.current), null);
  });
});

describe('the commit\'s reading of the object directories', () => {
  it('a directory that cannot be read fails the commit with an I/O error', async () => {
    const a = await area();
    const s = a.open();
    const b = randomBytes(KiB);
    await s.putObject(idOf(b), b);
    // a file where prefix 05's directory belongs cannot be read as one
    const bad = join(a.current, 'objects', '05');
    await fsp.rm(bad, { recursive: true, force: true });
    await fsp.writeFile(bad, 'not a directory');
    await assert.rejects(s.commit(headOf(idOf(b)), indexOf([idOf(b)])), (err: unknown) => isSnapError(err, 'io') && /ENOTDIR/.test(String(err)));
    assert.equal(await fsp.readFile(join(a.current, 'head'), 'utf8').catch(() => null), null, 'nothing was committed');
  });
});

describe('upload limits over the protocol loop', () => {
  const limits = (over: Partial<UploadLimits>): UploadLimits => ({ label: 'the backup area of alice', quotaBytes: null, freeSpaceFloor: null, ...over });

  it('a quota stops the upload with a clear error; nothing is committed; a higher quota resumes it', async () => {
    const a = await area();
    const data = blobs(10, 100 * KiB);
    const ids = data.map(idOf);
    {
      const { remote } = await inProcessRemote(a.open(), 'ssh://alice@server', { limits: limits({ quotaBytes: 450 * KiB }) });
      let stored = 0;
      let error: unknown;
      for (const [i, b] of data.entries()) {
        try {
          await remote.putObject(ids[i]!, b);
          stored++;
        } catch (err) {
          error = err;
          break;
        }
      }
      assert.equal(stored, 4, 'four objects of 100 KiB fit in 450 KiB, the fifth does not');
      assert.ok(isSnapError(error, 'io'), String(error));
      assert.match((error as Error).message, /^ssh:\/\/alice@server: The backup area of alice is full: 400\.0 KiB of its quota of 450\.0 KiB are used; nothing was committed, earlier snapshots are intact$/);
      assert.match((error as { hint?: string }).hint ?? '', /raise the quota/);
      await remote.close();
    }
    assert.deepEqual(await a.open().listSnapshots(), [], 'no snapshot');
    assert.equal(await objectBytesOf(a.current), 400 * KiB, 'what arrived stays, for the next run');
    {
      const { remote } = await inProcessRemote(a.open(), 'ssh://alice@server', { limits: limits({ quotaBytes: parseSize('1MiB') }) });
      for (const [i, b] of data.entries()) await remote.putObject(ids[i]!, b);
      const snap = await remote.commit(headOf(ids[0]!), indexOf(ids));
      assert.ok(snap.name);
      await remote.close();
    }
    assert.equal(await readUsageLedger(a.dir, a.current), 1000 * KiB);
    // the quota counts current only: a smaller next backup fits again once the old objects are pruned
    {
      const { remote } = await inProcessRemote(a.open(), 'ssh://alice@server', { limits: limits({ quotaBytes: 1000 * KiB + 50 * KiB }) });
      const extra = randomBytes(100 * KiB);
      await assert.rejects(remote.putObject(idOf(extra), extra), /is full/);
      await remote.commit(headOf(ids[0]!), indexOf(ids.slice(0, 5)));
      await remote.putObject(idOf(extra), extra);
      await remote.close();
    }
  });

  it('a free-space floor refuses uploads before the disk is full', async () => {
    const a = await area();
    const st = await fsp.statfs(a.current);
    const free = st.bavail * st.bsize;
    const b = randomBytes(KiB);
    for (const floor of [{ bytes: free + 1024 ** 3 }, { percent: 99.99 }]) {
      const { remote } = await inProcessRemote(a.open(), 'ssh://alice@server', { limits: limits({ freeSpaceFloor: floor }) });
      await assert.rejects(remote.putObject(idOf(b), b), (err: unknown) => {
        assert.ok(isSnapError(err, 'io'), String(err));
        assert.match(err.message, /^ssh:\/\/alice@server: The backup server's disk is too full to accept uploads: .* free, and the administrator keeps at least .*; nothing was committed, earlier snapshots are intact$/);
        return true;
      });
      await remote.close();
    }
    assert.equal(await objectBytesOf(a.current), 0, 'nothing was stored');
    const { remote } = await inProcessRemote(a.open(), 'ssh://alice@server', { limits: limits({ freeSpaceFloor: { bytes: Math.max(0, free - 1024 ** 3) } }) });
    await remote.putObject(idOf(b), b);
    await remote.close();
    assert.equal(await objectBytesOf(a.current), KiB);
  });

  it('policy.json: quota, freeSpaceFloor and alert are parsed strictly', () => {
    const p = parseServerPolicy(
      JSON.stringify({ quota: { default: '200GiB', users: { alice: '1TB', bob: 'none' } }, freeSpaceFloor: '5%', alert: { command: ['/usr/sbin/sendmail', 'root'] } }),
      'policy.json',
    );
    assert.deepEqual(p.quota, { default: 200 * 1024 ** 3, users: { alice: 1e12, bob: null } });
    assert.deepEqual(p.freeSpaceFloor, { percent: 5 });
    assert.deepEqual(p.alert, { command: ['/usr/sbin/sendmail', 'root'] });
    assert.deepEqual(parseServerPolicy('{"freeSpaceFloor": "20GiB"}', 'f').freeSpaceFloor, { bytes: 20 * 1024 ** 3 });
    for (const [text, message] of [
      ['{"quota": {"default": "200G"}}', /f: quota\.default: Invalid size "200G"/],
      ['{"quota": {"default": "0"}}', /quota\.default must be more than 0/],
      ['{"quota": {"users": {"Alice": "1GiB"}}}', /invalid user name "Alice"/],
      ['{"freeSpaceFloor": "100%"}', /under 100%/],
      ['{"alert": {"command": "sendmail root"}}', /alert\.command must be a non-empty list/],
      ['{"alert": {"command": ["sendmail"]}}', /must be an absolute path/],
      ['{"quotas": {}}', /unknown key "quotas"/],
    ] as const) {
      assert.throws(() => parseServerPolicy(text, 'f'), (err: unknown) => isSnapError(err, 'usage') && message.test(err.message), text);
    }
  });
});
