/**
 * I8 Bounded memory: the client's peak RSS backing up 100,000 small files (100 directories of 1000
 * files of 10-200 bytes, all different) stays under 150 MiB, for the first backup and for a second one
 * with nothing changed.
 *
 * The CLI runs as users run it (node dist/src/programs/snapcrypt.js); its peak RSS is measured by GNU
 * time (`/usr/bin/time -f %M`, maximum resident set size of the process incl. its threads), or, where
 * that is missing, by polling VmHWM in /proc/PID/status until it exits. The figures are printed as
 * test diagnostics.
 *
 * SNAPCRYPT_TEST_MEMORY_SCALING=1 also measures 25,000 and 50,000 files (subsets of the same tree,
 * each into a fresh repository) to show how the peak grows with the number of files.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { tempDir } from './env.js';
import { CLI_PATH, expectExit, jsonLines, makeRepo, type CliResult } from './cli-helpers.js';

const DIRS = 100;
const FILES_PER_DIR = 1000;
const LIMIT_MIB = 150;
const GNU_TIME = '/usr/bin/time';

/** Whether /usr/bin/time is GNU time (which knows -f %M and -o FILE; BusyBox and BSD time do not). */
function haveGnuTime(): boolean {
  const r = spawnSync(GNU_TIME, ['--version'], { encoding: 'utf8' });
  return r.error === undefined && /GNU/.test(`${r.stdout}${r.stderr}`);
}

interface Measured extends CliResult {
  /** Peak resident set size in KiB. */
  readonly peakKiB: number;
  readonly ms: number;
}

/** The CLI's environment: the test's own minus SNAPCRYPT_*, plus `env` (as runCli does). */
function cliEnv(env: Readonly<Record<string, string>>): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('SNAPCRYPT_')) out[k] = v;
  return { ...out, ...env };
}

/** Run the CLI and measure its peak RSS. */
async function runMeasured(args: readonly string[], env: Readonly<Record<string, string>>, useGnuTime: boolean): Promise<Measured> {
  const outFile = path.join(await tempDir('memory-time'), 'maxrss');
  const [cmd, argv] = useGnuTime
    ? [GNU_TIME, ['-f', '%M', '-o', outFile, process.execPath, CLI_PATH, ...args]]
    : [process.execPath, [CLI_PATH, ...args]];
  const t0 = Date.now();
  const child = spawn(cmd, argv, { env: cliEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  child.stdout.on('data', (b: Buffer) => out.push(b));
  child.stderr.on('data', (b: Buffer) => err.push(b));
  let polled = 0;
  const poll = useGnuTime
    ? null
    : setInterval(() => {
        try {
          const m = /^VmHWM:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${child.pid}/status`, 'utf8'));
          if (m) polled = Math.max(polled, Number(m[1]));
        } catch {
          /* exited */
        }
      }, 20);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (c, s) => resolve([c, s]));
  });
  if (poll) clearInterval(poll);
  const ms = Date.now() - t0;
  const peakKiB = useGnuTime ? Number(fs.readFileSync(outFile, 'utf8').trim().split('\n').pop()) : polled;
  fs.rmSync(path.dirname(outFile), { recursive: true, force: true });
  return { code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), peakKiB, ms };
}

/** 100 directories of 1000 files of 10-200 bytes each, every file's content different. */
function makeTree(root: string): void {
  let pool = randomBytes(4 * 1024 * 1024);
  let off = 0;
  for (let d = 0; d < DIRS; d++) {
    const dir = path.join(root, `d${String(d).padStart(3, '0')}`);
    fs.mkdirSync(dir);
    for (let i = 0; i < FILES_PER_DIR; i++) {
      const size = 10 + ((d * FILES_PER_DIR + i) * 7919) % 191;
      if (off + size > pool.length) {
        pool = randomBytes(pool.length);
        off = 0;
      }
      fs.writeFileSync(path.join(dir, `f${i}`), pool.subarray(off, off + size));
      off += size;
    }
  }
}

const mib = (kib: number): string => (kib / 1024).toFixed(1);

/** Back up `paths` twice (the second time with nothing changed) into a fresh repository. */
async function measure(t: TestContext, label: string, paths: string[], files: number, useGnuTime: boolean): Promise<[number, number]> {
  const repo = await makeRepo();
  const peaks: number[] = [];
  for (const run of ['first', 'unchanged'] as const) {
    const r = await runMeasured(['backup', '--repo', repo.repo, '--json', ...paths], repo.env, useGnuTime);
    expectExit(r, `${label}: ${run} backup`);
    const s = jsonLines(r.stdout).find((l) => l['type'] === 'summary');
    assert.ok(s, `${label}: ${run} backup printed no summary`);
    assert.equal(s['files'], files, `${label}: ${run} backup saw every file`);
    assert.equal(s['filesRead'], run === 'first' ? files : 0, `${label}: ${run} backup read ${run === 'first' ? 'every' : 'no'} file`);
    t.diagnostic(`${label}: ${run} backup: peak RSS ${mib(r.peakKiB)} MiB, ${(r.ms / 1000).toFixed(1)} s, ${String(s['objectsAdded'])} objects added`);
    peaks.push(r.peakKiB);
  }
  fs.rmSync(path.dirname(repo.repo), { recursive: true, force: true });
  return [peaks[0]!, peaks[1]!];
}

test(`backing up ${DIRS * FILES_PER_DIR} small files keeps the client under ${LIMIT_MIB} MiB (I8)`, { timeout: 30 * 60_000 }, async (t) => {
  const useGnuTime = haveGnuTime();
  t.diagnostic(`peak RSS measured with ${useGnuTime ? 'GNU time -f %M' : 'VmHWM polled from /proc/PID/status'}`);
  const src = await tempDir('memory-src');
  const t0 = Date.now();
  makeTree(src);
  t.diagnostic(`made ${DIRS * FILES_PER_DIR} files in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const dirs = fs.readdirSync(src).sort().map((d) => path.join(src, d));

  const scaling = process.env['SNAPCRYPT_TEST_MEMORY_SCALING'] === '1';
  const results: string[] = [];
  for (const n of scaling ? [25, 50, 100] : [100]) {
    const files = n * FILES_PER_DIR;
    // 100 directories are backed up as one path (the tree's root), subsets as n directory paths
    const paths = n === DIRS ? [src] : dirs.slice(0, n);
    const [first, second] = await measure(t, `${files} files`, paths, files, useGnuTime);
    results.push(`${files} files: first ${mib(first)} MiB, unchanged ${mib(second)} MiB`);
    if (n === DIRS) {
      assert.ok(first < LIMIT_MIB * 1024, `first backup of ${files} files: peak RSS ${mib(first)} MiB, limit ${LIMIT_MIB} MiB`);
      assert.ok(second < LIMIT_MIB * 1024, `unchanged backup of ${files} files: peak RSS ${mib(second)} MiB, limit ${LIMIT_MIB} MiB`);
    }
  }
  t.diagnostic(`peak RSS: ${results.join('; ')}`);
  console.log(`memory (I8): ${results.join('; ')}`);
});
