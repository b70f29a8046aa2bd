import { SnapError } from '../core/errors.js';
import { verify } from '../engine/verify.js';
import { type Command, commonHelp, fmtBytes } from './common.js';

export const verifyCommand: Command = {
  name: 'verify',
  summary: 'check the repository',
  usage: `Usage: snapcrypt verify --repo R [--read-data] [--snapshot ID]

Checks every snapshot: its head, index and root, that every tree decrypts and authenticates, and that
every object a tree needs is present and listed. With --read-data, every chunk is also downloaded,
decrypted and authenticated (each distinct chunk once).

Options:
      --read-data       authenticate all data, not only the structure
      --snapshot ID     check only this snapshot (repeatable)

${commonHelp}

Exit status: 0 no problem, 6 problems found (each named with its snapshot and path).`,
  options: { 'read-data': { type: 'boolean' }, snapshot: { type: 'string', multiple: true } },
  allowPositionals: false,
  async run(ctx) {
    const repo = await ctx.openRepo();
    const refs = ctx.list('snapshot');
    const snapshots = refs.length > 0 ? await Promise.all(refs.map(async (r) => (await repo.resolveSnapshot(r)).info)) : undefined;
    const t0 = Date.now();
    const r = await verify(repo, {
      readData: ctx.values['read-data'] === true,
      ...(snapshots ? { snapshots } : {}),
      onProgress: ctx.progressEnabled ? (p) => ctx.progress(`${p.snapshots} snapshots, ${p.trees} trees, ${p.chunksChecked} chunks, ${fmtBytes(p.bytesChecked)}`) : undefined,
    });
    ctx.progressDone();
    for (const p of r.problems) {
      ctx.emit({ type: 'problem', ...p });
      if (!ctx.json) ctx.io.stderr.write(`error: snapshot ${p.snapshot}: ${p.path}: ${p.message}\n`);
    }
    const secs = (Date.now() - t0) / 1000;
    ctx.emit({ type: 'summary', snapshots: r.snapshots, trees: r.trees, chunks: r.chunksChecked, bytes: r.bytesChecked, problems: r.problems.length, seconds: secs });
    ctx.out(`checked ${r.snapshots} snapshots, ${r.trees} trees${ctx.values['read-data'] ? `, ${r.chunksChecked} chunks (${fmtBytes(r.bytesChecked)})` : ''} in ${secs.toFixed(2)} s: ${r.problems.length === 0 ? 'no problems' : `${r.problems.length} problems`}`);
    if (r.problems.length > 0) throw new SnapError('integrity', `Repository ${repo.storage.location} has ${r.problems.length} problem${r.problems.length === 1 ? '' : 's'}, first: snapshot ${r.problems[0]!.snapshot}: ${r.problems[0]!.path}`);
    return 0;
  },
};
