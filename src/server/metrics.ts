/**
 * The metrics files that expire and alert write for node_exporter's textfile collector (docs/SERVER.md
 * "Metrics and alerts"), in server.json's "metricsDir": one file per user from status() rows, with the
 * policy gauges the seal helper cannot know, and the summary of the last expiry. The format and the
 * atomic write are the seal helper's (formatUserMetrics, formatMetrics, writeMetricsFile), so that
 * every writer writes the same thing.
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { formatMetrics, formatUserMetrics, USER_METRICS_PREFIX, USER_NAME, userMetricsFileName, writeMetricsFile } from './seal-helper.js';
import type { UserStatus } from './status.js';

export const EXPIRE_METRICS_FILE = 'snapcrypt_expire.prom';

async function write(dir: string, name: string, text: string): Promise<void> {
  await writeMetricsFile(dir, name, text).catch((err: unknown) => {
    const e = err as { code?: unknown; message?: unknown };
    throw new SnapError('io', `Cannot write the metrics file ${join(dir, name)}: ${typeof e.code === 'string' ? e.code : String(e.message)}; check "metricsDir" in server.json (a root-owned directory)`, { cause: err });
  });
}

/**
 * Rewrites the file of every user in rows (status() of all users) and removes the files snapcrypt
 * wrote for users that have neither an area nor snapshots any more; other files are left alone.
 */
export async function writeUserMetrics(dir: string, rows: readonly UserStatus[]): Promise<void> {
  for (const row of rows) await write(dir, userMetricsFileName(row.user), formatUserMetrics(row));
  const users = new Set(rows.map((r) => r.user));
  const names = await fsp.readdir(dir).catch((err: unknown) => {
    throw new SnapError('io', `Cannot list the metrics directory ${dir}: ${(err as Error).message}`, { cause: err });
  });
  for (const name of names) {
    if (!name.startsWith(USER_METRICS_PREFIX) || !name.endsWith('.prom')) continue;
    const user = name.slice(USER_METRICS_PREFIX.length, -'.prom'.length);
    if (USER_NAME.test(user) && name === userMetricsFileName(user) && !users.has(user)) {
      await fsp.rm(join(dir, name), { force: true }).catch((err: unknown) => {
        throw new SnapError('io', `Cannot remove the metrics file ${join(dir, name)} of the removed user ${user}: ${(err as Error).message}`, { cause: err });
      });
    }
  }
}

/** snapcrypt_expire.prom: when expire last ran (not a dry run) and how many snapshots it deleted. */
export async function writeExpireMetrics(dir: string, at: number, deleted: number): Promise<void> {
  await write(
    dir,
    EXPIRE_METRICS_FILE,
    formatMetrics([
      { name: 'snapcrypt_expire_last_run_timestamp_seconds', help: 'Time the last expire run ended, in seconds since the epoch.', samples: [{ labels: {}, value: at / 1000 }] },
      { name: 'snapcrypt_expire_deleted_snapshots', help: 'Snapshots the last expire run deleted.', samples: [{ labels: {}, value: deleted }] },
    ]),
  );
}
