/** Picks the storage driver for a local repository path. */
import * as fsp from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import type { Storage } from '../storage/types.js';
import { BtrfsStorage } from './btrfs.js';
import { LocalDirStorage, type DirStorageOptions } from './localdir.js';
import type { SshInvocationOptions } from './sshkeys.js';

/**
 * RemoteStorage over ssh for ssh://[user@]host[:port]/ (options: ssh, default SNAPCRYPT_SSH_OPTIONS
 * of this process, no passphrase, so plain ssh); BtrfsStorage when the repository's current is a btrfs
 * subvolume, or when there is no repository yet and the path (or its nearest existing parent) is on
 * btrfs; LocalDirStorage otherwise.
 */
export async function openStorage(path: string, opts?: DirStorageOptions, ssh?: SshInvocationOptions): Promise<Storage> {
  if (path.startsWith('ssh://')) {
    // (loaded only here: the server, which opens local paths, does not load ssh's modules)
    const { RemoteStorage, sshOptionsFromEnv } = await import('./ssh.js');
    return RemoteStorage.connectSsh(path, ssh ?? sshOptionsFromEnv(process.env));
  }
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
