/**
 * End to end over real SSH: a throwaway sshd on 127.0.0.1 whose authorized_keys forces
 * `snapcrypt-server serve --area DIR`, and the CLI's init, backup, snapshots, restore and verify with
 * --repo ssh://user@127.0.0.1:PORT/: once with the user's own ssh options (no snapcrypt key: plain ssh),
 * once with the snapcrypt key and known_hosts of `snapcrypt setup` (askpass). Skipped where sshd is
 * missing, except in CI (CI=true).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ensureKeyPair, sshIdentity } from '../src/drivers/sshkeys.js';
import { expectExit, jsonLines, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';
import { sshdAvailable, startSshd } from './sshd.js';

const SERVER_PATH = fileURLToPath(new URL('../src/programs/snapcrypt-server.js', import.meta.url));
const available = sshdAvailable();
if (!available && process.env['CI'] === 'true') throw new Error('CI must run the SSH end-to-end test: /usr/sbin/sshd is missing');

test('init, backup, snapshots, restore and verify through ssh:// and snapcrypt-server serve', { skip: !available, timeout: 60_000 }, async () => {
  const base = await tempDir('remote-cli');
  const area = join(base, 'area');
  const key = join(base, 'id_ed25519');
  execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'snapcrypt-test', '-f', key], { stdio: 'ignore' });
  const pub = await fsp.readFile(`${key}.pub`, 'utf8');
  const sshd = await startSshd({ authorizedKeys: [pub], forcedCommand: `${process.execPath} ${SERVER_PATH} serve --area ${area}` });
  try {
    const repo = `ssh://${sshd.user}@127.0.0.1:${sshd.port}/`;
    const env = {
      SNAPCRYPT_PASSWORD: 'correct horse battery staple',
      SNAPCRYPT_TEST_WEAK_KDF: '1',
      SNAPCRYPT_CACHE_DIR: join(base, 'cache'),
      SNAPCRYPT_CONFIG_DIR: join(base, 'config'),
      SNAPCRYPT_SSH_OPTIONS: `-i ${key} -o IdentitiesOnly=yes -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o LogLevel=ERROR`,
    };
    const src = join(base, 'src');
    await fsp.mkdir(join(src, 'sub'), { recursive: true });
    await fsp.writeFile(join(src, 'a.txt'), 'hello over ssh\n');
    await fsp.writeFile(join(src, 'sub', 'big.bin'), Buffer.alloc(3 * 1024 * 1024 + 17, 0x5a));
    await fsp.writeFile(join(src, 'sub', 'empty'), '');

    expectExit(await runCli(['init', '--repo', repo], { env }), 'init');
    const current = await fsp.readdir(join(area, 'current'));
    assert.ok(current.includes('config') && current.includes('keys'), `the area holds the repository: ${current.join(', ')}`);
    expectExit(await runCli(['backup', '--repo', repo, src], { env }), 'backup');
    await fsp.writeFile(join(src, 'a.txt'), 'changed\n');
    expectExit(await runCli(['backup', '--repo', repo, src], { env }), 'second backup');

    const snaps = await runCli(['snapshots', '--repo', repo, '--json'], { env });
    expectExit(snaps, 'snapshots');
    assert.equal(jsonLines(snaps.stdout).filter((l) => l['type'] === 'snapshot').length, 2, snaps.stdout);
    assert.equal((await fsp.readdir(join(area, 'snapshots'))).length, 2);

    const target = join(base, 'restored');
    expectExit(await runCli(['restore', '--repo', repo, 'latest', '--target', target], { env }), 'restore');
    const restoredRoot = join(target, src);
    const restored = (await fsp.stat(join(restoredRoot, 'a.txt')).catch(() => null)) ? restoredRoot : target;
    assert.equal(await fsp.readFile(join(restored, 'a.txt'), 'utf8'), 'changed\n');
    assert.deepEqual(await fsp.readFile(join(restored, 'sub', 'big.bin')), Buffer.alloc(3 * 1024 * 1024 + 17, 0x5a));
    assert.equal((await fsp.readFile(join(restored, 'sub', 'empty'))).length, 0);

    expectExit(await runCli(['verify', '--repo', repo, '--read-data', '--json'], { env }), 'verify');

    // A key the server does not know: a clear error naming the URL, with ssh's own words.
    const otherKey = join(base, 'other');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', otherKey], { stdio: 'ignore' });
    const refused = await runCli(['snapshots', '--repo', repo], {
      env: { ...env, SNAPCRYPT_SSH_OPTIONS: env.SNAPCRYPT_SSH_OPTIONS.replace(key, otherKey) },
    });
    assert.equal(refused.code, 9, refused.stderr);
    assert.ok(refused.stderr.includes(repo) && /Permission denied/.test(refused.stderr), refused.stderr);
  } finally {
    await sshd.stop();
  }
});

test('with the snapcrypt key that setup made: init, backup and snapshots through askpass, no other key or option', { skip: !available, timeout: 60_000 }, async () => {
  const base = await tempDir('remote-cli-key');
  const area = join(base, 'area');
  const config = join(base, 'config');
  const env = {
    SNAPCRYPT_PASSWORD: 'pässphrase of both keys',
    SNAPCRYPT_TEST_WEAK_KDF: '1',
    SNAPCRYPT_CACHE_DIR: join(base, 'cache'),
    SNAPCRYPT_CONFIG_DIR: config,
  };
  const id = sshIdentity(config);
  const pair = await ensureKeyPair(Buffer.from(env.SNAPCRYPT_PASSWORD), id, { rounds: 4 });
  const sshd = await startSshd({ authorizedKeys: [pair.publicKey], forcedCommand: `${process.execPath} ${SERVER_PATH} serve --area ${area}` });
  try {
    // setup records the host key; the repository URL it prints is the one to use
    const setup = await runCli(['setup', `${sshd.user}@127.0.0.1:${sshd.port}`, '--json'], { env });
    expectExit(setup, 'setup');
    const repo = jsonLines(setup.stdout).find((o) => o['type'] === 'setup')?.['repo'] as string;
    assert.equal(repo, `ssh://${sshd.user}@127.0.0.1:${sshd.port}/`);
    const src = join(base, 'src');
    await fsp.mkdir(src);
    await fsp.writeFile(join(src, 'f'), 'through the snapcrypt key\n');
    expectExit(await runCli(['init', '--repo', repo], { env }), 'init');
    expectExit(await runCli(['backup', '--repo', repo, src], { env }), 'backup');
    // the first backup over SSH leaves its trees in the local cache: one per directory from / to src
    // (and the index it committed, the kept index, and the walk's directory records)
    const files = (await fsp.readdir(env.SNAPCRYPT_CACHE_DIR, { recursive: true, withFileTypes: true })).filter((e) => e.isFile());
    const cached = files.filter((e) => /^[0-9a-f]{64}$/.test(e.name));
    assert.equal(cached.length, src.split('/').length, `${cached.length} trees cached for ${src}`);
    assert.deepEqual(files.filter((e) => !cached.includes(e)).map((e) => e.name).sort(), ['dirs', 'index'], 'the kept index and the directory records');
    const snaps = await runCli(['snapshots', '--repo', repo, '--json'], { env });
    expectExit(snaps, 'snapshots');
    assert.equal(jsonLines(snaps.stdout).filter((l) => l['type'] === 'snapshot').length, 1, snaps.stdout);
    assert.match(sshd.log(), /Accepted publickey for \S+ from 127\.0\.0\.1 .* ED25519/);
    // a wrong passphrase does not unlock the key: ssh is refused, exit status 9 with ssh's words
    const wrong = await runCli(['snapshots', '--repo', repo], { env: { ...env, SNAPCRYPT_PASSWORD: 'wrong' } });
    assert.equal(wrong.code, 9, wrong.stderr);
    assert.match(wrong.stderr, /Permission denied/);
  } finally {
    await sshd.stop();
  }
});
