/** What every command shares: options, passphrases, output, opening the repository. */
import fs from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { formatDuration, parseDuration } from '../core/duration.js';
import { SnapError } from '../core/errors.js';
import { Repository } from '../engine/repository.js';
import { DirKeyStore, defaultCacheRoot, defaultConfigRoot, openTreeCache } from '../drivers/cachedir.js';
import { openStorage } from '../drivers/open.js';
import { sshOptionsFromEnv } from '../drivers/ssh.js';
import type { Storage } from '../storage/types.js';

export interface Io {
  readonly stdout: NodeJS.WriteStream;
  readonly stderr: NodeJS.WriteStream;
  readonly stdin: NodeJS.ReadStream;
  readonly env: NodeJS.ProcessEnv;
}

export type Values = Record<string, string | boolean | string[] | undefined>;

export interface Command {
  readonly name: string;
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig['options']>;
  readonly allowPositionals: boolean;
  run(ctx: Ctx): Promise<number>;
}

export const commonOptions = {
  repo: { type: 'string', short: 'r' },
  'password-file': { type: 'string' },
  json: { type: 'boolean' },
  quiet: { type: 'boolean', short: 'q' },
  'cache-dir': { type: 'string' },
  'no-cache': { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

export const commonHelp = `Common options:
  -r, --repo R            repository: a local directory (or set SNAPCRYPT_REPO)
      --password-file F   read the passphrase from F (or set SNAPCRYPT_PASSWORD; else a prompt)
      --json              machine-readable output: one JSON object per line
  -q, --quiet             no progress and no summary lines
      --cache-dir D       local cache (default $XDG_CACHE_HOME/snapcrypt or ~/.cache/snapcrypt)
      --no-cache          do not use the local cache
  -h, --help              this help`;

export class Ctx {
  readonly io: Io;
  readonly values: Values;
  readonly positionals: string[];
  private storage: Storage | null = null;
  constructor(io: Io, values: Values, positionals: string[]) {
    this.io = io;
    this.values = values;
    this.positionals = positionals;
  }
  get json(): boolean {
    return this.values['json'] === true;
  }
  get quiet(): boolean {
    return this.values['quiet'] === true;
  }
  str(name: string): string | undefined {
    const v = this.values[name];
    return typeof v === 'string' ? v : undefined;
  }
  list(name: string): string[] {
    const v = this.values[name];
    return Array.isArray(v) ? v : typeof v === 'string' ? [v] : [];
  }
  /** Human output on stdout (suppressed with --json). */
  out(line: string): void {
    if (!this.json) this.io.stdout.write(line + '\n');
  }
  emit(obj: Record<string, unknown>): void {
    if (this.json) this.io.stdout.write(JSON.stringify(obj) + '\n');
  }
  warn(line: string): void {
    if (this.json) this.io.stdout.write(JSON.stringify({ type: 'warning', message: line }) + '\n');
    else this.io.stderr.write(`warning: ${line}\n`);
  }
  /**
   * Warns when the newest snapshot is older than SNAPCRYPT_WARN_AGE (a duration, default 7d; "off"
   * disables it): backups that silently stopped running are the most common way to lose data.
   */
  warnIfStale(newest: { name: string; time: number } | undefined, location: string): void {
    if (newest === undefined) return;
    const setting = this.io.env['SNAPCRYPT_WARN_AGE']?.trim() || '7d';
    if (setting === 'off') return;
    const limit = parseDuration(setting);
    const age = Date.now() - newest.time;
    if (age > limit) {
      this.warn(`the newest snapshot of ${location} is ${formatDuration(age - (age % 1000))} old (${newest.name}), older than ${setting}: are backups still running? (SNAPCRYPT_WARN_AGE sets the limit, "off" silences this)`);
    }
  }
  /** A live progress line only on a terminal. */
  get progressEnabled(): boolean {
    return !this.quiet && !this.json && this.io.stderr.isTTY === true;
  }
  progress(line: string): void {
    if (this.progressEnabled) this.io.stderr.write(`\r\x1b[K${line}`);
  }
  progressDone(): void {
    if (this.progressEnabled) this.io.stderr.write('\r\x1b[K');
  }

  repoLocation(): string {
    const r = this.str('repo') ?? this.io.env['SNAPCRYPT_REPO'];
    if (!r) throw new SnapError('usage', 'No repository given: use --repo R or set SNAPCRYPT_REPO');
    return r;
  }
  async openStorage(): Promise<Storage> {
    if (this.storage) return this.storage;
    // ssh://: the workstation's own SSH key (snapcrypt setup), where it exists, is protected by the
    // repository passphrase (asked only then); without it ssh uses the user's own configuration.
    this.storage = await openStorage(this.repoLocation(), undefined, {
      ...sshOptionsFromEnv(this.io.env),
      passphrase: () => this.passphrase(),
    });
    return this.storage;
  }
  async close(): Promise<void> {
    await this.storage?.close();
  }

  cacheRoot(): string | null {
    if (this.values['no-cache'] === true) return null;
    return this.str('cache-dir') ?? defaultCacheRoot();
  }

  private cachedPassphrase: Buffer | null = null;

  /** The passphrase, asked (or read) once per command. */
  async passphrase(prompt = 'Passphrase: '): Promise<Buffer> {
    this.cachedPassphrase ??= await this.readPassphrase(prompt);
    return this.cachedPassphrase;
  }

  private async readPassphrase(prompt: string): Promise<Buffer> {
    const file = this.str('password-file');
    if (file !== undefined) return readPasswordFile(file);
    const env = this.io.env['SNAPCRYPT_PASSWORD'];
    if (env !== undefined) return Buffer.from(env);
    if (this.io.stdin.isTTY && this.io.stderr.isTTY) return readHidden(this.io, prompt);
    throw new SnapError('usage', 'No passphrase: set SNAPCRYPT_PASSWORD, use --password-file F, or run on a terminal');
  }

  /** A new passphrase: --new-password-file, SNAPCRYPT_NEW_PASSWORD, or asked twice on a terminal. */
  async newPassphrase(fileOption: string | undefined, envName: string): Promise<Buffer> {
    let p: Buffer;
    if (fileOption !== undefined) p = readPasswordFile(fileOption);
    else if (this.io.env[envName] !== undefined) p = Buffer.from(this.io.env[envName]!);
    else if (this.io.stdin.isTTY && this.io.stderr.isTTY) {
      p = await readHidden(this.io, 'New passphrase: ');
      const again = await readHidden(this.io, 'Repeat the new passphrase: ');
      if (!p.equals(again)) throw new SnapError('usage', 'The two passphrases differ; nothing was changed');
    } else {
      throw new SnapError('usage', `No new passphrase: set ${envName}, give a password file, or run on a terminal`);
    }
    if (p.length === 0) throw new SnapError('usage', 'An empty passphrase is not allowed');
    return p;
  }

  async openRepo(): Promise<Repository> {
    // the passphrase first, so that the KDF runs (from the local key files) while ssh connects
    const pass = await this.passphrase();
    const keyStore = this.keyStore();
    const early = this.storage ? null : await Repository.deriveEarly(keyStore, this.repoLocation(), pass);
    const storage = await this.openStorage();
    const repo = await Repository.open(storage, pass, openTreeCache(this.cacheRoot()), keyStore, early);
    await keyStore.rememberRepoId(this.repoLocation(), repo.config.id).catch(() => undefined);
    return repo;
  }

  /** Local copies of key files, in the user's configuration directory. */
  keyStore(): DirKeyStore {
    return new DirKeyStore(defaultConfigRoot());
  }
}

export function readPasswordFile(file: string): Buffer {
  let data: Buffer;
  try {
    data = fs.readFileSync(file);
  } catch (err) {
    throw new SnapError('usage', `Cannot read password file ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
  // the first line, without its newline
  const nl = data.indexOf(0x0a);
  let line = nl >= 0 ? data.subarray(0, nl) : data;
  if (line.length > 0 && line[line.length - 1] === 0x0d) line = line.subarray(0, line.length - 1);
  return Buffer.from(line);
}

/** Read a line from the terminal without echo. */
export function readHidden(io: Io, prompt: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const stdin = io.stdin;
    io.stderr.write(prompt);
    const chunks: number[] = [];
    stdin.setRawMode(true);
    stdin.resume();
    const onData = (d: Buffer): void => {
      for (const b of d) {
        if (b === 0x0d || b === 0x0a) {
          finish();
          io.stderr.write('\n');
          resolve(Buffer.from(chunks));
          return;
        }
        if (b === 0x03) {
          finish();
          io.stderr.write('\n');
          reject(new SnapError('interrupted', 'Interrupted at the passphrase prompt'));
          return;
        }
        if (b === 0x7f || b === 0x08) chunks.pop();
        else chunks.push(b);
      }
    };
    const finish = (): void => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
    };
    stdin.on('data', onData);
  });
}

export function parse(cmd: Command, args: string[]): { values: Values; positionals: string[] } {
  try {
    const r = parseArgs({ args, options: { ...commonOptions, ...cmd.options }, allowPositionals: cmd.allowPositionals, strict: true });
    return { values: r.values as Values, positionals: r.positionals };
  } catch (err) {
    throw new SnapError('usage', `${cmd.name}: ${(err as Error).message}`, { hint: `see "snapcrypt ${cmd.name} --help"` });
  }
}

// ---------------------------------------------------------------------------------------------
// formatting

export function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

export function fmtDuration(sec: number): string {
  if (!Number.isFinite(sec) || sec < 0) return '?';
  const s = Math.round(sec);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

export function table(rows: string[][]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')).join('\n');
}

/** Parse SNAPSHOT[:PATH]; a snapshot's time name itself contains colons. */
export function parseSnapshotRef(arg: string): { ref: string; path: string | null } {
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)(?::(.*))?$/.exec(arg);
  if (m) return { ref: m[1]!, path: m[2] ?? null };
  const i = arg.indexOf(':');
  if (i < 0) return { ref: arg, path: null };
  return { ref: arg.slice(0, i), path: arg.slice(i + 1) };
}
