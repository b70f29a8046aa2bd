/** Picks the storage driver for a local repository path. */
import * as fsp from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import type { Storage } from '../storage/types.js';
import { BtrfsStorage } from './btrfs.js';
import { LocalDirStorage, type DirStorageOptions } from './localdir.js';
import { RemoteStorage, sshOptionsFromEnv } from './ssh.js';

/**
 * BtrfsStorage when the repository's current is a btrfs subvolume, or when there is no repository yet
 * and the path (or its nearest existing parent) is on btrfs; LocalDirStorage otherwise.
 */
export async function openStorage(path: string, opts?: DirStorageOptions): Promise<Storage> {
  if (path.startsWith('ssh://')) return RemoteStorage.connectSsh(path, sshOptionsFromEnv(process.env));
  const root = resolve(path);
  const current = join(root, 'current');
  const hasCurrent = (await fsp.lstat(current).catch(() => null)) !== null;
  const btrfs = hasCurrent
    ? await BtrfsStorage.isSubvolume(current)
    : await BtrfsStorage.isBtrfs(await nearestExisting(root));
  return btrfs ? new BtrfsStorage(root, opts) : new LocalDirStorage(root, opts);
}

async function nearestExisting(path: string): Promise<string> {
  let p = path;
  while ((await fsp.lstat(p).catch(() => null)) === null && dirname(p) !== p) p = dirname(p);
  return p;
}
