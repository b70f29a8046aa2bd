import { type TreeEntry, NodeKind } from '../core/format.js';
import { lookup } from '../engine/restore.js';
import { SnapError } from '../core/errors.js';
import { type Command, commonHelp, parseSnapshotRef } from './common.js';

const kindName: Record<number, string> = { 1: 'file', 2: 'dir', 3: 'symlink', 4: 'fifo', 5: 'chardev', 6: 'blockdev', 7: 'socket' };
const kindChar: Record<number, string> = { 1: '-', 2: 'd', 3: 'l', 4: 'p', 5: 'c', 6: 'b', 7: 's' };

function modeString(e: TreeEntry): string {
  const m = e.mode;
  const rwx = (v: number, special: boolean, ch: string): string =>
    (v & 4 ? 'r' : '-') + (v & 2 ? 'w' : '-') + (special ? (v & 1 ? ch : ch.toUpperCase()) : v & 1 ? 'x' : '-');
  return kindChar[e.kind] + rwx(m >> 6, (m & 0o4000) !== 0, 's') + rwx(m >> 3, (m & 0o2000) !== 0, 's') + rwx(m, (m & 0o1000) !== 0, 't');
}

function mtimeIso(ns: bigint): string {
  const ms = Number(ns / 1_000_000n);
  return new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z');
}

export const lsCommand: Command = {
  name: 'ls',
  summary: 'list the files of a snapshot',
  usage: `Usage: snapcrypt ls --repo R [-l] [--no-recursive] SNAPSHOT[:PATH]

Lists the entries below PATH (default: everything) in SNAPSHOT (an ID, a time name, or "latest").

Options:
  -l, --long            mode, owner, size and mtime
      --no-recursive    only the entries directly below PATH

${commonHelp}`,
  options: { long: { type: 'boolean', short: 'l' }, 'no-recursive': { type: 'boolean' } },
  allowPositionals: true,
  async run(ctx) {
    const arg = ctx.positionals[0];
    if (arg === undefined || ctx.positionals.length > 1) {
      throw new SnapError('usage', 'ls: give exactly one SNAPSHOT[:PATH]');
    }
    const { ref, path } = parseSnapshotRef(arg);
    const repo = await ctx.openRepo();
    const snap = await repo.resolveSnapshot(ref);
    const start = Buffer.from(path ?? '/');
    const { entry, tree } = await lookup(repo, snap, start);
    const long = ctx.values['long'] === true;
    const recursive = ctx.values['no-recursive'] !== true;
    const base = '/' + start.toString('utf8').split('/').filter(Boolean).join('/');
    const print = (p: string, e: TreeEntry): void => {
      const target = e.kind === NodeKind.symlink && e.target ? e.target.toString('utf8') : undefined;
      ctx.emit({ type: 'node', path: p, kind: kindName[e.kind], mode: e.mode, uid: e.uid, gid: e.gid, size: e.size, mtime: mtimeIso(e.mtimeNs), ...(target !== undefined ? { target } : {}) });
      if (long) {
        ctx.out(`${modeString(e)} ${String(e.uid).padStart(5)} ${String(e.gid).padStart(5)} ${String(e.size).padStart(12)} ${mtimeIso(e.mtimeNs)} ${p}${target !== undefined ? ` -> ${target}` : ''}`);
      } else {
        ctx.out(p);
      }
    };
    const walk = async (dir: string, entries: TreeEntry[]): Promise<void> => {
      for (const e of entries) {
        const p = (dir === '/' ? '/' : dir + '/') + e.name.toString('utf8');
        print(p, e);
        if (recursive && e.kind === NodeKind.dir && e.subtree) await walk(p, await repo.loadTree(snap.reader, e.subtree));
      }
    };
    if (entry && entry.kind !== NodeKind.dir) print(base, entry);
    else await walk(base, tree);
    return 0;
  },
};
