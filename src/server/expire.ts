/**
 * `snapcrypt-server expire`: applies each user's retention policy (retention.ts) to their sealed
 * snapshots and deletes, as root, those it does not keep. Needs no key (I6): it reads only snapshot
 * names, which are the server's own times (I4). The newest snapshot of each user is always kept.
 *
 * The policies live in policy.json beside server.json (docs/SERVER.md, "Retention"). server.json
 * belongs to `install`, which rewrites it; policy.json belongs to the administrator and is never
 * rewritten. Without policy.json, or for a user without a policy and no default, nothing is deleted.
 */
import { execFile } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { SnapError } from '../core/errors.js';
import { isSnapshotName } from '../drivers/localdir.js';
import { applyRetention, checkPolicy, parseDuration, type Decision, type RetentionPolicy } from './retention.js';
import { readServerConfig, SAFE_PATH, USER_NAME } from './seal-helper.js';

const execFileAsync = promisify(execFile);

export interface PolicyFile {
  /** The policy of users that have none of their own (absent: keep everything). */
  readonly default?: RetentionPolicy;
  readonly users: Readonly<Record<string, RetentionPolicy>>;
}

/** policy.json, next to the server configuration file. */
export function policyFileOf(configFile: string): string {
  return join(dirname(configFile), 'policy.json');
}

const POLICY_KEYS = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly', 'within'] as const;

function parsePolicy(v: unknown, where: string): RetentionPolicy {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new SnapError('usage', `${where}: expected an object like {"daily": 7, "within": "2d"}`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!(POLICY_KEYS as readonly string[]).includes(k)) throw new SnapError('usage', `${where}: unknown setting "${k}" (known: ${POLICY_KEYS.join(', ')})`);
  }
  const p: { -readonly [K in keyof RetentionPolicy]: RetentionPolicy[K] } = {};
  for (const k of ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) {
    if (o[k] !== undefined) p[k] = o[k] as number;
  }
  if (o['within'] !== undefined) {
    if (typeof o['within'] !== 'string') throw new SnapError('usage', `${where}: "within" must be a duration such as "30d"`);
    p.withinMs = parseDuration(o['within']);
  }
  checkPolicy(p, where);
  return p;
}

/** Parses policy.json: {"retention": {"default": POLICY, "users": {"alice": POLICY}}}. */
export function parsePolicyFile(text: string, file: string): PolicyFile {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new SnapError('usage', `${file} is not valid JSON: ${(err as Error).message}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new SnapError('usage', `${file}: expected a JSON object`);
  const r = (v as Record<string, unknown>)['retention'];
  if (r === undefined) return { users: {} };
  if (typeof r !== 'object' || r === null || Array.isArray(r)) throw new SnapError('usage', `${file}: "retention" must be an object`);
  const ro = r as Record<string, unknown>;
  for (const k of Object.keys(ro)) {
    if (k !== 'default' && k !== 'users') throw new SnapError('usage', `${file}: unknown key "retention.${k}" (known: default, users)`);
  }
  const users: Record<string, RetentionPolicy> = {};
  const u = ro['users'] ?? {};
  if (typeof u !== 'object' || u === null || Array.isArray(u)) throw new SnapError('usage', `${file}: "retention.users" must be an object`);
  for (const [name, p] of Object.entries(u)) {
    if (!USER_NAME.test(name)) throw new SnapError('usage', `${file}: invalid user name ${JSON.stringify(name)} in "retention.users"`);
    users[name] = parsePolicy(p, `${file}: retention.users.${name}`);
  }
  return ro['default'] === undefined ? { users } : { default: parsePolicy(ro['default'], `${file}: retention.default`), users };
}

async function readPolicyFile(file: string): Promise<PolicyFile> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return { users: {} };
    throw new SnapError('io', `Cannot read ${file}: ${(err as Error).message}`);
  }
  return parsePolicyFile(text, file);
}

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
  const config = await readServerConfig(opts.configFile, !opts.dryRun).catch((err: unknown) => {
    throw err instanceof SnapError ? err : new SnapError('not-found', (err as Error).message);
  });
  const policies = await readPolicyFile(policyFileOf(opts.configFile));
  const snapshotsRoot = join(config.root, 'snapshots');
  let users: string[];
  if (opts.user !== undefined) {
    if (!USER_NAME.test(opts.user)) throw new SnapError('usage', `Invalid user name ${JSON.stringify(opts.user)}`);
    users = [opts.user];
  } else {
    users = (await fsp.readdir(snapshotsRoot).catch((err: unknown) => {
      throw new SnapError('io', `Cannot list ${snapshotsRoot}: ${(err as Error).message}`);
    })).filter((n) => USER_NAME.test(n)).sort();
  }
  let count = 0;
  for (const user of users) {
    const dir = join(snapshotsRoot, user);
    const names = (await fsp.readdir(dir).catch((err: unknown) => {
      if ((err as { code?: unknown }).code === 'ENOENT') throw new SnapError('not-found', `No snapshots directory for user ${user} (${dir})`);
      throw new SnapError('io', `Cannot list ${dir}: ${(err as Error).message}`);
    })).filter(isSnapshotName);
    const policy = policies.users[user] ?? policies.default ?? {};
    const decisions = applyRetention(names.map((name) => ({ name, time: Date.parse(name) })), policy);
    const done: Array<Decision & { deleted: boolean }> = [];
    for (const d of decisions) {
      let deleted = false;
      if (!d.keep) {
        count++;
        if (!opts.dryRun) {
          await execFileAsync('btrfs', ['subvolume', 'delete', join(dir, d.name)], { env: { PATH: SAFE_PATH }, timeout: 10 * 60_000 }).catch((err: unknown) => {
            const e = err as { stderr?: unknown; message?: unknown };
            const why = (typeof e.stderr === 'string' && e.stderr.trim().split('\n')[0]) || String(e.message);
            throw new SnapError('io', `Cannot delete the snapshot ${join(dir, d.name)}: ${why}`);
          });
          deleted = true;
        }
      }
      done.push({ ...d, deleted });
    }
    opts.report(user, done);
  }
  return count;
}
