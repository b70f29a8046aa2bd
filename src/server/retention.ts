/**
 * Retention: which sealed snapshots a policy keeps, and why. Pure (no I/O): the server applies it to its
 * own snapshot names, which are its own clock's times (I4), so a client cannot game it.
 *
 * A policy keeps the union of:
 *   - last N: the N newest snapshots;
 *   - hourly/daily/weekly/monthly/yearly N: walking from the newest, the newest snapshot of each of
 *     the N most recent hours (days, ISO weeks, months, years) that have a snapshot;
 *   - within D: every snapshot taken less than D before the newest one. Measured from the newest
 *     snapshot, not from now, so that the history of a user whose backups stopped does not drain away
 *     as time passes;
 *   - the newest snapshot, always.
 * Periods are calendar periods in UTC. A policy that sets nothing keeps everything: an empty or
 * mistyped policy never deletes a user's history.
 */
import { formatDuration } from '../core/duration.js';
import { SnapError } from '../core/errors.js';

export { formatDuration, parseDuration } from '../core/duration.js';

export interface RetentionPolicy {
  readonly last?: number;
  readonly hourly?: number;
  readonly daily?: number;
  readonly weekly?: number;
  readonly monthly?: number;
  readonly yearly?: number;
  /** Milliseconds: keep every snapshot younger than this, counted back from the newest snapshot. */
  readonly withinMs?: number;
}

export interface Snapshot {
  readonly name: string;
  /** Milliseconds since the epoch (the server's clock). */
  readonly time: number;
}

export interface Decision extends Snapshot {
  readonly keep: boolean;
  /** Why it is kept (e.g. "newest", "last 2/3", "daily 1/7", "within 30d"); empty when it is not. */
  readonly reasons: readonly string[];
}

type Period = 'hourly' | 'daily' | 'weekly' | 'monthly' | 'yearly';
const PERIODS: readonly Period[] = ['hourly', 'daily', 'weekly', 'monthly', 'yearly'];

/** The calendar period (UTC) a time falls in, as a comparable key. */
function bucket(period: Period, time: number): string {
  const d = new Date(time);
  const y = d.getUTCFullYear();
  const m = d.getUTCMonth();
  const day = d.getUTCDate();
  switch (period) {
    case 'hourly':
      return `${y}-${m}-${day}T${d.getUTCHours()}`;
    case 'daily':
      return `${y}-${m}-${day}`;
    case 'weekly': {
      // ISO 8601 week: the week (Monday to Sunday) belongs to the year of its Thursday
      const thursday = new Date(Date.UTC(y, m, day + 3 - ((d.getUTCDay() + 6) % 7)));
      const ty = thursday.getUTCFullYear();
      const week = Math.floor((thursday.getTime() - Date.UTC(ty, 0, 1)) / (7 * 86_400_000)) + 1;
      return `${ty}-W${week}`;
    }
    case 'monthly':
      return `${y}-${m}`;
    case 'yearly':
      return `${y}`;
  }
}

/** Whether a policy keeps anything beyond the newest snapshot; a policy that sets nothing keeps all. */
export function isEmptyPolicy(p: RetentionPolicy): boolean {
  return p.last === undefined && p.withinMs === undefined && PERIODS.every((k) => p[k] === undefined);
}

/** Checks a policy's numbers: counts are whole numbers ≥ 0, a duration is finite and ≥ 0. */
export function checkPolicy(p: RetentionPolicy, where: string): void {
  for (const k of ['last', ...PERIODS] as const) {
    const v = p[k];
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new SnapError('usage', `${where}: "${k}" must be a whole number of 0 or more, not ${JSON.stringify(v)}`);
  }
  if (p.withinMs !== undefined && (!Number.isFinite(p.withinMs) || p.withinMs < 0)) {
    throw new SnapError('usage', `${where}: "within" must be a duration of 0 or more`);
  }
}

/**
 * Decides for each snapshot whether the policy keeps it. Returns the snapshots newest first (ties by
 * name), each with its reasons.
 */
export function applyRetention(snapshots: readonly Snapshot[], policy: RetentionPolicy): Decision[] {
  const sorted = [...snapshots].sort((a, b) => b.time - a.time || (a.name < b.name ? 1 : a.name > b.name ? -1 : 0));
  const reasons: string[][] = sorted.map(() => []);
  if (sorted.length === 0) return [];
  if (isEmptyPolicy(policy)) {
    return sorted.map((s) => ({ ...s, keep: true, reasons: ['no retention policy: everything is kept'] }));
  }
  reasons[0]!.push('newest');
  const last = policy.last ?? 0;
  for (let i = 0; i < Math.min(last, sorted.length); i++) reasons[i]!.push(`last ${i + 1}/${last}`);
  for (const period of PERIODS) {
    const want = policy[period] ?? 0;
    let seen: string | null = null;
    let count = 0;
    for (let i = 0; i < sorted.length && count < want; i++) {
      const b = bucket(period, sorted[i]!.time);
      if (b === seen) continue;
      seen = b;
      count++;
      reasons[i]!.push(`${period} ${count}/${want}`);
    }
  }
  if (policy.withinMs !== undefined) {
    const newest = sorted[0]!.time;
    const label = `within ${formatDuration(policy.withinMs)}`;
    sorted.forEach((s, i) => {
      if (newest - s.time < policy.withinMs!) reasons[i]!.push(label);
    });
  }
  return sorted.map((s, i) => ({ ...s, keep: reasons[i]!.length > 0, reasons: reasons[i]! }));
}
