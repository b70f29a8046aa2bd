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
 * Then: `sync -f current` (so the snapshot does not stall on unwritten data), a name from the server's
 * clock (Date.toISOString(), bumped by 1 ms while it exists), `btrfs subvolume snapshot -r current
 * snapshots/<user>/<name>`, fsync of snapshots/<user>, and the name on stdout. Any failure: one line on
 * stderr and a non-zero exit (2 usage, 1 anything else).
 */
import { execFile } from 'node:child_process';
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
  return {
    version: 1,
    root: o['root'] as string,
    group: o['group'],
    seal: o['seal'] as string,
    serve: o['serve'],
    homeBase: o['homeBase'] as string,
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

async function run(cmd: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileAsync(cmd, args, { encoding: 'utf8', env: { PATH: SAFE_PATH }, timeout: 10 * 60_000 });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: unknown };
    const stderr = typeof e.stderr === 'string' ? e.stderr.trim().split('\n')[0] : '';
    throw new HelperError(`${cmd} ${args.join(' ')} failed: ${stderr || messageOf(err)}`);
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

  await run('sync', ['-f', current]);
  let time = Date.now();
  while (await pathExists(join(dest, new Date(time).toISOString()))) time++;
  const name = new Date(time).toISOString();
  await run('btrfs', ['subvolume', 'snapshot', '-r', current, join(dest, name)]);
  const fh = await fsp.open(dest, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  return name;
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
