/**
 * The id function of a repository (docs/FORMAT.md sections 5 and 14): HMAC-SHA256 (format version 1)
 * or HMAC-BLAKE2b-512 cut to 32 bytes (version 2), chosen by `init --id-hash` (auto: SHA-256 where the
 * CPU has SHA instructions) and named in the sealed secret. Both kinds back up, restore and verify
 * through the CLI, and their objects are named by the function the repository names.
 */
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { IdHash } from '../src/core/crypto.js';
import { cpuinfoHasSha256, hasSha256Instructions } from '../src/drivers/cpu.js';
import { openStorage } from '../src/drivers/open.js';
import { Repository } from '../src/engine/repository.js';
import { tempDir } from './env.js';
import { assertSameTree, expectExit, makeRepo, runCli, treeSnapshot } from './cli-helpers.js';

test('cpuinfoHasSha256 finds SHA-NI on x86 and the SHA2 extension on arm64, and nothing else', () => {
  const x86 = (flags: string): string => `processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu vme ${flags} avx2\nbugs\t\t: spectre_v1\n`;
  assert.equal(cpuinfoHasSha256(x86('sse4_2 sha_ni aes')), true);
  assert.equal(cpuinfoHasSha256(x86('sse4_2 aes avx512f sha512')), false, 'SHA-512 instructions are not SHA-256 ones');
  assert.equal(cpuinfoHasSha256('processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n'), true);
  assert.equal(cpuinfoHasSha256('processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n'), false, 'a Raspberry Pi 4 has none');
  assert.equal(cpuinfoHasSha256('model name\t: sha_ni in a name is not a flag\n'), false);
  assert.equal(hasSha256Instructions(path.join('/nonexistent', 'cpuinfo')), false);
});

for (const fn of ['sha256', 'blake2b'] as const) {
  test(`a repository made with --id-hash ${fn} backs up, restores and verifies, its objects named by HMAC-${fn === 'sha256' ? 'SHA256' : 'BLAKE2b'}`, async () => {
    const repo = await makeRepo({ init: false });
    expectExit(await runCli(['init', '--repo', repo.repo, '--id-hash', fn], { env: repo.env }), `init --id-hash ${fn}`);
    const config = JSON.parse(fs.readFileSync(path.join(repo.repo, 'current', 'config'), 'utf8')) as { version: number };
    assert.equal(config.version, fn === 'sha256' ? 1 : 2);

    const src = await tempDir(`id-hash-${fn}-src`);
    const small = Buffer.from(`a small file under ${fn}\n`);
    fs.writeFileSync(path.join(src, 'small.txt'), small);
    fs.writeFileSync(path.join(src, 'big.bin'), randomBytes(3 * 1024 * 1024 + 5)); // four chunks
    fs.mkdirSync(path.join(src, 'sub'));
    fs.writeFileSync(path.join(src, 'sub', 'copy.txt'), small);
    // more chunks than a restore opens on its main thread (64): the rest go to its worker threads
    for (let i = 0; i < 80; i++) fs.writeFileSync(path.join(src, 'sub', `f${i}`), randomBytes(100 + i));
    expectExit(await runCli(['backup', '--repo', repo.repo, src], { env: repo.env }), 'backup');

    // the small file's chunk is stored under the id the repository's function gives
    const opened = await Repository.open(await openStorage(repo.repo), Buffer.from(repo.env['SNAPCRYPT_PASSWORD']!));
    assert.equal(opened.keys.idHash, fn === 'sha256' ? IdHash.sha256 : IdHash.blake2b);
    const digest = createHmac(fn === 'sha256' ? 'sha256' : 'blake2b512', opened.keys.idKey).update(Buffer.of(1)).update(small).digest();
    const id = digest.subarray(0, 32).toString('hex');
    assert.ok(fs.existsSync(path.join(repo.repo, 'current', 'objects', id.slice(0, 2), id)), `object ${id}`);
    const otherFn = createHmac(fn === 'sha256' ? 'blake2b512' : 'sha256', opened.keys.idKey).update(Buffer.of(1)).update(small).digest().subarray(0, 32).toString('hex');
    assert.ok(!fs.existsSync(path.join(repo.repo, 'current', 'objects', otherFn.slice(0, 2), otherFn)), 'not under the other function');
    await opened.storage.close();

    const target = await tempDir(`id-hash-${fn}-out`);
    expectExit(await runCli(['restore', '--repo', repo.repo, 'latest', '--target', target], { env: repo.env }), 'restore');
    assertSameTree(await treeSnapshot(path.join(target, src)), await treeSnapshot(src), 'restored');
    expectExit(await runCli(['verify', '--repo', repo.repo, '--read-data'], { env: repo.env }), 'verify --read-data');
  });
}

test('init refuses an unknown --id-hash (usage, nothing created) and takes auto', async () => {
  const repo = await makeRepo({ init: false });
  const bad = await runCli(['init', '--repo', repo.repo, '--id-hash', 'md5'], { env: repo.env });
  expectExit(bad, 'init --id-hash md5', 2);
  assert.match(bad.stderr, /--id-hash must be auto, sha256 or blake2b/);
  assert.equal(fs.existsSync(path.join(repo.repo, 'current')), false);
  expectExit(await runCli(['init', '--repo', repo.repo, '--id-hash', 'auto'], { env: repo.env }), 'init --id-hash auto');
  const config = JSON.parse(fs.readFileSync(path.join(repo.repo, 'current', 'config'), 'utf8')) as { version: number };
  assert.equal(config.version, hasSha256Instructions() ? 1 : 2);
});
