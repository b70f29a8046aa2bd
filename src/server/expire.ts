/**
 * `snapcrypt-server expire`: applies each user's retention policy (retention.ts) to their sealed
 * snapshots and deletes, as root, those it does not keep. Needs no key (I6): it reads only snapshot
 * names, which are the server's own times (I4). The newest snapshot of each user is always kept.
 *
 * The policies are policy.json's "retention" (policy.ts, docs/SERVER.md "Retention"). Without
 * policy.json, or for a user without a policy and no default, nothing is deleted.
 *
 * Afterwards (not with dryRun), when server.json names a "metricsDir", it rewrites every user's
 * metrics file and snapcrypt_expire.prom (metrics.ts).
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { isSnapshotName } from '../drivers/localdir.js';
import { writeExpireMetrics, writeUserMetrics } from './metrics.js';
import { forUser, readServerFiles } from './policy.js';
import { applyRetention, type Decision } from './retention.js';
import { RunError, runSafe } from './seal-helper.js';
import { status } from './status.js';
import { serverUsers } from './users.js';

export interface ExpireOptions {
  readonly configFile: string;
  /** Only this user (default: every user with a snapshots directory). */
  readonly user?: string;
  /** Show the decisions, delete nothing. */
  readonly dryRun: boolean;
  /** Called with each user's decisions (newest first) once they are carried out. */
  readonly report: (user: string, decisions: ReadonlyArray<Decision & { deleted: boolean }>) => void;
}

/** Applies the policies; returns the number of snapshots deleted (or that would be, with dryRun). */
export async function expire(opts: ExpireOptions): Promise<number> {
  if (!opts.dryRun && process.getuid?.() !== 0) throw new SnapError('usage', 'snapcrypt-server expire deletes snapshots as root: run it as root (or with --dry-run)');
  const { config, policy: policies } = await readServerFiles(opts.configFile, !opts.dryRun);
  const snapshotsRoot = join(config.root, 'snapshots');
  const users = await serverUsers(config.root, opts.user);
  let count = 0;
  for (const user of users) {
    const dir = join(snapshotsRoot, user);
    const names = (await fsp.readdir(dir).catch((err: unknown) => {
      if ((err as { code?: unknown }).code === 'ENOENT') throw new SnapError('not-found', `No snapshots directory for user ${user} (${dir})`);
      throw new SnapError('io', `Cannot list ${dir}: ${(err as Error).message}`);
    })).filter(isSnapshotName);
    const policy = forUser(policies.retention, user) ?? {};
    const decisions = applyRetention(names.map((name) => ({ name, time: Date.parse(name) })), policy);
    const done: Array<Decision & { deleted: boolean }> = [];
    for (const d of decisions) {
      let deleted = false;
      if (!d.keep) {
        count++;
        if (!opts.dryRun) {
          await runSafe('btrfs', ['subvolume', 'delete', join(dir, d.name)]).catch((err: unknown) => {
            throw err instanceof RunError ? new SnapError('io', `Cannot delete the snapshot ${join(dir, d.name)}: ${err.reason}`) : err;
          });
          deleted = true;
        }
      }
      done.push({ ...d, deleted });
    }
    opts.report(user, done);
  }
  if (!opts.dryRun && config.metricsDir !== undefined) {
    await writeUserMetrics(config.metricsDir, await status({ configFile: opts.configFile, files: { config, policy: policies } }));
    await writeExpireMetrics(config.metricsDir, Date.now(), count);
  }
  return count;
}
