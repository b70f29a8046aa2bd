/** I9: the passphrase alone recovers everything, and the workstation keeps its own copy of the key. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { expectExit, jsonLines, makeRepo, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';
import { DirKeyStore } from '../src/drivers/cachedir.js';
import { openStorage } from '../src/drivers/open.js';
import { type EarlyKeys, Repository } from '../src/engine/repository.js';

/** Remove every key file of the repository, in current and in every sealed snapshot. */
function deleteRepoKeys(repo: string): number {
  let n = 0;
  const areas = [path.join(repo, 'current'), ...fs.readdirSync(path.join(repo, 'snapshots')).map((s) => path.join(repo, 'snapshots', s))];
  for (const area of areas) {
    const keys = path.join(area, 'keys');
    fs.chmodSync(area, 0o700);
    fs.chmodSync(keys, 0o700);
    for (const k of fs.readdirSync(keys)) {
      fs.rmSync(path.join(keys, k));
      n++;
    }
  }
  return n;
}

test('the local key copy opens a repository whose key files are gone', async () => {
  const r = await makeRepo();
  const src = await tempDir('keys-src');
  fs.writeFileSync(path.join(src, 'a.txt'), 'hello keys\n');
  expectExit(await runCli(['backup', '--repo', r.repo, src], { env: r.env }), 'backup');
  const copies = fs.readdirSync(path.join(r.env['SNAPCRYPT_CONFIG_DIR']!, 'repos'));
  assert.equal(copies.length, 1, 'init keeps a local copy of the key file');
  assert.ok(deleteRepoKeys(r.repo) >= 2);
  const ok = await runCli(['snapshots', '--repo', r.repo, '--json'], { env: r.env });
  expectExit(ok, 'snapshots with only the local key copy');
  assert.equal(jsonLines(ok.stdout).filter((o) => o['type'] === 'snapshot').length, 1);
  // a machine without the local copy has nothing to open the repository with
  const elsewhere = await runCli(['snapshots', '--repo', r.repo], { env: { ...r.env, SNAPCRYPT_CONFIG_DIR: await tempDir('keys-cfg') } });
  assert.equal(elsewhere.code, 7, elsewhere.stderr);
  assert.match(elsewhere.stderr, /has no key file/);
});

test('a new machine with only the passphrase restores everything (keys from the repository)', async () => {
  const r = await makeRepo();
  const src = await tempDir('keys-src2');
  fs.writeFileSync(path.join(src, 'doc.txt'), 'recover me\n');
  expectExit(await runCli(['backup', '--repo', r.repo, src], { env: r.env }), 'backup');
  const fresh = { ...r.env, SNAPCRYPT_CONFIG_DIR: await tempDir('keys-new-cfg'), SNAPCRYPT_CACHE_DIR: await tempDir('keys-new-cache') };
  const target = await tempDir('keys-target');
  expectExit(await runCli(['restore', '--repo', r.repo, 'latest', '--target', target], { env: fresh }), 'restore on a new machine');
  assert.equal(fs.readFileSync(path.join(target, src, 'doc.txt'), 'utf8'), 'recover me\n');
  const wrong = await runCli(['snapshots', '--repo', r.repo], { env: { ...fresh, SNAPCRYPT_PASSWORD: 'not it' } });
  assert.equal(wrong.code, 4);
  assert.match(wrong.stderr, /wrong passphrase/);
});

test('the key is derived from the local key copy while the storage connects, and only used for that key file', async () => {
  const r = await makeRepo();
  expectExit(await runCli(['snapshots', '--repo', r.repo], { env: r.env }), 'snapshots');
  const store = new DirKeyStore(r.env['SNAPCRYPT_CONFIG_DIR']!);
  const id = await store.repoIdAt(r.repo);
  assert.match(id ?? '', /^[0-9a-f]{32}$/, 'the repository id at this location is remembered');
  const pass = Buffer.from(r.env['SNAPCRYPT_PASSWORD']!);
  const early = await Repository.deriveEarly(store, r.repo, pass);
  assert.equal(early.size, 1, 'one derivation started, for the one local key file');
  const storage = await openStorage(r.repo);
  try {
    assert.equal((await Repository.open(storage, pass, null, store, early)).config.id, id);
    // the early result is what opens the key file: a wrong one is not silently replaced
    const wrong: EarlyKeys = new Map([...early.keys()].map((k) => [k, Promise.resolve(Buffer.alloc(32, 1))]));
    await assert.rejects(Repository.open(storage, pass, null, store, wrong), /wrong passphrase/);
    // nothing remembered for another location: nothing derived early
    assert.equal((await Repository.deriveEarly(store, `${r.repo}-elsewhere`, pass)).size, 0);
  } finally {
    await storage.close();
  }
});

test('open asks for the config, the snapshot list and the key names together, and still names a path that is not a repository', async () => {
  const r = await makeRepo();
  const storage = await openStorage(r.repo);
  // count the storage's calls that are under way when each one starts (a remote sends them together)
  let open = 0;
  let most = 0;
  const counted = new Proxy(storage, {
    get(target, prop, receiver) {
      const v = Reflect.get(target, prop, receiver) as unknown;
      if (typeof v !== 'function' || !['readFile', 'listSnapshots', 'listKeys'].includes(String(prop))) return v;
      return async (...args: unknown[]) => {
        open++;
        most = Math.max(most, open);
        try {
          return await (v as (...a: unknown[]) => Promise<unknown>).apply(target, args);
        } finally {
          open--;
        }
      };
    },
  });
  const repo = await Repository.open(counted, Buffer.from(r.env['SNAPCRYPT_PASSWORD']!));
  assert.ok(repo.config.id.length > 0);
  assert.equal(most, 3, 'config, snapshots and key names asked for at once');
  // no config, and a snapshot list that cannot be read: the answer is still "no repository there"
  const notRepo = await tempDir('keys-not-repo');
  fs.mkdirSync(path.join(notRepo, 'current'));
  fs.writeFileSync(path.join(notRepo, 'snapshots'), 'a file where the snapshots directory would be');
  const unhandled: unknown[] = [];
  const onUnhandled = (err: unknown): void => void unhandled.push(err);
  process.on('unhandledRejection', onUnhandled);
  try {
    const s = await openStorage(notRepo);
    await assert.rejects(s.listSnapshots(), /Cannot list the snapshots/);
    await assert.rejects(Repository.open(s, Buffer.from('any')), (err: unknown) => (err as { code?: string }).code === 'not-a-repository');
    await new Promise((resolve) => setTimeout(resolve, 50));
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
  assert.deepEqual(unhandled, [], 'the listings\' failures are not left unhandled');
});
