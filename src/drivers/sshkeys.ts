/**
 * The workstation's SSH identity for snapcrypt, kept apart from the user's own ~/.ssh:
 *
 *   <config root>/ssh/id_ed25519       the private key, encrypted with the snapcrypt passphrase (0600)
 *   <config root>/ssh/id_ed25519.pub   its public key, comment snapcrypt@<hostname> (0644)
 *   <config root>/ssh/known_hosts      the host keys of the servers set up with `snapcrypt setup`
 *   <config root>/ssh/askpass          a tiny SSH_ASKPASS program (0700, rewritten when it differs)
 *
 * One passphrase protects both this key and the repository's master key; decrypting the SSH key is how
 * the passphrase is checked before any connection.
 *
 * This module also holds the one parser of SSH destinations (parseSshTarget, for --repo ssh://... and
 * `snapcrypt setup user@host`) and the one builder of ssh command lines (sshInvocation): with this key
 * and askpass where the key exists, else plain ssh with the user's own configuration and agent.
 *
 * How the passphrase reaches OpenSSH (ssh-keygen and ssh) without ever being on a command line:
 * `ssh-keygen -N/-P` would put it in argv, which every user on the machine can read
 * (/proc/PID/cmdline, ps). Instead every ssh/ssh-keygen child runs with
 *   SSH_ASKPASS=<config root>/ssh/askpass, SSH_ASKPASS_REQUIRE=force (OpenSSH >= 8.4),
 *   SNAPCRYPT_ASKPASS_SECRET=<the passphrase as octal escapes>
 * (DISPLAY is not needed: "force" enables askpass without it, and leaving it alone keeps X11 out)
 * and OpenSSH's read_passphrase() asks the askpass program for every passphrase: ssh-keygen's
 * "Enter passphrase (empty for no passphrase)" / "Enter same passphrase again" when generating,
 * "Enter passphrase" for `ssh-keygen -y`, and ssh's "Enter passphrase for key '...'" on connect. The
 * askpass program is a POSIX sh script that prints the secret with the printf builtin (no new process,
 * so no argv), and only for those prompts; it refuses confirmations (SSH_ASKPASS_PROMPT set) and any
 * other prompt, e.g. a password prompt.
 *
 * Exposure: the variable lives only in the environment of the ssh/ssh-keygen child (never in
 * snapcrypt's own process.env) and of the askpass it starts. /proc/PID/environ is readable only by the
 * same user (and root), who can read the passphrase from snapcrypt's memory anyway. Other programs that
 * ssh starts (a user's ProxyCommand) inherit it; they are the user's own. ssh sends environment
 * variables to the server only for SendEnv patterns: sshInvocation() runs `ssh -G` and refuses to go
 * on if the effective configuration would send SNAPCRYPT_ASKPASS_SECRET. Password and
 * keyboard-interactive authentication are switched off on the command line (which beats any config
 * file), so the server can never make ssh ask the askpass program a question of its choosing.
 * Limits: a passphrase used for the SSH key cannot contain NUL, CR or LF bytes and must be at most
 * 1000 bytes (OpenSSH reads one line of at most 1023 bytes from askpass).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SnapError } from '../core/errors.js';
import { defaultConfigRoot } from './localpaths.js';

export const ASKPASS_SECRET_ENV = 'SNAPCRYPT_ASKPASS_SECRET';
const MAX_PASSPHRASE = 1000;
/**
 * bcrypt_pbkdf rounds for the private key (ssh-keygen -a; OpenSSH's default is 16, about 0.13 s here).
 * The key file is an offline oracle for the same passphrase that wraps the master key with a strong
 * KDF, so it gets 4x the default: about 0.5 s per decryption, i.e. per ssh connection.
 */
export const KEY_KDF_ROUNDS = 64;
/** Rounds for new keys: KEY_KDF_ROUNDS, or 4 with SNAPCRYPT_TEST_WEAK_KDF=1 (tests only, as for key files). */
export function keyKdfRounds(): number {
  return process.env['SNAPCRYPT_TEST_WEAK_KDF'] === '1' ? 4 : KEY_KDF_ROUNDS;
}

/** Where the identity lives. */
export interface SshIdentity {
  readonly dir: string;
  readonly keyFile: string;
  readonly pubFile: string;
  readonly knownHostsFile: string;
  readonly askpassFile: string;
}

export function sshIdentity(configRoot: string = defaultConfigRoot()): SshIdentity {
  const dir = path.join(configRoot, 'ssh');
  return {
    dir,
    keyFile: path.join(dir, 'id_ed25519'),
    pubFile: path.join(dir, 'id_ed25519.pub'),
    knownHostsFile: path.join(dir, 'known_hosts'),
    askpassFile: path.join(dir, 'askpass'),
  };
}

// ---------------------------------------------------------------------------------------------
// targets

/** A server as `snapcrypt setup` and the ssh driver see it. */
export interface SshTarget {
  /** The account on the server; undefined leaves it to ssh (its configuration, else the local user). */
  readonly user: string | undefined;
  /** A host name or an IP address (an IPv6 address without its brackets). */
  readonly host: string;
  /** undefined leaves it to ssh (its configuration, else 22). */
  readonly port: number | undefined;
}

const USER_RE = /^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$/;
const HOST_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$/;
const IPV6_RE = /^(?=[^%]*:)[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?$/;

/**
 * The one parser of SSH destinations: `ssh://[user@]host[:port][/]` (a --repo value) and
 * `user@host[:port]` (what setup takes; the user is required in this form). A host may be an IPv6
 * address in brackets (`[::1]`, `[fe80::1%eth0]`). Neither user nor host may start with "-", so no part
 * can turn into an ssh option; the URL carries no path (the server's forced command picks the area).
 * Anything else: SnapError('usage').
 */
export function parseSshTarget(spec: string): SshTarget {
  const bad = (why: string): SnapError =>
    new SnapError('usage', `Invalid SSH destination ${JSON.stringify(spec.slice(0, 300))}: ${why}`, {
      hint: 'write ssh://[user@]host[:port]/ or user@host[:port]; there is no path: the server decides where the repository lives',
    });
  let rest = spec;
  const isUrl = rest.startsWith('ssh://');
  if (isUrl) {
    rest = rest.slice('ssh://'.length);
    if (rest.endsWith('/')) rest = rest.slice(0, -1);
    if (rest.includes('/')) throw bad('an ssh:// URL has no path');
  }
  const at = rest.lastIndexOf('@');
  if (at < 0 && !isUrl) throw bad('the user name is missing');
  const user = at < 0 ? undefined : rest.slice(0, at);
  if (user !== undefined && !USER_RE.test(user)) throw bad(`${JSON.stringify(user)} is not a valid user name`);
  let hostPort = rest.slice(at + 1);
  let host: string;
  let portStr: string | undefined;
  if (hostPort.startsWith('[')) {
    const close = hostPort.indexOf(']');
    if (close < 0) throw bad('missing "]"');
    host = hostPort.slice(1, close);
    hostPort = hostPort.slice(close + 1);
    if (hostPort !== '') {
      if (!hostPort.startsWith(':')) throw bad('junk after "]"');
      portStr = hostPort.slice(1);
    }
    if (!IPV6_RE.test(host)) throw bad(`${JSON.stringify(host)} is not an IPv6 address`);
  } else {
    const colon = hostPort.indexOf(':');
    if (colon >= 0) {
      host = hostPort.slice(0, colon);
      portStr = hostPort.slice(colon + 1);
    } else host = hostPort;
    if (!HOST_RE.test(host)) throw bad(`${JSON.stringify(host)} is not a valid host name`);
  }
  let port: number | undefined;
  if (portStr !== undefined) {
    if (!/^\d{1,5}$/.test(portStr) || Number(portStr) < 1 || Number(portStr) > 65535) throw bad(`${JSON.stringify(portStr)} is not a port number`);
    port = Number(portStr);
  }
  return { user, host, port };
}

/** `host` for port 22, `[host]:port` otherwise: how known_hosts names a server. */
export function knownHostsName(t: { host: string; port: number }): string {
  return t.port === 22 ? t.host : `[${t.host}]:${t.port}`;
}

/** ssh://[user@]host[:port]/ (IPv6 addresses in brackets). */
export function sshUrl(t: SshTarget): string {
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `ssh://${t.user === undefined ? '' : `${t.user}@`}${host}${t.port === undefined ? '' : `:${t.port}`}/`;
}

// ---------------------------------------------------------------------------------------------
// running OpenSSH tools

interface RunResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

function run(cmd: string, args: readonly string[], opts: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        e.code === 'ENOENT'
          ? new SnapError('usage', `${cmd} is not installed`, { hint: 'install the OpenSSH client (Debian: apt-get install openssh-client)' })
          : new SnapError('io', `Cannot run ${cmd}: ${e.message}`, { cause: e }),
      );
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
    child.stdin.on('error', () => {
      /* the tool may not read its stdin */
    });
    child.stdin.end(opts.input ?? '');
  });
}

// ---------------------------------------------------------------------------------------------
// askpass

/** The askpass program: answers only OpenSSH's passphrase prompts, with the secret from the environment. */
const ASKPASS_SCRIPT = `#!/bin/sh
# snapcrypt's SSH_ASKPASS helper (written by snapcrypt; rewritten when it differs).
# Prints the passphrase that snapcrypt put into ${ASKPASS_SECRET_ENV} for the ssh or ssh-keygen child it
# started, and only for passphrase prompts: never for confirmations or password prompts.
[ -n "\${${ASKPASS_SECRET_ENV}-}" ] || exit 1
[ -z "\${SSH_ASKPASS_PROMPT-}" ] || exit 1
case "\${1-}" in
"Enter passphrase (empty for no passphrase): " | "Enter same passphrase again: " | "Enter passphrase: " | "Enter passphrase for key '"*"': ") ;;
*) exit 1 ;;
esac
# the secret holds only octal escapes (made by snapcrypt), so it is a safe printf format
printf "\${${ASKPASS_SECRET_ENV}}\\n"
`;

function ensureDir(dir: string): void {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
}

/** Write the askpass program if it is missing or differs (atomically, 0700). */
export function ensureAskpass(id: SshIdentity = sshIdentity()): string {
  let current: string | null = null;
  try {
    current = fs.readFileSync(id.askpassFile, 'utf8');
  } catch {
    current = null;
  }
  if (current === ASKPASS_SCRIPT && (fs.statSync(id.askpassFile).mode & 0o777) === 0o700) return id.askpassFile;
  ensureDir(id.dir);
  const tmp = `${id.askpassFile}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, ASKPASS_SCRIPT, { mode: 0o700 });
  fs.chmodSync(tmp, 0o700);
  fs.renameSync(tmp, id.askpassFile);
  return id.askpassFile;
}

/** Refuse passphrases that cannot travel through askpass unchanged. */
function checkSshPassphrase(passphrase: Buffer): void {
  if (passphrase.length === 0) throw new SnapError('usage', 'An empty passphrase cannot protect the SSH key');
  if (passphrase.length > MAX_PASSPHRASE) throw new SnapError('usage', `The passphrase is longer than ${MAX_PASSPHRASE} bytes; OpenSSH cannot take it`);
  if (passphrase.includes(0) || passphrase.includes(0x0a) || passphrase.includes(0x0d)) {
    throw new SnapError('usage', 'The passphrase contains a NUL, CR or LF byte; OpenSSH cannot take it');
  }
}

/**
 * The environment for an ssh or ssh-keygen child that may need the key's passphrase: `base` plus the
 * askpass variables. Never assign the result to process.env.
 */
export function askpassEnv(passphrase: Buffer, id: SshIdentity = sshIdentity(), base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  checkSshPassphrase(passphrase);
  let secret = '';
  for (const b of passphrase) secret += `\\${b.toString(8).padStart(3, '0')}`;
  const env: NodeJS.ProcessEnv = { ...base };
  delete env['SSH_ASKPASS_PROMPT'];
  env['SSH_ASKPASS'] = ensureAskpass(id);
  env['SSH_ASKPASS_REQUIRE'] = 'force';
  env[ASKPASS_SECRET_ENV] = secret;
  return env;
}

// ---------------------------------------------------------------------------------------------
// the key pair

export function keyExists(id: SshIdentity = sshIdentity()): boolean {
  return fs.existsSync(id.keyFile);
}

/**
 * Check the passphrase by decrypting the private key (`ssh-keygen -y`, passphrase through askpass).
 * Returns the public key line. Throws SnapError('wrong-password') if it does not decrypt,
 * 'not-found' if there is no key.
 */
export async function checkPassphrase(passphrase: Buffer, id: SshIdentity = sshIdentity()): Promise<string> {
  if (!keyExists(id)) throw new SnapError('not-found', `No snapcrypt SSH key at ${id.keyFile}`, { hint: 'run "snapcrypt setup user@host" first' });
  const env = askpassEnv(passphrase, id);
  const r = await run('ssh-keygen', ['-y', '-f', id.keyFile], { env });
  if (r.code === 0) return r.stdout.trim();
  if (/incorrect passphrase/i.test(r.stderr)) {
    throw new SnapError('wrong-password', `The passphrase does not decrypt the SSH key ${id.keyFile}`);
  }
  throw new SnapError('io', `Cannot read the SSH key ${id.keyFile}: ${r.stderr.trim() || `ssh-keygen exited with ${r.code}`}`);
}

export interface KeyPair {
  /** The public key line (type, base64, comment). */
  readonly publicKey: string;
  readonly created: boolean;
}

/**
 * The key pair, generated with this passphrase if there is none; an existing key is never overwritten
 * (its passphrase is checked instead, and a missing .pub is rebuilt from it).
 */
export async function ensureKeyPair(passphrase: Buffer, id: SshIdentity = sshIdentity(), opts: { rounds?: number } = {}): Promise<KeyPair> {
  if (keyExists(id)) {
    const pub = await checkPassphrase(passphrase, id);
    if (!fs.existsSync(id.pubFile)) writeFileAtomic(id.pubFile, pub + '\n', 0o644);
    return { publicKey: readPub(id), created: false };
  }
  ensureDir(id.dir);
  const env = askpassEnv(passphrase, id);
  const tmpDir = fs.mkdtempSync(path.join(id.dir, '.keygen-'));
  try {
    const tmpKey = path.join(tmpDir, 'id_ed25519');
    const r = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-a', String(opts.rounds ?? keyKdfRounds()), '-C', `snapcrypt@${os.hostname()}`, '-f', tmpKey], { env });
    if (r.code !== 0 || !fs.existsSync(tmpKey) || !fs.existsSync(`${tmpKey}.pub`)) {
      throw new SnapError('io', `ssh-keygen could not make a key: ${r.stderr.trim() || `exit status ${r.code}`}`);
    }
    // If askpass could not run (e.g. a noexec config directory), ssh-keygen takes "" as the passphrase
    // and writes the key unencrypted: make sure it did not.
    const plain = await run('ssh-keygen', ['-y', '-P', '', '-f', tmpKey]);
    if (plain.code === 0) {
      throw new SnapError('io', `ssh-keygen did not get the passphrase through ${id.askpassFile}; no key was made`, {
        hint: 'the configuration directory must allow running programs (not mounted noexec)',
      });
    }
    fs.chmodSync(tmpKey, 0o600);
    fs.chmodSync(`${tmpKey}.pub`, 0o644);
    // the public key first, so that a private key never exists without it
    fs.renameSync(`${tmpKey}.pub`, id.pubFile);
    try {
      fs.linkSync(tmpKey, id.keyFile); // fails if a key appeared meanwhile: never overwrite
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') return ensureKeyPair(passphrase, id, opts);
      throw err;
    }
  } finally {
    fs.rmSync(tmpDir, { recursive: true, force: true });
  }
  return { publicKey: readPub(id), created: true };
}

function readPub(id: SshIdentity): string {
  return fs.readFileSync(id.pubFile, 'utf8').trim();
}

function writeFileAtomic(file: string, data: string, mode: number): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, data, { mode });
  fs.chmodSync(tmp, mode);
  fs.renameSync(tmp, file);
}

// ---------------------------------------------------------------------------------------------
// the ssh command line

/** Ciphers in order of preference: AES-GCM first (hardware AES makes it the cheapest per byte). */
const CIPHERS = 'aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com';

/**
 * The options for snapcrypt's own key: only that key, only the snapcrypt known_hosts (strict: an
 * unknown or changed host key is refused by ssh itself), public-key authentication only (so askpass is
 * never asked for a password), no agent, no forwarding, no multiplexing.
 *
 * Never with `-o BatchMode=yes`: in batch mode ssh never asks for a key's passphrase, so the encrypted
 * key is skipped and the login fails ("Permission denied (publickey)"). These options already keep ssh
 * from asking anything else (no passwords, strict host key checking); BatchMode=no comes before any
 * extra option, and ssh keeps the first value it gets, so a user's "BatchMode yes" cannot undo it.
 */
function snapcryptKeyOptions(id: SshIdentity): string[] {
  const o = (s: string): string[] => ['-o', s];
  return [
    '-i', id.keyFile,
    ...o('BatchMode=no'),
    ...o('IdentitiesOnly=yes'),
    ...o('IdentityAgent=none'),
    ...o(`UserKnownHostsFile=${id.knownHostsFile}`),
    ...o('StrictHostKeyChecking=yes'),
    ...o('UpdateHostKeys=no'),
    ...o('PreferredAuthentications=publickey'),
    ...o('PasswordAuthentication=no'),
    ...o('KbdInteractiveAuthentication=no'),
    ...o('NumberOfPasswordPrompts=1'),
    ...o('ControlMaster=no'),
    ...o('ControlPath=none'),
    ...o('ForwardAgent=no'),
    ...o('ForwardX11=no'),
    ...o('ClearAllForwardings=yes'),
    ...o('PermitLocalCommand=no'),
  ];
}

/** A shell-style glob (ssh's match_pattern: * and ?) against a name. */
function globMatch(pattern: string, name: string): boolean {
  const re = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);
  return re.test(name);
}

/** The effective ssh configuration for a command line (`ssh -G`), one "key value" line each, or what ssh said when it refused it. */
async function effectiveConfig(args: readonly string[]): Promise<{ lines: string[] } | { error: string }> {
  const g = await run('ssh', ['-G', ...args], { timeoutMs: 10_000 });
  if (g.code !== 0) return { error: g.stderr.trim() };
  return { lines: g.stdout.split('\n').map((l) => l.trim()) };
}

/** Refuses (usage) when the effective ssh configuration would send the askpass secret (SendEnv). */
function checkSendEnv(lines: readonly string[]): void {
  for (const line of lines) {
    const m = /^sendenv\s+(.+)$/i.exec(line);
    if (m && !m[1]!.startsWith('-') && globMatch(m[1]!, ASKPASS_SECRET_ENV)) {
      throw new SnapError('usage', `The ssh configuration would send ${ASKPASS_SECRET_ENV} to the server (SendEnv ${m[1]})`, {
        hint: 'narrow SendEnv in ~/.ssh/config or /etc/ssh/ssh_config',
      });
    }
  }
}

const CURVE25519 = ['curve25519-sha256', 'curve25519-sha256@libssh.org'];

/**
 * The key exchanges of an effective configuration (ssh -G's "kexalgorithms" line), reordered with
 * curve25519 first, or null to leave them as they are. OpenSSH 9.0 to 9.8 offer sntrup761x25519 first,
 * whose key generation cost this client 140 ms of CPU per connection (the benchmark's connection:
 * 0.46 s with it, 0.31 s with curve25519-sha256). Its worth is against a recording decrypted years
 * later; what a snapcrypt connection carries is what the server stores anyway (sealed objects, their
 * ids, sealed key files: docs/THREAT-MODEL.md), so such a recording shows no more than the server
 * has. Left as they are: lists that name ML-KEM (OpenSSH 9.9 and later offer it first: post-quantum
 * and cheap), lists without curve25519, and lists that already start with it. Only the order
 * changes: the user's configuration still decides which exchanges are allowed.
 */
export function kexPreference(lines: readonly string[]): string | null {
  const line = lines.find((l) => /^kexalgorithms\s/i.test(l));
  if (line === undefined) return null;
  const list = line.split(/\s+/)[1]!.split(',');
  if (list.some((a) => a.startsWith('mlkem'))) return null;
  const fast = list.filter((a) => CURVE25519.includes(a));
  if (fast.length === 0 || list.slice(0, fast.length).every((a) => fast.includes(a))) return null;
  return [...fast, ...list.filter((a) => !fast.includes(a))].join(',');
}

/** Whether ssh options given by the user set an option themselves (-o Name=..., -oName ...; names are case-insensitive). */
function setsOption(extra: readonly string[], name: string): boolean {
  const re = new RegExp(`^(-o)?\\s*${name}\\s*[= ]`, 'i');
  return extra.some((a, i) => re.test(a) && (a.startsWith('-o') || extra[i - 1] === '-o'));
}

export interface SshInvocationOptions {
  /** snapcrypt's SSH identity (default: the one in the configuration directory). */
  readonly identity?: SshIdentity;
  /** The passphrase of snapcrypt's key; asked only when that key exists. Without it, plain ssh is used. */
  readonly passphrase?: () => Promise<Buffer>;
  /** More ssh arguments (SNAPCRYPT_SSH_OPTIONS), placed after snapcrypt's and before the destination. */
  readonly extraOptions?: readonly string[];
}

export interface SshInvocation {
  /** Arguments for the `ssh` program, ending with the remote command. */
  readonly args: string[];
  /** The child's environment; undefined: inherit snapcrypt's (never assign it to process.env). */
  readonly env: NodeJS.ProcessEnv | undefined;
  /** Whether snapcrypt's own key (and known_hosts, askpass) is used. */
  readonly snapcryptKey: boolean;
}

/**
 * The one place where snapcrypt's ssh command lines are made (RemoteStorage.connectSsh, so every
 * ssh:// repository, runs what this returns). Common to both cases:
 *   -o Ciphers=<AES-GCM first> -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -e none -T
 *   ... [-o KexAlgorithms=<curve25519 first>] [extraOptions] [-p PORT] [-l USER] -- HOST REMOTE-COMMAND
 * The key exchanges are those of the effective configuration (`ssh -G`), reordered (kexPreference).
 * - snapcrypt's key exists (`snapcrypt setup` made it) and a passphrase source is given: the options of
 *   snapcryptKeyOptions(), the port 22 when the target names none (setup recorded the host key for
 *   that port), and an environment that feeds the passphrase to ssh through askpass. If the effective
 *   configuration would send the secret (SendEnv), or ssh refuses it, SnapError('usage').
 * - otherwise: the user's own ssh configuration, keys and agent, with BatchMode=yes (ssh never prompts:
 *   a key that needs a passphrase must be in the agent).
 */
export async function sshInvocation(target: SshTarget, remoteCommand: string, opts: SshInvocationOptions = {}): Promise<SshInvocation> {
  const common = ['-o', `Ciphers=${CIPHERS}`, '-o', 'ServerAliveInterval=15', '-o', 'ServerAliveCountMax=4', '-e', 'none', '-T'];
  const extra = opts.extraOptions ?? [];
  const destination = (port: number | undefined): string[] => [
    ...(port === undefined ? [] : ['-p', String(port)]),
    ...(target.user === undefined ? [] : ['-l', target.user]),
    '--',
    target.host,
  ];
  const id = opts.identity ?? sshIdentity();
  /** The key exchanges in a cheaper order (kexPreference), unless the user's options set them. */
  const kex = (lines: readonly string[]): string[] => {
    const order = setsOption(extra, 'KexAlgorithms') ? null : kexPreference(lines);
    return order === null ? [] : ['-o', `KexAlgorithms=${order}`];
  };
  if (opts.passphrase !== undefined && keyExists(id)) {
    const own = [...common, ...snapcryptKeyOptions(id)];
    const rest = [...extra, ...destination(target.port ?? 22)];
    const config = await effectiveConfig([...own, ...rest]);
    if ('error' in config) throw new SnapError('usage', `ssh -G failed for ${sshUrl(target)}: ${config.error}`);
    checkSendEnv(config.lines);
    const env = askpassEnv(await opts.passphrase(), id);
    return { args: [...own, ...kex(config.lines), ...rest, remoteCommand], env, snapcryptKey: true };
  }
  const own = [...common, '-o', 'BatchMode=yes'];
  const rest = [...extra, ...destination(target.port)];
  // (a configuration ssh refuses is reported by ssh itself, when it runs)
  const config = await effectiveConfig([...own, ...rest]);
  return { args: [...own, ...('lines' in config ? kex(config.lines) : []), ...rest, remoteCommand], env: undefined, snapcryptKey: false };
}

// ---------------------------------------------------------------------------------------------
// known hosts

export interface HostKey {
  /** e.g. ssh-ed25519, ecdsa-sha2-nistp256 */
  readonly type: string;
  readonly key: string;
}

export interface ScannedHost {
  readonly keys: HostKey[];
  /** The known_hosts lines as ssh-keyscan printed them. */
  readonly lines: string[];
  /** `ssh-keygen -lf` lines: "256 SHA256:... [host]:port (ED25519)". */
  readonly fingerprints: string[];
}

function parseKeyLines(text: string): { keys: HostKey[]; lines: string[] } {
  const keys: HostKey[] = [];
  const lines: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith('@')) continue;
    const f = line.split(/\s+/);
    if (f.length < 3) continue;
    keys.push({ type: f[1]!, key: f[2]! });
    lines.push(line);
  }
  return { keys, lines };
}

/** Ask the server for its host keys (ed25519 and ecdsa) with ssh-keyscan. */
export async function scanHostKeys(t: { host: string; port: number }, timeoutSec = 10): Promise<ScannedHost> {
  const r = await run('ssh-keyscan', ['-T', String(timeoutSec), '-p', String(t.port), '-t', 'ed25519,ecdsa', '--', t.host], { timeoutMs: timeoutSec * 3000 + 5000 });
  const { keys, lines } = parseKeyLines(r.stdout);
  if (keys.length === 0) {
    const why = r.stderr.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('#')).join('; ');
    throw new SnapError('io', `Cannot get the host key of ${knownHostsName(t)}${why ? `: ${why}` : ' (no answer, or no ed25519/ecdsa host key)'}`);
  }
  const fp = await run('ssh-keygen', ['-l', '-f', '-'], { input: lines.join('\n') + '\n' });
  const fingerprints = fp.code === 0 ? fp.stdout.split('\n').map((l) => l.trim()).filter((l) => l !== '') : [];
  return { keys, lines, fingerprints };
}

/** The keys known_hosts holds for this server (`ssh-keygen -F`, which also reads hashed entries). */
export async function knownHostKeys(t: { host: string; port: number }, id: SshIdentity = sshIdentity()): Promise<HostKey[]> {
  if (!fs.existsSync(id.knownHostsFile)) return [];
  const r = await run('ssh-keygen', ['-F', knownHostsName(t), '-f', id.knownHostsFile]);
  if (r.code !== 0) return []; // 1: not found
  return parseKeyLines(r.stdout).keys;
}

export interface RecordResult {
  readonly scanned: ScannedHost;
  /** true if the keys were added now, false if they were already known (and equal). */
  readonly added: boolean;
}

/**
 * Contact the server once and record its host keys in the snapcrypt known_hosts. If keys for it are
 * already recorded, every scanned key of a recorded type must equal a recorded one, else the error
 * "host key of HOST changed" (integrity); nothing new is added then.
 */
export async function recordHostKeys(t: { host: string; port: number }, id: SshIdentity = sshIdentity()): Promise<RecordResult> {
  const scanned = await scanHostKeys(t);
  const known = await knownHostKeys(t, id);
  if (known.length > 0) {
    const knownTypes = new Set(known.map((k) => k.type));
    const matching = scanned.keys.filter((s) => known.some((k) => k.type === s.type && k.key === s.key));
    const changed = scanned.keys.some((s) => knownTypes.has(s.type) && !known.some((k) => k.type === s.type && k.key === s.key));
    if (changed || matching.length === 0) {
      throw new SnapError('integrity', `The host key of ${knownHostsName(t)} changed since it was recorded in ${id.knownHostsFile}`, {
        hint: `if the server was really reinstalled, check the new fingerprint with its administrator, then remove the old entry with "ssh-keygen -R '${knownHostsName(t)}' -f ${id.knownHostsFile}" and run setup again`,
      });
    }
    return { scanned, added: false };
  }
  ensureDir(id.dir);
  let existing = '';
  try {
    existing = fs.readFileSync(id.knownHostsFile, 'utf8');
  } catch {
    existing = '';
  }
  if (existing !== '' && !existing.endsWith('\n')) existing += '\n';
  writeFileAtomic(id.knownHostsFile, existing + scanned.lines.join('\n') + '\n', 0o600);
  return { scanned, added: true };
}
