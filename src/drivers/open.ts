/** Picks the storage driver for a local repository path. */
import { dirname, join, resolve } from 'node:path';
import type { Storage } from '../storage/types.js';
import type { DirStorageOptions } from './localdir.js';
import type { SshInvocationOptions } from './sshkeys.js';

/**
 * RemoteStorage over ssh for ssh://[user@]host[:port]/ (options: ssh, default SNAPCRYPT_SSH_OPTIONS
 * of this process, no passphrase, so plain ssh); BtrfsStorage when the repository's current is a btrfs
 * subvolume, or when there is no repository yet and the path (or its nearest existing parent) is on
 * btrfs; LocalDirStorage otherwise. Each kind's modules are loaded only when it is opened: a client of
 * an ssh:// repository does not load the directory drivers (nor node:fs/promises, about 1.1 MiB of
 * RSS), the server does not load ssh's.
 */
export async function openStorage(path: string, opts?: DirStorageOptions, ssh?: SshInvocationOptions): Promise<Storage> {
  if (path.startsWith('ssh://')) {
    const { RemoteStorage, sshOptionsFromEnv } = await import('./ssh.js');
    return RemoteStorage.connectSsh(path, ssh ?? sshOptionsFromEnv(process.env));
  }
  const [fsp, { BtrfsStorage }, { LocalDirStorage }] = await Promise.all([import('node:fs/promises'), import('./btrfs.js'), import('./localdir.js')]);
  const exists = async (p: string): Promise<boolean> => (await fsp.lstat(p).catch(() => null)) !== null;
  const root = resolve(path);
  const current = join(root, 'current');
  let btrfs: boolean;
  if (await exists(current)) btrfs = await BtrfsStorage.isSubvolume(current);
  else {
    let p = root; // (the nearest existing parent)
    while (!(await exists(p)) && dirname(p) !== p) p = dirname(p);
    btrfs = await BtrfsStorage.isBtrfs(p);
  }
  return btrfs ? new BtrfsStorage(root, opts) : new LocalDirStorage(root, opts);
}
