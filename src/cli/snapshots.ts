import { SnapError } from '../core/errors.js';
import { type Command, commonHelp, fmtBytes, table } from './common.js';

export const snapshotsCommand: Command = {
  name: 'snapshots',
  summary: 'list snapshots',
  usage: `Usage: snapcrypt snapshots --repo R

Lists the snapshots, oldest first: ID, time (the storage's clock, when it was sealed), host, paths,
size and number of files.

${commonHelp}`,
  options: {},
  allowPositionals: false,
  async run(ctx) {
    const repo = await ctx.openRepo();
    const all = await repo.listSnapshotsChecked();
    const rows = [['ID', 'Time', 'Host', 'Paths', 'Size', 'Files']];
    let damaged = 0;
    const snaps = [];
    for (const s of all) {
      if ('error' in s) {
        damaged++;
        rows.push(['????????', s.info.name, '', `DAMAGED: ${s.error.message}`, '', '']);
        ctx.emit({ type: 'snapshot', time: s.info.name, damaged: true, error: s.error.message });
        continue;
      }
      snaps.push(s);
      const paths = s.root.paths.map((p) => p.toString('utf8'));
      rows.push([s.rootId.slice(0, 8), s.info.name, s.root.host, paths.join(' '), fmtBytes(s.root.stats.bytes), String(s.root.stats.files)]);
      ctx.emit({
        type: 'snapshot', id: s.rootId.slice(0, 8), fullId: s.rootId, time: s.info.name, host: s.root.host, user: s.root.user,
        paths, tags: s.root.tags, bytes: s.root.stats.bytes, files: s.root.stats.files, dirs: s.root.stats.dirs, clientTime: s.root.clientTime,
      });
    }
    ctx.warnIfStale(all.map((s) => s.info).sort((a, b) => a.time - b.time).at(-1), repo.storage.location);
    if (all.length === 0) ctx.out('no snapshots yet');
    else ctx.out(table(rows) + `\n${all.length} snapshot${all.length === 1 ? '' : 's'}`);
    if (damaged > 0) {
      throw new SnapError('integrity', `${damaged} snapshot${damaged === 1 ? '' : 's'} of ${repo.storage.location} cannot be read; run "snapcrypt verify"`);
    }
    return 0;
  },
};
