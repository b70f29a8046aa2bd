/**
 * `snapcrypt-server alert`: tells the administrator, once per change, when a user becomes overdue and
 * when they are back (docs/SERVER.md "Metrics and alerts"). Needs no key (I6): it reads status().
 *
 * A user's state is "overdue" or "ok" (status: no snapshot, or the newest older than the threshold).
 * The state last notified is kept per user in <root>/state/alerts.json (root 0600 in a root 0700
 * directory, written atomically). policy.json's alert.command runs (no shell, fixed PATH, 60 s at most)
 * when a user becomes overdue, the first time a user is seen too, and when an overdue user is back to
 * ok; a user first seen ok is recorded without a notice. The notice is a mail (a Subject header, a
 * blank line, a body) on the command's stdin, with SNAPCRYPT_USER, SNAPCRYPT_STATE, SNAPCRYPT_LAST and
 * SNAPCRYPT_AGE_SECONDS in its environment. A failed command leaves the user's state unrecorded, so the
 * next run tries again. Without alert.command the states are recorded and nothing is sent.
 */
import { spawn } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { formatDuration, formatDurationShort } from '../core/duration.js';
import { SnapError } from '../core/errors.js';
import { processAlive } from '../drivers/localdir.js';
import { writeUserMetrics } from './metrics.js';
import { readServerFiles } from './policy.js';
import { SAFE_PATH, USER_NAME } from './seal-helper.js';
import { status, type UserStatus } from './status.js';

export type AlertState = 'overdue' | 'ok';

/** What alert did for one user. */
export interface AlertOutcome {
  readonly user: string;
  readonly state: AlertState;
  /** The state recorded before this run, or null for a user seen for the first time. */
  readonly previous: AlertState | null;
  /**
   * unchanged: as recorded, nothing to send; recorded: first seen and ok, recorded without a notice;
   * notified: the command ran, the state is recorded; unsent: no alert.command, recorded without a
   * notice; would-notify: a dry run; failed: the command failed, nothing recorded (the next run retries).
   */
  readonly action: 'unchanged' | 'recorded' | 'notified' | 'unsent' | 'would-notify' | 'failed';
  /** The notice's subject, when the state changed to one that is notified. */
  readonly subject: string | null;
  /** Why the command failed (action "failed"). */
  readonly error: string | null;
}

export interface AlertOptions {
  readonly configFile: string;
  /** Show what would be sent; run nothing, write nothing. */
  readonly dryRun: boolean;
  /** Called for every user, in name order, once they are handled. */
  readonly report: (outcome: AlertOutcome) => void;
  readonly now?: number;
  /** The host name in the notices (default: this machine's). */
  readonly host?: string;
}

export const ALERT_TIMEOUT_MS = 60_000;

interface Recorded {
  readonly state: AlertState;
  /** When it was recorded (ISO time). */
  readonly since: string;
}

/** The state file's path under the server root. */
export function alertStateFileOf(root: string): string {
  return join(root, 'state', 'alerts.json');
}

function damaged(file: string, why: string): SnapError {
  return new SnapError('io', `The alert state file ${file} is damaged (${why}); move it away to start over (every overdue user is then notified again)`);
}

/** {"version": 1, "users": {"alice": {"state": "overdue", "since": ISO}}}; empty when there is none. */
async function readAlertState(file: string): Promise<Map<string, Recorded>> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as { code?: unknown }).code === 'ENOENT') return new Map();
    throw new SnapError('io', `Cannot read the alert state file ${file}: ${(err as Error).message}`, { cause: err });
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw damaged(file, (err as Error).message);
  }
  const o = v as { version?: unknown; users?: unknown } | null;
  if (typeof o !== 'object' || o === null || o.version !== 1) throw damaged(file, 'expected {"version": 1, "users": {…}}');
  if (typeof o.users !== 'object' || o.users === null || Array.isArray(o.users)) throw damaged(file, '"users" is not an object');
  const out = new Map<string, Recorded>();
  for (const [user, r] of Object.entries(o.users as Record<string, unknown>)) {
    const { state, since } = (r ?? {}) as { state?: unknown; since?: unknown };
    if (!USER_NAME.test(user) || (state !== 'ok' && state !== 'overdue') || typeof since !== 'string') {
      throw damaged(file, `bad entry ${JSON.stringify(user)}`);
    }
    out.set(user, { state, since });
  }
  return out;
}

/** The state file's directory, made root 0700 if missing; refused unless root owns it. */
async function stateDir(file: string): Promise<string> {
  const dir = join(file, '..');
  await fsp.mkdir(dir, { mode: 0o700 }).catch((err: unknown) => {
    if ((err as { code?: unknown }).code !== 'EEXIST') throw new SnapError('io', `Cannot create ${dir}: ${(err as Error).message}`, { cause: err });
  });
  const st = await fsp.lstat(dir);
  if (!st.isDirectory() || st.uid !== 0) throw new SnapError('usage', `Refusing ${dir}: the alert state must be in a directory owned by root; remove it and run alert again`);
  if ((st.mode & 0o7777) !== 0o700) await fsp.chmod(dir, 0o700);
  return dir;
}

/**
 * One alert run at a time, so that two runs (the hourly one and one by hand) cannot both send a
 * notice: `<state file>.lock` holds the pid of the run that has it; a lock whose process is gone is
 * taken over. Returns the release function.
 */
async function lockAlertState(file: string): Promise<() => Promise<void>> {
  await stateDir(file);
  const lock = `${file}.lock`;
  for (let attempt = 0; ; attempt++) {
    try {
      const fh = await fsp.open(lock, 'wx', 0o600);
      try {
        await fh.writeFile(`${process.pid}\n`);
      } finally {
        await fh.close();
      }
      return () => fsp.rm(lock, { force: true });
    } catch (err) {
      if ((err as { code?: unknown }).code !== 'EEXIST') throw new SnapError('io', `Cannot create the lock ${lock}: ${(err as Error).message}`, { cause: err });
    }
    const pid = Number((await fsp.readFile(lock, 'utf8').catch(() => '')).trim());
    if (attempt > 0 || (Number.isSafeInteger(pid) && pid > 0 && processAlive(pid))) {
      throw new SnapError('locked', `Another snapcrypt-server alert is running (pid ${pid || 'unknown'}, lock ${lock}); if it is not, remove the lock`);
    }
    await fsp.rm(lock, { force: true }); // its process is gone
  }
}

/** Writes the state atomically (temp, fsync, rename) into its directory, made root 0700 if missing. */
async function writeAlertState(file: string, recorded: ReadonlyMap<string, Recorded>): Promise<void> {
  const fail = (err: unknown) => new SnapError('io', `Cannot write the alert state file ${file}: ${(err as Error).message}`, { cause: err });
  const dir = await stateDir(file);
  const users = Object.fromEntries([...recorded].sort(([a], [b]) => (a < b ? -1 : 1)));
  const tmp = join(dir, `.alerts.json.${process.pid}.tmp`);
  try {
    const fh = await fsp.open(tmp, 'wx', 0o600);
    try {
      await fh.writeFile(`${JSON.stringify({ version: 1, users }, null, 2)}\n`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
  } catch (err) {
    throw fail(err);
  } finally {
    await fsp.rm(tmp, { force: true });
  }
}

/** The notice for a user's new state: a mail (Subject header, blank line, body) and the command's environment. */
export function alertNotice(row: UserStatus, state: AlertState, host: string): { subject: string; text: string; env: Record<string, string> } {
  const threshold = formatDuration(row.overdueAfterMs);
  const age = row.ageMs === null ? null : formatDurationShort(Math.max(0, row.ageMs));
  const subject =
    state === 'ok'
      ? `snapcrypt: ${row.user} is backed up again (last backup ${age ?? '?'} ago)`
      : age === null
        ? `snapcrypt: ${row.user} has no backup yet (threshold ${threshold})`
        : `snapcrypt: ${row.user} has had no backup for ${age} (threshold ${threshold})`;
  const ageSeconds = row.ageMs === null ? '' : String(Math.max(0, Math.floor(row.ageMs / 1000)));
  const body = [
    state === 'ok' ? `${row.user} is backed up again on ${host}.` : `${row.user} is overdue on ${host}: no backup for longer than ${threshold}.`,
    '',
    `User:         ${row.user}`,
    `State:        ${state}`,
    `Last backup:  ${row.last === null ? 'none' : `${row.last} (server time)`}`,
    `Age:          ${age === null ? '-' : `${age} (${ageSeconds} s)`}`,
    `Threshold:    ${threshold}`,
    `Snapshots:    ${row.snapshots}`,
    `Host:         ${host}`,
    '',
    `Details: snapcrypt-server status --user ${row.user}`,
  ];
  return {
    subject,
    text: `Subject: ${subject}\n\n${body.join('\n')}\n`,
    env: { SNAPCRYPT_USER: row.user, SNAPCRYPT_STATE: state, SNAPCRYPT_LAST: row.last ?? '', SNAPCRYPT_AGE_SECONDS: ageSeconds },
  };
}

/** Runs the command (no shell, fixed PATH) with input on its stdin; rejects with one line saying why it failed. */
export function runAlertCommand(command: readonly string[], input: string, env: Record<string, string>, timeoutMs = ALERT_TIMEOUT_MS): Promise<void> {
  const [program = '', ...args] = command;
  return new Promise((resolve, reject) => {
    let settled = false;
    let timedOut = false;
    let stderr = '';
    const child = spawn(program, args, { env: { PATH: SAFE_PATH, ...env }, stdio: ['pipe', 'ignore', 'pipe'] });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    const settle = (why: string | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.stderr.destroy();
      if (why === null) resolve();
      else reject(new Error(why));
    };
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      if (stderr.length < 4096) stderr += d;
    });
    child.stdin.on('error', () => undefined); // a command that does not read its input
    child.stdin.end(input);
    child.once('error', (err: Error & { code?: unknown }) => {
      const why = err.code === 'ENOENT' ? 'no such file (ENOENT)' : err.code === 'EACCES' ? 'permission denied (EACCES)' : typeof err.code === 'string' ? err.code : err.message;
      settle(`cannot run ${program}: ${why}; check alert.command in policy.json`);
    });
    child.once('exit', (code, signal) => {
      const why = timedOut
        ? `${program} did not finish within ${timeoutMs / 1000} s and was killed`
        : signal !== null
          ? `${program} was ended by ${signal}`
          : code !== 0
            ? `${program} exited with status ${code}`
            : null;
      // its stderr, unless something it started keeps the pipe open
      const done = () => settle(why === null ? null : `${why}${stderr.trim() === '' ? '' : `: ${stderr.trim().split('\n')[0]}`}`);
      if (child.stderr.readableEnded) done();
      else {
        child.stderr.once('end', done);
        setTimeout(done, 1000).unref();
      }
    });
  });
}

/** Handles every user (see the top of this file); returns the number of users whose notice failed. */
export async function alert(opts: AlertOptions): Promise<number> {
  if (!opts.dryRun && process.getuid?.() !== 0) {
    throw new SnapError('usage', 'snapcrypt-server alert keeps its state and runs the alert command as root: run it as root (or with --dry-run)');
  }
  const { config, policy } = await readServerFiles(opts.configFile, !opts.dryRun);
  const rows = await status({ configFile: opts.configFile, now: opts.now ?? Date.now(), files: { config, policy } });
  const file = alertStateFileOf(config.root);
  const release = opts.dryRun ? null : await lockAlertState(file);
  try {
    return await alertUsers(opts, config, policy, rows, file);
  } finally {
    await release?.();
  }
}

async function alertUsers(
  opts: AlertOptions,
  config: Awaited<ReturnType<typeof readServerFiles>>['config'],
  policy: Awaited<ReturnType<typeof readServerFiles>>['policy'],
  rows: UserStatus[],
  file: string,
): Promise<number> {
  const recorded = await readAlertState(file);
  const host = opts.host ?? hostname();
  const record = async (user: string, state: AlertState) => {
    recorded.set(user, { state, since: new Date(opts.now ?? Date.now()).toISOString() });
    await writeAlertState(file, recorded);
  };
  let failed = 0;
  for (const row of rows) {
    const state: AlertState = row.overdue ? 'overdue' : 'ok';
    const previous = recorded.get(row.user)?.state ?? null;
    const outcome = { user: row.user, state, previous, subject: null, error: null };
    if (previous === state) {
      opts.report({ ...outcome, action: 'unchanged' });
      continue;
    }
    if (previous === null && state === 'ok') {
      if (!opts.dryRun) await record(row.user, state);
      opts.report({ ...outcome, action: 'recorded' });
      continue;
    }
    const notice = alertNotice(row, state, host);
    if (opts.dryRun) {
      opts.report({ ...outcome, action: 'would-notify', subject: notice.subject });
      continue;
    }
    if (policy.alert === null) {
      await record(row.user, state);
      opts.report({ ...outcome, action: 'unsent', subject: notice.subject });
      continue;
    }
    try {
      await runAlertCommand(policy.alert.command, notice.text, notice.env);
    } catch (err) {
      failed++;
      opts.report({ ...outcome, action: 'failed', subject: notice.subject, error: (err as Error).message });
      continue;
    }
    await record(row.user, state);
    opts.report({ ...outcome, action: 'notified', subject: notice.subject });
  }
  if (!opts.dryRun) {
    // users no longer on the server are forgotten: if they come back, they are new
    const gone = [...recorded.keys()].filter((user) => !rows.some((r) => r.user === user));
    for (const user of gone) recorded.delete(user);
    if (gone.length > 0) await writeAlertState(file, recorded);
    if (config.metricsDir !== undefined) await writeUserMetrics(config.metricsDir, rows);
  }
  return failed;
}
