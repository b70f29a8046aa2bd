/**
 * Administration of the backup server (docs/SERVER.md): `snapcrypt-server install` and `adduser`.
 * Both run as root, change only what differs from the wanted state (safe to run again), and report
 * every step through log().
 */
import { existsSync } from 'node:fs';
import * as fsp from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { SnapError } from '../core/errors.js';
import {
  checkRootOwnedChain,
  configFileOf,
  DEFAULT_CONFIG_FILE,
  getGroup,
  getPasswd,
  GROUP_NAME,
  HelperError,
  isBtrfsSubvolume,
  readServerConfig,
  RunError,
  runSafe,
  SAFE_PATH,
  USER_NAME,
  type ServerConfig,
} from './seal-helper.js';
import { userAreaPaths } from './area.js';
import { DEFAULTS } from './defaults.js';

const BTRFS_SUPER_MAGIC = 0x9123683e;
/** Paths written into sudoers, sshd_config and shell scripts: no quoting needed, nothing to misparse. */
const PLAIN_PATH = /^\/[A-Za-z0-9_./+-]*$/;
const PLAIN_NAME = /^[A-Za-z0-9_-]+$/;
/** The lowest uid adduser accepts for an existing account (Debian's UID_MIN). */
const UID_MIN = 1000;

export { DEFAULTS };

export type Log = (line: string) => void;

export interface InstallOptions {
  readonly root: string;
  /** Directory holding snapcrypt/server.json (default /etc). */
  readonly etc?: string;
  readonly sudoersDir?: string;
  /** File name of the sudoers rule in sudoersDir (no dot: sudo ignores names with one). */
  readonly sudoersName?: string;
  readonly sshdConfigDir?: string;
  /** Where the seal wrapper and the helper's root-owned copy go (default /usr/local/lib/snapcrypt). */
  readonly libDir?: string;
  readonly group?: string;
  readonly homeBase?: string;
  /** The command sshd forces (default: this node and this snapcrypt-server, with "serve"). */
  readonly serve?: string;
  /** Where the seal helper, expire and alert write metrics for node_exporter's textfile collector (default DEFAULTS.metricsDir); null: no metrics. */
  readonly metricsDir?: string | null;
  /** How expiry, alerts and scrubbing are scheduled: systemd timers, a cron.d file, or not at all (default: systemd when it runs, else cron). */
  readonly scheduler?: 'systemd' | 'cron' | 'none';
  /** Where the systemd units go (default /etc/systemd/system; only there are they enabled). */
  readonly systemdDir?: string;
  /** Where the cron file goes (default /etc/cron.d). */
  readonly cronDir?: string;
  readonly log: Log;
}

export interface AddUserOptions {
  readonly name: string;
  /** Path of a file holding one OpenSSH public key line. */
  readonly keyFile: string;
  readonly etc?: string;
  readonly log: Log;
}

function requireRoot(what: string): void {
  if (process.getuid?.() !== 0) throw new SnapError('usage', `${what} must be run as root`);
}

function errnoOf(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function asSnapError(err: unknown): unknown {
  return err instanceof HelperError ? new SnapError('usage', err.message, { cause: err }) : err;
}

async function run(cmd: string, args: string[]): Promise<string> {
  return runSafe(cmd, args, 0).catch((err: unknown) => {
    throw err instanceof RunError ? new SnapError('io', err.message, { cause: err.cause }) : err;
  });
}

/** Make dir (and missing parents) and give it exactly this owner and mode; logs changes. */
async function ensureDir(dir: string, uid: number, gid: number, mode: number, log: Log): Promise<void> {
  let st = await fsp.lstat(dir).catch(() => null);
  if (st === null) {
    await fsp.mkdir(dir, { recursive: true, mode: 0o755 }); // missing parents must be traversable
    st = await fsp.lstat(dir);
    log(`created ${dir}`);
  }
  if (!st.isDirectory()) throw new SnapError('usage', `${dir} exists and is not a directory`);
  if (st.uid !== uid || st.gid !== gid) await fsp.chown(dir, uid, gid);
  if ((st.mode & 0o7777) !== mode) await fsp.chmod(dir, mode);
  if (st.uid !== uid || st.gid !== gid || (st.mode & 0o7777) !== mode) {
    log(`set ${dir} to ${uid}:${gid} ${mode.toString(8).padStart(4, '0')}`);
  }
}

/** A system directory (sudoers.d, sshd_config.d): created root 0755 if missing, otherwise left as it is. */
async function mkdirIfMissing(dir: string, log: Log): Promise<void> {
  if ((await fsp.lstat(dir).catch(() => null)) !== null) return;
  await fsp.mkdir(dir, { recursive: true, mode: 0o755 });
  log(`created ${dir}`);
}

/** Write a file atomically (temp + fsync + rename) with owner and mode, unless it already holds data. */
async function ensureFile(path: string, data: string, uid: number, gid: number, mode: number, log: Log): Promise<boolean> {
  const old = await fsp.readFile(path, 'utf8').catch(() => null);
  const st = await fsp.lstat(path).catch(() => null);
  if (old === data && st?.isFile() && st.uid === uid && st.gid === gid && (st.mode & 0o7777) === mode) return false;
  // A dot in the temp name: sudo's @includedir skips such files while they are incomplete.
  const tmp = join(dirname(path), `.${process.pid}.snapcrypt-tmp`);
  try {
    const fh = await fsp.open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(data);
      await fh.chown(uid, gid);
      await fh.chmod(mode);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, path);
  } finally {
    await fsp.rm(tmp, { force: true });
  }
  log(`${old === null ? 'wrote' : 'updated'} ${path}`);
  return true;
}

function checkPlainPath(what: string, p: string): void {
  if (!PLAIN_PATH.test(p)) {
    throw new SnapError('usage', `${what} ${JSON.stringify(p)} has characters other than letters, digits and "_./+-"; install snapcrypt under a plainer path`);
  }
}

/** The nearest existing directory at or above p (synchronously: called a few times at install). */
function nearestAncestor(p: string): string {
  let dir = p;
  while (!existsSync(dir) && dirname(dir) !== dir) dir = dirname(dir);
  return dir;
}


/** The directory must be on btrfs. */
async function checkBtrfs(dir: string): Promise<void> {
  const fs = await fsp.statfs(dir);
  if (fs.type !== BTRFS_SUPER_MAGIC) {
    throw new SnapError('usage', `${dir} is not on a btrfs file system; the server keeps every user's area as a btrfs subvolume`);
  }
}

const SYSTEMD_DIR = '/etc/systemd/system';
const CRON_DIR = '/etc/cron.d';

/** The commands that install schedules, run as root. */
interface ScheduledCommands {
  readonly expire: string;
  readonly alert: string;
  readonly scrub: string;
}

/**
 * Schedules `expire` daily, `alert` hourly and `btrfs scrub` monthly: systemd timers (enabled when
 * written to the system's unit directory and systemd runs), else a cron.d file.
 */
async function schedule(opts: InstallOptions, commands: ScheduledCommands, log: Log): Promise<void> {
  const systemdRuns = existsSync('/run/systemd/system');
  const how = opts.scheduler ?? (systemdRuns ? 'systemd' : 'cron');
  if (how === 'none') return;
  if (how === 'cron') {
    const dir = resolve(opts.cronDir ?? CRON_DIR);
    await mkdirIfMissing(dir, log);
    await ensureFile(
      join(dir, 'snapcrypt'),
      '# Written by snapcrypt-server install: daily expiry of old snapshots, hourly alerts, monthly btrfs scrub.\n' +
        `PATH=${SAFE_PATH}\n` +
        `17 3 * * * root ${commands.expire} >/dev/null\n` +
        `7 * * * * root ${commands.alert} >/dev/null\n` +
        `47 4 1 * * root ${commands.scrub} >/dev/null\n`,
      0,
      0,
      0o644,
      log,
    );
    return;
  }
  const dir = resolve(opts.systemdDir ?? SYSTEMD_DIR);
  await mkdirIfMissing(dir, log);
  const unit = (description: string, body: string) => `# Written by snapcrypt-server install\n[Unit]\nDescription=${description}\n\n${body}`;
  const jobs = [
    ['snapcrypt-expire', 'snapcrypt: delete snapshots that the retention policies do not keep', commands.expire, 'daily', '1h'],
    ['snapcrypt-alert', 'snapcrypt: notify when a user becomes overdue or is back (policy.json alert.command)', commands.alert, 'hourly', '5m'],
    ['snapcrypt-scrub', 'snapcrypt: verify every checksum of the backup file system (btrfs scrub)', commands.scrub, 'monthly', '6h'],
  ] as const;
  let changed = false;
  for (const [name, description, command, calendar, delay] of jobs) {
    changed = (await ensureFile(join(dir, `${name}.service`), unit(description, `[Service]\nType=oneshot\nExecStart=${command}\n`), 0, 0, 0o644, log)) || changed;
    changed =
      (await ensureFile(
        join(dir, `${name}.timer`),
        unit(description, `[Timer]\nOnCalendar=${calendar}\nRandomizedDelaySec=${delay}\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n`),
        0,
        0,
        0o644,
        log,
      )) || changed;
  }
  const timers = jobs.map(([name]) => `${name}.timer`);
  if (dir === SYSTEMD_DIR && systemdRuns) {
    if (changed) await run('systemctl', ['daemon-reload']);
    const enabled = await run('systemctl', ['is-enabled', ...timers]).then(() => true, () => false);
    if (!enabled) {
      await run('systemctl', ['enable', '--now', ...timers]);
      log(`enabled ${timers.join(' ')}`);
    }
  } else if (changed) {
    log(`enable them with: systemctl daemon-reload && systemctl enable --now ${timers.join(' ')}`);
  }
}

/** `snapcrypt-server install --root DIR`. Returns the configuration written. */
export async function install(opts: InstallOptions): Promise<ServerConfig> {
  requireRoot('snapcrypt-server install');
  const log = opts.log;
  const root = resolve(opts.root);
  const group = opts.group ?? DEFAULTS.group;
  const libDir = resolve(opts.libDir ?? DEFAULTS.libDir);
  const sudoersDir = resolve(opts.sudoersDir ?? DEFAULTS.sudoersDir);
  const sudoersName = opts.sudoersName ?? DEFAULTS.sudoersName;
  const sshdDir = resolve(opts.sshdConfigDir ?? DEFAULTS.sshdConfigDir);
  const homeBase = resolve(opts.homeBase ?? DEFAULTS.homeBase);
  const configFile = configFileOf(opts.etc);
  const metricsDir = opts.metricsDir === null ? null : resolve(opts.metricsDir ?? DEFAULTS.metricsDir);
  if (metricsDir === '/') throw new SnapError('usage', 'Invalid --metrics-dir /: name the textfile collector\'s directory, or "none"');
  if (!GROUP_NAME.test(group)) throw new SnapError('usage', `Invalid group name ${JSON.stringify(group)}`);
  if (!PLAIN_NAME.test(sudoersName)) throw new SnapError('usage', `Invalid sudoers file name ${JSON.stringify(sudoersName)}`);
  for (const [what, p] of [['--root', root], ['--lib-dir', libDir], ['the configuration file', configFile], ['--home-base', homeBase]] as const) {
    checkPlainPath(what, p);
  }
  const node = process.execPath;
  const helperSource = fileURLToPath(new URL('./seal-helper.js', import.meta.url));
  const program = fileURLToPath(new URL('../programs/snapcrypt-server.js', import.meta.url));
  checkPlainPath('node', node);
  // serve finds the configuration at its default place; anywhere else, the forced command names it.
  const serve = opts.serve ?? `${node} ${program} serve${configFile === DEFAULT_CONFIG_FILE ? '' : ` --config ${configFile}`}`;
  if (opts.serve === undefined) checkPlainPath('snapcrypt-server', program);
  if (/[\n\r"\\]/.test(serve) || serve.trim() === '') throw new SnapError('usage', `Invalid serve command ${JSON.stringify(serve)}`);

  // The root helper runs this node as root: only root may be able to change it.
  try {
    const st = await fsp.stat(node);
    if (st.uid !== 0 || (st.mode & 0o022) !== 0) throw new HelperError(`${node} must be owned by root and writable by root only`);
    await checkRootOwnedChain(dirname(await fsp.realpath(node)));
  } catch (err) {
    throw new SnapError('usage', `Refusing to let root run ${node} for the seal helper: ${(err as Error).message}; install Node.js 24 in a root-owned place`);
  }

  // 1. The root directory, on btrfs, reachable only through root-owned directories.
  const parent = dirname(root);
  if ((await fsp.lstat(root).catch(() => null)) === null) {
    await checkBtrfs(parent).catch((err: unknown) => {
      throw errnoOf(err) === 'ENOENT' ? new SnapError('not-found', `${parent} does not exist`) : err;
    });
  }
  // Root runs what is in libDir and trusts configFile: nobody else may change any directory above them.
  try {
    await checkRootOwnedChain(parent);
    await checkRootOwnedChain(nearestAncestor(libDir));
    await checkRootOwnedChain(nearestAncestor(dirname(configFile)));
  } catch (err) {
    throw asSnapError(err);
  }
  await ensureDir(root, 0, 0, 0o755, log);
  await checkBtrfs(root);
  // 0711: users reach their own area but cannot list the others' names.
  await ensureDir(join(root, 'users'), 0, 0, 0o711, log);
  await ensureDir(join(root, 'snapshots'), 0, 0, 0o711, log);
  await ensureDir(homeBase, 0, 0, 0o755, log);

  // 2. The group.
  if ((await getGroup(group)) === null) {
    await run('groupadd', ['--system', group]);
    log(`created group ${group}`);
  }

  // 3. The configuration, and the metrics directory it names.
  if (metricsDir !== null) {
    await mkdirIfMissing(metricsDir, log);
    if (!(await fsp.lstat(metricsDir)).isDirectory()) throw new SnapError('usage', `--metrics-dir ${metricsDir} exists and is not a directory; name another, or "none"`);
  }
  const config: ServerConfig = { version: 1, root, group, seal: join(libDir, 'seal'), serve, homeBase, ...(metricsDir === null ? {} : { metricsDir }) };
  await ensureDir(dirname(configFile), 0, 0, 0o755, log);
  await ensureFile(configFile, `${JSON.stringify(config, null, 2)}\n`, 0, 0, 0o644, log);

  // 4. The seal wrapper, with a root-owned copy of the helper and an entry naming the configuration.
  await ensureDir(libDir, 0, 0, 0o755, log);
  const helper = join(libDir, 'seal-helper.mjs');
  const entry = join(libDir, 'seal-entry.mjs');
  await ensureFile(helper, await fsp.readFile(helperSource, 'utf8'), 0, 0, 0o644, log);
  await ensureFile(
    entry,
    `// Written by snapcrypt-server install: run the seal helper with the server's configuration.\n` +
      `import { main } from ${JSON.stringify(pathToFileURL(helper).href)};\n` +
      `process.exitCode = await main(${JSON.stringify(configFile)}, process.argv.slice(2));\n`,
    0,
    0,
    0o644,
    log,
  );
  await ensureFile(
    config.seal,
    `#!/bin/sh\n` +
      `# Written by snapcrypt-server install: seal the calling user's area as root (run through sudo,\n` +
      `# no arguments; the user comes from SUDO_UID). The environment is cleared.\n` +
      `[ "$#" -eq 0 ] || { echo "snapcrypt-seal: takes no arguments" >&2; exit 2; }\n` +
      `exec /usr/bin/env -i PATH=${SAFE_PATH} SUDO_UID="$SUDO_UID" ${node} ${entry}\n`,
    0,
    0,
    0o755,
    log,
  );

  // 5. The sudoers rule, checked by visudo before sudo can see it.
  const rule = `# Written by snapcrypt-server install: members of ${group} may seal their own area, nothing else.\n%${group} ALL=(root) NOPASSWD: ${config.seal} ""\n`;
  const sudoersFile = join(sudoersDir, sudoersName);
  const oldRule = await fsp.readFile(sudoersFile, 'utf8').catch(() => null);
  if (oldRule !== rule) {
    await mkdirIfMissing(sudoersDir, log);
    const tmp = join(sudoersDir, `.${sudoersName}.snapcrypt-new`);
    try {
      await fsp.writeFile(tmp, rule, { mode: 0o440 });
      await fsp.chmod(tmp, 0o440);
      await run('visudo', ['-cf', tmp]);
      await fsp.rename(tmp, sudoersFile);
    } finally {
      await fsp.rm(tmp, { force: true });
    }
    log(`${oldRule === null ? 'wrote' : 'updated'} ${sudoersFile}`);
  }

  // 6. The sshd drop-in.
  await mkdirIfMissing(sshdDir, log);
  const sshdFile = join(sshdDir, 'snapcrypt.conf');
  await ensureFile(
    sshdFile,
    `# Written by snapcrypt-server install: accounts of group ${group} can only run the server.\n` +
      `Match Group ${group}\n` +
      `\tForceCommand ${serve}\n` +
      `\tDisableForwarding yes\n` +
      `\tAllowAgentForwarding no\n` +
      `\tAllowTcpForwarding no\n` +
      `\tAllowStreamLocalForwarding no\n` +
      `\tX11Forwarding no\n` +
      `\tPermitTunnel no\n` +
      `\tPermitTTY no\n` +
      `\tPermitUserRC no\n`,
    0,
    0,
    0o644,
    log,
  );
  // 7. Daily expiry, hourly alerts and a monthly scrub, as root.
  const etcOption = configFile === DEFAULT_CONFIG_FILE ? '' : ` --etc ${dirname(dirname(configFile))}`;
  await schedule(
    opts,
    { expire: `${node} ${program} expire${etcOption}`, alert: `${node} ${program} alert${etcOption}`, scrub: `/usr/bin/btrfs scrub start -B ${root}` },
    log,
  );

  log(`installed: root ${root}, group ${group}, configuration ${configFile}`);
  log(`check the sshd configuration with "sshd -t" and reload sshd; add users with "snapcrypt-server adduser NAME --key FILE"`);
  return config;
}

const KEY_TYPES = new Set([
  'ssh-ed25519',
  'ssh-rsa',
  'ecdsa-sha2-nistp256',
  'ecdsa-sha2-nistp384',
  'ecdsa-sha2-nistp521',
  'sk-ssh-ed25519@openssh.com',
  'sk-ecdsa-sha2-nistp256@openssh.com',
]);

/** One public key line "TYPE BASE64 [comment]" (no options); returns it normalized. */
export function parsePublicKey(text: string): string {
  const lines = text.split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.trim() !== '');
  if (lines.length !== 1) throw new SnapError('usage', `The key file must hold exactly one public key line (found ${lines.length})`);
  const line = (lines[0] ?? '').trim();
  const m = /^(\S+) ([A-Za-z0-9+/]+={0,2})(?: ([\x20-\x7e]*))?$/.exec(line);
  if (m === null || !KEY_TYPES.has(m[1] ?? '')) {
    throw new SnapError('usage', 'Not an OpenSSH public key line: expected "ssh-ed25519 AAAA... comment" (or ecdsa-sha2-*, ssh-rsa), without options');
  }
  const type = m[1] ?? '';
  const blob = Buffer.from(m[2] ?? '', 'base64');
  const len = blob.length >= 4 ? blob.readUInt32BE(0) : -1;
  if (len !== type.length || blob.subarray(4, 4 + len).toString('latin1') !== type) {
    throw new SnapError('usage', `The key's data does not match its type ${type}: the key line is damaged`);
  }
  const comment = (m[3] ?? '').replace(/"/g, '').trim();
  return comment === '' ? `${type} ${m[2]}` : `${type} ${m[2]} ${comment}`;
}

/** `snapcrypt-server adduser NAME --key FILE`. */
export async function addUser(opts: AddUserOptions): Promise<void> {
  requireRoot('snapcrypt-server adduser');
  const { name, log } = opts;
  if (!USER_NAME.test(name)) {
    throw new SnapError('usage', `Invalid user name ${JSON.stringify(name)}: use a lower-case letter or "_", then up to 31 of a-z, 0-9, "_", "-"`);
  }
  let keyText: string;
  try {
    keyText = await fsp.readFile(opts.keyFile, 'utf8');
  } catch (err) {
    throw new SnapError('not-found', `Cannot read the key file ${opts.keyFile}: ${errnoOf(err) ?? String(err)}`);
  }
  const key = parsePublicKey(keyText);
  let config: ServerConfig;
  try {
    config = await readServerConfig(configFileOf(opts.etc), true);
  } catch (err) {
    throw asSnapError(err);
  }
  if ((await getGroup(config.group)) === null) throw new SnapError('not-found', `There is no group ${config.group}: run snapcrypt-server install first`);

  // 1. The account: its own group, a working shell (sshd runs "$SHELL -c"), password '*' (no password
  // login, yet not "locked" for sshd), member of the server's group.
  const home = join(config.homeBase, name);
  let account = await getPasswd(name);
  if (account === null) {
    await run('useradd', ['--home-dir', home, '--no-create-home', '--shell', '/bin/sh', '--user-group', '--groups', config.group, '--comment', 'snapcrypt backup account', name]);
    await run('usermod', ['-p', '*', name]);
    account = await getPasswd(name);
    if (account === null) throw new SnapError('io', `useradd ${name} succeeded, but the account cannot be found`);
    log(`created account ${name} (uid ${account.uid}, shell /bin/sh, no password)`);
  } else {
    if (account.uid < UID_MIN) {
      throw new SnapError('usage', `Refusing to use the existing account ${name} (uid ${account.uid}): it is a system account; choose another name`);
    }
    const group = await getGroup(config.group);
    if (group !== null && account.gid !== group.gid && !group.members.includes(name)) {
      await run('usermod', ['-a', '-G', config.group, name]);
      log(`added ${name} to group ${config.group}`);
    }
  }
  const { uid, gid } = account;
  const accountHome = account.home === '' ? home : account.home;

  // 2. Home and the key, owned by root (readable by the user): the user cannot add keys of their own.
  await ensureDir(accountHome, 0, gid, 0o750, log);
  await ensureDir(join(accountHome, '.ssh'), 0, gid, 0o750, log);
  const keysFile = join(accountHome, '.ssh', 'authorized_keys');
  const keyLine = `restrict,command="${config.serve}" ${key}`;
  const old = (await fsp.readFile(keysFile, 'utf8').catch(() => '')).split('\n').filter((l) => l.trim() !== '');
  const keyData = key.split(' ').slice(0, 2).join(' ');
  const kept = old.filter((l) => !l.includes(` ${keyData}`));
  await ensureFile(keysFile, [...kept, keyLine].join('\n') + '\n', 0, gid, 0o640, log);

  // 3. The area.
  const p = userAreaPaths(config.root, name);
  await ensureDir(p.home, 0, gid, 0o750, log);
  if ((await fsp.lstat(p.subvolume).catch(() => null)) === null) {
    await run('btrfs', ['subvolume', 'create', p.subvolume]);
    log(`created subvolume ${p.subvolume}`);
  } else if (!(await isBtrfsSubvolume(p.subvolume))) {
    throw new SnapError('usage', `${p.subvolume} exists and is not a btrfs subvolume; move it away and run adduser again`);
  }
  await ensureDir(p.subvolume, 0, gid, 0o750, log);
  await ensureDir(p.current, uid, gid, 0o700, log);
  await ensureDir(p.lockDir, uid, gid, 0o700, log);
  await ensureDir(p.snapshots, 0, gid, 0o750, log);
  log(`user ${name} can back up to this server with the key ${keyData.slice(0, 40)}...`);
  log(`on the client: snapcrypt init --repo ssh://${name}@<this server> (the area is ${p.current})`);
}
