/**
 * `snapcrypt-server status`: per user, without any key (I6): the last successful backup (the newest
 * sealed snapshot, named by the server's clock), its age, the number of snapshots, the bytes of the
 * objects in `current` (from the usage ledger serve keeps, else one walk), the user's quota, and
 * whether the user is overdue by their threshold (policy.json "overdue").
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { isSnapshotName, objectBytesOf, readUsageLedger } from '../drivers/localdir.js';
import { userAreaPaths } from './area.js';
import { forUser, readServerFiles } from './policy.js';
import { historyOnly } from './history.js';
import { USER_NAME } from './seal-helper.js';

export interface UserStatus {
  readonly user: string;
  /** The newest snapshot's name (its server time), or null if there is none. */
  readonly last: string | null;
  /** Milliseconds since the newest snapshot, or null if there is none. */
  readonly ageMs: number | null;
  readonly snapshots: number;
  /** Bytes of the objects in the user's current (apparent sizes), from the usage ledger or a walk. */
  readonly currentBytes: number;
  /** The user's quota on currentBytes (policy.json "quota"), or null. */
  readonly quotaBytes: number | null;
  /**
   * Bytes of the objects only the user's snapshots hold, not current (history.ts): about what deleting
   * every snapshot would give back. Null unless asked for (it reads every snapshot's index).
   */
  readonly historyBytes: number | null;
  readonly overdueAfterMs: number;
  /** No snapshot, or the newest is older than overdueAfterMs. */
  readonly overdue: boolean;
}

/** The status of every user that has an area or snapshots (or of one), sorted by name. */
export async function status(opts: {
  configFile: string;
  user?: string;
  now?: number;
  history?: boolean;
  /** server.json and policy.json when the caller has read them already. */
  files?: Awaited<ReturnType<typeof readServerFiles>>;
}): Promise<UserStatus[]> {
  const { config, policy } = opts.files ?? (await readServerFiles(opts.configFile, false));
  const now = opts.now ?? Date.now();
  let users: string[];
  if (opts.user !== undefined) {
    if (!USER_NAME.test(opts.user)) throw new SnapError('usage', `Invalid user name ${JSON.stringify(opts.user)}`);
    users = [opts.user];
  } else {
    const names = new Set<string>();
    for (const sub of ['users', 'snapshots']) {
      for (const n of await fsp.readdir(join(config.root, sub)).catch(() => [] as string[])) if (USER_NAME.test(n)) names.add(n);
    }
    users = [...names].sort();
  }
  const out: UserStatus[] = [];
  for (const user of users) {
    const snapDir = join(config.root, 'snapshots', user);
    const area = userAreaPaths(config.root, user);
    const userDir = area.home;
    const names = (await fsp.readdir(snapDir).catch(() => null))?.filter(isSnapshotName).sort() ?? null;
    if (names === null && (await fsp.stat(userDir).catch(() => null)) === null) {
      throw new SnapError('not-found', `No user ${user} on this server (neither ${userDir} nor ${snapDir} exists)`);
    }
    const last = names?.at(-1) ?? null;
    const ageMs = last === null ? null : now - Date.parse(last);
    const overdueAfterMs = forUser(policy.overdue, user);
    out.push({
      user,
      last,
      ageMs,
      snapshots: names?.length ?? 0,
      currentBytes: (await readUsageLedger(area.lockDir, area.current)) ?? (await objectBytesOf(area.current).catch(() => 0)),
      quotaBytes: forUser(policy.quota, user),
      historyBytes: opts.history === true && names !== null ? (await historyOnly(names.map((n) => join(snapDir, n, 'repo')), area.current)).bytes : null,
      overdueAfterMs,
      overdue: ageMs === null || ageMs > overdueAfterMs,
    });
  }
  return out;
}
