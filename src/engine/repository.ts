/**
 * The repository: keys, objects, trees and snapshots on top of a Storage that only moves bytes.
 * A Repository opened read-only can load; only a WritableRepository (from openForWrite) can store.
 */
import { createHash, randomBytes } from 'node:crypto';
import os from 'node:os';
import {
  type IdHashCode, type Keys, type KdfParams, type ObjectTypeCode, DEFAULT_KDF, IdHash, ObjectType, TEST_KDF,
  deriveKeys, deriveWrapKey, objectId, unwrapSecret, wrapAad, wrapSecret,
} from '../core/crypto.js';
import {
  type RepoConfig, type RepoSecret, type SnapshotRoot, type TreeEntry,
  DEFAULT_CHUNK_SIZE, FORMAT_NAME, decodeConfig, decodeHead, decodeKeyFile, formatVersionOf,
  decodeSecret, decodeSnapshotRoot, decodeTree, TreeView, encodeConfig, encodeKeyFile, encodeSecret,
} from '../core/format.js';
import { IdSet, IdList } from '../core/idset.js';
import { release } from '../core/memory.js';
import { IntegrityError, SnapError } from '../core/errors.js';
import { mapInLanes } from '../core/lanes.js';
import type { DirectWriterSpec, ObjectReader, SnapshotInfo, Storage } from '../storage/types.js';
import type { KeyStore, TreeCache } from './cache.js';
import { SealPool, compressAndSeal } from './seal.js';
import { Decompressor, openSealed } from './open.js';
import { RestorePool } from './restore-pool.js';

export const rng = (n: number): Buffer => randomBytes(n);

/** KDF for new key files: strong by default; SNAPCRYPT_TEST_WEAK_KDF=1 (tests only) makes it cheap. */
export function kdfForNewKeys(): KdfParams {
  return process.env['SNAPCRYPT_TEST_WEAK_KDF'] === '1' ? TEST_KDF : DEFAULT_KDF;
}

async function makeKeyFile(secret: RepoSecret, passphrase: Buffer, kdf: KdfParams): Promise<Buffer> {
  const salt = rng(32);
  const nonce = rng(12);
  const wrapKey = await deriveWrapKey(passphrase, kdf, salt);
  const data = wrapSecret(wrapKey, wrapAad(kdf, salt), nonce, encodeSecret(secret));
  return encodeKeyFile({ version: 1, kdf, salt, nonce, data, created: new Date().toISOString() });
}

/** Wrapping keys being derived before the storage answered (Repository.deriveEarly), by KDF and salt. */
export type EarlyKeys = Map<string, Promise<Buffer>>;
const earlyKey = (kdf: KdfParams, salt: Buffer): string => `${JSON.stringify(kdf)}/${salt.toString('hex')}`;

export interface SnapshotRecord {
  readonly info: SnapshotInfo;
  /** Root object id (hex); the short form (first 8 hex) is the snapshot's ID for users. */
  readonly rootId: string;
  readonly root: SnapshotRoot;
  readonly reader: ObjectReader;
}

export class Repository {
  readonly storage: Storage;
  readonly config: RepoConfig;
  readonly secret: RepoSecret;
  readonly keys: Keys;
  /** Name of the key file that opened the repository. */
  readonly keyName: string;
  readonly cache: TreeCache | null;

  readonly keyStore: KeyStore | null;

  protected constructor(storage: Storage, config: RepoConfig, secret: RepoSecret, keyName: string, cache: TreeCache | null, keyStore: KeyStore | null = null) {
    this.keyStore = keyStore;
    this.storage = storage;
    this.config = config;
    this.secret = secret;
    this.keys = deriveKeys(secret.master, secret.idHash);
    this.keyName = keyName;
    this.cache = cache;
  }

  get chunkSize(): number {
    return this.secret.chunkSize;
  }

  /**
   * Create a new repository on an empty storage area. idHash: its id function (default HMAC-SHA256,
   * format version 1; HMAC-BLAKE2b makes it version 2).
   */
  static async init(storage: Storage, passphrase: Buffer, opts: { chunkSize?: number; keyStore?: KeyStore | null; idHash?: IdHashCode } = {}): Promise<string> {
    if (await storage.exists()) {
      throw new SnapError('exists', `Cannot create repository at ${storage.location}: a repository already exists there`);
    }
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    const idHash = opts.idHash ?? IdHash.sha256;
    const config: RepoConfig = { format: FORMAT_NAME, version: formatVersionOf(idHash), id: rng(16).toString('hex') };
    const secret: RepoSecret = { master: rng(64), repoId: config.id, chunkSize, idHash };
    const keyFile = await makeKeyFile(secret, passphrase, kdfForNewKeys());
    await storage.init(encodeConfig(config));
    const keyName = rng(8).toString('hex');
    await storage.writeFile(`keys/${keyName}`, keyFile);
    await opts.keyStore?.write(config.id, keyName, keyFile);
    return config.id;
  }

  /**
   * Start deriving the wrapping keys of the local key files of the repository last opened at
   * `location`, so that the KDF runs while the storage connects; pass the result to open(). The
   * derived keys are only used for key files that open() reads and checks as usual.
   */
  static async deriveEarly(keyStore: KeyStore, location: string, passphrase: Buffer): Promise<EarlyKeys> {
    const early: EarlyKeys = new Map();
    const repoId = await keyStore.repoIdAt?.(location).catch(() => null);
    if (!repoId) return early;
    for (const name of await keyStore.list(repoId).catch(() => [])) {
      const buf = await keyStore.read(repoId, name).catch(() => null);
      if (!buf) continue;
      try {
        const kf = decodeKeyFile(buf, name);
        const key = earlyKey(kf.kdf, kf.salt);
        if (early.has(key)) continue;
        const p = deriveWrapKey(passphrase, kf.kdf, kf.salt);
        p.catch(() => undefined); // open() derives again if this failed
        early.set(key, p);
      } catch {
        /* a damaged local copy: open() tries the repository's own */
      }
    }
    return early;
  }

  /**
   * Open with a passphrase: try every key file of current, then of the newest snapshot, then of older
   * snapshots (a passphrase changed since still opens the snapshots sealed while it was valid). A key
   * file already tried (same bytes, e.g. sealed unchanged into many snapshots) is not tried again, and
   * older snapshots are only read when nothing newer opened.
   */
  static async open(
    storage: Storage,
    passphrase: Buffer,
    cache: ((repoId: string) => TreeCache | null) | null = null,
    keyStore: KeyStore | null = null,
    early: EarlyKeys | null = null,
  ): Promise<Repository> {
    // the listings are asked for with the config (over SSH one round trip instead of three); a
    // failure of theirs counts only once the config says that this is a repository
    const configP = storage.readFile('config');
    const snapsP = storage.listSnapshots();
    const keysP = storage.listKeys();
    snapsP.catch(() => undefined);
    keysP.catch(() => undefined);
    const configBuf = await configP;
    if (configBuf === null) {
      throw new SnapError('not-a-repository', `Cannot open repository ${storage.location}: no repository there`, {
        hint: 'create one with "snapcrypt init" or check --repo',
      });
    }
    const config = decodeConfig(configBuf, storage.location);
    const snaps = await snapsP;
    type KeySource = Pick<ObjectReader, 'listKeys' | 'readFile'> & { readonly local?: boolean };
    const local: KeySource | null = keyStore && {
      local: true,
      listKeys: () => keyStore.list(config.id),
      readFile: (name: string) => keyStore.read(config.id, name.slice('keys/'.length)),
    };
    const sources: Array<() => Promise<KeySource>> = [
      async () => ({ listKeys: () => keysP, readFile: (name: string) => storage.readFile(name) }),
      ...(local ? [async () => local] : []),
      ...snaps.reverse().map((s) => () => storage.openSnapshot(s.name)),
    ];
    const tried = new Set<string>();
    let sawKey = false;
    let foreign: SnapError | null = null;
    for (const source of sources) {
      const src = await source();
      for (const name of await src.listKeys()) {
        const buf = await src.readFile(`keys/${name}`);
        if (!buf) continue;
        const digest = createHash('sha256').update(buf).digest('hex');
        if (tried.has(digest)) continue;
        tried.add(digest);
        let kf;
        try {
          kf = decodeKeyFile(buf, name);
        } catch {
          continue; // a damaged key file must not hide a good one
        }
        sawKey = true;
        const started = early?.get(earlyKey(kf.kdf, kf.salt));
        const wrapKey = (started && (await started.catch(() => null))) || (await deriveWrapKey(passphrase, kf.kdf, kf.salt));
        const plain = unwrapSecret(wrapKey, wrapAad(kf.kdf, kf.salt), kf.nonce, kf.data);
        if (!plain) continue;
        const secret = decodeSecret(plain);
        if (secret.repoId !== config.id) {
          // planted from another repository (one with the same passphrase): never use it, but let
          // this repository's own key files still open
          foreign ??= new SnapError('integrity', `Cannot open repository ${storage.location}: key file ${name} belongs to another repository (${secret.repoId}, not ${config.id})`);
          continue;
        }
        if (keyStore && !src.local && !(await keyStore.read(config.id, name).catch(() => null))?.equals(buf)) {
          await keyStore.write(config.id, name, buf).catch(() => undefined); // a copy is a bonus, not a must
        }
        return new this(storage, config, secret, name, cache ? cache(config.id) : null, keyStore);
      }
    }
    if (foreign) throw foreign;
    if (!sawKey) throw new SnapError('not-a-repository', `Cannot open repository ${storage.location}: it has no key file`);
    throw new SnapError('wrong-password', `Cannot open repository ${storage.location}: wrong passphrase (no key file opens with it)`);
  }

  // -------------------------------------------------------------------------------------------
  // keys

  async listKeyNames(): Promise<string[]> {
    return this.storage.listKeys();
  }

  /** Add a key file for another passphrase; returns its name. */
  async addKey(passphrase: Buffer): Promise<string> {
    const name = rng(8).toString('hex');
    const file = await makeKeyFile(this.secret, passphrase, kdfForNewKeys());
    await this.storage.writeFile(`keys/${name}`, file);
    await this.keyStore?.write(this.config.id, name, file);
    return name;
  }

  /** Replace the key file that opened the repository with one for a new passphrase. */
  async changePassphrase(passphrase: Buffer): Promise<void> {
    const file = await makeKeyFile(this.secret, passphrase, kdfForNewKeys());
    await this.storage.writeFile(`keys/${this.keyName}`, file);
    await this.keyStore?.write(this.config.id, this.keyName, file);
  }

  // -------------------------------------------------------------------------------------------
  // objects

  /** Encrypt a plaintext into an object (compressed when that pays); returns the bytes to store. */
  sealPlain(type: ObjectTypeCode, plain: Buffer, id: Buffer = objectId(this.keys, type, plain)): Buffer {
    return compressAndSeal(this.keys, type, id, plain);
  }

  /** A pool of worker threads that seal objects, and store them where the storage allows (the caller closes it). */
  async sealPool(): Promise<SealPool> {
    const writer = (await this.storage.directWriter?.()) ?? null;
    return new SealPool(this.secret.master, this.keys, this.chunkSize, writer);
  }

  /** Worker threads that open chunks and write them into a restore's target (the caller closes it). */
  restorePool(fs: DirectWriterSpec, threads: number): RestorePool {
    return new RestorePool(this.secret.master, this.secret.idHash, fs, threads);
  }

  /** Decrypt, decompress and authenticate one object. */
  async loadObject(reader: ObjectReader, id: Buffer, type: ObjectTypeCode): Promise<Buffer> {
    const hex = id.toString('hex');
    let data: Buffer;
    try {
      data = await reader.getObject(hex);
    } catch (err) {
      if (err instanceof SnapError && err.code === 'not-found') throw new IntegrityError(hex, `Object ${hex} is missing`);
      throw err;
    }
    return this.openData(id, type, data);
  }

  /** Decrypt, decompress and authenticate one object's stored bytes (openSealed). */
  openData(id: Buffer, type: ObjectTypeCode, data: Buffer, expectedLength?: number): Buffer {
    return openSealed(this.keys, id, type, data, expectedLength);
  }

  /** One zstd context for the small trees loaded (openSealed). */
  private readonly treeZ = new Decompressor();

  /** A tree's plaintext from its stored bytes, in a buffer of its own. */
  private openTree(id: Buffer, data: Buffer): Buffer {
    return openSealed(this.keys, id, ObjectType.tree, data, undefined, this.treeZ);
  }

  async loadTree(reader: ObjectReader, id: Buffer): Promise<TreeEntry[]> {
    return this.loadTreeAs(reader, id, decodeTree);
  }

  /** A tree as its checked bytes (TreeView): a backup reads its previous trees so. */
  async loadTreeView(reader: ObjectReader, id: Buffer): Promise<TreeView> {
    return this.loadTreeAs(reader, id, (b) => TreeView.parse(b));
  }

  private async loadTreeAs<T>(reader: ObjectReader, id: Buffer, parse: (plain: Buffer) => T): Promise<T> {
    const cached = this.cache?.get(id);
    if (cached) {
      try {
        return parse(this.openTree(id, cached)); // (the plaintext is a buffer of its own)
      } catch {
        this.cache?.drop(id); // a damaged cache entry costs a download, never correctness
      } finally {
        release(cached);
      }
    }
    const hex = id.toString('hex');
    let data: Buffer;
    try {
      data = await reader.getObject(hex);
    } catch (err) {
      if (err instanceof SnapError && err.code === 'not-found') throw new IntegrityError(hex, `Tree ${hex} is missing`);
      throw err;
    }
    const tree = parse(this.openTree(id, data));
    this.cache?.put(id, data);
    return tree;
  }

  // -------------------------------------------------------------------------------------------
  // snapshots

  /** Open one sealed snapshot; every integrity failure names the snapshot. */
  async readSnapshot(info: SnapshotInfo): Promise<SnapshotRecord> {
    const reader = await this.storage.openSnapshot(info.name);
    const head = await reader.readFile('head');
    if (!head) throw new SnapError('integrity', `Snapshot ${info.name} has no head`);
    try {
      const rootId = decodeHead(head);
      const root = decodeSnapshotRoot(await this.loadObject(reader, Buffer.from(rootId, 'hex'), ObjectType.snapshot));
      return { info, rootId, root, reader };
    } catch (err) {
      if (err instanceof IntegrityError) throw new IntegrityError(err.objectId, `Snapshot ${info.name}: ${err.message}`);
      if (err instanceof SnapError && err.code === 'integrity') throw new SnapError('integrity', `Snapshot ${info.name}: ${err.message}`, { cause: err });
      throw err;
    }
  }

  async listSnapshots(): Promise<SnapshotRecord[]> {
    return (await this.listSnapshotsChecked()).filter((s): s is SnapshotRecord => !('error' in s));
  }

  /** Every snapshot, with the ones that cannot be read reported instead of stopping the listing. */
  async listSnapshotsChecked(): Promise<Array<SnapshotRecord | { info: SnapshotInfo; error: SnapError }>> {
    return inOrder(await this.storage.listSnapshots(), async (info) => {
      try {
        return await this.readSnapshot(info);
      } catch (err) {
        if (!(err instanceof SnapError) || err.code !== 'integrity') throw err;
        return { info, error: err };
      }
    });
  }

  /** "latest", a seal name (server time), or a unique prefix (>= 4 hex) of a snapshot root id. */
  async resolveSnapshot(ref: string): Promise<SnapshotRecord> {
    const infos = await this.storage.listSnapshots();
    if (infos.length === 0) throw new SnapError('not-found', `Repository ${this.storage.location} has no snapshots yet`);
    if (ref === 'latest') return this.readSnapshot(infos[infos.length - 1]!);
    const byName = infos.find((i) => i.name === ref);
    if (byName) return this.readSnapshot(byName);
    if (!/^[0-9a-f]{4,64}$/.test(ref)) {
      throw new SnapError('usage', `Snapshot "${ref}" is not a snapshot ID, a time name or "latest"`, { hint: 'see "snapcrypt snapshots"' });
    }
    const ids = await inOrder(infos, async (info) => {
      const head = await (await this.storage.openSnapshot(info.name)).readFile('head');
      try {
        return head ? decodeHead(head) : '';
      } catch {
        return ''; // a damaged head must not hide the other snapshots (verify reports it)
      }
    });
    const matches = infos.filter((_info, i) => ids[i]!.startsWith(ref));
    if (matches.length === 0) throw new SnapError('not-found', `No snapshot with ID ${ref} in ${this.storage.location}`);
    if (matches.length > 1) throw new SnapError('usage', `Snapshot ID ${ref} is ambiguous (${matches.length} snapshots); give more digits`);
    return this.readSnapshot(matches[0]!);
  }

  /** The snapshot root that current's head points at, if current is complete (the last commit). */
  async currentHead(): Promise<{ rootId: string; root: SnapshotRoot } | null> {
    const head = await this.storage.readFile('head');
    if (!head) return null;
    let rootId: string;
    try {
      rootId = decodeHead(head);
    } catch {
      return null; // a damaged head costs a full read, never a wrong backup
    }
    try {
      const root = decodeSnapshotRoot(await this.loadObject(this.storage, Buffer.from(rootId, 'hex'), ObjectType.snapshot));
      return { rootId, root };
    } catch (err) {
      if (err instanceof IntegrityError) return null; // unusable parent: back up from scratch
      throw err;
    }
  }

  /** Every object id present in current. */
  async knownObjects(): Promise<IdSet> {
    const list = new IdList();
    for await (const hex of this.storage.listObjects()) list.pushHex(hex);
    return new IdSet(list.sortedUnique());
  }
}

/**
 * fn over items with up to 16 calls in flight (over SSH each is a round trip or two, which would
 * otherwise add up one after the other), results in the items' order.
 */
function inOrder<T, R>(items: readonly T[], fn: (item: T) => Promise<R>): Promise<R[]> {
  return mapInLanes(items, 16, fn);
}

export function hostName(): string {
  return os.hostname();
}
