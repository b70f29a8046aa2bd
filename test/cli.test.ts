/** The command line itself: help, usage errors, --json, and the progress line only on a terminal. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CLI_PATH, expectExit, jsonLines, makeRepo, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';

const SERVER_PATH = path.join(path.dirname(CLI_PATH), 'snapcrypt-server.js');

const COMMANDS = ['init', 'backup', 'snapshots', 'ls', 'restore', 'verify', 'key', 'demo', 'setup'];

test('every command has --help (exit 0, a usage line and the common options)', async () => {
  const top = await runCli(['--help']);
  expectExit(top, 'snapcrypt --help');
  for (const c of COMMANDS) {
    assert.match(top.stdout, new RegExp(`^  ${c} `, 'm'), `top help lists ${c}`);
    const r = await runCli([c, '--help']);
    expectExit(r, `snapcrypt ${c} --help`);
    assert.match(r.stdout, new RegExp(`^Usage: snapcrypt ${c}`, 'm'));
  }
  assert.match(top.stdout, /Exit status: 0 ok/);
});

test('usage errors: one line on stderr, exit 2, JSON error object with --json', async () => {
  const unknown = await runCli(['frobnicate']);
  assert.equal(unknown.code, 2);
  assert.equal(unknown.stderr.trim().split('\n').length, 1, unknown.stderr);
  assert.match(unknown.stderr, /Unknown command "frobnicate"/);
  const badOpt = await runCli(['snapshots', '--no-such-option', '--json'], { env: { SNAPCRYPT_REPO: '/nonexistent' } });
  assert.equal(badOpt.code, 2);
  const err = jsonLines(badOpt.stdout).find((o) => o['type'] === 'error');
  assert.equal(err?.['code'], 'usage');
  assert.equal(err?.['exitStatus'], 2);
  const noRepo = await runCli(['snapshots'], { env: { SNAPCRYPT_PASSWORD: 'x' } });
  assert.equal(noRepo.code, 2);
  assert.match(noRepo.stderr, /No repository given: use --repo R or set SNAPCRYPT_REPO/);
  const missing = await runCli(['snapshots', '--repo', '/nonexistent/repo'], { env: { SNAPCRYPT_PASSWORD: 'x' } });
  assert.equal(missing.code, 7, missing.stderr);
  assert.match(missing.stderr, /Cannot open repository \/nonexistent\/repo/);
  // a path that does not exist is named before the repository is opened (no passphrase asked for)
  const noPath = await runCli(['backup', '--repo', '/nonexistent/repo', '/nonexistent/path'], { env: {} });
  assert.equal(noPath.code, 7, noPath.stderr);
  assert.equal(noPath.stderr.trim().split('\n').length, 1, noPath.stderr);
  assert.match(noPath.stderr, /Cannot back up \/nonexistent\/path: ENOENT/);
});

test('SNAPCRYPT_REPO stands for --repo, and --json prints one JSON object per line', async () => {
  const r = await makeRepo();
  const src = await tempDir('cli-src');
  fs.writeFileSync(path.join(src, 'a.txt'), 'a');
  const env = { ...r.env, SNAPCRYPT_REPO: r.repo };
  const b = await runCli(['backup', '--json', src], { env });
  expectExit(b, 'backup --json');
  const lines = b.stdout.trim().split('\n');
  assert.ok(lines.length >= 1);
  for (const l of lines) JSON.parse(l);
  const summary = jsonLines(b.stdout).find((o) => o['type'] === 'summary');
  assert.match(String(summary?.['snapshot']), /^[0-9a-f]{8}$/);
  const s = await runCli(['snapshots', '--json'], { env });
  expectExit(s, 'snapshots --json');
  const snaps = jsonLines(s.stdout).filter((o) => o['type'] === 'snapshot');
  assert.equal(snaps.length, 1);
  assert.equal(snaps[0]!['id'], summary?.['snapshot']);
  assert.equal(snaps[0]!['files'], 1);
});

test('a terminal gets a live progress line; a pipe gets none', async () => {
  const r = await makeRepo();
  const src = await tempDir('cli-progress');
  // enough data that the backup takes longer than one progress interval (200 ms)
  const big = Buffer.alloc(48 * 1024 * 1024);
  for (let i = 0; i < big.length; i += 4096) big.writeUInt32LE(i * 2654435761 >>> 0, i);
  fs.writeFileSync(path.join(src, 'big.bin'), big);
  for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(src, `f${i}.txt`), `file ${i}\n`.repeat(50));
  const piped = await runCli(['backup', '--repo', r.repo, src], { env: r.env });
  expectExit(piped, 'backup into a pipe');
  assert.doesNotMatch(piped.stderr, /ETA|\r/, 'no progress line on a pipe');
  fs.appendFileSync(path.join(src, 'big.bin'), Buffer.from('changed'));
  fs.writeFileSync(path.join(src, 'new.bin'), big.subarray(1024));
  // script(1) runs the command on a pseudo-terminal and copies what it shows
  const env: NodeJS.ProcessEnv = { ...process.env, ...r.env };
  for (const k of Object.keys(env)) if (k.startsWith('SNAPCRYPT_') && !(k in r.env)) delete env[k];
  const cmd = [process.execPath, CLI_PATH, 'backup', '--repo', r.repo, src].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  const tty = spawnSync('script', ['-qec', cmd, '/dev/null'], { env, encoding: 'utf8', timeout: 120_000 });
  assert.equal(tty.status, 0, `${tty.stdout}\n${tty.stderr}`);
  assert.match(tty.stdout, /\r\x1b\[K\[\d+:\d\d\] \d+\/\d+ files .* ETA /, 'progress line with files, bytes, rate and ETA');
  assert.match(tty.stdout, /snapshot [0-9a-f]{8} saved as/);
});

test('backup and snapshots warn when the newest snapshot is older than SNAPCRYPT_WARN_AGE', async () => {
  const r = await makeRepo();
  const src = await tempDir('cli-stale');
  fs.writeFileSync(path.join(src, 'a.txt'), 'a');
  expectExit(await runCli(['backup', '--repo', r.repo, src], { env: r.env }), 'first backup');
  await new Promise((res) => setTimeout(res, 2100));
  const stale = { ...r.env, SNAPCRYPT_WARN_AGE: '1s' };
  const s = await runCli(['snapshots', '--repo', r.repo], { env: stale });
  expectExit(s, 'snapshots');
  assert.match(s.stderr, /^warning: the newest snapshot of .* is \d+s old \(\d{4}-\d\d-\d\dT[\d:.]+Z\), older than 1s: are backups still running\?/m);
  const j = await runCli(['snapshots', '--repo', r.repo, '--json'], { env: stale });
  assert.equal(jsonLines(j.stdout).filter((o) => o['type'] === 'warning').length, 1, j.stdout);
  const b = await runCli(['backup', '--repo', r.repo, src], { env: stale });
  expectExit(b, 'backup');
  assert.match(b.stderr, /^warning: the newest snapshot of .* older than 1s/m);
  // the default (7d), and "off", stay silent
  for (const env of [r.env, { ...r.env, SNAPCRYPT_WARN_AGE: 'off' }]) {
    const quiet = await runCli(['snapshots', '--repo', r.repo], { env });
    expectExit(quiet, 'snapshots');
    assert.doesNotMatch(quiet.stderr, /warning/);
  }
  const bad = await runCli(['snapshots', '--repo', r.repo], { env: { ...r.env, SNAPCRYPT_WARN_AGE: 'soon' } });
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /Invalid duration "soon"/);
});

test('output into a pipe whose reader has gone is dropped: the command still finishes (a backup commits), no stack trace', async () => {
  const r = await makeRepo();
  const src = await tempDir('cli-epipe');
  for (let i = 0; i < 50; i++) fs.writeFileSync(path.join(src, `f${i}`), `file ${i}\n`);
  const runClosed = (args: string[], program = CLI_PATH): Promise<{ code: number | null; stderr: string }> =>
    new Promise((resolve) => {
      const child = spawn(process.execPath, [program, ...args], { env: { ...process.env, ...r.env }, stdio: ['ignore', 'pipe', 'pipe'] });
      child.stdout.destroy(); // the reader is gone before the first line is written
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('close', (code) => resolve({ code, stderr }));
    });
  const b = await runClosed(['backup', '--repo', r.repo, '--json', src]);
  assert.equal(b.code, 0, b.stderr);
  assert.doesNotMatch(b.stderr, /EPIPE|Unhandled|at /);
  const list = await runCli(['snapshots', '--repo', r.repo, '--json'], { env: r.env });
  expectExit(list, 'snapshots');
  assert.equal(jsonLines(list.stdout).filter((o) => o['type'] === 'snapshot').length, 1, 'the backup whose output went nowhere committed');
  const s = await runClosed(['snapshots', '--repo', r.repo, '--json']);
  assert.equal(s.code, 0, s.stderr);
  assert.equal(s.stderr, '');
  // the server program too (`snapcrypt-server snapshots --repo DIR | head -1`)
  const server = await runClosed(['snapshots', '--repo', r.repo, '--json'], SERVER_PATH);
  assert.equal(server.code, 0, server.stderr);
  assert.equal(server.stderr, '');
});
