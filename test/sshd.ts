/**
 * A throwaway OpenSSH server for tests: /usr/sbin/sshd in the foreground on 127.0.0.1, with its own
 * config, host key and authorized_keys in a temp directory. Only the user running the tests can log in
 * (as root, sshd does privilege separation and needs /run/sshd; as another user it runs unprivileged).
 *
 *   const sshd = await startSshd({ authorizedKeys: [pubKeyLine], forcedCommand: 'echo ok' });
 *   ... ssh -p sshd.port user@127.0.0.1 ...
 *   await sshd.stop();
 *
 * Restart on the same port with a new host key: startSshd({ ..., port: old.port }).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { tempDir } from './env.js';

export const SSHD_PATH = '/usr/sbin/sshd';

export interface SshdOptions {
  /** Public key lines (type base64 [comment]) allowed to log in. */
  readonly authorizedKeys: readonly string[];
  /** Forced with restrict,command="..." on every key (the client's command is in SSH_ORIGINAL_COMMAND). */
  readonly forcedCommand?: string;
  /** Listen on this port (default: a free one). */
  readonly port?: number;
  /** Use this host key file instead of generating one (ed25519, private; must be 0600). */
  readonly hostKeyFile?: string;
  /** Extra sshd_config lines. */
  readonly extraConfig?: readonly string[];
}

export interface Sshd {
  readonly port: number;
  readonly host: '127.0.0.1';
  /** The user that may log in (the one running the tests). */
  readonly user: string;
  readonly dir: string;
  readonly hostKeyFile: string;
  /** The host public key line. */
  readonly hostPublicKey: string;
  /** sshd's log so far (stderr, LogLevel VERBOSE). */
  log(): string;
  stop(): Promise<void>;
}

/** Whether sshd can run here (installed; as root, /run/sshd is created if missing). */
export function sshdAvailable(): boolean {
  return fs.existsSync(SSHD_PATH);
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of running) c.kill('SIGKILL');
});

export async function startSshd(opts: SshdOptions): Promise<Sshd> {
  const dir = await tempDir('sshd');
  const user = os.userInfo().username;
  if (process.getuid?.() === 0) fs.mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });
  const hostKeyFile = path.join(dir, 'ssh_host_ed25519_key');
  if (opts.hostKeyFile !== undefined) {
    fs.copyFileSync(opts.hostKeyFile, hostKeyFile);
    fs.chmodSync(hostKeyFile, 0o600);
  } else {
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'test-sshd', '-f', hostKeyFile], { stdio: 'ignore' });
  }
  const hostPublicKey = execFileSync('ssh-keygen', ['-y', '-f', hostKeyFile], { encoding: 'utf8' }).trim();
  const authFile = path.join(dir, 'authorized_keys');
  const prefix = opts.forcedCommand !== undefined ? `restrict,command=${JSON.stringify(opts.forcedCommand)} ` : '';
  fs.writeFileSync(authFile, opts.authorizedKeys.map((k) => prefix + k.trim() + '\n').join(''), { mode: 0o600 });
  const config = path.join(dir, 'sshd_config');

  for (let attempt = 0; ; attempt++) {
    const port = opts.port ?? (await freePort());
    fs.writeFileSync(
      config,
      [
        `Port ${port}`,
        'ListenAddress 127.0.0.1',
        `HostKey ${hostKeyFile}`,
        'PidFile none',
        `AuthorizedKeysFile ${authFile}`,
        'StrictModes no',
        'UsePAM no',
        'PubkeyAuthentication yes',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'PermitRootLogin prohibit-password',
        `AllowUsers ${user}`,
        'PrintMotd no',
        'PrintLastLog no',
        'LogLevel VERBOSE',
        ...(opts.extraConfig ?? []),
        '',
      ].join('\n'),
    );
    const child = spawn(SSHD_PATH, ['-D', '-e', '-f', config], { stdio: ['ignore', 'ignore', 'pipe'] });
    running.add(child);
    let log = '';
    child.stderr!.on('data', (d: Buffer) => (log += d.toString()));
    const ready = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 10_000);
      const check = (): void => {
        if (/Server listening on 127\.0\.0\.1 port/.test(log)) {
          clearTimeout(timer);
          resolve(true);
        }
      };
      child.stderr!.on('data', check);
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(false);
      });
    });
    if (!ready) {
      child.kill('SIGKILL');
      running.delete(child);
      // a port taken between freePort() and sshd's bind: try another one
      if (opts.port === undefined && attempt < 3 && /Address already in use|Bind to port/.test(log)) continue;
      throw new Error(`sshd did not start (port ${port}):\n${log}`);
    }
    const exited = new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) resolve();
      else child.once('exit', () => resolve());
    });
    return {
      port,
      host: '127.0.0.1',
      user,
      dir,
      hostKeyFile,
      hostPublicKey,
      log: () => log,
      async stop() {
        child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(t);
        running.delete(child);
      },
    };
  }
}
