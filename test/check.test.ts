/**
 * `snapcrypt-server check` on real btrfs, through the compiled program: synthetic areas (objects of
 * random bytes under objects/xx/<id>, a sorted index, a head) in users/<user>/current/repo, sealed with
 * `btrfs subvolume snapshot -r` into snapshots/<user>/<time>. A good history with pruned objects; each
 * kind of damage in a snapshot of its own; --read-data reading each shared file once; the check run as
 * the user; and unknown users. Needs root and btrfs: in CI it never skips.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { btrfsTempDir, btrfsTestDir } from './env.js';
import { as, SERVER_PROGRAM, server } from './server-fixture.js';

const CI = process.env['CI'] === 'true';
const isRoot = process.getuid?.() === 0;
const haveBtrfs = btrfsTestDir() !== null; // throws in CI without btrfs
if (CI && !isRoot) throw new Error('CI must run test/check as root');
const skip = !isRoot || !haveBtrfs ? 'needs root and SNAPCRYPT_TEST_BTRFS' : false;

type Row = Record<string, unknown>;
const jsonLines = (stdout: string): Row[] => stdout.trim().split('\n').map((l) => JSON.parse(l) as Row);
const newId = () => randomBytes(32).toString('hex');
const objectPath = (repo: string, id: string) => join(repo, 'objects', id.slice(0, 2), id);
const re = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

describe('snapcrypt-server check on btrfs', { skip }, () => {
  let top = '';
  let etc = '';
  let root = '';
  /** Snapshot names by user, oldest first. */
  const names: Record<string, string[]> = {};
  /** alice's object ids as of each snapshot. */
  const aliceIds: string[][] = [];
  let nobodyUid = 0;
  let nobodyGid = 0;
  let clock = Date.parse('2026-03-01T09:15:00.000Z');

  const repoOf = (user: string) => join(root, 'users', user, 'current', 'repo');
  const snapRepo = (user: string, name: string) => join(root, 'snapshots', user, name, 'repo');

  /** users/<user>/current (a subvolume, root:group 0750) with an empty repo (owner 0700); snapshots/<user> root:group 0750. */
  async function area(user: string, owner = 0, group = 0): Promise<void> {
    await fsp.mkdir(join(root, 'users', user), { recursive: true });
    const current = join(root, 'users', user, 'current');
    execFileSync('btrfs', ['subvolume', 'create', current], { stdio: 'ignore' });
    await fsp.chown(current, 0, group);
    await fsp.chmod(current, 0o750);
    const repo = repoOf(user);
    await fsp.mkdir(join(repo, 'keys'), { recursive: true, mode: 0o700 });
    await fsp.mkdir(join(repo, 'objects'), { mode: 0o700 });
    await fsp.writeFile(join(repo, 'config'), randomBytes(300));
    const dir = join(root, 'snapshots', user);
    await fsp.mkdir(dir, { recursive: true });
    await fsp.chown(dir, 0, group);
    await fsp.chmod(dir, 0o750);
    execFileSync('chown', ['-R', `${owner}:${group}`, repo]);
    names[user] = [];
  }

  /** Adds n objects of 16-80 random bytes to the user's current; returns their ids. */
  async function put(user: string, n: number, owner = 0, group = 0): Promise<string[]> {
    const ids = Array.from({ length: n }, newId);
    for (const id of ids) {
      const path = objectPath(repoOf(user), id);
      await fsp.mkdir(join(path, '..'), { recursive: true, mode: 0o700 });
      await fsp.writeFile(path, randomBytes(16 + (id.charCodeAt(5) % 64)), { mode: 0o400 });
      if (owner !== 0 || group !== 0) {
        await fsp.chown(join(path, '..'), owner, group);
        await fsp.chown(path, owner, group);
      }
    }
    return ids;
  }

  /** The sorted index of ids and a head naming head, as a commit writes them. */
  async function commit(user: string, ids: readonly string[], head = ids[0]!): Promise<void> {
    const sorted = [...ids].sort();
    await fsp.writeFile(join(repoOf(user), 'index'), Buffer.concat(sorted.map((id) => Buffer.from(id, 'hex'))));
    await fsp.writeFile(join(repoOf(user), 'head'), `${head}\n`);
  }

  /** A read-only snapshot of the user's current, named by the next minute. */
  function seal(user: string): string {
    clock += 60_000;
    const name = new Date(clock).toISOString();
    execFileSync('btrfs', ['subvolume', 'snapshot', '-r', join(root, 'users', user, 'current'), join(root, 'snapshots', user, name)], { stdio: 'ignore' });
    names[user]!.push(name);
    return name;
  }

  /** Every path under dir with what a write would change (not the access time). */
  async function fingerprint(dir: string): Promise<string[]> {
    const out: string[] = [];
    for (const name of (await fsp.readdir(dir, { recursive: true })).sort()) {
      const st = await fsp.lstat(join(dir, name));
      out.push(`${name} ${st.mode} ${st.uid} ${st.size} ${st.mtimeMs} ${st.ctimeMs}`);
    }
    return out;
  }

  before(async () => {
    const dir = await btrfsTempDir('check');
    assert.ok(dir);
    top = dir;
    await fsp.chmod(top, 0o711); // the user's run below must reach its own part
    etc = join(top, 'etc');
    root = join(top, 'srv');
    await fsp.mkdir(join(etc, 'snapcrypt'), { recursive: true, mode: 0o755 });
    await fsp.chmod(etc, 0o755);
    await fsp.writeFile(
      join(etc, 'snapcrypt', 'server.json'),
      JSON.stringify({ version: 1, root, group: 'snapcrypt', seal: '/usr/local/lib/snapcrypt/seal', serve: 'snapcrypt-server serve', homeBase: join(top, 'home') }),
      { mode: 0o644 },
    );
    for (const sub of ['users', 'snapshots']) await fsp.mkdir(join(root, sub), { recursive: true, mode: 0o711 });
    await fsp.chmod(root, 0o755);

    // alice: three backups; each later one drops objects that are then only in earlier snapshots.
    // 9000 ids make an index larger than one 256 KiB read.
    await area('alice');
    let ids = await put('alice', 9000);
    await commit('alice', ids);
    seal('alice');
    aliceIds.push(ids);
    for (const [added, dropped] of [[100, 50], [10, 20]] as const) {
      const gone = ids.slice(0, dropped);
      ids = [...ids.slice(dropped), ...(await put('alice', added))];
      for (const id of gone) await fsp.rm(objectPath(repoOf('alice'), id));
      await commit('alice', ids);
      seal('alice');
      aliceIds.push(ids);
    }
  });

  it('a good history: every snapshot and current whole, with exact counts; objects pruned from current stay in their snapshots', async () => {
    const pruned = aliceIds[0]![0]!;
    await assert.rejects(fsp.access(objectPath(repoOf('alice'), pruned)), 'pruned from current');
    await fsp.access(objectPath(snapRepo('alice', names['alice']![0]!), pruned));

    const r = await server('check', '--etc', etc, '--user', 'alice', '--json');
    assert.equal(r.code, 0, r.stderr);
    const rows = jsonLines(r.stdout);
    assert.deepEqual(rows.map((x) => [x['type'], x['name'] ?? null, x['objects'], x['checked'] ?? null, x['missing'], x['unreadable'], x['index'] ?? null]), [
      ['snapshot', names['alice']![0], 9000, true, 0, 0, []],
      ['snapshot', names['alice']![1], 9050, true, 0, 0, []],
      ['snapshot', names['alice']![2], 9040, true, 0, 0, []],
      ['snapshot', 'current', 9040, true, 0, 0, []],
      ['summary', null, 9000 + 9050 + 9040 + 9040, null, 0, 0, null],
    ]);
    assert.equal(rows[0]!['path'], snapRepo('alice', names['alice']![0]!));
    assert.deepEqual(rows[4], { type: 'summary', user: 'alice', snapshots: 3, current: true, objects: 36130, missing: 0, unreadable: 0, badIndexes: 0, read: 0, bytesRead: 0, shared: 0, ok: true });

    const human = await server('check', '--etc', etc, '--user', 'alice');
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /^alice: 3 snapshots and current, 36130 objects listed, all present$/m);
    assert.match(human.stdout, new RegExp(`^  ${re(names['alice']![1]!)}  9050 objects  ok$`, 'm'));
    assert.match(human.stdout, /^  current +9040 objects  ok$/m);
  });

  it('--read-data reads every object once: a file a later snapshot (or current) shares is not read again', async () => {
    const r = await server('check', '--etc', etc, '--user', 'alice', '--read-data', '--json');
    assert.equal(r.code, 0, r.stderr);
    const rows = jsonLines(r.stdout);
    assert.deepEqual(rows.slice(0, 4).map((x) => [x['read'], x['shared']]), [
      [9000, 0],
      [100, 8950],
      [10, 9030],
      [0, 9040],
    ]);
    let bytes = 0;
    for (const id of aliceIds[0]!) bytes += (await fsp.stat(objectPath(snapRepo('alice', names['alice']![0]!), id))).size;
    assert.equal(rows[0]!['bytesRead'], bytes);
    assert.equal(rows[4]!['ok'], true);
    const human = await server('check', '--etc', etc, '--user', 'alice', '--read-data');
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /^alice: 3 snapshots and current, 36130 objects listed, all present and readable; 9110 read \(\d+\.\d MiB\), 27020 shared with an earlier snapshot$/m);
  });

  describe('damage', () => {
    const good: string[] = [];
    /** The snapshot name of each kind of damage, and the id it concerns. */
    const bad: Record<string, { name: string; id: string }> = {};

    before(async () => {
      await area('bob');
      good.push(...(await put('bob', 30)));
      const repo = repoOf('bob');
      await commit('bob', good);
      seal('bob');
      const content = async (id: string) => fsp.readFile(objectPath(repo, id));
      /** Seals a current damaged by harm, then repairs it with undo. */
      const damaged = async (kind: string, id: string, harm: () => Promise<void>, undo: () => Promise<void>) => {
        await harm();
        bad[kind] = { name: seal('bob'), id };
        await undo();
      };
      const [m, e, d] = [good[3]!, good[17]!, good[25]!];
      const [mData, eData, dData] = [await content(m), await content(e), await content(d)];
      // a current lacking an object its index lists: the snapshot is made from it as it is
      await damaged('missing', m, () => fsp.rm(objectPath(repo, m)), () => fsp.writeFile(objectPath(repo, m), mData));
      await damaged('empty', e, () => fsp.truncate(objectPath(repo, e), 0), () => fsp.writeFile(objectPath(repo, e), eData));
      await damaged('directory', d, async () => {
        await fsp.rm(objectPath(repo, d));
        await fsp.mkdir(objectPath(repo, d));
      }, async () => {
        await fsp.rmdir(objectPath(repo, d));
        await fsp.writeFile(objectPath(repo, d), dData);
      });
      const index = await fsp.readFile(join(repo, 'index'));
      const restore = () => fsp.writeFile(join(repo, 'index'), index);
      await damaged('length', '', () => fsp.appendFile(join(repo, 'index'), Buffer.alloc(5)), restore);
      const swapped = Buffer.concat([index.subarray(32, 64), index.subarray(0, 32), index.subarray(64)]);
      await damaged('order', '', () => fsp.writeFile(join(repo, 'index'), swapped), restore);
      const stranger = newId();
      await damaged('head', stranger, () => fsp.writeFile(join(repo, 'head'), `${stranger}\n`), () => commit('bob', good));
      seal('bob');
    });

    it('each kind of damage is named in its snapshot, every snapshot is checked, and exit status is 6', async () => {
      const before = await fingerprint(root);
      const r = await server('check', '--etc', etc, '--user', 'bob', '--json');
      assert.equal(r.code, 6, r.stderr);
      assert.equal(r.stderr, '');
      const rows = jsonLines(r.stdout);
      const of = (name: string) => rows.find((x) => x['name'] === name)!;
      const problem = (kind: string, what: string) => [{ id: bad[kind]!.id, path: objectPath(snapRepo('bob', bad[kind]!.name), bad[kind]!.id), problem: what }];
      assert.deepEqual(rows.map((x) => x['name'] ?? x['type']), [...names['bob']!, 'current', 'summary']);
      assert.deepEqual([of(bad['missing']!.name)['missing'], of(bad['missing']!.name)['unreadable'], of(bad['missing']!.name)['problems']], [1, 0, problem('missing', 'missing')]);
      assert.deepEqual([of(bad['empty']!.name)['missing'], of(bad['empty']!.name)['unreadable'], of(bad['empty']!.name)['problems']], [0, 1, problem('empty', 'empty')]);
      assert.deepEqual(of(bad['directory']!.name)['problems'], problem('directory', 'not a regular file'));
      assert.deepEqual(of(bad['length']!.name)['index'], ['the index of 965 bytes is not a whole number of 32-byte ids']);
      assert.deepEqual([of(bad['length']!.name)['objects'], of(bad['length']!.name)['checked'], of(bad['length']!.name)['missing']], [30, true, 0]);
      assert.deepEqual(of(bad['order']!.name)['index'], ['the index is not sorted strictly ascending at entry 1; its objects were not checked']);
      assert.equal(of(bad['order']!.name)['checked'], false);
      assert.deepEqual(of(bad['head']!.name)['index'], [`the head object ${bad['head']!.id} is not listed in the index`]);
      for (const name of [names['bob']![0]!, names['bob']!.at(-1)!, 'current']) {
        assert.deepEqual([of(name)['objects'], of(name)['missing'], of(name)['unreadable'], of(name)['index']], [30, 0, 0, []], name);
      }
      assert.deepEqual(rows.at(-1), { type: 'summary', user: 'bob', snapshots: 8, current: true, objects: 270, missing: 1, unreadable: 2, badIndexes: 3, read: 0, bytesRead: 0, shared: 0, ok: false });
      assert.deepEqual(await fingerprint(root), before, 'the check changes nothing');

      const human = await server('check', '--etc', etc, '--user', 'bob');
      assert.equal(human.code, 6, human.stderr);
      assert.match(human.stdout, /^bob: 8 snapshots and current, 270 objects listed, 1 missing, 2 unreadable, 3 with a bad index or head$/m);
      assert.match(human.stdout, new RegExp(`^  ${re(bad['missing']!.name)}  30 objects  1 missing\\n    missing  ${re(problem('missing', '')[0]!.path)}$`, 'm'));
      assert.match(human.stdout, new RegExp(`^  ${re(bad['order']!.name)}  30 objects  the index is not sorted`, 'm'));
    });

    it('--read-data on damaged snapshots: the same problems, and the good files read once', async () => {
      const r = await server('check', '--etc', etc, '--user', 'bob', '--read-data', '--json');
      assert.equal(r.code, 6, r.stderr);
      const rows = jsonLines(r.stdout);
      assert.deepEqual(rows.map((x) => [x['missing'], x['unreadable']]), [[0, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [1, 2]]);
      // the first snapshot reads all 30; the missing/empty/directory cases were rewritten in current
      // (new files) after their damage, so the snapshots after each read that one file again
      assert.deepEqual(rows.slice(0, 9).map((x) => x['read']), [30, 0, 1, 1, 1, 0, 0, 0, 0]);
      assert.equal(rows[9]!['read'], 33);
    });

    it('all users at once: a damaged user does not stop the check of the others', async () => {
      const r = await server('check', '--etc', etc, '--json');
      assert.equal(r.code, 6, r.stderr);
      const summaries = jsonLines(r.stdout).filter((x) => x['type'] === 'summary');
      assert.deepEqual(summaries.map((x) => [x['user'], x['ok']]), [['alice', true], ['bob', false]]);
    });
  });

  it('as the user: their own snapshots with --user (an object they cannot open is unreadable); others are refused, exit 9', async () => {
    nobodyUid = Number(execFileSync('id', ['-u', 'nobody'], { encoding: 'utf8' }));
    nobodyGid = Number(execFileSync('id', ['-g', 'nobody'], { encoding: 'utf8' }));
    await area('nobody', nobodyUid, nobodyGid);
    const ids = await put('nobody', 12, nobodyUid, nobodyGid);
    await fsp.chown(objectPath(repoOf('nobody'), ids[4]!), 0, 0); // root's, 0400: nobody cannot open it
    await commit('nobody', ids);
    execFileSync('chown', [`${nobodyUid}:${nobodyGid}`, join(repoOf('nobody'), 'index'), join(repoOf('nobody'), 'head')]);
    seal('nobody');
    const check = (...args: string[]) => as('nobody', process.execPath, SERVER_PROGRAM, 'check', '--etc', etc, ...args);

    const plain = await check('--user', 'nobody');
    assert.equal(plain.code, 0, plain.stderr + plain.stdout);
    assert.match(plain.stdout, /^nobody: 1 snapshot and current, 24 objects listed, all present$/m);
    const read = await check('--user', 'nobody', '--read-data', '--json');
    assert.equal(read.code, 6, read.stderr);
    const rows = jsonLines(read.stdout);
    const path = objectPath(snapRepo('nobody', names['nobody']![0]!), ids[4]!);
    assert.deepEqual(rows[0]!['problems'], [{ id: ids[4], path, problem: 'unreadable (EACCES)' }]);
    assert.deepEqual(rows.map((x) => [x['read'], x['unreadable']]), [[11, 1], [0, 1], [11, 2]]);

    const other = await check('--user', 'alice');
    assert.equal(other.code, 9, other.stderr);
    assert.match(other.stderr, /^snapcrypt-server: Cannot read .*\/snapshots\/alice: permission denied; run the check as root, or as alice with --user alice\n$/);
    const all = await check();
    assert.equal(all.code, 9, all.stderr);
    assert.match(all.stderr, /Cannot list .*\/snapshots: .*; run it as root, or check your own snapshots with --user NAME\n$/);
  });

  it('an unknown user is not found (exit 7); a bad name or option is a usage error (exit 2)', async () => {
    const unknown = await server('check', '--etc', etc, '--user', 'nobody-here');
    assert.equal(unknown.code, 7, unknown.stderr);
    assert.match(unknown.stderr, /^snapcrypt-server: No user nobody-here on this server \(neither .*\/snapshots\/nobody-here nor .*\/users\/nobody-here\/current\/repo\/index exists\)\n$/);
    for (const args of [['--user', '../alice'], ['--read-date']]) {
      const r = await server('check', '--etc', etc, ...args);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    }
  });
});
