/**
 * A user's repository area on the backup server (layout in docs/SERVER.md):
 *
 *   <root>/users/<user>/              root:<user> 0750
 *     current/                        btrfs subvolume, top directory root:<user> 0750 (made by adduser)
 *       repo/                         <user>:<user> 0700: what DirStorage calls current
 *     run/                            <user>:<user> 0700: the writer lock, the usage ledger and the
 *                                     object directories' state of the last commit (outside the subvolume)
 *   <root>/snapshots/<user>/          root:<user> 0750
 *     <ISO time>/                     read-only snapshot of users/<user>/current, taken by root
 *       repo/                         the repository state of that commit
 *
 * Everything is DirStorage (same checks, durability and pruning as the local drivers), except the last
 * step of commit: the user cannot snapshot a subvolume they do not own, and must not own their
 * snapshots (an owner can flip the ro property and delete them), so commit runs the root helper
 * `sudo -n <seal>` (no arguments; it learns the user from SUDO_UID) which snapshots users/<user>/current
 * into snapshots/<user>/<name> and prints the name, chosen by the server's clock.
 */
import * as fsp from 'node:fs/promises';
import { userInfo } from 'node:os';
import { join, resolve } from 'node:path';
import { SnapError } from '../core/errors.js';
import { DirStorage, isSnapshotName } from '../drivers/localdir.js';
import type { SnapshotInfo, Storage } from '../storage/types.js';
import { DEFAULT_CONFIG_FILE, HelperError, readServerConfig, RunError, runSafe, USER_NAME } from './seal-helper.js';

export interface UserAreaOptions {
  /** The server's root directory; read from the configuration file when absent. */
  readonly root?: string;
  /** The account whose area to open; the calling user by default. */
  readonly user?: string;
  /** The server configuration (default /etc/snapcrypt/server.json), read when root or seal is absent. */
  readonly configFile?: string;
  /** The seal command run through `sudo -n`; the configuration's "seal" when absent. */
  readonly seal?: string;
}

/** Paths of one user's area under the server root. */
export function userAreaPaths(root: string, user: string) {
  const home = join(root, 'users', user);
  return {
    home,
    subvolume: join(home, 'current'),
    current: join(home, 'current', 'repo'),
    lockDir: join(home, 'run'),
    snapshots: join(root, 'snapshots', user),
  };
}

class UserAreaStorage extends DirStorage {
  readonly user: string;
  private readonly sealCommand: string;

  constructor(root: string, user: string, sealCommand: string) {
    const p = userAreaPaths(root, user);
    super(p.home, { layout: { current: p.current, snapshots: p.snapshots, lockDir: p.lockDir, snapshotState: 'repo' } });
    this.user = user;
    this.sealCommand = sealCommand;
  }

  protected override async createCurrent(): Promise<void> {
    const st = await fsp.lstat(this.current).catch(() => null);
    if (st === null || !st.isDirectory()) {
      throw new SnapError(
        'not-found',
        `No area for user ${this.user} on this server (${this.current} is missing); ask the administrator to run "snapcrypt-server adduser ${this.user}"`,
      );
    }
  }

  protected override async seal(): Promise<void> {
    throw new SnapError('internal', 'A server area is sealed by the root helper, never directly');
  }

  protected override async sealCurrent(): Promise<SnapshotInfo> {
    let stdout: string;
    try {
      stdout = await runSafe('sudo', ['-n', this.sealCommand]);
    } catch (err) {
      if (!(err instanceof RunError)) throw err;
      throw new SnapError('io', `Cannot seal the area of ${this.user}: ${err.message}`, { cause: err.cause });
    }
    const name = stdout.endsWith('\n') ? stdout.slice(0, -1) : stdout;
    if (!isSnapshotName(name)) {
      throw new SnapError('io', `Cannot seal the area of ${this.user}: the seal helper printed ${JSON.stringify(stdout.slice(0, 80))}, not a snapshot name`);
    }
    const st = await fsp.lstat(join(this.snapshotsDir, name)).catch(() => null);
    if (st === null || !st.isDirectory()) {
      throw new SnapError('io', `Cannot seal the area of ${this.user}: the seal helper named ${name}, which is not in ${this.snapshotsDir}`);
    }
    return { name, time: Date.parse(name) };
  }
}

/**
 * The Storage of one user's area on this server (the calling user's by default): current is
 * users/<user>/current/repo, snapshots are listed from snapshots/<user>/ (state at <name>/repo), and
 * commit seals through `sudo -n <seal>`.
 */
export async function openUserArea(opts: UserAreaOptions = {}): Promise<Storage> {
  const user = opts.user ?? userInfo().username;
  if (!USER_NAME.test(user)) throw new SnapError('usage', `Invalid user name ${JSON.stringify(user)}`);
  let root = opts.root;
  let seal = opts.seal;
  if (root === undefined || seal === undefined) {
    try {
      const config = await readServerConfig(opts.configFile ?? DEFAULT_CONFIG_FILE, false);
      root ??= config.root;
      seal ??= config.seal;
    } catch (err) {
      if (err instanceof HelperError) throw new SnapError('not-found', err.message, { cause: err });
      throw err;
    }
  }
  return new UserAreaStorage(resolve(root), user, seal);
}
