/**
 * The bytes only a user's history holds: the objects listed by some sealed snapshot's clear-text index
 * but not by current's, each counted once (by its size in the newest snapshot that has it). That is
 * what deleting every snapshot would give back, without a key and without btrfs quota groups: objects
 * are immutable and named by their id, so the copies of one id in several snapshots are one extent on
 * btrfs. (An object pruned from current and uploaded again later is two extents; it is counted once,
 * so the figure can be a little low.)
 *
 * The indexes are sorted, so they are read together one id prefix (first byte) at a time: memory holds
 * one prefix's ids, not the indexes, and each index file is opened again for each prefix, so there is
 * no limit from open files however many snapshots there are.
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { ID_BYTES, INDEX_CHUNK, prefixName, takeIndexPrefix } from '../drivers/localdir.js';

interface IndexState {
  readonly dir: string;
  readonly length: number;
  offset: number;
}

async function openIndex(dir: string): Promise<IndexState | null> {
  const st = await fsp.stat(join(dir, 'index')).catch(() => null);
  return st === null || !st.isFile() ? null : { dir, length: st.size - (st.size % ID_BYTES), offset: 0 };
}

/** The ids of one prefix, from where the previous prefix ended (prefixes are taken in order). */
async function take(state: IndexState, prefix: number, scratch: Buffer): Promise<Set<string>> {
  const { ids, next } = await takeIndexPrefix(join(state.dir, 'index'), state.length, state.offset, prefix, scratch);
  state.offset = next;
  return ids;
}

/**
 * Bytes and count of the objects that the repositories in snapshotDirs (each a `repo` directory of a
 * sealed snapshot, oldest first) list and currentDir's index does not. Unreadable indexes count as empty.
 */
export async function historyOnly(snapshotDirs: readonly string[], currentDir: string): Promise<{ bytes: number; objects: number }> {
  const current = await openIndex(currentDir);
  const snapshots = (await Promise.all([...snapshotDirs].reverse().map(openIndex))).filter((s): s is IndexState => s !== null);
  const scratch = Buffer.allocUnsafe(INDEX_CHUNK);
  let bytes = 0;
  let objects = 0;
  for (let p = 0; p < 256; p++) {
    const keep = current === null ? new Set<string>() : await take(current, p, scratch);
    for (const snap of snapshots) {
      for (const id of await take(snap, p, scratch)) {
        if (keep.has(id)) continue;
        keep.add(id); // once
        const st = await fsp.lstat(join(snap.dir, 'objects', prefixName(p), id)).catch(() => null);
        if (st?.isFile()) {
          bytes += st.size;
          objects++;
        }
      }
    }
  }
  return { bytes, objects };
}
