/**
 * policy.json: the administrator's settings of a backup server, beside server.json (docs/SERVER.md).
 * server.json belongs to `install`, which rewrites it; policy.json belongs to the administrator and is
 * never rewritten. Every part is optional, and a missing file means: keep every snapshot, overdue after
 * 2 days, no quota, no free-space floor, no alert hook.
 *
 *   {
 *     "retention": {"default": {"daily": 7, "weekly": 5}, "users": {"alice": {"within": "90d"}}},
 *     "overdue":   {"default": "2d", "users": {"alice": "8d"}},
 *     "quota":     {"default": "200GiB", "users": {"alice": "1TiB", "bob": "none"}},
 *     "freeSpaceFloor": "5%",
 *     "alert":     {"command": ["/usr/sbin/sendmail", "admin@example.org"]}
 *   }
 *
 * Parsed once, strictly: an unknown key or a bad value is a one-line usage error naming the key.
 */
import * as fsp from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { parseDuration } from '../core/duration.js';
import { SnapError } from '../core/errors.js';
import { parseSize } from '../core/size.js';
import { checkPolicy, type RetentionPolicy } from './retention.js';
import { USER_NAME, type ServerConfig } from './seal-helper.js';
import { serverConfig } from './users.js';

/** A user is overdue when their newest snapshot is older than this, unless policy.json says otherwise. */
export const DEFAULT_OVERDUE_MS = 2 * 86_400_000;

/** A setting with a default and per-user values. */
export interface PerUser<T> {
  readonly default: T;
  readonly users: Readonly<Record<string, T>>;
}

export interface ServerPolicy {
  /** Retention; a user with neither their own policy nor a default keeps everything. */
  readonly retention: PerUser<RetentionPolicy | null>;
  /** Milliseconds without a new snapshot after which a user is overdue. */
  readonly overdue: PerUser<number>;
  /** Bytes a user's `current` may hold (the latest backup plus an upload in progress); null: no quota. */
  readonly quota: PerUser<number | null>;
  /** serve refuses uploads once the file system has less free space than this; null: no floor. */
  readonly freeSpaceFloor: { readonly bytes: number } | { readonly percent: number } | null;
  /** The command run (without a shell) when a user becomes overdue or is back; null: none. */
  readonly alert: { readonly command: readonly string[] } | null;
}

export const EMPTY_POLICY: ServerPolicy = {
  retention: { default: null, users: {} },
  overdue: { default: DEFAULT_OVERDUE_MS, users: {} },
  quota: { default: null, users: {} },
  freeSpaceFloor: null,
  alert: null,
};

/** policy.json, next to the server configuration file. */
export function policyFileOf(configFile: string): string {
  return join(dirname(configFile), 'policy.json');
}

/** The value of a per-user setting for one user. */
export function forUser<T>(setting: PerUser<T>, user: string): T {
  return Object.hasOwn(setting.users, user) ? setting.users[user]! : setting.default;
}

type Obj = Record<string, unknown>;

function object(v: unknown, where: string, example: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new SnapError('usage', `${where} must be an object like ${example}`);
  return v as Obj;
}

function onlyKeys(o: Obj, known: readonly string[], where: string): void {
  for (const k of Object.keys(o)) {
    if (!known.includes(k)) throw new SnapError('usage', `${where}: unknown key "${k}" (known: ${known.join(', ')})`);
  }
}

/** Re-throws a value error with the file and key in front. */
function at<T>(where: string, f: () => T): T {
  try {
    return f();
  } catch (err) {
    if (err instanceof SnapError) throw new SnapError('usage', `${where}: ${err.message}`);
    throw err;
  }
}

/** {"default": V, "users": {"alice": V}}: each value through parse. */
function perUser<T>(v: unknown, where: string, example: string, fallback: T, parse: (x: unknown, where: string) => T): PerUser<T> {
  if (v === undefined) return { default: fallback, users: {} };
  const o = object(v, where, example);
  onlyKeys(o, ['default', 'users'], where);
  const users: Record<string, T> = {};
  const u = object(o['users'] ?? {}, `${where}.users`, '{"alice": …}');
  for (const [name, x] of Object.entries(u)) {
    if (!USER_NAME.test(name)) throw new SnapError('usage', `${where}.users: invalid user name ${JSON.stringify(name)}`);
    users[name] = parse(x, `${where}.users.${name}`);
  }
  return { default: o['default'] === undefined ? fallback : parse(o['default'], `${where}.default`), users };
}

const RETENTION_KEYS = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly', 'within'] as const;

function retention(v: unknown, where: string): RetentionPolicy {
  const o = object(v, where, '{"daily": 7, "within": "2d"}');
  onlyKeys(o, RETENTION_KEYS, where);
  const p: { -readonly [K in keyof RetentionPolicy]: RetentionPolicy[K] } = {};
  for (const k of ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) {
    if (o[k] !== undefined) p[k] = o[k] as number;
  }
  if (o['within'] !== undefined) {
    if (typeof o['within'] !== 'string') throw new SnapError('usage', `${where}: "within" must be a duration such as "30d"`);
    p.withinMs = at(where, () => parseDuration(o['within'] as string));
  }
  checkPolicy(p, where);
  return p;
}

function duration(v: unknown, where: string): number {
  if (typeof v !== 'string') throw new SnapError('usage', `${where} must be a duration such as "2d"`);
  return at(where, () => parseDuration(v));
}

function quota(v: unknown, where: string): number | null {
  if (v === 'none' || v === null) return null;
  if (typeof v !== 'string') throw new SnapError('usage', `${where} must be a size such as "200GiB", or "none"`);
  const bytes = at(where, () => parseSize(v));
  if (bytes <= 0) throw new SnapError('usage', `${where} must be more than 0 (or "none")`);
  return bytes;
}

function floor(v: unknown, where: string): ServerPolicy['freeSpaceFloor'] {
  if (v === undefined || v === 'none' || v === null) return null;
  if (typeof v !== 'string') throw new SnapError('usage', `${where} must be a size such as "20GiB" or a share such as "5%"`);
  const pct = /^\s*(\d+(?:\.\d+)?)\s*%\s*$/.exec(v);
  if (pct) {
    const percent = Number(pct[1]);
    if (percent >= 100) throw new SnapError('usage', `${where} must be under 100%`);
    return { percent };
  }
  return { bytes: at(where, () => parseSize(v)) };
}

function alert(v: unknown, where: string): ServerPolicy['alert'] {
  if (v === undefined || v === null) return null;
  const o = object(v, where, '{"command": ["/usr/sbin/sendmail", "admin@example.org"]}');
  onlyKeys(o, ['command'], where);
  const c = o['command'];
  if (!Array.isArray(c) || c.length === 0 || !c.every((x) => typeof x === 'string' && x !== '' && !x.includes('\0'))) {
    throw new SnapError('usage', `${where}.command must be a non-empty list of strings: the program (an absolute path) and its arguments`);
  }
  if (!isAbsolute(c[0] as string)) throw new SnapError('usage', `${where}.command: the program must be an absolute path, not ${JSON.stringify(c[0])}`);
  return { command: c as string[] };
}

/** Parses policy.json's text (see the top of this file). */
export function parseServerPolicy(text: string, file: string): ServerPolicy {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new SnapError('usage', `${file} is not valid JSON: ${(err as Error).message}`);
  }
  const o = object(v, file, '{"retention": {…}}');
  onlyKeys(o, ['retention', 'overdue', 'quota', 'freeSpaceFloor', 'alert'], file);
  return {
    retention: perUser<RetentionPolicy | null>(o['retention'], `${file}: retention`, '{"default": {"daily": 7}}', null, retention),
    overdue: perUser(o['overdue'], `${file}: overdue`, '{"default": "2d"}', DEFAULT_OVERDUE_MS, duration),
    quota: perUser<number | null>(o['quota'], `${file}: quota`, '{"default": "200GiB"}', null, quota),
    freeSpaceFloor: floor(o['freeSpaceFloor'], `${file}: freeSpaceFloor`),
    alert: alert(o['alert'], `${file}: alert`),
  };
}

/**
 * Reads policy.json beside configFile; EMPTY_POLICY when there is none. trusted (root code: expire
 * deletes what it says, alert runs its command): it must be a regular file owned by root and writable
 * by root only.
 */
export async function readServerPolicy(configFile: string, trusted = false): Promise<ServerPolicy> {
  const file = policyFileOf(configFile);
  const st = trusted ? await fsp.lstat(file).catch(() => null) : null;
  if (st !== null && (!st.isFile() || st.uid !== 0 || (st.mode & 0o022) !== 0)) {
    throw new SnapError('usage', `Refusing ${file}: root acts on it, so it must be a regular file owned by root and writable by root only (chown root ${file}; chmod 0644 ${file})`);
  }
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return EMPTY_POLICY;
    throw new SnapError('io', `Cannot read the server policy ${file}: ${(err as Error).message}; it must be readable by every user of the server (mode 0644)`);
  }
  return parseServerPolicy(text, file);
}

/** server.json (trusted: root-owned, as root code needs) and policy.json, errors as SnapErrors. */
export async function readServerFiles(configFile: string, trusted: boolean): Promise<{ config: ServerConfig; policy: ServerPolicy }> {
  return { config: await serverConfig(configFile, trusted), policy: await readServerPolicy(configFile, trusted) };
}
