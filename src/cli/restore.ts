import path from 'node:path';
import { restore } from '../engine/restore.js';
import { boundedHeapGrowth, smallYoungGeneration } from '../programs/runtime.js';
import { LocalTargetFs } from '../drivers/localfs.js';
import { SnapError } from '../core/errors.js';
import { type Command, commonHelp, fmtBytes, parseSnapshotRef } from './common.js';

export const restoreCommand: Command = {
  name: 'restore',
  summary: 'restore a snapshot, a directory or a file',
  usage: `Usage: snapcrypt restore --repo R SNAPSHOT[:PATH] --target DIR

Restores SNAPSHOT (an ID, a time name, or "latest") into DIR. Without PATH the whole snapshot is
restored under DIR with its original absolute paths; with PATH, that file or directory is restored
as DIR/<its name>. Content is authenticated before it is written; a file that fails is not left
behind, and the error names it.

Options:
  -t, --target DIR      where to restore (created if missing)

${commonHelp}

Exit status: 0 done, 6 some files failed authentication or were missing (named on stderr).`,
  options: { target: { type: 'string', short: 't' } },
  allowPositionals: true,
  async run(ctx) {
    const arg = ctx.positionals[0];
    if (arg === undefined || ctx.positionals.length > 1) throw new SnapError('usage', 'restore: give exactly one SNAPSHOT[:PATH]');
    const target = ctx.str('target');
    if (target === undefined) throw new SnapError('usage', 'restore: --target DIR is required');
    const { ref, path: sub } = parseSnapshotRef(arg);
    smallYoungGeneration();
    boundedHeapGrowth();
    const repo = await ctx.openRepo();
    const snap = await repo.resolveSnapshot(ref);
    const fs = new LocalTargetFs();
    const t0 = Date.now();
    const r = await restore(repo, snap, sub === null ? null : Buffer.from(sub), {
      target: Buffer.from(path.resolve(target)),
      fs,
      onWarning: (p, m) => {
        ctx.progressDone();
        ctx.warn(`${p}: ${m}`);
      },
      onProgress: ctx.progressEnabled ? (p) => ctx.progress(`${p.files} files, ${fmtBytes(p.bytes)}`) : undefined,
    });
    ctx.progressDone();
    const secs = (Date.now() - t0) / 1000;
    ctx.emit({ type: 'summary', snapshot: snap.rootId.slice(0, 8), files: r.files, dirs: r.dirs, bytes: r.bytes, errors: r.errors, seconds: secs });
    if (!ctx.quiet) ctx.out(`restored ${r.files} files, ${r.dirs} dirs, ${fmtBytes(r.bytes)} from snapshot ${snap.rootId.slice(0, 8)} in ${secs.toFixed(2)} s`);
    if (r.errors.length > 0) {
      const integrity = r.errors.some((e) => e.integrity);
      throw new SnapError(integrity ? 'integrity' : 'io', `Restore incomplete: ${r.errors.length} path${r.errors.length === 1 ? '' : 's'} failed, first: ${r.errors[0]!.path}: ${r.errors[0]!.message}`);
    }
    return 0;
  },
};
