import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { Repository } from '../engine/repository.js';
import { backup } from '../engine/backup.js';
import { LocalSourceFs } from '../drivers/localfs.js';
import { openStorage } from '../drivers/open.js';
import { openTreeCache } from '../drivers/cachedir.js';
import { makeExcluder } from '../core/excluder.js';
import { type Command, commonHelp, fmtBytes, table } from './common.js';
import { preferredIdHash } from './init.js';

const DEMO_PASSPHRASE = 'snapcrypt demo passphrase';

/** A small sample tree: text, a binary file, a symlink, an empty dir, a file to exclude. */
function makeSample(dir: string): void {
  if (fs.existsSync(dir)) return;
  fs.mkdirSync(path.join(dir, 'letters'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'empty'));
  fs.mkdirSync(path.join(dir, 'build'));
  fs.writeFileSync(path.join(dir, 'letters', 'hello.txt'), 'Hello from snapcrypt.\n');
  fs.writeFileSync(path.join(dir, 'letters', 'notes.md'), '# Notes\n\n' + 'Backups are encrypted before they leave this machine.\n'.repeat(200));
  const bin = Buffer.alloc(3 * 1024 * 1024 + 123);
  for (let i = 0; i < bin.length; i++) bin[i] = (i * 2654435761) >>> 24;
  fs.writeFileSync(path.join(dir, 'data.bin'), bin);
  fs.writeFileSync(path.join(dir, 'build', 'output.o'), 'not worth keeping');
  fs.writeFileSync(path.join(dir, '.snapcryptignore'), 'build/\n');
  fs.symlinkSync('letters/hello.txt', path.join(dir, 'hello-link'));
}

export const demoCommand: Command = {
  name: 'demo',
  summary: 'back up a sample folder to a local repository and show the snapshots',
  usage: `Usage: snapcrypt demo [--dir D]

Creates D/sample (a few files) and the repository D/repo (passphrase "${DEMO_PASSPHRASE}"), backs up
the sample, and lists the snapshots. D defaults to ./demo. Run it again to see an incremental backup.

${commonHelp}`,
  options: { dir: { type: 'string' } },
  allowPositionals: false,
  async run(ctx) {
    const dir = path.resolve(ctx.str('dir') ?? 'demo');
    const sample = path.join(dir, 'sample');
    const repoDir = path.join(dir, 'repo');
    makeSample(sample);
    const pass = Buffer.from(DEMO_PASSPHRASE);
    const storage = await openStorage(repoDir);
    if (!(await storage.exists())) {
      await Repository.init(storage, pass, { idHash: preferredIdHash() });
      ctx.out(`created repository ${repoDir} (passphrase: "${DEMO_PASSPHRASE}")`);
    }
    const repo = await Repository.open(storage, pass, openTreeCache(ctx.cacheRoot()));
    const source = new LocalSourceFs();
    const t0 = Date.now();
    try {
      const r = await backup(repo, { paths: [sample], source, excluder: makeExcluder(), host: os.hostname(), user: os.userInfo().username });
      const s = r.root.stats;
      ctx.out(`backed up ${sample}: ${s.files} files (${s.filesRead} read), ${fmtBytes(s.bytes)}; stored ${s.objectsAdded} new objects (${fmtBytes(s.bytesAdded)}) in ${((Date.now() - t0) / 1000).toFixed(2)} s`);
      ctx.emit({ type: 'summary', snapshot: r.rootId.slice(0, 8), time: r.snapshot.name, ...s });
    } finally {
      await source.finish();
    }
    const rows = [['ID', 'Time', 'Host', 'Paths', 'Size', 'Files']];
    for (const s of await repo.listSnapshots()) {
      rows.push([s.rootId.slice(0, 8), s.info.name, s.root.host, s.root.paths.map((p) => p.toString('utf8')).join(' '), fmtBytes(s.root.stats.bytes), String(s.root.stats.files)]);
    }
    ctx.out(table(rows));
    ctx.out(`\nTry: SNAPCRYPT_PASSWORD='${DEMO_PASSPHRASE}' bin/snapcrypt ls --repo ${repoDir} latest`);
    await storage.close();
    return 0;
  },
};
