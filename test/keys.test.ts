/** I9: the passphrase alone recovers everything, and the workstation keeps its own copy of the key. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { expectExit, jsonLines, makeRepo, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';

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
