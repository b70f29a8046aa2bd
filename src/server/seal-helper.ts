/**
 * The root helper that seals a user's area on the backup server (see docs/SERVER.md).
 *
 * It runs as root through one sudoers rule that allows it with no arguments only:
 *   %snapcrypt ALL=(root) NOPASSWD: /usr/local/lib/snapcrypt/seal ""
 * `seal` is a root-owned shell wrapper written by `snapcrypt-server install`; it clears the environment
 * and runs node on a root-owned copy of this module (self-contained: it imports node's built-ins only),
 * through a generated entry file that names the root-owned configuration file.
 *
 * What it trusts: its own code, the configuration file (root-owned, not writable by anyone else), the
 * system's user and group databases, and SUDO_UID (set by sudo, which a user cannot forge). What it never
 * trusts: arguments (any is refused), the rest of the environment (programs run with a fixed PATH), and
 * anything a user can change: every directory on the way to the user's `current` and to the snapshot
 * directory must be root-owned and writable by root only, `current` must be a btrfs subvolume whose top
 * directory is root:<user's group> 0750, and every check uses lstat (no symlink is followed).
 *
 * Then (the commit has flushed current with syncfs and fsynced its index and head: src/drivers/btrfs.ts
 * says why no second flush) a name from the server's clock (Date.toISOString(), bumped by 1 ms while it exists), `btrfs subvolume snapshot -r current
 * snapshots/<user>/<name>`, fsync of snapshots/<user>, and the name on stdout. Any failure: one line on
 * stderr and a non-zero exit (2 usage, 1 anything else).
 *
 * Then, when server.json names a "metricsDir", the user's metrics file for node_exporter's textfile
 * collector (docs/SERVER.md "Metrics and alerts"): formatUserMetrics() below is the one writer of
 * these files, used by expire and alert too. A failure there is ignored: the snapshot exists. What
 * the user can change (the usage ledger in run/) is only read: opened without following a link at
 * its end and without blocking, read only when a small regular file, and believed only when it names
 * the head of the snapshot just taken.
 */
import { execFile } from 'node:child_process';
import { constants as fsc } from 'node:fs';
import * as fsp from 'node:fs/promises';
import { dirname, isAbsolute, join, normalize, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

export const DEFAULT_CONFIG_FILE = '/etc/snapcrypt/server.json';

/** The configuration file under --etc DIR (DEFAULT_CONFIG_FILE without it). */
export function configFileOf(etc: string | undefined): string {
  return etc === undefined ? DEFAULT_CONFIG_FILE : join(resolve(etc), 'snapcrypt', 'server.json');
}
/** The PATH of every program the server's root code runs; never the caller's. */
export const SAFE_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
export const USER_NAME = /^[a-z_][a-z0-9_-]{0,31}$/;
export const GROUP_NAME = /^[a-z_][a-z0-9_-]{0,31}$/;

const BTRFS_SUPER_MAGIC = 0x9123683e;
const SUBVOLUME_ROOT_INO = 256;

/** /etc/snapcrypt/server.json, written by `snapcrypt-server install`. */
export interface ServerConfig {
  readonly version: 1;
  /** The server's root directory (on btrfs): users/ and snapshots/ are in it. */
  readonly root: string;
  /** Members of this group may use the server (sshd Match Group, sudoers rule). */
  readonly group: string;
  /** The command sudo runs to seal (the wrapper). */
  readonly seal: string;
  /** The command sshd forces for the group's accounts (ForceCommand, authorized_keys command=). */
  readonly serve: string;
  /** Where adduser puts the accounts' home directories. */
  readonly homeBase: string;
  /** Where the metrics files for node_exporter's textfile collector go; absent: no metrics. */
  readonly metricsDir?: string;
}

export class HelperError extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode = 1) {
    super(message);
    this.exitCode = exitCode;
  }
}

function errnoOf(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function isNormalAbsolute(p: string): boolean {
  return isAbsolute(p) && normalize(p) === p && (p === '/' || !p.endsWith('/')) && !p.includes('\0');
}

/** Parse and validate the configuration's text (throws HelperError). */
export function parseServerConfig(text: string, file: string): ServerConfig {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new HelperError(`${file} is not valid JSON: ${messageOf(err)}`);
  }
  if (typeof v !== 'object' || v === null) throw new HelperError(`${file}: expected a JSON object`);
  const o = v as Record<string, unknown>;
  if (o['version'] !== 1) throw new HelperError(`${file}: unsupported version ${JSON.stringify(o['version'])}`);
  for (const key of ['root', 'seal', 'homeBase'] as const) {
    const p = o[key];
    if (typeof p !== 'string' || !isNormalAbsolute(p) || p === '/') {
      throw new HelperError(`${file}: "${key}" must be a normalized absolute path other than /`);
    }
  }
  if (typeof o['group'] !== 'string' || !GROUP_NAME.test(o['group'])) throw new HelperError(`${file}: invalid "group"`);
  if (typeof o['serve'] !== 'string' || o['serve'] === '' || /[\n\r"]/.test(o['serve'])) {
    throw new HelperError(`${file}: invalid "serve"`);
  }
  const metricsDir = o['metricsDir'];
  if (metricsDir !== undefined && (typeof metricsDir !== 'string' || !isNormalAbsolute(metricsDir) || metricsDir === '/')) {
    throw new HelperError(`${file}: "metricsDir" must be a normalized absolute path other than / (or absent: no metrics)`);
  }
  return {
    version: 1,
    root: o['root'] as string,
    group: o['group'],
    seal: o['seal'] as string,
    serve: o['serve'],
    homeBase: o['homeBase'] as string,
    ...(metricsDir === undefined ? {} : { metricsDir }),
  };
}

/** Read the configuration; with trusted=true it must be a root-owned file only root can write. */
export async function readServerConfig(file: string, trusted: boolean): Promise<ServerConfig> {
  if (trusted) {
    const st = await fsp.lstat(file).catch((err: unknown) => {
      throw new HelperError(`Cannot read the server configuration ${file}: ${errnoOf(err) ?? messageOf(err)}; run snapcrypt-server install`);
    });
    if (!st.isFile() || st.uid !== 0 || (st.mode & 0o022) !== 0) {
      throw new HelperError(`Refusing ${file}: it must be a regular file owned by root and writable by root only`);
    }
    await checkRootOwnedChain(dirname(file));
  }
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    throw new HelperError(`Cannot read the server configuration ${file}: ${errnoOf(err) ?? messageOf(err)}; run snapcrypt-server install`);
  }
  return parseServerConfig(text, file);
}

/** Every directory from / down to dir: a real directory, owned by root, writable by root only. */
export async function checkRootOwnedChain(dir: string): Promise<void> {
  const parts: string[] = [];
  for (let p = dir; ; p = dirname(p)) {
    parts.unshift(p);
    if (dirname(p) === p) break;
  }
  for (const p of parts) await checkRootOwnedDir(p);
}

async function checkRootOwnedDir(p: string): Promise<void> {
  const st = await fsp.lstat(p).catch((err: unknown) => {
    throw new HelperError(`Cannot check ${p}: ${errnoOf(err) ?? messageOf(err)}`);
  });
  if (!st.isDirectory()) throw new HelperError(`Refusing ${p}: not a directory`);
  if (st.uid !== 0 || (st.mode & 0o022) !== 0) {
    throw new HelperError(`Refusing ${p}: it must be owned by root and writable by root only`);
  }
}

/** A program that runSafe ran failed: `reason` is the first line of its stderr, else the error's message. */
export class RunError extends HelperError {
  readonly reason: string;
  constructor(cmd: string, args: readonly string[], reason: string, cause: unknown) {
    super(`${cmd} ${args.join(' ')} failed: ${reason}`);
    this.reason = reason;
    this.cause = cause;
  }
}

/**
 * Runs a program as the server's root code does (no shell, the fixed SAFE_PATH, none of the caller's
 * environment) and returns its stdout; a failure is a RunError. timeoutMs 0: no time limit.
 */
export async function runSafe(cmd: string, args: readonly string[], timeoutMs = 10 * 60_000): Promise<string> {
  try {
    return (await execFileAsync(cmd, [...args], { encoding: 'utf8', env: { PATH: SAFE_PATH }, timeout: timeoutMs })).stdout;
  } catch (err) {
    const stderr = (err as { stderr?: unknown }).stderr;
    throw new RunError(cmd, args, (typeof stderr === 'string' && stderr.trim().split('\n')[0]) || messageOf(err), err);
  }
}

export interface PasswdEntry {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
  readonly home: string;
}

/** The account of a uid or name from the system's databases (getent), or null. */
export async function getPasswd(key: number | string): Promise<PasswdEntry | null> {
  let out: string;
  try {
    const r = await execFileAsync('getent', ['passwd', String(key)], { encoding: 'utf8', env: { PATH: SAFE_PATH } });
    out = r.stdout;
  } catch (err) {
    if ((err as { code?: unknown }).code === 2) return null; // not found
    throw new HelperError(`getent passwd ${key} failed: ${messageOf(err)}`);
  }
  const f = out.trim().split('\n')[0]?.split(':') ?? [];
  if (f.length < 7) return null;
  const uid = Number(f[2]);
  const gid = Number(f[3]);
  if (!Number.isSafeInteger(uid) || !Number.isSafeInteger(gid)) return null;
  return { name: f[0] ?? '', uid, gid, home: f[5] ?? '' };
}

/** A group's gid and listed members, or null if there is no such group. */
export async function getGroup(name: string): Promise<{ gid: number; members: string[] } | null> {
  let out: string;
  try {
    out = (await execFileAsync('getent', ['group', name], { encoding: 'utf8', env: { PATH: SAFE_PATH } })).stdout;
  } catch (err) {
    if ((err as { code?: unknown }).code === 2) return null;
    throw new HelperError(`getent group ${name} failed: ${messageOf(err)}`);
  }
  const f = out.trim().split('\n')[0]?.split(':') ?? [];
  const gid = Number(f[2]);
  if (f.length < 4 || !Number.isSafeInteger(gid)) return null;
  return { gid, members: (f[3] ?? '').split(',').filter((m) => m !== '') };
}

export async function isBtrfsSubvolume(p: string): Promise<boolean> {
  const st = await fsp.lstat(p).catch(() => null);
  if (st === null || !st.isDirectory() || st.ino !== SUBVOLUME_ROOT_INO) return false;
  return (await fsp.statfs(p).catch(() => null))?.type === BTRFS_SUPER_MAGIC;
}

async function pathExists(p: string): Promise<boolean> {
  try {
    await fsp.lstat(p);
    return true;
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return false;
    throw err;
  }
}

/** Seal the area of the user sudo names (SUDO_UID); returns the new snapshot's name. */
export async function sealForSudoUid(configFile: string, sudoUid: string | undefined): Promise<string> {
  if (process.getuid?.() !== 0 || process.geteuid?.() !== 0) throw new HelperError('must be run as root through sudo');
  if (sudoUid === undefined || !/^[0-9]{1,10}$/.test(sudoUid)) throw new HelperError('SUDO_UID is missing: run through sudo', 2);
  const uid = Number(sudoUid);
  if (uid === 0) throw new HelperError('refusing to seal for root');
  const config = await readServerConfig(configFile, true);
  const user = await getPasswd(uid);
  if (user === null) throw new HelperError(`no account has uid ${uid}`);
  if (user.uid !== uid || !USER_NAME.test(user.name)) throw new HelperError(`refusing account ${JSON.stringify(user.name)} (uid ${uid})`);
  const group = await getGroup(config.group);
  if (group === null) throw new HelperError(`there is no group ${config.group}; run snapcrypt-server install`);
  if (group.gid === 0 || (user.gid !== group.gid && !group.members.includes(user.name))) {
    throw new HelperError(`user ${user.name} is not in group ${config.group}`);
  }

  const usersDir = join(config.root, 'users');
  const snapshotsDir = join(config.root, 'snapshots');
  await checkRootOwnedChain(config.root);
  for (const d of [usersDir, join(usersDir, user.name), snapshotsDir, join(snapshotsDir, user.name)]) await checkRootOwnedDir(d);

  const current = join(usersDir, user.name, 'current');
  const st = await fsp.lstat(current).catch(() => null);
  if (st === null || !(await isBtrfsSubvolume(current))) throw new HelperError(`${current} is not a btrfs subvolume`);
  if (st.uid !== 0 || st.gid !== user.gid || (st.mode & 0o7777) !== 0o750) {
    throw new HelperError(`refusing ${current}: its top directory must be root:${user.gid} mode 0750`);
  }
  const dest = join(snapshotsDir, user.name);

  let time = Date.now();
  while (await pathExists(join(dest, new Date(time).toISOString()))) time++;
  const name = new Date(time).toISOString();
  await runSafe('btrfs', ['subvolume', 'snapshot', '-r', current, join(dest, name)]);
  const fh = await fsp.open(dest, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  if (config.metricsDir !== undefined) {
    await writeSealMetrics(config.metricsDir, config.root, user.name).catch(() => undefined); // the snapshot exists: never fail for this
  }
  return name;
}

// Metrics for node_exporter's textfile collector (docs/SERVER.md "Metrics and alerts").

/** One gauge family: its name, help text and samples. */
export interface Gauge {
  readonly name: string;
  readonly help: string;
  readonly samples: ReadonlyArray<{ readonly labels: Readonly<Record<string, string>>; readonly value: number }>;
}

/** A label value in the text exposition format: backslash, double quote and line feed escaped. */
export function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function formatSampleValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (!Number.isFinite(v)) return v > 0 ? '+Inf' : '-Inf';
  return String(v);
}

const byCodeUnits = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/**
 * Gauges in the Prometheus text exposition format, deterministically: families sorted by name, each
 * with # HELP and # TYPE lines, samples sorted; a family without samples is left out.
 */
export function formatMetrics(gauges: readonly Gauge[]): string {
  let out = '';
  for (const g of [...gauges].filter((x) => x.samples.length > 0).sort((a, b) => byCodeUnits(a.name, b.name))) {
    out += `# HELP ${g.name} ${g.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}\n# TYPE ${g.name} gauge\n`;
    const lines = g.samples.map((s) => {
      const labels = Object.keys(s.labels).sort(byCodeUnits).map((k) => `${k}="${escapeLabelValue(s.labels[k]!)}"`);
      return `${g.name}${labels.length === 0 ? '' : `{${labels.join(',')}}`} ${formatSampleValue(s.value)}\n`;
    });
    out += lines.sort(byCodeUnits).join('');
  }
  return out;
}

/** What a user's metrics file says; the last three come from policy.json, so only expire and alert know them. */
export interface UserMetrics {
  readonly user: string;
  /** The newest snapshot's name (its server time), or null when there is none. */
  readonly last: string | null;
  readonly snapshots: number;
  /** Bytes of the objects in the user's current, or null when unknown. */
  readonly currentBytes: number | null;
  /** The quota on currentBytes; null: no quota; absent: not known to the writer. */
  readonly quotaBytes?: number | null;
  readonly overdueAfterMs?: number;
  readonly overdue?: boolean;
}

export const USER_METRICS_PREFIX = 'snapcrypt_user_';

/** The name of a user's metrics file in the metrics directory. */
export function userMetricsFileName(user: string): string {
  return `${USER_METRICS_PREFIX}${user}.prom`;
}

/** A user's metrics file, the one format every writer uses. */
export function formatUserMetrics(m: UserMetrics): string {
  const labels = { user: m.user };
  const gauge = (name: string, help: string, value: number | null | undefined): Gauge => ({
    name,
    help,
    samples: value === null || value === undefined ? [] : [{ labels, value }],
  });
  return formatMetrics([
    gauge('snapcrypt_last_backup_timestamp_seconds', 'Server time of the newest snapshot, in seconds since the epoch (absent without a snapshot).', m.last === null ? null : Date.parse(m.last) / 1000),
    gauge('snapcrypt_snapshots', 'Number of sealed snapshots.', m.snapshots),
    gauge('snapcrypt_current_bytes', 'Bytes of the objects in current: the latest backup plus an upload in progress.', m.currentBytes),
    gauge('snapcrypt_quota_bytes', 'Quota on snapcrypt_current_bytes from policy.json (absent without a quota).', m.quotaBytes),
    gauge('snapcrypt_overdue_threshold_seconds', 'Age of the newest snapshot after which the user is overdue (policy.json "overdue").', m.overdueAfterMs === undefined ? undefined : m.overdueAfterMs / 1000),
    gauge('snapcrypt_overdue', '1 when the user has no snapshot or the newest is older than the threshold, else 0.', m.overdue === undefined ? undefined : m.overdue ? 1 : 0),
  ]);
}

/**
 * Writes name in dir atomically: a temp file (created exclusively, so never through a link; not
 * ending in .prom, so the collector skips it) with mode 0644, renamed over name.
 */
export async function writeMetricsFile(dir: string, name: string, text: string): Promise<void> {
  const st = await fsp.lstat(dir);
  if (!st.isDirectory()) throw new HelperError(`${dir} is not a directory`);
  const tmp = join(dir, `.${name}.${process.pid}.tmp`);
  try {
    const fh = await fsp.open(tmp, 'wx', 0o644);
    try {
      await fh.writeFile(text);
      await fh.chmod(0o644);
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, join(dir, name));
  } finally {
    await fsp.rm(tmp, { force: true });
  }
}

const SNAPSHOT_NAME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

function isSnapshotName(name: string): boolean {
  const time = Date.parse(name);
  return SNAPSHOT_NAME.test(name) && Number.isFinite(time) && new Date(time).toISOString() === name;
}

/** A small regular file's text, or null (missing, a link, not regular, larger than max, unreadable); never blocks on a FIFO. */
async function readSmallFile(path: string, max = 65_536): Promise<string | null> {
  const fh = await fsp.open(path, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK).catch(() => null);
  if (fh === null) return null;
  try {
    const st = await fh.stat();
    if (!st.isFile() || st.size > max) return null;
    const buf = Buffer.alloc(max + 1);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return bytesRead > max ? null : buf.toString('utf8', 0, bytesRead);
  } catch {
    return null;
  } finally {
    await fh.close();
  }
}

/** The bytes of the usage ledger (serve's `run/usage`, see drivers/localdir.ts) when it names head, else null. */
export function ledgerBytes(ledger: string | null, head: string | null): number | null {
  if (ledger === null || head === null) return null;
  let v: unknown;
  try {
    v = JSON.parse(ledger);
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null) return null;
  const { version, head: named, objectBytes } = v as Record<string, unknown>;
  if (version !== 1 || typeof named !== 'string' || !/^[0-9a-f]{64}$/.test(named) || named !== head.trim()) return null;
  return typeof objectBytes === 'number' && Number.isSafeInteger(objectBytes) && objectBytes >= 0 ? objectBytes : null;
}

/**
 * The policy gauges of a user's previous metrics file (written by expire or alert, which read
 * policy.json): kept by the seal helper, which cannot read policy.json, so that they do not vanish at
 * each backup. Just sealed, the user is not overdue.
 */
export function policyMetricsOf(previous: string | null, user: string): Pick<UserMetrics, 'quotaBytes' | 'overdueAfterMs' | 'overdue'> {
  const out: { quotaBytes?: number; overdueAfterMs?: number; overdue?: boolean } = {};
  for (const line of previous?.split('\n') ?? []) {
    const m = /^snapcrypt_(quota_bytes|overdue_threshold_seconds)\{user="([a-z0-9_-]+)"\} (\d+(?:\.\d+)?(?:e\+\d+)?)$/.exec(line);
    const value = Number(m?.[3]);
    if (m === null || m[2] !== user || !Number.isFinite(value)) continue;
    if (m[1] === 'quota_bytes') out.quotaBytes = value;
    else {
      out.overdueAfterMs = value * 1000;
      out.overdue = false;
    }
  }
  return out;
}

/** After a seal: the user's metrics file from the snapshots, the new snapshot's head and the usage ledger. */
async function writeSealMetrics(metricsDir: string, root: string, user: string): Promise<void> {
  const snapshotsDir = join(root, 'snapshots', user);
  const names = (await fsp.readdir(snapshotsDir)).filter(isSnapshotName).sort();
  const last = names.at(-1) ?? null;
  // the head in the (read-only) snapshot is the one the ledger must name
  const head = last === null ? null : await readSmallFile(join(snapshotsDir, last, 'repo', 'head'));
  const ledger = await readSmallFile(join(root, 'users', user, 'run', 'usage'));
  const previous = await readSmallFile(join(metricsDir, userMetricsFileName(user)));
  const text = formatUserMetrics({ user, last, snapshots: names.length, currentBytes: ledgerBytes(ledger, head), ...policyMetricsOf(previous, user) });
  await writeMetricsFile(metricsDir, userMetricsFileName(user), text);
}

/** The helper's whole life: returns the exit status. */
export async function main(configFile: string, argv: readonly string[]): Promise<number> {
  try {
    if (argv.length !== 0) throw new HelperError('takes no arguments', 2);
    const name = await sealForSudoUid(configFile, process.env['SUDO_UID']);
    process.stdout.write(`${name}\n`);
    return 0;
  } catch (err) {
    const exit = err instanceof HelperError ? err.exitCode : 1;
    process.stderr.write(`snapcrypt-seal: ${messageOf(err).replace(/[\r\n]+/g, ' ')}\n`);
    return exit;
  }
}

// Run directly (`node seal-helper.js`): the default configuration file.
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(DEFAULT_CONFIG_FILE, process.argv.slice(2));
}
