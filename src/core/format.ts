/**
 * Encoding and decoding of every stored structure (docs/FORMAT.md). Pure: no I/O.
 * Readers reject unknown versions and check every length before allocating.
 */
import { Reader, Writer } from './codec.js';
import { SnapError } from './errors.js';
import { type IdHashCode, type KdfParams, IdHash, checkKdfParams, isIdHash } from './crypto.js';

export const FORMAT_NAME = 'snapcrypt';
/** Format version 1: object ids by HMAC-SHA256. */
export const FORMAT_VERSION = 1;
/** Format version 2: version 1 with the id function named in the secret (docs/FORMAT.md section 14). */
export const FORMAT_VERSION_2 = 2;
export const TREE_VERSION = 1;
export const ID_LEN = 32;
/** An all-zero chunk id in a file's content list means "a chunk of zeros" (stored as a hole). */
export const ZERO_CHUNK = Buffer.alloc(ID_LEN);

export const DEFAULT_CHUNK_SIZE = 1024 * 1024;
export const MIN_CHUNK_SIZE = 64 * 1024;
export const MAX_CHUNK_SIZE = 16 * 1024 * 1024;

/** The format version of a repository with this id function: 1 for HMAC-SHA256 (readable by every reader), else 2. */
export function formatVersionOf(idHash: IdHashCode): number {
  return idHash === IdHash.sha256 ? FORMAT_VERSION : FORMAT_VERSION_2;
}

// ---------------------------------------------------------------------------------------------
// Repository config (clear text, no secrets)

export interface RepoConfig {
  readonly format: typeof FORMAT_NAME;
  readonly version: number;
  /** 32 hex chars, random, names the local cache. */
  readonly id: string;
}

export function encodeConfig(c: RepoConfig): Buffer {
  return Buffer.from(JSON.stringify(c) + '\n');
}

export function decodeConfig(buf: Buffer, where: string): RepoConfig {
  let c: unknown;
  try {
    c = JSON.parse(buf.toString('utf8'));
  } catch {
    throw new SnapError('not-a-repository', `${where} is not a snapcrypt repository: config is not JSON`);
  }
  const o = c as Record<string, unknown>;
  if (o?.['format'] !== FORMAT_NAME) throw new SnapError('not-a-repository', `${where} is not a snapcrypt repository`);
  const version = o['version'];
  if (version !== FORMAT_VERSION && version !== FORMAT_VERSION_2) {
    throw new SnapError('unsupported-version', `Repository ${where} has format version ${String(version)}; this snapcrypt reads versions ${FORMAT_VERSION} and ${FORMAT_VERSION_2}`, { hint: 'upgrade snapcrypt' });
  }
  if (typeof o['id'] !== 'string' || !/^[0-9a-f]{32}$/.test(o['id'])) {
    throw new SnapError('not-a-repository', `${where} has a malformed repository id`);
  }
  return { format: FORMAT_NAME, version, id: o['id'] };
}

// ---------------------------------------------------------------------------------------------
// Key file: the wrapped secret and how to unwrap it

export interface KeyFile {
  readonly version: 1;
  readonly kdf: KdfParams;
  readonly salt: Buffer;
  readonly nonce: Buffer;
  /** AES-256-GCM ciphertext + tag of the encoded RepoSecret. */
  readonly data: Buffer;
  readonly created: string;
}

export function encodeKeyFile(k: KeyFile): Buffer {
  return Buffer.from(
    JSON.stringify({
      version: k.version,
      kdf: k.kdf,
      salt: k.salt.toString('base64'),
      nonce: k.nonce.toString('base64'),
      data: k.data.toString('base64'),
      created: k.created,
    }, null, 1) + '\n',
  );
}

export function decodeKeyFile(buf: Buffer, name: string): KeyFile {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(buf.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw new SnapError('integrity', `Key file ${name} is not valid JSON`);
  }
  if (o['version'] !== 1) throw new SnapError('unsupported-version', `Key file ${name} has unknown version ${String(o['version'])}`);
  const kdf = o['kdf'] as KdfParams;
  if (typeof kdf !== 'object' || kdf === null || (kdf.name !== 'argon2id' && kdf.name !== 'scrypt')) {
    throw new SnapError('integrity', `Key file ${name} names an unknown KDF`);
  }
  const clean: KdfParams =
    kdf.name === 'argon2id'
      ? { name: 'argon2id', memoryKiB: kdf.memoryKiB, passes: kdf.passes, parallelism: kdf.parallelism }
      : { name: 'scrypt', N: kdf.N, r: kdf.r, p: kdf.p };
  checkKdfParams(clean);
  const b64 = (f: string, len?: number): Buffer => {
    const v = o[f];
    if (typeof v !== 'string') throw new SnapError('integrity', `Key file ${name} lacks ${f}`);
    const b = Buffer.from(v, 'base64');
    if (len !== undefined && b.length !== len) throw new SnapError('integrity', `Key file ${name} has a malformed ${f}`);
    return b;
  };
  return {
    version: 1,
    kdf: clean,
    salt: b64('salt', 32),
    nonce: b64('nonce', 12),
    data: b64('data'),
    created: typeof o['created'] === 'string' ? o['created'] : '',
  };
}

/** What a key file protects. */
export interface RepoSecret {
  readonly master: Buffer; // 64 bytes
  readonly repoId: string;
  readonly chunkSize: number;
  /** The id function: HMAC-SHA256 in a secret of version 1, the byte after the chunk size in version 2. */
  readonly idHash: IdHashCode;
}

/** Version 1 (no id function: HMAC-SHA256) when the id function is HMAC-SHA256, else version 2. */
export function encodeSecret(s: RepoSecret): Buffer {
  const w = new Writer(128).u8(s.idHash === IdHash.sha256 ? 1 : 2).raw(s.master).str(s.repoId).uvar(s.chunkSize);
  return (s.idHash === IdHash.sha256 ? w : w.u8(s.idHash)).finish();
}

export function decodeSecret(buf: Buffer): RepoSecret {
  const r = new Reader(buf, 'key secret');
  const version = r.u8();
  if (version !== 1 && version !== 2) r.fail(`unknown secret version ${version}`);
  const master = Buffer.from(r.raw(64));
  const repoId = r.str(64);
  const chunkSize = r.uvar();
  const idHash = version === 1 ? IdHash.sha256 : r.u8();
  r.end();
  if (chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) r.fail(`chunk size ${chunkSize} out of range`);
  if (!isIdHash(idHash)) return r.fail(`unknown id function ${idHash}`);
  return { master, repoId, chunkSize, idHash };
}

// ---------------------------------------------------------------------------------------------
// Trees: one per directory

export const NodeKind = { file: 1, dir: 2, symlink: 3, fifo: 4, chardev: 5, blockdev: 6, socket: 7 } as const;
export type NodeKindCode = (typeof NodeKind)[keyof typeof NodeKind];

export interface Xattr {
  readonly name: Buffer;
  readonly value: Buffer;
}

export interface TreeEntry {
  readonly kind: NodeKindCode;
  /** File name bytes (any bytes but '/' and NUL). */
  readonly name: Buffer;
  /** Permission bits including setuid/setgid/sticky (mode & 0o7777). */
  readonly mode: number;
  readonly uid: number;
  readonly gid: number;
  readonly mtimeNs: bigint;
  /** Change time and inode: used only to detect unchanged files in the next backup. */
  readonly ctimeNs: bigint;
  readonly inode: number;
  readonly nlink: number;
  readonly xattrs: readonly Xattr[];
  /** Regular files: size in bytes and chunk ids (ZERO_CHUNK for a chunk of zeros). */
  readonly size: number;
  readonly chunks: readonly Buffer[];
  /** Directories: id of the subtree. */
  readonly subtree: Buffer | null;
  /** Symlinks: target bytes. */
  readonly target: Buffer | null;
  /** Device nodes. */
  readonly rdev: number;
}

const MAX_NAME = 4096;
const MAX_XATTRS = 4096;
const MAX_XATTR_VALUE = 1 << 20;
const MAX_ENTRIES = 1 << 24;

function splitNs(ns: bigint): [number, number] {
  let sec = ns / 1_000_000_000n;
  let nsec = ns % 1_000_000_000n;
  if (nsec < 0n) {
    nsec += 1_000_000_000n;
    sec -= 1n;
  }
  return [Number(sec), Number(nsec)];
}

export function encodeTree(entries: readonly TreeEntry[]): Buffer {
  const w = new Writer(64 + entries.length * 96);
  w.u8(TREE_VERSION).uvar(entries.length);
  let prev: Buffer | null = null;
  for (const e of entries) {
    if (prev !== null && Buffer.compare(prev, e.name) >= 0) throw new Error('tree entries must be sorted and unique');
    prev = e.name;
    const [ms, mn] = splitNs(e.mtimeNs);
    const [cs, cn] = splitNs(e.ctimeNs);
    w.u8(e.kind).bytes(e.name).uvar(e.mode).uvar(e.uid).uvar(e.gid);
    w.svar(ms).uvar(mn).svar(cs).uvar(cn).uvar(e.inode).uvar(e.nlink);
    w.uvar(e.xattrs.length);
    for (const x of e.xattrs) w.bytes(x.name).bytes(x.value);
    switch (e.kind) {
      case NodeKind.file:
        w.uvar(e.size).uvar(e.chunks.length);
        for (const c of e.chunks) w.raw(c);
        break;
      case NodeKind.dir:
        if (!e.subtree) throw new Error('directory entry without subtree');
        w.raw(e.subtree);
        break;
      case NodeKind.symlink:
        w.bytes(e.target ?? Buffer.alloc(0));
        break;
      case NodeKind.chardev:
      case NodeKind.blockdev:
        w.uvar(e.rdev);
        break;
      default:
        break;
    }
  }
  return w.finish();
}

/**
 * Whether two entries encode to the same bytes (encodeTree), compared field by field without encoding:
 * a directory whose entries all match its previous tree's keeps that tree's id.
 */
export function sameEntry(a: TreeEntry, b: TreeEntry): boolean {
  if (a === b) return true;
  if (
    a.kind !== b.kind || a.mode !== b.mode || a.uid !== b.uid || a.gid !== b.gid || a.mtimeNs !== b.mtimeNs ||
    a.ctimeNs !== b.ctimeNs || a.inode !== b.inode || a.nlink !== b.nlink || !a.name.equals(b.name)
  ) {
    return false;
  }
  if (a.xattrs !== b.xattrs) {
    if (a.xattrs.length !== b.xattrs.length) return false;
    for (let i = 0; i < a.xattrs.length; i++) {
      if (!a.xattrs[i]!.name.equals(b.xattrs[i]!.name) || !a.xattrs[i]!.value.equals(b.xattrs[i]!.value)) return false;
    }
  }
  switch (a.kind) {
    case NodeKind.file:
      if (a.size !== b.size || a.chunks.length !== b.chunks.length) return false;
      return a.chunks === b.chunks || a.chunks.every((c, i) => c.equals(b.chunks[i]!));
    case NodeKind.dir:
      return a.subtree !== null && b.subtree !== null && a.subtree.equals(b.subtree);
    case NodeKind.symlink:
      return (a.target ?? EMPTY).equals(b.target ?? EMPTY);
    case NodeKind.chardev:
    case NodeKind.blockdev:
      return a.rdev === b.rdev;
    default:
      return true;
  }
}
const EMPTY = Buffer.alloc(0);

/** The xattrs and chunks of entries that have none (frozen: shared by all of them). */
export const NO_XATTRS: readonly Xattr[] = Object.freeze([]);
export const NO_CHUNKS: readonly Buffer[] = Object.freeze([]);

export function decodeTree(buf: Buffer): TreeEntry[] {
  const r = new Reader(buf, 'tree');
  const version = r.u8();
  if (version !== TREE_VERSION) r.fail(`unknown tree version ${version}`);
  const n = r.count(MAX_ENTRIES, 16);
  const out: TreeEntry[] = [];
  let prev: Buffer | null = null;
  for (let i = 0; i < n; i++) {
    const kind = r.u8();
    if (kind < 1 || kind > 7) r.fail(`unknown entry kind ${kind}`);
    const name = Buffer.from(r.bytes(MAX_NAME));
    if (name.length === 0 || name.includes(0x2f) || name.includes(0) || (name.length <= 2 && /^\.\.?$/.test(name.toString('latin1')))) {
      r.fail('invalid entry name');
    }
    if (prev !== null && Buffer.compare(prev, name) >= 0) r.fail('entries not sorted');
    prev = name;
    const mode = r.uvar();
    if (mode > 0o7777) r.fail('invalid mode');
    const uid = r.uvar();
    const gid = r.uvar();
    const mtimeNs = BigInt(r.svar()) * 1_000_000_000n + BigInt(r.uvar());
    const ctimeNs = BigInt(r.svar()) * 1_000_000_000n + BigInt(r.uvar());
    const inode = r.uvar();
    const nlink = r.uvar();
    const nx = r.count(MAX_XATTRS, 2);
    // Arrays of exactly their length (a first push() gives an array room for 17 elements: 150 bytes
    // more per entry, and a backup holds a directory's previous entries while it walks it); one
    // shared empty array for entries without xattrs.
    let xattrs: readonly Xattr[] = NO_XATTRS;
    if (nx > 0) {
      const list = new Array<Xattr>(nx);
      for (let j = 0; j < nx; j++) list[j] = { name: Buffer.from(r.bytes(MAX_NAME)), value: Buffer.from(r.bytes(MAX_XATTR_VALUE)) };
      xattrs = list;
    }
    let size = 0;
    let chunks: readonly Buffer[] = NO_CHUNKS;
    let subtree: Buffer | null = null;
    let target: Buffer | null = null;
    let rdev = 0;
    switch (kind) {
      case NodeKind.file: {
        size = r.uvar();
        const nc = r.count(MAX_ENTRIES, ID_LEN);
        if (nc > 0) {
          const list = new Array<Buffer>(nc);
          for (let j = 0; j < nc; j++) list[j] = Buffer.from(r.raw(ID_LEN));
          chunks = list;
        }
        break;
      }
      case NodeKind.dir:
        subtree = Buffer.from(r.raw(ID_LEN));
        break;
      case NodeKind.symlink:
        target = Buffer.from(r.bytes(MAX_NAME));
        break;
      case NodeKind.chardev:
      case NodeKind.blockdev:
        rdev = r.uvar();
        break;
      default:
        break;
    }
    out.push({ kind: kind as NodeKindCode, name, mode, uid, gid, mtimeNs, ctimeNs, inode, nlink, xattrs, size, chunks, subtree, target, rdev });
  }
  r.end();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Snapshot root

export interface SnapshotRoot {
  readonly version: 1;
  /** Id of the root tree (hex). */
  readonly tree: string;
  /** Absolute paths that were backed up (bytes, base64 in the encoding). */
  readonly paths: readonly Buffer[];
  readonly host: string;
  readonly user: string;
  /** The client's clock when the backup started (ISO). The authoritative time is the seal name. */
  readonly clientTime: string;
  /** Id (hex) of the snapshot root this backup was based on, or null. */
  readonly parent: string | null;
  readonly chunkSize: number;
  readonly stats: SnapshotStats;
  readonly tags: readonly string[];
}

export interface SnapshotStats {
  files: number;
  dirs: number;
  symlinks: number;
  others: number;
  bytes: number;
  /** Files whose content was read in this run. */
  filesRead: number;
  bytesRead: number;
  /** Objects and bytes (as stored) that this backup added to the repository. */
  objectsAdded: number;
  bytesAdded: number;
  /** Files skipped because they could not be read. */
  errors: number;
}

export function encodeSnapshotRoot(s: SnapshotRoot): Buffer {
  return Buffer.from(JSON.stringify({ ...s, paths: s.paths.map((p) => p.toString('base64')) }));
}

export function decodeSnapshotRoot(buf: Buffer): SnapshotRoot {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(buf.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw new SnapError('integrity', 'Malformed snapshot root: not JSON');
  }
  if (o['version'] !== 1) throw new SnapError('unsupported-version', `Snapshot root has unknown version ${String(o['version'])}`);
  if (typeof o['tree'] !== 'string' || !/^[0-9a-f]{64}$/.test(o['tree'])) throw new SnapError('integrity', 'Malformed snapshot root: tree');
  if (!Array.isArray(o['paths'])) throw new SnapError('integrity', 'Malformed snapshot root: paths');
  return {
    version: 1,
    tree: o['tree'],
    paths: (o['paths'] as unknown[]).map((p) => Buffer.from(String(p), 'base64')),
    host: String(o['host'] ?? ''),
    user: String(o['user'] ?? ''),
    clientTime: String(o['clientTime'] ?? ''),
    parent: typeof o['parent'] === 'string' ? o['parent'] : null,
    chunkSize: Number(o['chunkSize']),
    stats: o['stats'] as SnapshotStats,
    tags: Array.isArray(o['tags']) ? (o['tags'] as unknown[]).map(String) : [],
  };
}

// ---------------------------------------------------------------------------------------------
// head and index (clear text, readable by the server)

export function encodeHead(rootId: string): Buffer {
  return Buffer.from(rootId + '\n');
}

export function decodeHead(buf: Buffer): string {
  const s = buf.toString('latin1').trim();
  if (!/^[0-9a-f]{64}$/.test(s)) throw new SnapError('integrity', 'Malformed head file');
  return s;
}

/** The index: the sorted, unique 32-byte ids of every object a snapshot references. */
export function encodeIndex(ids: Buffer[]): Buffer {
  ids.sort(Buffer.compare);
  const out: Buffer[] = [];
  let prev: Buffer | null = null;
  for (const id of ids) {
    if (prev === null || !prev.equals(id)) out.push(id);
    prev = id;
  }
  return Buffer.concat(out);
}
