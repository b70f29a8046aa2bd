/**
 * verify: for every snapshot, check that its head, index and snapshot root are sound, every tree
 * decrypts and authenticates, every object a tree needs is present in that snapshot and listed in its
 * index; with readData, also decrypt and authenticate every chunk. Every problem is reported with the
 * snapshot and the path that needs the object.
 *
 * Trees are read from the repository, never from the local tree cache (an authentic cached copy would
 * hide a damaged tree on the target). Each distinct chunk is authenticated once per run, in the first
 * snapshot that needs it. A server can only replay snapshot roots it already has, so a root shared by
 * two snapshots, or a parent that is not older than its child, is reported as a replaced snapshot.
 */
import { type TreeEntry, NodeKind, ZERO_CHUNK, decodeHead, decodeTree } from '../core/format.js';
import { ObjectType } from '../core/crypto.js';
import { IdList, IdSet, ID_BYTES } from '../core/idset.js';
import { SnapError } from '../core/errors.js';
import type { Repository, SnapshotRecord } from './repository.js';
import type { SnapshotInfo } from '../storage/types.js';

export interface VerifyProblem {
  readonly snapshot: string;
  readonly path: string;
  readonly objectId: string | null;
  readonly message: string;
}

export interface VerifyResult {
  snapshots: number;
  trees: number;
  chunksChecked: number;
  bytesChecked: number;
  problems: VerifyProblem[];
}

export interface VerifyOptions {
  readonly readData: boolean;
  readonly snapshots?: readonly SnapshotInfo[];
  readonly onProgress?: ((r: VerifyResult) => void) | undefined;
}

export async function verify(repo: Repository, opts: VerifyOptions): Promise<VerifyResult> {
  const result: VerifyResult = { snapshots: 0, trees: 0, chunksChecked: 0, bytesChecked: 0, problems: [] };
  const infos = opts.snapshots ?? (await repo.storage.listSnapshots());
  /** Chunks already authenticated (objects are immutable and named by content). */
  const checked = new Set<string>();
  /** Root id -> name of the first snapshot that has it, and each snapshot's parent root. */
  const rootsSeen = new Map<string, string>();
  const parents: Array<{ name: string; parent: string }> = [];
  for (const info of infos) {
    result.snapshots++;
    const problem = (path: string, objectId: string | null, message: string): void => {
      result.problems.push({ snapshot: info.name, path, objectId, message });
    };
    let snap: SnapshotRecord;
    try {
      snap = await repo.readSnapshot(info);
    } catch (err) {
      const head = await (await repo.storage.openSnapshot(info.name)).readFile('head').catch(() => null);
      problem('/', head ? safeHead(head) : null, err instanceof Error ? err.message : String(err));
      continue;
    }
    // A snapshot root can only be made with the key, so a server can only replay old ones: a root that
    // another snapshot already has, or a parent that is a later snapshot, means a rolled-back snapshot.
    const twin = rootsSeen.get(snap.rootId);
    if (twin !== undefined) {
      problem('/', snap.rootId, `snapshot root ${snap.rootId.slice(0, 8)} is also the root of snapshot ${twin}: this snapshot was replaced by a copy of another`);
    }
    rootsSeen.set(snap.rootId, info.name);
    if (snap.root.parent !== null) parents.push({ name: info.name, parent: snap.root.parent });
    const reader = snap.reader;
    const presentList = new IdList();
    for await (const hex of reader.listObjects()) presentList.pushHex(hex);
    const present = new IdSet(presentList.sortedUnique());
    const indexBuf = (await reader.readFile('index')) ?? Buffer.alloc(0);
    const index = new IdSet(indexBuf.subarray(0, indexBuf.length - (indexBuf.length % ID_BYTES)));
    if (indexBuf.length % ID_BYTES !== 0) problem('/', null, 'index is malformed');
    const need = (path: string, id: Buffer): boolean => {
      const hex = id.toString('hex');
      if (!index.has(id)) problem(path, hex, `object ${hex} is not listed in the snapshot's index (the server may drop it)`);
      if (!present.has(id)) {
        problem(path, hex, `object ${hex} is missing`);
        return false;
      }
      return true;
    };
    need('/', Buffer.from(snap.rootId, 'hex'));
    const seenTrees = new Set<string>();
    const walk = async (treeId: Buffer, path: string): Promise<void> => {
      const hex = treeId.toString('hex');
      if (seenTrees.has(hex)) return;
      seenTrees.add(hex);
      if (!need(path, treeId)) return;
      let tree: TreeEntry[];
      try {
        // From the repository itself, never the local tree cache: a cached (authentic) copy would hide
        // a tree that was damaged or replaced on the target.
        tree = decodeTree(await repo.loadObject(reader, treeId, ObjectType.tree));
        result.trees++;
      } catch (err) {
        problem(path, hex, err instanceof Error ? err.message : String(err));
        return;
      }
      for (const e of tree) {
        const p = (path === '/' ? '/' : path + '/') + e.name.toString('utf8');
        if (e.kind === NodeKind.dir && e.subtree) {
          await walk(e.subtree, p);
        } else if (e.kind === NodeKind.file) {
          for (const c of e.chunks) {
            if (c.equals(ZERO_CHUNK) || !need(p, c) || !opts.readData) continue;
            const chex = c.toString('hex');
            if (checked.has(chex)) continue;
            try {
              const plain = await repo.loadObject(reader, c, ObjectType.data);
              result.chunksChecked++;
              result.bytesChecked += plain.length;
              checked.add(chex);
            } catch (err) {
              if (err instanceof SnapError && err.code !== 'integrity' && err.code !== 'not-found') throw err;
              problem(p, chex, err instanceof Error ? err.message : String(err));
            }
          }
          opts.onProgress?.(result);
        }
      }
    };
    await walk(Buffer.from(snap.root.tree, 'hex'), '/');
  }
  // A parent must be older than its child (snapshots are listed oldest first).
  const order = new Map<string, number>(infos.map((info, i) => [info.name, i]));
  for (const { name, parent } of parents) {
    const parentSnap = rootsSeen.get(parent);
    if (parentSnap !== undefined && order.get(parentSnap)! >= order.get(name)!) {
      result.problems.push({
        snapshot: name, path: '/', objectId: parent,
        message: `snapshot's parent ${parent.slice(0, 8)} is the root of snapshot ${parentSnap}, which is not older: snapshots were replaced or reordered`,
      });
    }
  }
  return result;
}

function safeHead(b: Buffer): string | null {
  try {
    return decodeHead(b);
  } catch {
    return null;
  }
}
