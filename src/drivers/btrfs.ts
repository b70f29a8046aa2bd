/**
 * Storage on btrfs: the same layout and code as LocalDirStorage (see localdir.ts for how each write is
 * made durable), but `current` is a subvolume and commit seals it with a read-only btrfs snapshot.
 *
 * Sealing: after the commit has flushed current (syncfs), written index and head, and pruned current,
 * `btrfs subvolume snapshot -r current snapshots/<name>` creates the snapshot in one transaction,
 * which it commits before it returns: it exists completely or not at all, with no temp directory.
 * What is left unwritten by then is small (index and head are fsynced, the objects were flushed by
 * the commit's syncfs): the snapshot flushes it itself. A second `sync -f` before the snapshot cost
 * 28-34 ms per commit (strace of a commit with no change) and, on a server shared by several users,
 * would also flush their uploads in progress. The snapshot shares
 * extents with current (copy-on-write), so later changes to current never reach it, and being
 * read-only it refuses every write, even root's, until someone flips its ro property (which its owner
 * can do: see FACTS.md; the server protects snapshots with root-owned directories, not with this flag).
 *
 * A snapshot is the whole subvolume, so it holds whatever current holds at that moment: the lock
 * therefore lives beside current (<area>/lock, with the holder's host and pid), never in it, and the
 * commit has already removed the `unsynced` marker and every temp file; a snapshot holds config, keys/,
 * objects/, head and index only. `btrfs` and `sync` are spawned without a shell.
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { DIR_MODE, DirStorage, execFileAsync } from './localdir.js';

/** statfs f_type of btrfs. */
const BTRFS_SUPER_MAGIC = 0x9123683e;
/** Inode number of the top directory of every btrfs subvolume. */
const SUBVOLUME_ROOT_INO = 256;

/** Run a program (no shell); failures become SnapError('io') quoting its first line of stderr. */
async function run(cmd: string, args: string[]): Promise<void> {
  try {
    await execFileAsync(cmd, args, { encoding: 'utf8', timeout: 10 * 60_000 });
  } catch (err) {
    const e = err as { code?: unknown; stderr?: unknown; message?: unknown };
    if (e.code === 'ENOENT') {
      throw new SnapError('io', `Cannot run ${cmd}: command not found; install ${cmd === 'btrfs' ? 'btrfs-progs' : 'coreutils'}`);
    }
    const stderr = typeof e.stderr === 'string' ? e.stderr.trim().split('\n')[0] : undefined;
    throw new SnapError('io', `${cmd} ${args.join(' ')} failed: ${stderr || String(e.message)}`, { cause: err });
  }
}

export class BtrfsStorage extends DirStorage {
  /** Whether path (which must exist) is on a btrfs file system. */
  static async isBtrfs(path: string): Promise<boolean> {
    try {
      return (await fsp.statfs(path)).type === BTRFS_SUPER_MAGIC;
    } catch {
      return false;
    }
  }

  /** Whether path is the top directory of a btrfs subvolume. */
  static async isSubvolume(path: string): Promise<boolean> {
    const st = await fsp.stat(path).catch(() => null);
    return st !== null && st.isDirectory() && st.ino === SUBVOLUME_ROOT_INO && (await BtrfsStorage.isBtrfs(path));
  }

  protected override async createCurrent(): Promise<void> {
    if (await BtrfsStorage.isSubvolume(this.current)) return; // left by an interrupted init
    if ((await fsp.lstat(this.current).catch(() => null)) !== null) {
      throw new SnapError('usage', `Cannot create a btrfs repository at ${this.location}: ${this.current} exists and is not a btrfs subvolume; remove it or use a local directory repository`);
    }
    if (!(await BtrfsStorage.isBtrfs(this.root))) {
      throw new SnapError('usage', `Cannot create a btrfs repository at ${this.location}: it is not on a btrfs file system`);
    }
    await run('btrfs', ['subvolume', 'create', this.current]);
    await fsp.chmod(this.current, DIR_MODE);
  }

  protected override async seal(name: string): Promise<void> {
    if (!(await BtrfsStorage.isSubvolume(this.current))) {
      throw new SnapError('usage', `Cannot seal ${this.current}: it is not a btrfs subvolume; open this repository with the local directory driver`);
    }
    // The base class checked that snapshots/<name> does not exist (btrfs would nest into a directory).
    await run('btrfs', ['subvolume', 'snapshot', '-r', this.current, join(this.snapshotsDir, name)]);
    await this.syncDir(this.snapshotsDir);
  }
}
