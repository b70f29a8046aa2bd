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
    encodeEntry(w, e);
  }
  return w.finish();
}

function encodeEntry(w: Writer, e: TreeEntry): void {
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

/** The xattrs and chunks of entries that have none (frozen: shared by all of them). */
export const NO_XATTRS: readonly Xattr[] = Object.freeze([]);
export const NO_CHUNKS: readonly Buffer[] = Object.freeze([]);

export function decodeTree(buf: Buffer): TreeEntry[] {
  const r = new Reader(buf, 'tree');
  const n = readTreeHeader(r);
  const out: TreeEntry[] = [];
  let prev: Buffer | null = null;
  for (let i = 0; i < n; i++) {
    const e = readEntry(r);
    if (prev !== null && Buffer.compare(prev, e.name) >= 0) r.fail('entries not sorted');
    prev = e.name;
    out.push(e);
  }
  r.end();
  return out;
}

function readTreeHeader(r: Reader): number {
  const version = r.u8();
  if (version !== TREE_VERSION) r.fail(`unknown tree version ${version}`);
  return r.count(MAX_ENTRIES, 16);
}

/** One entry of a tree, checked (everything but its order among the others). */
function readEntry(r: Reader): TreeEntry {
  const kind = r.u8();
  if (kind < 1 || kind > 7) r.fail(`unknown entry kind ${kind}`);
  const name = Buffer.from(r.bytes(MAX_NAME));
  if (!validName(name, 0, name.length)) r.fail('invalid entry name');
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
  return { kind: kind as NodeKindCode, name, mode, uid, gid, mtimeNs, ctimeNs, inode, nlink, xattrs, size, chunks, subtree, target, rdev };
}

/**
 * A tree's bytes, checked entry by entry as decodeTree checks them, and where each entry lies: a
 * backup compares a large directory with its previous tree one entry at a time (entry(i) decodes one)
 * and copies the entries that did not change into the new tree as they are (TreeBuilder.addRaw),
 * instead of holding every previous entry as objects (about 450 bytes each) while it walks.
 */
export class TreeView {
  readonly bytes: Buffer;
  readonly length: number;
  /** Per entry: its first byte, its name's first byte and its name's length; then the end (so entry i ends at at[i * 3 + 3]). */
  private readonly at: Uint32Array;
  private readonly inodes: Float64Array;

  private constructor(bytes: Buffer, at: Uint32Array, inodes: Float64Array) {
    this.bytes = bytes;
    this.length = inodes.length;
    this.at = at;
    this.inodes = inodes;
  }

  /** Checks a whole tree (SnapError 'integrity' as decodeTree) and notes where its entries lie. */
  static parse(buf: Buffer): TreeView {
    const r = new Reader(buf, 'tree');
    const n = readTreeHeader(r);
    const at = new Uint32Array(n * 3 + 1);
    const inodes = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      at[i * 3] = r.position;
      // the checks of readEntry, in its order, without making the entry
      const kind = r.u8();
      if (kind < 1 || kind > 7) r.fail(`unknown entry kind ${kind}`);
      const len = r.uvar();
      if (len > MAX_NAME) r.fail(`field of ${len} bytes exceeds limit ${MAX_NAME}`);
      const nameAt = r.position;
      r.skip(len);
      if (!validName(buf, nameAt, nameAt + len)) r.fail('invalid entry name');
      at[i * 3 + 1] = nameAt;
      at[i * 3 + 2] = len;
      if (r.uvar() > 0o7777) r.fail('invalid mode');
      r.uvar(); // uid
      r.uvar(); // gid
      r.svar();
      r.uvar(); // mtime
      r.svar();
      r.uvar(); // ctime
      inodes[i] = r.uvar();
      r.uvar(); // nlink
      const nx = r.count(MAX_XATTRS, 2);
      for (let j = 0; j < nx; j++) {
        r.skipBytes(MAX_NAME);
        r.skipBytes(MAX_XATTR_VALUE);
      }
      switch (kind) {
        case NodeKind.file: {
          r.uvar(); // size
          const nc = r.count(MAX_ENTRIES, ID_LEN);
          for (let j = 0; j < nc; j++) r.skip(ID_LEN);
          break;
        }
        case NodeKind.dir:
          r.skip(ID_LEN);
          break;
        case NodeKind.symlink:
          r.skipBytes(MAX_NAME);
          break;
        case NodeKind.chardev:
        case NodeKind.blockdev:
          r.uvar();
          break;
        default:
          break;
      }
      if (i > 0 && compareRanges(buf, at[i * 3 - 2]!, at[i * 3 - 2]! + at[i * 3 - 1]!, buf, nameAt, nameAt + len) >= 0) r.fail('entries not sorted');
    }
    r.end();
    at[n * 3] = buf.length;
    return new TreeView(buf, at, inodes);
  }

  /** Entry i decoded (its own copies of names and ids). */
  entry(i: number): TreeEntry {
    return readEntry(new Reader(this.bytes, 'tree', this.at[i * 3]!));
  }
  /** Entry i's encoded bytes (a view). */
  raw(i: number): Buffer {
    return this.bytes.subarray(this.at[i * 3]!, this.at[i * 3 + 3]!);
  }
  /** Appends entry i's encoded bytes to w. */
  copyTo(w: Writer, i: number): void {
    w.rawRange(this.bytes, this.at[i * 3]!, this.at[i * 3 + 3]!);
  }
  /** Where entry i's name starts within raw(i), and its length. */
  nameOffset(i: number): number {
    return this.at[i * 3 + 1]! - this.at[i * 3]!;
  }
  nameLength(i: number): number {
    return this.at[i * 3 + 2]!;
  }
  kind(i: number): NodeKindCode {
    return this.bytes[this.at[i * 3]!]! as NodeKindCode;
  }
  inode(i: number): number {
    return this.inodes[i]!;
  }
  /** Entry i's name against name, as Buffer.compare(entry i's name, name). */
  compareName(i: number, name: Buffer): number {
    const o = this.at[i * 3 + 1]!;
    return compareRanges(this.bytes, o, o + this.at[i * 3 + 2]!, name, 0, name.length);
  }
  /** The index of the entry with this name, or -1. */
  find(name: Buffer): number {
    let lo = 0;
    let hi = this.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const c = this.compareName(mid, name);
      if (c === 0) return mid;
      if (c < 0) lo = mid + 1;
      else hi = mid;
    }
    return -1;
  }
  /** Every entry decoded. */
  entries(): TreeEntry[] {
    const out = new Array<TreeEntry>(this.length);
    for (let i = 0; i < this.length; i++) out[i] = this.entry(i);
    return out;
  }
}

/** A tree entry's name: not empty, no "/" or NUL, not "." or "..". */
function validName(b: Uint8Array, start: number, end: number): boolean {
  if (end === start) return false;
  for (let i = start; i < end; i++) if (b[i] === 0x2f || b[i] === 0) return false;
  return !(b[start] === 0x2e && (end - start === 1 || (end - start === 2 && b[start + 1] === 0x2e)));
}

/**
 * Buffer.compare of a[aStart, aEnd) and b[bStart, bEnd), in JavaScript: names are short, and a call
 * into Buffer's native compare with ranges costs more than comparing them here.
 */
function compareRanges(a: Uint8Array, aStart: number, aEnd: number, b: Uint8Array, bStart: number, bEnd: number): number {
  const n = Math.min(aEnd - aStart, bEnd - bStart);
  for (let i = 0; i < n; i++) {
    const x = a[aStart + i]!;
    const y = b[bStart + i]!;
    if (x !== y) return x < y ? -1 : 1;
  }
  const d = aEnd - aStart - (bEnd - bStart);
  return d < 0 ? -1 : d > 0 ? 1 : 0;
}

function uvarLength(v: number): number {
  let n = 1;
  while (v >= 0x80) {
    v = Math.floor(v / 0x80);
    n++;
  }
  return n;
}

/**
 * A tree made one entry at a time, in any order: each entry is encoded when it is added (a new one
 * from its fields, an unchanged one copied from its previous tree's bytes), and finish() puts them in
 * the order of their names. The bytes are encodeTree's for the same entries.
 */
export class TreeBuilder {
  private readonly w = new Writer(4096);
  /** Per entry: its first byte, its name's first byte and its name's length (in w). */
  private at = new Uint32Array(96);
  private n = 0;

  get count(): number {
    return this.n;
  }

  add(e: TreeEntry): void {
    const start = this.w.position;
    encodeEntry(this.w, e);
    this.note(start, start + 1 + uvarLength(e.name.length), e.name.length);
  }

  /** Entry i of a checked tree, as it is. */
  addRaw(view: TreeView, i: number): void {
    const start = this.w.position;
    view.copyTo(this.w, i);
    this.note(start, start + view.nameOffset(i), view.nameLength(i));
  }

  private note(start: number, nameAt: number, nameLen: number): void {
    if ((this.n + 1) * 3 > this.at.length) {
      const grown = new Uint32Array(this.at.length * 2);
      grown.set(this.at);
      this.at = grown;
    }
    this.at[this.n * 3] = start;
    this.at[this.n * 3 + 1] = nameAt;
    this.at[this.n * 3 + 2] = nameLen;
    this.n++;
  }

  /** The tree's bytes, its entries sorted by name (Error if two have the same name). */
  finish(): Buffer {
    const body = this.w.finish();
    const at = this.at;
    const n = this.n;
    const cmp = (a: number, b: number): number =>
      compareRanges(body, at[a * 3 + 1]!, at[a * 3 + 1]! + at[a * 3 + 2]!, body, at[b * 3 + 1]!, at[b * 3 + 1]! + at[b * 3 + 2]!);
    // strictly ascending as added (then unique too), or put in order: two runs, the files' and the
    // directories', merged by the sort, and checked for a name added twice
    let sorted = true;
    for (let i = 1; i < n && sorted; i++) sorted = cmp(i - 1, i) < 0;
    let order: number[] | null = null;
    if (!sorted) {
      order = new Array<number>(n);
      for (let i = 0; i < n; i++) order[i] = i;
      order.sort(cmp);
      for (let i = 1; i < n; i++) if (cmp(order[i - 1]!, order[i]!) >= 0) throw new Error('tree entries must be sorted and unique');
    }
    const head = new Writer(16).u8(TREE_VERSION).uvar(n).finish();
    const out = Buffer.allocUnsafe(head.length + body.length);
    let o = head.copy(out, 0);
    if (order === null) body.copy(out, o);
    else for (const k of order) o += body.copy(out, o, at[k * 3]!, k + 1 < n ? at[k * 3 + 3]! : body.length);
    return out;
  }
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
