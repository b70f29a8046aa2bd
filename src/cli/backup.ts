import fs from 'node:fs';
import os from 'node:os';
import { backup, normalisePaths } from '../engine/backup.js';
import { LocalSourceFs } from '../drivers/localfs.js';
import { SnapError } from '../core/errors.js';
import { makeExcluder } from '../core/excluder.js';
import { optimizeForSize } from '../programs/runtime.js';
import { type Command, commonHelp, fmtBytes, fmtDuration } from './common.js';

export const backupCommand: Command = {
  name: 'backup',
  summary: 'back up files and directories into a new snapshot',
  usage: `Usage: snapcrypt backup --repo R [options] PATH...

Backs up the PATHs into a new snapshot and prints its ID. Unchanged files (same size, mtime, ctime and
inode as in the previous snapshot) are not read again; only chunks the repository lacks are stored.

Options:
  -e, --exclude PATTERN   exclude paths matching a gitignore-style pattern (repeatable)
      --exclude-file F    read exclude patterns from F, one per line (repeatable)
      --tag TAG           add a tag to the snapshot (repeatable)
      --host NAME         host name recorded in the snapshot (default: this machine's)
Patterns follow gitignore: one without a slash matches a name at any depth ("*.o"); one with a slash
is anchored at / ("/home/me/tmp", "home/me/tmp"); "**/" matches any depth ("**/node_modules/"); a
trailing "/" matches only directories; "!" re-includes. Files named .snapcryptignore are read as
gitignore files for their own directory; directories holding a valid CACHEDIR.TAG are stored with
only the tag file.

${commonHelp}

Exit status: 0 done, 3 done but some files could not be read (listed as warnings).`,
  options: {
    exclude: { type: 'string', short: 'e', multiple: true },
    'exclude-file': { type: 'string', multiple: true },
    tag: { type: 'string', multiple: true },
    host: { type: 'string' },
  },
  allowPositionals: true,
  async run(ctx) {
    optimizeForSize();
    if (ctx.positionals.length === 0) throw new SnapError('usage', 'backup: give at least one PATH to back up');
    const files = ctx.list('exclude-file').map((name) => {
      try {
        return { name, text: fs.readFileSync(name, 'latin1') };
      } catch (err) {
        throw new SnapError('usage', `Cannot read exclude file ${name}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
      }
    });
    const source = new LocalSourceFs();
    // a PATH that does not exist is named before the passphrase is asked for
    normalisePaths(ctx.positionals, source, process.cwd());
    const repo = await ctx.openRepo();
    const listing = repo.storage.listSnapshots(); // (asked for with the lock: one round trip less)
    listing.catch(() => undefined);
    const lock = await repo.storage.lock(`snapcrypt backup`);
    const t0 = Date.now();
    let warnings = 0;
    try {
      ctx.warnIfStale((await listing).sort((a, b) => a.time - b.time).at(-1), repo.storage.location);
      const r = await backup(repo, {
        paths: ctx.positionals,
        source,
        excluder: makeExcluder({ patterns: ctx.list('exclude'), files }),
        host: ctx.str('host') ?? os.hostname(),
        user: os.userInfo().username,
        tags: ctx.list('tag'),
        prescan: ctx.progressEnabled,
        onStep: crashHook(ctx.io.env['SNAPCRYPT_TEST_CRASH_AT']),
        onWarning: (p, m) => {
          warnings++;
          ctx.progressDone();
          ctx.warn(`${p}: ${m}`);
        },
        onProgress: ctx.progressEnabled
          ? (p) => {
              const el = (Date.now() - t0) / 1000;
              const rate = p.bytesDone / Math.max(el, 0.001);
              const eta = p.bytesTotal ? (p.bytesTotal - p.bytesDone) / Math.max(rate, 1) : NaN;
              const total = p.filesTotal !== null ? `/${p.filesTotal}` : '';
              const btotal = p.bytesTotal !== null ? ` / ${fmtBytes(p.bytesTotal)}` : '';
              ctx.progress(`[${fmtDuration(el)}] ${p.filesDone}${total} files  ${fmtBytes(p.bytesDone)}${btotal}  ${fmtBytes(rate)}/s  ETA ${fmtDuration(eta)}`);
            }
          : undefined,
      });
      ctx.progressDone();
      const s = r.root.stats;
      const secs = (Date.now() - t0) / 1000;
      if (!ctx.quiet) {
        ctx.out(`files: ${s.files} (${s.filesRead} read), dirs: ${s.dirs}, ${fmtBytes(s.bytes)} in total`);
        ctx.out(`added to the repository: ${s.objectsAdded} objects, ${fmtBytes(s.bytesAdded)}, in ${secs.toFixed(2)} s`);
      }
      ctx.out(`snapshot ${r.rootId.slice(0, 8)} saved as ${r.snapshot.name}`);
      ctx.emit({ type: 'summary', snapshot: r.rootId.slice(0, 8), id: r.rootId, time: r.snapshot.name, seconds: secs, ...s });
      return warnings > 0 || s.errors > 0 ? 3 : 0;
    } finally {
      await lock.release();
      await source.finish();
    }
  },
};

/**
 * Test hook for crash tests: SNAPCRYPT_TEST_CRASH_AT=STEP:N kills this process with SIGKILL the N-th
 * time the backup reaches STEP (start, put-chunk, put-tree, trees-done, uploaded, commit, committed).
 */
function crashHook(spec: string | undefined): (step: string) => void {
  const m = spec ? /^([a-z-]+):(\d+)$/.exec(spec) : null;
  if (!m) return () => {};
  const [, want, n] = m;
  let count = 0;
  return (step) => {
    if (step === want && ++count === Number(n)) process.kill(process.pid, 'SIGKILL');
  };
}
