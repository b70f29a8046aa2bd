/**
 * `snapcrypt-server expire` on real btrfs: read-only snapshots named by (synthetic) server times, a
 * policy.json with a default and per-user policies; --dry-run deletes nothing; a real run deletes
 * exactly what the policy does not keep, as root, leaves the kept snapshots intact, and gives the space
 * back, and rewrites the metrics files; and `status` on the same snapshots. Needs root and btrfs: in
 * CI it never skips.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { btrfsTestDir } from './env.js';
import { readMetrics } from './metrics-format.js';
import { handWrittenServer, server } from './server-fixture.js';

const CI = process.env['CI'] === 'true';
const isRoot = process.getuid?.() === 0;
const haveBtrfs = btrfsTestDir() !== null; // throws in CI without btrfs
if (CI && !isRoot) throw new Error('CI must run test/expire as root');
const skip = !isRoot || !haveBtrfs ? 'needs root and SNAPCRYPT_TEST_BTRFS' : false;
const MiB = 1024 * 1024;
const D = 86_400_000;

describe('snapcrypt-server expire and status on btrfs', { skip }, () => {
  let top = '';
  let etc = '';
  let root = '';
  let metrics = '';
  /** The content each snapshot was taken with, by user and name. */
  const content = new Map<string, Buffer>();
  const names: Record<string, string[]> = {};

  /** Ten daily snapshots of a subvolume whose one file (4 MiB, new each day) is then only in its snapshot. */
  async function snapshots(user: string): Promise<void> {
    const current = join(root, 'users', user, 'current');
    await fsp.mkdir(join(root, 'users', user), { recursive: true });
    execFileSync('btrfs', ['subvolume', 'create', current], { stdio: 'ignore' });
    const dir = join(root, 'snapshots', user);
    await fsp.mkdir(dir, { recursive: true });
    names[user] = [];
    for (let i = 0; i < 10; i++) {
      const name = new Date(Date.parse('2026-03-01T09:15:00.000Z') + i * D).toISOString();
      const data = randomBytes(4 * MiB);
      await fsp.writeFile(join(current, 'data'), data);
      execFileSync('btrfs', ['subvolume', 'snapshot', '-r', current, join(dir, name)], { stdio: 'ignore' });
      content.set(`${user}/${name}`, data);
      names[user].push(name);
    }
    await fsp.rm(join(current, 'data'));
  }

  const listed = async (user: string) => (await fsp.readdir(join(root, 'snapshots', user))).sort();
  /** Free bytes once deleted subvolumes are cleaned up and the freed space is committed. */
  const free = async () => {
    execFileSync('btrfs', ['filesystem', 'sync', root]);
    execFileSync('btrfs', ['subvolume', 'sync', root], { stdio: 'ignore', timeout: 120_000 });
    execFileSync('btrfs', ['filesystem', 'sync', root]);
    const st = await fsp.statfs(root);
    return st.bavail * st.bsize;
  };

  before(async () => {
    ({ top, etc, root, metrics } = await handWrittenServer('expire'));
    for (const user of ['alice', 'bob', 'carol', 'dave']) await snapshots(user);
    await fsp.writeFile(
      join(etc, 'snapcrypt', 'policy.json'),
      JSON.stringify({
        retention: { default: { last: 2 }, users: { alice: { daily: 3, within: '1d' }, carol: { last: 0 }, dave: {} } },
        overdue: { users: { dave: '1000d' } },
        quota: { users: { bob: '1GiB' } },
      }),
    );
    // bob's current: one object of 12345 bytes (counted by a walk); carol's: a head and a usage
    // ledger for it, which status believes without walking (its one object is 100 bytes)
    const id = 'ab'.repeat(32);
    for (const user of ['bob', 'carol']) {
      await fsp.mkdir(join(root, 'users', user, 'current', 'repo', 'objects', 'ab'), { recursive: true });
      await fsp.writeFile(join(root, 'users', user, 'current', 'repo', 'objects', 'ab', id), Buffer.alloc(user === 'bob' ? 12345 : 100, 1));
    }
    await fsp.writeFile(join(root, 'users', 'carol', 'current', 'repo', 'head'), `${id}\n`);
    await fsp.mkdir(join(root, 'users', 'carol', 'run'));
    await fsp.writeFile(join(root, 'users', 'carol', 'run', 'usage'), JSON.stringify({ version: 1, head: id, objectBytes: 4321 }));
  });

  it('status: per user the last backup, its age, snapshots and bytes in current; overdue users make exit 3', async () => {
    const r = await server('status', '--etc', etc, '--json');
    assert.equal(r.code, 3, r.stderr);
    const rows = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.deepEqual(rows.map((x) => [x['user'], x['last'], x['snapshots'], x['currentBytes'], x['quotaBytes'], x['overdue']]), [
      ['alice', names['alice']![9], 10, 0, null, true],
      ['bob', names['bob']![9], 10, 12345, 1024 ** 3, true],
      ['carol', names['carol']![9], 10, 4321, null, true],
      ['dave', names['dave']![9], 10, 0, null, false],
    ]);
    const bob = await server('status', '--etc', etc, '--user', 'bob');
    assert.match(bob.stdout, /^bob .* 12\.1 KiB of 1\.0 GiB \(0%\) +OVERDUE/m);
    const age = Number(rows[0]!['ageMs']);
    assert.ok(Math.abs(age - (Date.now() - Date.parse(names['alice']![9]!))) < 60_000, `age ${age}`);
    assert.equal(rows[0]!['overdueAfterMs'], 2 * D, 'the default threshold');
    assert.equal(rows[3]!['overdueAfterMs'], 1000 * D);
    const dave = await server('status', '--etc', etc, '--user', 'dave');
    assert.equal(dave.code, 0, dave.stderr);
    assert.match(dave.stdout, new RegExp(`^dave +${names['dave']![9]!.replace(/\./g, '\\.')} +\\d+d(?:\\d+h)? +10 +0 B +0 B$`, 'm'));
    const human = await server('status', '--etc', etc);
    assert.match(human.stdout, /^bob .* OVERDUE \(no backup for more than 2d\)$/m);
    const nobody = await server('status', '--etc', etc, '--user', 'nobody-here');
    assert.equal(nobody.code, 7, nobody.stderr);
  });

  it('--dry-run shows what it would delete and why it keeps the rest, and deletes nothing', async () => {
    const r = await server('expire', '--dry-run', '--etc', etc, '--json');
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    const alice = lines.filter((l) => l['type'] === 'snapshot' && l['user'] === 'alice');
    assert.deepEqual(alice.filter((l) => l['keep']).map((l) => [l['name'], (l['reasons'] as string[]).join(', ')]), [
      [names['alice']![9], 'newest, daily 1/3, within 1d'],
      [names['alice']![8], 'daily 2/3'],
      [names['alice']![7], 'daily 3/3'],
    ]);
    assert.deepEqual(lines.at(-1), { type: 'summary', dryRun: true, wouldDelete: 7 + 8 + 9 });
    for (const user of ['alice', 'bob', 'carol', 'dave']) assert.equal((await listed(user)).length, 10, user);
    const human = await server('expire', '--dry-run', '--etc', etc, '--user', 'bob');
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /^bob: 2 kept, 8 to delete \(dry run\)$/m);
    assert.match(human.stdout, new RegExp(`^  would delete  ${names['bob']![0]!.replace(/\./g, '\\.')}$`, 'm'));
    assert.deepEqual(await fsp.readdir(metrics), [], 'a dry run writes no metrics');
  });

  it('deletes what the policies do not keep, keeps the newest always, and gives the space back', async () => {
    const before = await free();
    const t0 = Date.now();
    const r = await server('expire', '--etc', etc);
    const t1 = Date.now();
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^alice: 3 kept, 7 deleted$/m);
    assert.deepEqual(await listed('alice'), names['alice']!.slice(7));
    assert.deepEqual(await listed('bob'), names['bob']!.slice(8), 'the default policy: last 2');
    assert.deepEqual(await listed('carol'), names['carol']!.slice(9), 'a policy of zeros keeps the newest');
    assert.deepEqual(await listed('dave'), names['dave'], 'an empty policy keeps everything');
    for (const user of ['alice', 'bob', 'carol', 'dave']) {
      for (const name of await listed(user)) {
        const snap = join(root, 'snapshots', user, name);
        assert.ok((await fsp.readFile(join(snap, 'data'))).equals(content.get(`${user}/${name}`)!), `${user}/${name} intact`);
        assert.match(execFileSync('btrfs', ['property', 'get', '-ts', snap, 'ro'], { encoding: 'utf8' }), /ro=true/);
      }
    }
    let gained = (await free()) - before;
    // the cleaner frees extents in the background after the subvolumes are gone: give it a little time
    for (let i = 0; i < 50 && gained < 0.8 * 24 * 4 * MiB; i++) {
      await new Promise((r) => setTimeout(r, 200));
      gained = (await free()) - before;
    }
    assert.ok(gained >= 0.8 * 24 * 4 * MiB, `space given back: ${(gained / MiB).toFixed(1)} MiB for 24 snapshots of 4 MiB each`);
    // the metrics files: every user's after the deletions, and the run's
    assert.deepEqual((await fsp.readdir(metrics)).sort(), ['snapcrypt_expire.prom', ...['alice', 'bob', 'carol', 'dave'].map((u) => `snapcrypt_user_${u}.prom`)]);
    const expected = { alice: [3, 0, null, 1], bob: [2, 12345, 1024 ** 3, 1], carol: [1, 4321, null, 1], dave: [10, 0, null, 0] } as const;
    for (const [user, [snapshots, bytes, quota, overdue]] of Object.entries(expected)) {
      const m = await readMetrics(join(metrics, `snapcrypt_user_${user}.prom`));
      const l = `{user="${user}"}`;
      assert.deepEqual(m, {
        [`snapcrypt_current_bytes${l}`]: bytes,
        [`snapcrypt_last_backup_timestamp_seconds${l}`]: Date.parse(names[user]![9]!) / 1000,
        [`snapcrypt_overdue${l}`]: overdue,
        [`snapcrypt_overdue_threshold_seconds${l}`]: (user === 'dave' ? 1000 : 2) * 86_400,
        ...(quota === null ? {} : { [`snapcrypt_quota_bytes${l}`]: quota }),
        [`snapcrypt_snapshots${l}`]: snapshots,
      }, user);
    }
    const run = await readMetrics(join(metrics, 'snapcrypt_expire.prom'));
    assert.equal(run['snapcrypt_expire_deleted_snapshots'], 24);
    const at = run['snapcrypt_expire_last_run_timestamp_seconds']! * 1000;
    assert.ok(at >= t0 && at <= t1, `last run ${at} within ${t0}..${t1}`);
    // a second run finds nothing to do
    const again = await server('expire', '--etc', etc, '--json');
    assert.equal(again.code, 0, again.stderr);
    assert.deepEqual(JSON.parse(again.stdout.trim().split('\n').at(-1)!), { type: 'summary', dryRun: false, deleted: 0 });
    assert.equal((await readMetrics(join(metrics, 'snapcrypt_expire.prom')))['snapcrypt_expire_deleted_snapshots'], 0);
  });

  it('a bad policy file or user is refused with one line and changes nothing', async () => {
    const policy = join(etc, 'snapcrypt', 'policy.json');
    const good = await fsp.readFile(policy, 'utf8');
    try {
      for (const [text, message] of [
        ['{"retention": {"users": {"alice": {"dayly": 3}}}}', /retention\.users\.alice: unknown key "dayly"/],
        ['{"retention": {"default": {"last": -1}}}', /"last" must be a whole number/],
        ['{"retention": {"default": {"within": "3 days"}}}', /Invalid duration "3 days"/],
        ['{not json', /is not valid JSON/],
      ] as const) {
        await fsp.writeFile(policy, text);
        const r = await server('expire', '--etc', etc);
        assert.equal(r.code, 2, `${text}: ${r.stderr}`);
        assert.match(r.stderr, message);
        assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      }
    } finally {
      await fsp.writeFile(policy, good);
    }
    const unknown = await server('expire', '--etc', etc, '--user', 'nobody-here');
    assert.equal(unknown.code, 7, unknown.stderr);
    assert.match(unknown.stderr, /No snapshots directory for user nobody-here/);
    assert.deepEqual(await listed('dave'), names['dave']);
  });
});
