/**
 * `snapcrypt-server status`: per user, without any key (I6): the last successful backup (the newest
 * sealed snapshot, named by the server's clock), its age, the number of snapshots, the bytes in
 * `current`, and whether the user is overdue by their threshold (policy.json "overdue").
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { isSnapshotName } from '../drivers/localdir.js';
import { policyFileOf } from './expire.js';
import { parseDuration } from '../core/duration.js';
import { readServerConfig, USER_NAME } from './seal-helper.js';

/** A user is overdue when their newest snapshot is older than this, unless policy.json says otherwise. */
export const DEFAULT_OVERDUE_MS = 2 * 86_400_000;

export interface UserStatus {
  readonly user: string;
  /** The newest snapshot's name (its server time), or null if there is none. */
  readonly last: string | null;
  /** Milliseconds since the newest snapshot, or null if there is none. */
  readonly ageMs: number | null;
  readonly snapshots: number;
  /** Bytes of the files in the user's current subvolume (apparent sizes). */
  readonly currentBytes: number;
  readonly overdueAfterMs: number;
  /** No snapshot, or the newest is older than overdueAfterMs. */
  readonly overdue: boolean;
}

/** policy.json's "overdue": {"default": "2d", "users": {"alice": "8d"}}; absent parts use the default. */
export function parseOverdue(text: string | null, file: string): { default: number; users: Record<string, number> } {
  const out = { default: DEFAULT_OVERDUE_MS, users: {} as Record<string, number> };
  if (text === null) return out;
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new SnapError('usage', `${file} is not valid JSON: ${(err as Error).message}`);
  }
  const o = (typeof v === 'object' && v !== null ? (v as Record<string, unknown>)['overdue'] : undefined) ?? {};
  if (typeof o !== 'object' || o === null || Array.isArray(o)) throw new SnapError('usage', `${file}: "overdue" must be an object`);
  const od = o as Record<string, unknown>;
  for (const k of Object.keys(od)) if (k !== 'default' && k !== 'users') throw new SnapError('usage', `${file}: unknown key "overdue.${k}" (known: default, users)`);
  const dur = (x: unknown, where: string) => {
    if (typeof x !== 'string') throw new SnapError('usage', `${file}: ${where} must be a duration such as "2d"`);
    return parseDuration(x);
  };
  if (od['default'] !== undefined) out.default = dur(od['default'], '"overdue.default"');
  const users = od['users'] ?? {};
  if (typeof users !== 'object' || users === null || Array.isArray(users)) throw new SnapError('usage', `${file}: "overdue.users" must be an object`);
  for (const [name, d] of Object.entries(users)) {
    if (!USER_NAME.test(name)) throw new SnapError('usage', `${file}: invalid user name ${JSON.stringify(name)} in "overdue.users"`);
    out.users[name] = dur(d, `"overdue.users.${name}"`);
  }
  return out;
}

/** Sum of the apparent sizes of the regular files under dir (0 if it does not exist or cannot be read). */
async function treeBytes(dir: string): Promise<number> {
  let total = 0;
  const stack = [dir];
  while (stack.length > 0) {
    const d = stack.pop()!;
    let entries;
    try {
      entries = await fsp.readdir(d, { withFileTypes: true });
    } catch {
      continue;
    }
    for (const e of entries) {
      const p = join(d, e.name);
      if (e.isDirectory()) stack.push(p);
      else if (e.isFile()) total += (await fsp.lstat(p).catch(() => null))?.size ?? 0;
    }
  }
  return total;
}

/** The status of every user that has an area or snapshots (or of one), sorted by name. */
export async function status(opts: { configFile: string; user?: string; now?: number }): Promise<UserStatus[]> {
  const config = await readServerConfig(opts.configFile, false).catch((err: unknown) => {
    throw err instanceof SnapError ? err : new SnapError('not-found', (err as Error).message);
  });
  const policyFile = policyFileOf(opts.configFile);
  const policyText = await fsp.readFile(policyFile, 'utf8').catch((err: unknown) => {
    if ((err as { code?: unknown }).code === 'ENOENT') return null;
    throw new SnapError('io', `Cannot read ${policyFile}: ${(err as Error).message}`);
  });
  const overdue = parseOverdue(policyText, policyFile);
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
    const userDir = join(config.root, 'users', user);
    const names = (await fsp.readdir(snapDir).catch(() => null))?.filter(isSnapshotName).sort() ?? null;
    if (names === null && (await fsp.stat(userDir).catch(() => null)) === null) {
      throw new SnapError('not-found', `No user ${user} on this server (neither ${userDir} nor ${snapDir} exists)`);
    }
    const last = names?.at(-1) ?? null;
    const ageMs = last === null ? null : now - Date.parse(last);
    const overdueAfterMs = overdue.users[user] ?? overdue.default;
    out.push({
      user,
      last,
      ageMs,
      snapshots: names?.length ?? 0,
      currentBytes: await treeBytes(join(userDir, 'current')),
      overdueAfterMs,
      overdue: ageMs === null || ageMs > overdueAfterMs,
    });
  }
  return out;
}
