/**
 * Shared by the tests that run the installed server layout for real (test/server-admin.test.ts,
 * test/office.test.ts): running commands and capturing their output, running snapcrypt-server with a
 * root-owned node, running a command as an account, and a real sshd whose configuration includes the
 * drop-in that `snapcrypt-server install` writes.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import { chmodSync, copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { btrfsTempDir } from './env.js';
import { freePort } from './sshd.js';

export const SERVER_PROGRAM = fileURLToPath(new URL('../src/programs/snapcrypt-server.js', import.meta.url));

export interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs cmd without a shell; code is the exit status, or -1 when it was killed or could not start. */
export function run(cmd: string, args: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<Result> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: opts.timeoutMs ?? 30_000, maxBuffer: 64 * 1024 * 1024, ...(opts.env ? { env: opts.env } : {}) }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs a command as an account (runuser, no shell). */
export function as(user: string, cmd: string, ...args: string[]): Promise<Result> {
  return run('runuser', ['-u', user, '--', cmd, ...args]);
}

/**
 * install bakes the node that runs it into the root helper, and refuses a node that anyone but root
 * could replace (a checkout under /tmp, say): the tests run snapcrypt-server with a root-owned copy,
 * removed when the process exits.
 */
let rootNode: string | null = null;
export function rootOwnedNode(): string {
  if (rootNode !== null) return rootNode;
  const dir = mkdtempSync('/usr/local/lib/snapcrypt-test-node-');
  chmodSync(dir, 0o755);
  const copy = join(dir, 'node');
  copyFileSync(process.execPath, copy);
  chmodSync(copy, 0o755);
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  rootNode = copy;
  return copy;
}

/** snapcrypt-server ARGS, as root with the root-owned node (else with this node). */
export function server(...args: string[]): Promise<Result> {
  return run(process.getuid?.() === 0 ? rootOwnedNode() : process.execPath, [SERVER_PROGRAM, ...args]);
}

/**
 * A server layout without install, for commands that only read it (status, expire, alert): a fresh
 * directory on the btrfs test mount (root-owned all the way up, as root code wants its configuration)
 * with etc/snapcrypt/server.json naming the root srv/ and the metrics directory metrics/ (made empty).
 */
export async function handWrittenServer(prefix: string): Promise<{ top: string; etc: string; root: string; metrics: string }> {
  const top = await btrfsTempDir(prefix);
  if (top === null) throw new Error('handWrittenServer needs SNAPCRYPT_TEST_BTRFS');
  const etc = join(top, 'etc');
  const root = join(top, 'srv');
  const metrics = join(top, 'metrics');
  await fsp.mkdir(join(etc, 'snapcrypt'), { recursive: true, mode: 0o755 });
  await fsp.mkdir(metrics);
  await fsp.writeFile(
    join(etc, 'snapcrypt', 'server.json'),
    JSON.stringify({ version: 1, root, group: 'snapcrypt', seal: '/usr/local/lib/snapcrypt/seal', serve: 'snapcrypt-server serve', homeBase: join(top, 'home'), metricsDir: metrics }),
    { mode: 0o644 },
  );
  return { top, etc, root, metrics };
}

export interface LayoutSshd {
  readonly port: number;
  readonly hostKeyFile: string;
  log(): string;
  stop(): Promise<void>;
}

/**
 * A real sshd on 127.0.0.1 (as root, in the foreground) whose configuration starts like Debian's, with
 * `Include DROPINDIR/*.conf`, and lets only `users` log in, by public key from their own
 * ~/.ssh/authorized_keys (written by adduser).
 */
export async function startLayoutSshd(dir: string, dropInDir: string, users: readonly string[]): Promise<LayoutSshd> {
  const hostKeyFile = join(dir, 'ssh_host_ed25519_key');
  const keygen = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKeyFile]);
  if (keygen.code !== 0) throw new Error(`ssh-keygen: ${keygen.stderr}`);
  const port = await freePort();
  const config = join(dir, 'sshd_config');
  await fsp.writeFile(
    config,
    [`Include ${dropInDir}/*.conf`, `Port ${port}`, 'ListenAddress 127.0.0.1', `HostKey ${hostKeyFile}`, 'PidFile none', 'UsePAM no',
      'PasswordAuthentication no', 'KbdInteractiveAuthentication no', `AllowUsers ${users.join(' ')}`, 'LogLevel VERBOSE', ''].join('\n'),
  );
  await fsp.mkdir('/run/sshd', { recursive: true, mode: 0o755 });
  const daemon = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', config], { stdio: ['ignore', 'ignore', 'pipe'] });
  const killOnExit = () => daemon.kill('SIGKILL');
  process.once('exit', killOnExit);
  let log = '';
  daemon.stderr.on('data', (d: Buffer) => (log += d.toString()));
  for (let i = 0; i < 200 && !/Server listening/.test(log) && daemon.exitCode === null; i++) await new Promise((r) => setTimeout(r, 50));
  if (!/Server listening/.test(log)) {
    daemon.kill('SIGKILL');
    throw new Error(`sshd did not start: ${log}`);
  }
  return {
    port,
    hostKeyFile,
    log: () => log,
    stop: async () => {
      process.off('exit', killOnExit);
      if (daemon.exitCode !== null || daemon.signalCode !== null) return;
      const exited = new Promise((r) => daemon.once('exit', r));
      daemon.kill('SIGTERM');
      await exited;
    },
  };
}

/** Removes what a test's install and adduser made outside its temp directory: accounts, group, sudoers file. */
export function removeAccounts(users: readonly string[], group: string, sudoersFile: string): void {
  for (const user of users) {
    try {
      execFileSync('getent', ['passwd', user], { stdio: 'ignore' });
    } catch {
      continue;
    }
    // -r: mail spool and home (the homes are in the temp dir, root-owned, so userdel may leave them)
    try {
      execFileSync('userdel', ['-r', user], { stdio: 'ignore' });
    } catch {
      /* exit 12: home not removed (not owned by the user); the temp dir's cleanup removes it */
    }
  }
  try {
    execFileSync('groupdel', [group], { stdio: 'ignore' });
  } catch {
    /* not created */
  }
  rmSync(sudoersFile, { force: true });
}
