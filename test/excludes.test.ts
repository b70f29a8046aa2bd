/** Excludes through the CLI: --exclude, --exclude-file, .snapcryptignore files and CACHEDIR.TAG. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { expectExit, jsonLines, makeRepo, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';

function write(root: string, rel: string, data = rel): void {
  fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
  fs.writeFileSync(path.join(root, rel), data);
}

test('excludes: patterns, files, .snapcryptignore and CACHEDIR.TAG decide what is stored', async () => {
  const r = await makeRepo();
  const src = await tempDir('excl-src');
  for (const f of [
    'keep.txt', 'debug.log', 'sub/keep.c', 'sub/build.o', 'sub/deep/x.o', 'tmp/junk', 'docs/a.md', 'docs/draft/b.md',
    'proj/.snapcryptignore', 'proj/out/bin', 'proj/src/main.c', 'proj/src/gen.tmp', 'proj/important.tmp',
    'cache/CACHEDIR.TAG', 'cache/blob', 'fakecache/CACHEDIR.TAG', 'fakecache/data',
  ]) write(src, f);
  fs.writeFileSync(path.join(src, 'proj/.snapcryptignore'), '# build output\nout/\n*.tmp\n!important.tmp\n');
  fs.writeFileSync(path.join(src, 'cache/CACHEDIR.TAG'), 'Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n');
  fs.writeFileSync(path.join(src, 'fakecache/CACHEDIR.TAG'), 'not a real tag\n');
  const exFile = path.join(await tempDir('excl-file'), 'excludes');
  fs.writeFileSync(exFile, '# comment line\n*.log\n**/docs/draft/\n');
  expectExit(
    await runCli(['backup', '--repo', r.repo, '--exclude', '*.o', '--exclude', `${src.slice(1)}/tmp`, '--exclude-file', exFile, src], { env: r.env }),
    'backup with excludes',
  );
  const ls = await runCli(['ls', '--repo', r.repo, '--json', `latest:${src}`], { env: r.env });
  expectExit(ls, 'ls');
  const names = jsonLines(ls.stdout)
    .filter((o) => o['type'] === 'node')
    .map((o) => String(o['path']).slice(src.length + 1))
    .filter((p) => p.length > 0)
    .sort();
  assert.deepEqual(names, [
    'cache', 'cache/CACHEDIR.TAG',
    'docs', 'docs/a.md',
    'fakecache', 'fakecache/CACHEDIR.TAG', 'fakecache/data',
    'keep.txt',
    'proj', 'proj/.snapcryptignore', 'proj/important.tmp', 'proj/src', 'proj/src/main.c',
    'sub', 'sub/deep', 'sub/keep.c',
  ]);
});

test('an unreadable exclude file is a usage error that names it', async () => {
  const r = await makeRepo();
  const src = await tempDir('excl-src2');
  write(src, 'a');
  const res = await runCli(['backup', '--repo', r.repo, '--exclude-file', '/nonexistent/excludes', src], { env: r.env });
  assert.equal(res.code, 2, res.stderr);
  assert.match(res.stderr, /Cannot read exclude file \/nonexistent\/excludes/);
  const snaps = await runCli(['snapshots', '--repo', r.repo, '--json'], { env: r.env });
  assert.equal(jsonLines(snaps.stdout).filter((o) => o['type'] === 'snapshot').length, 0, 'nothing was backed up');
});
