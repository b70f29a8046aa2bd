/**
 * Shared helpers for tests that drive the compiled CLI: run it, make a repository, and describe a
 * directory tree exactly (content and metadata) so that two trees compare with assert.deepStrictEqual.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FsMeta } from '../src/drivers/fsmeta.js';
import { tempDir } from './env.js';

/** The compiled CLI entry point (dist/src/programs/snapcrypt.js). */
export const CLI_PATH = fileURLToPath(new URL('../src/programs/snapcrypt.js', import.meta.url));

export interface CliOptions {
  /** Added to the environment (a value of undefined removes a variable). */
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Written to the CLI's stdin (stdin is closed either way). */
  readonly input?: string | Buffer;
  readonly cwd?: string;
  /** A run that takes longer is taken for hung: diagnosed (threads, Node report) and killed (default 300 000). */
  readonly timeoutMs?: number;
  /** Kill the CLI with SIGKILL after this many ms, as a crash would (crash tests; no diagnosis). */
  readonly killAfterMs?: number;
}

export interface CliResult {
  /** Exit status; null if the process was killed by a signal. */
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * Run `node dist/src/programs/snapcrypt.js ...args`. The environment is the test's own minus every
 * SNAPCRYPT_* variable (so a developer's settings do not leak in), plus opts.env.
 */
export function runCli(args: readonly string[], opts: CliOptions = {}): Promise<CliResult> {
  return startCli(args, opts).done;
}

/**
 * runCli's process, for tests that signal it while it runs (SIGSTOP, SIGKILL). done settles when it
 * has exited; at the timeout it is killed, and the result's stderr says when it last wrote anything and
 * what its threads and JavaScript were doing (to tell a hang from slowness, and to find the hang).
 */
export function startCli(args: readonly string[], opts: CliOptions = {}): { child: ChildProcessWithoutNullStreams; done: Promise<CliResult> } {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('SNAPCRYPT_')) env[k] = v;
  for (const [k, v] of Object.entries(opts.env ?? {})) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  // a hung run can be asked for a diagnostic report (JS stack, libuv handles) before it is killed
  const reportDir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapcrypt-report-'));
  env['NODE_OPTIONS'] = `${env['NODE_OPTIONS'] ?? ''} --report-on-signal --report-signal=SIGUSR2 --report-directory=${reportDir}`.trim();
  const child = spawn(process.execPath, [CLI_PATH, ...args], { cwd: opts.cwd, env, stdio: ['pipe', 'pipe', 'pipe'] });
  const done = new Promise<CliResult>((resolve, reject) => {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let lastOutput = Date.now();
    child.stdout.on('data', (b: Buffer) => {
      out.push(b);
      lastOutput = Date.now();
    });
    child.stderr.on('data', (b: Buffer) => {
      err.push(b);
      lastOutput = Date.now();
    });
    child.stdin.on('error', () => {}); // the CLI may exit without reading its input
    child.stdin.end(opts.input ?? '');
    const started = Date.now();
    let timedOut = false;
    let closed = false;
    let diagnosis = '';
    const timer =
      opts.killAfterMs !== undefined
        ? setTimeout(() => child.kill('SIGKILL'), opts.killAfterMs)
        : setTimeout(() => {
            timedOut = true;
            diagnosis = processTreeState(child.pid);
            child.kill('SIGUSR2');
            setTimeout(() => {
              if (!closed) diagnosis += readReports(reportDir);
              child.kill('SIGKILL');
            }, 3000);
          }, opts.timeoutMs ?? 300_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      closed = true;
      clearTimeout(timer);
      const note = timedOut ? `\n[runCli: killed by the ${Date.now() - started} ms timeout; last output at ${lastOutput - started} ms]\n${diagnosis}` : '';
      fs.rmSync(reportDir, { recursive: true, force: true });
      resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') + note });
    });
  });
  return { child, done };
}

/** Each thread of a process and its descendants: name, state and kernel wait channel (for hangs). */
function processTreeState(pid: number | undefined): string {
  if (pid === undefined) return '';
  const lines: string[] = [];
  const visit = (p: number, depth: number) => {
    const read = (f: string) => {
      try {
        return fs.readFileSync(`/proc/${p}/${f}`, 'utf8');
      } catch {
        return '';
      }
    };
    lines.push(`${'  '.repeat(depth)}pid ${p}: ${read('cmdline').split('\0').join(' ').trim()}`);
    let tasks: string[] = [];
    try {
      tasks = fs.readdirSync(`/proc/${p}/task`);
    } catch {
      /* gone */
    }
    for (const t of tasks) {
      const stat = read(`task/${t}/stat`);
      const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
      lines.push(`${'  '.repeat(depth)}  thread ${t} ${read(`task/${t}/comm`).trim()} state ${state} wchan ${read(`task/${t}/wchan`) || '-'} syscall ${read(`task/${t}/syscall`).split(' ')[0]?.trim() ?? '-'}`);
    }
    for (const c of read(`task/${p}/children`).split(' ').filter((x) => x.trim() !== '')) visit(Number(c), depth + 1);
  };
  visit(pid, 0);
  return `[process tree at the timeout]\n${lines.join('\n')}\n`;
}

/** The JS stack and the active libuv handles from the diagnostic reports a hung CLI wrote. */
function readReports(dir: string): string {
  let out = '';
  for (const f of fs.readdirSync(dir)) {
    try {
      const r = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as {
        javascriptStack?: { message?: string; stack?: string[] };
        libuv?: Array<{ type: string; is_active: boolean; is_referenced?: boolean; [k: string]: unknown }>;
        workers?: unknown[];
      };
      const handles = (r.libuv ?? []).filter((h) => h.is_active).map((h) => JSON.stringify(h));
      out += `[diagnostic report ${f}]\nJS stack: ${r.javascriptStack?.message ?? ''}\n  ${(r.javascriptStack?.stack ?? []).join('\n  ')}\nactive handles:\n  ${handles.join('\n  ')}\nworkers: ${(r.workers ?? []).length}\n`;
    } catch (err) {
      out += `[diagnostic report ${f} unreadable: ${String(err)}]\n`;
    }
  }
  return out === '' ? '[no diagnostic report: the main thread did not reach JavaScript (blocked in native code?)]\n' : out;
}

/** The --json output of a command: one object per non-empty line. */
export function jsonLines(stdout: string): Array<Record<string, unknown>> {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** Fails with the command's output if it did not exit with `code` (default 0). */
export function expectExit(r: CliResult, what: string, code = 0): void {
  if (r.code !== code) {
    throw new Error(`${what}: exit ${r.code ?? r.signal}, expected ${code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`);
  }
}

export interface TestRepo {
  /** The repository directory (pass as --repo). */
  readonly repo: string;
  /** SNAPCRYPT_PASSWORD, SNAPCRYPT_TEST_WEAK_KDF=1, fresh SNAPCRYPT_CACHE_DIR and SNAPCRYPT_CONFIG_DIR: pass as opts.env. */
  readonly env: Readonly<Record<string, string>>;
  readonly cacheDir: string;
}

/** A new repository made with `snapcrypt init` in a temp dir (cheap KDF, own cache dir). */
export async function makeRepo(opts: { password?: string; init?: boolean } = {}): Promise<TestRepo> {
  const base = await tempDir('repo');
  const repo = path.join(base, 'repo');
  const cacheDir = path.join(base, 'cache');
  const env = {
    SNAPCRYPT_PASSWORD: opts.password ?? 'correct horse battery staple',
    SNAPCRYPT_TEST_WEAK_KDF: '1',
    SNAPCRYPT_CACHE_DIR: cacheDir,
    // local copies of key files go here, not into the user's ~/.config
    SNAPCRYPT_CONFIG_DIR: path.join(base, 'config'),
  };
  if (opts.init !== false) expectExit(await runCli(['init', '--repo', repo], { env }), 'snapcrypt init');
  return { repo, env, cacheDir };
}

// ---------------------------------------------------------------------------------------------
// Exact description of a tree

export type NodeType = 'file' | 'dir' | 'symlink' | 'fifo' | 'chardev' | 'blockdev' | 'socket';

export interface NodeDesc {
  type: NodeType;
  /** Permission bits incl. setuid/setgid/sticky, in octal (e.g. "4755"). */
  mode: string;
  uid: number;
  gid: number;
  mtimeNs: bigint;
  /** Extended attributes: escaped name -> value in hex. */
  xattrs: Record<string, string>;
  /** Files: size and SHA-256 of the content. Symlinks: size (= target length). */
  size?: number;
  sha256?: string;
  /** Symlinks: the target, escaped. */
  target?: string;
  /** Hard links: every key of this tree that names the same inode (sorted, incl. this one). */
  hardLinks?: string[];
  /** Sparse files only (a hole before the end): the data segments [start, end) per SEEK_DATA/SEEK_HOLE. */
  dataMap?: Array<[number, number]>;
  /** Device nodes. */
  rdev?: number;
}

/** Key = path relative to the root, escaped ("." for the root itself). */
export type TreeSnapshot = Record<string, NodeDesc>;

/**
 * Bytes as an exact, readable string: printable ASCII and printable UTF-8 characters as they are,
 * every other byte (control characters, invalid UTF-8) and the backslash as \xNN. unescapeBytes()
 * inverts it, so it can stand for a raw name or path.
 */
export function escapeBytes(b: Buffer): string {
  let s = '';
  for (let i = 0; i < b.length; ) {
    const c = b[i]!;
    if (c >= 0x20 && c < 0x7f && c !== 0x5c) {
      s += String.fromCharCode(c);
      i++;
      continue;
    }
    const n = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (n > 0 && i + n <= b.length) {
      const seq = b.subarray(i, i + n);
      const ch = seq.toString('utf8');
      if (!ch.includes('\ufffd') && Buffer.from(ch).equals(seq) && /^[^\p{C}\p{Z}]$/u.test(ch)) {
        s += ch;
        i += n;
        continue;
      }
    }
    s += `\\x${c.toString(16).padStart(2, '0')}`;
    i++;
  }
  return s;
}

export function unescapeBytes(s: string): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < s.length; ) {
    if (s[i] === '\\') {
      parts.push(Buffer.from([parseInt(s.slice(i + 2, i + 4), 16)]));
      i += 4;
    } else {
      const cp = s.codePointAt(i)!;
      const ch = String.fromCodePoint(cp);
      parts.push(Buffer.from(ch));
      i += ch.length;
    }
  }
  return Buffer.concat(parts);
}

/**
 * assert.deepStrictEqual for two tree snapshots, with messages that name the first differing entry
 * (a whole-tree diff of a big tree is hard to read).
 */
export function assertSameTree(actual: TreeSnapshot, expected: TreeSnapshot, message = ''): void {
  const pre = message ? `${message}: ` : '';
  const missing = Object.keys(expected).filter((k) => !Object.hasOwn(actual, k));
  const extra = Object.keys(actual).filter((k) => !Object.hasOwn(expected, k));
  assert.deepStrictEqual({ missing, extra }, { missing: [], extra: [] }, `${pre}entries missing from / extra in the tree`);
  for (const k of Object.keys(expected)) assert.deepStrictEqual(actual[k], expected[k], `${pre}entry ${JSON.stringify(k)} differs`);
}

const TYPES: Record<number, NodeType> = {
  0o100000: 'file', 0o040000: 'dir', 0o120000: 'symlink', 0o010000: 'fifo', 0o020000: 'chardev', 0o060000: 'blockdev', 0o140000: 'socket',
};

const slash = Buffer.from('/');

/**
 * Describe the tree at `root` (a directory, or any single entry): every entry's relative path (raw
 * bytes), type, mode, owner, mtime in ns, xattrs, size and content hash, symlink target, hard-link
 * groups (within the tree) and, for sparse files, where the data is. Not described: atime, ctime,
 * inode numbers, link counts (they depend on what lies outside the tree) and directory sizes.
 */
export async function treeSnapshot(root: string | Buffer): Promise<TreeSnapshot> {
  const rootBuf = Buffer.isBuffer(root) ? root : Buffer.from(root);
  const out: TreeSnapshot = Object.create(null) as TreeSnapshot; // no prototype: a file may be named __proto__
  const inodes = new Map<string, string[]>();
  const sparseCandidates: Array<{ key: string; path: Buffer; size: number }> = [];
  const meta = FsMeta.start();
  try {
    const visit = async (p: Buffer, key: string): Promise<void> => {
      const st = fs.lstatSync(p, { bigint: true });
      const type = TYPES[Number(st.mode) & 0o170000];
      if (type === undefined) throw new Error(`unknown file type at ${escapeBytes(p)}`);
      const xattrs: Record<string, string> = Object.create(null) as Record<string, string>;
      const list = await meta.listXattrs(p);
      list.sort((a, b) => Buffer.compare(a.name, b.name));
      for (const x of list) xattrs[escapeBytes(x.name)] = x.value.toString('hex');
      const d: NodeDesc = {
        type,
        mode: (Number(st.mode) & 0o7777).toString(8),
        uid: Number(st.uid),
        gid: Number(st.gid),
        mtimeNs: st.mtimeNs,
        xattrs,
      };
      out[key] = d;
      if (type !== 'dir' && st.nlink > 1n) {
        const ik = `${st.dev}:${st.ino}`;
        const keys = inodes.get(ik) ?? [];
        keys.push(key);
        inodes.set(ik, keys);
      }
      switch (type) {
        case 'file': {
          d.size = Number(st.size);
          d.sha256 = createHash('sha256').update(fs.readFileSync(p)).digest('hex');
          if (d.size > 0 && st.blocks * 512n < st.size) sparseCandidates.push({ key, path: p, size: d.size });
          break;
        }
        case 'symlink': {
          d.size = Number(st.size);
          d.target = escapeBytes(fs.readlinkSync(p, { encoding: 'buffer' }));
          break;
        }
        case 'chardev':
        case 'blockdev':
          d.rdev = Number(st.rdev);
          break;
        case 'dir': {
          const names = fs.readdirSync(p, { encoding: 'buffer' }).sort(Buffer.compare);
          for (const n of names) {
            await visit(Buffer.concat([p, slash, n]), key === '.' ? escapeBytes(n) : `${key}/${escapeBytes(n)}`);
          }
          break;
        }
        default:
          break;
      }
    };
    await visit(rootBuf, '.');
  } finally {
    await meta.close();
  }
  for (const keys of inodes.values()) {
    if (keys.length < 2) continue;
    const sorted = [...keys].sort();
    for (const k of keys) out[k]!.hardLinks = sorted;
  }
  if (sparseCandidates.length > 0) {
    const maps = await dataMaps(sparseCandidates.map((c) => c.path));
    sparseCandidates.forEach((c, i) => {
      const m = maps[i]!;
      const dense = m.length === 1 && m[0]![0] === 0 && m[0]![1] === c.size;
      if (!dense) out[c.key]!.dataMap = m;
    });
  }
  return out;
}

/** Data segments of files via lseek(SEEK_DATA / SEEK_HOLE), in one perl run (node has no SEEK_DATA). */
const SEEK_SCRIPT = `
use Fcntl;
binmode STDOUT;
while (my $l = <STDIN>) {
  chomp $l;
  my $p = pack('H*', $l);
  sysopen(my $fh, $p, O_RDONLY | O_NOFOLLOW) or die "open: $!\\n";
  my ($size, $pos, @seg) = (-s $fh, 0);
  while ($pos < $size) {
    my $d = sysseek($fh, $pos, 3);
    if (!defined $d) { last if $!{ENXIO}; die "SEEK_DATA: $!\\n" }
    my $h = sysseek($fh, $d, 4);
    die "SEEK_HOLE: $!\\n" unless defined $h;
    push @seg, (0 + $d) . ':' . (0 + $h);
    $pos = $h;
  }
  close $fh;
  print join(',', @seg), "\\n";
}
`;

function dataMaps(paths: readonly Buffer[]): Promise<Array<Array<[number, number]>>> {
  return new Promise((resolve, reject) => {
    const child = execFile('perl', ['-e', SEEK_SCRIPT], { maxBuffer: 64 * 1024 * 1024 }, (err, stdout) => {
      if (err) {
        reject(err);
        return;
      }
      const lines = stdout.split('\n');
      resolve(
        paths.map((_, i) =>
          (lines[i] ?? '')
            .split(',')
            .filter((s) => s !== '')
            .map((s): [number, number] => {
              const [a, b] = s.split(':');
              return [Number(a), Number(b)];
            }),
        ),
      );
    });
    child.stdin?.end(paths.map((p) => p.toString('hex') + '\n').join(''));
  });
}

/** target, with onCall() run before each call of its method `method` (other members pass through, bound). */
export function countingCalls<T extends object>(target: T, method: string, onCall: () => void): T {
  return new Proxy(target, {
    get(t, prop, receiver) {
      const v = Reflect.get(t, prop, receiver) as unknown;
      if (typeof v !== 'function') return v;
      const f = (v as (...a: unknown[]) => unknown).bind(t);
      if (prop !== method) return f;
      return (...args: unknown[]) => {
        onCall();
        return f(...args);
      };
    },
  });
}
