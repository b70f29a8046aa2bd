/**
 * The format test vectors (test/vectors/format-v1.json, docs/FORMAT.md appendix A) pin every byte of
 * format version 1: derived keys, object ids, sealed objects, Padmé, compression choice, key files,
 * trees, snapshot roots, head, index and config. If any of these checks fails, the on-disk format has
 * changed: existing repositories would no longer read. Regenerate the vectors (test/vectors/generate.ts)
 * only together with a new format version.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { zstdDecompressSync } from 'node:zlib';
import {
  type IdHashCode, type KdfParams, type ObjectTypeCode, type Rng,
  Compression, DEFAULT_KDF, IdHash, DEFAULT_SCRYPT, MIN_PADDED_SIZE, OBJECT_HEADER_LEN, OBJECT_OVERHEAD, OBJECT_VERSION,
  ObjectType, TEST_KDF, WRAP_LABEL, checkObjectId, deriveKeys, deriveWrapKey, objectId, openObject, padme,
  paddedObjectSize, sealObject, unwrapSecret, wrapAad, wrapSecret,
} from '../src/core/crypto.js';
import {
  type RepoConfig, type RepoSecret, type SnapshotRoot, type TreeEntry,
  DEFAULT_CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_2, ID_LEN, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, NodeKind, TREE_VERSION,
  ZERO_CHUNK, decodeConfig, decodeHead, decodeKeyFile, decodeSecret, decodeSnapshotRoot, decodeTree, encodeConfig,
  encodeHead, encodeIndex, encodeKeyFile, encodeSecret, encodeSnapshotRoot, encodeTree, formatVersionOf, TreeBuilder, TreeView,
} from '../src/core/format.js';
import { IntegrityError, SnapError } from '../src/core/errors.js';
import { Repository } from '../src/engine/repository.js';
import type { ObjectReader, SnapshotInfo, Storage } from '../src/storage/types.js';

// ---------------------------------------------------------------------------------------------
// The vectors, read from the source tree (dist/test/x.js -> test/vectors/format-v1.json)

interface ObjectVector {
  name: string;
  type: ObjectTypeCode;
  plaintext: string;
  id: string;
  compression: number;
  payload: string;
  salt: string;
  nonce: string;
  subkey: string;
  aad: string;
  size: number;
  sealed: string;
}

interface EntryJson {
  kind: TreeEntry['kind'];
  name: string;
  mode: number;
  uid: number;
  gid: number;
  mtimeNs: string;
  ctimeNs: string;
  inode: number;
  nlink: number;
  xattrs: Array<{ name: string; value: string }>;
  size: number;
  chunks: string[];
  subtree: string | null;
  target: string | null;
  rdev: number;
}

interface KeyFileVector {
  name: string;
  passphrase: string;
  wrongPassphrase: string;
  kdf: KdfParams;
  salt: string;
  nonce: string;
  created: string;
  secret: { master: string; repoId: string; chunkSize: number; idHash?: number };
  secretEncoded: string;
  wrapKey: string;
  aad: string;
  data: string;
  file: string;
}

interface Vectors {
  format: string;
  version: number;
  constants: Record<string, unknown>;
  master: string;
  keys: { idKey: string; encKey: string };
  padme: Array<[number, number]>;
  paddedObjectSize: Array<[number, number]>;
  compressionDecisions: Array<{ plaintext: string; compression: number }>;
  objects: ObjectVector[];
  tree: { entries: EntryJson[]; encoded: string; id: string };
  emptyTree: { encoded: string; id: string };
  snapshotRoot: { value: Omit<SnapshotRoot, 'paths'> & { paths: string[] }; encoded: string; id: string };
  head: { rootId: string; encoded: string };
  index: { ids: string[]; encoded: string };
  config: { value: RepoConfig; encoded: string };
  keyFiles: KeyFileVector[];
}

const H = (s: string): Buffer => Buffer.from(s, 'hex');
const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

/** An Rng that hands out exactly the recorded salt (16 bytes) and then nonce (12 bytes). */
function replayRng(...values: Buffer[]): Rng & { left(): number } {
  const queue = [...values];
  const rng = (n: number): Buffer => {
    const next = queue.shift();
    assert.ok(next, `rng called more often than recorded (asked for ${n} bytes)`);
    assert.equal(n, next.length, 'rng asked for a different number of bytes than recorded');
    return Buffer.from(next);
  };
  return Object.assign(rng, { left: () => queue.length });
}

function entryOf(j: EntryJson): TreeEntry {
  return {
    kind: j.kind, name: H(j.name), mode: j.mode, uid: j.uid, gid: j.gid, mtimeNs: BigInt(j.mtimeNs),
    ctimeNs: BigInt(j.ctimeNs), inode: j.inode, nlink: j.nlink,
    xattrs: j.xattrs.map((x) => ({ name: H(x.name), value: H(x.value) })), size: j.size, chunks: j.chunks.map(H),
    subtree: j.subtree === null ? null : H(j.subtree), target: j.target === null ? null : H(j.target), rdev: j.rdev,
  };
}

/** A Repository over no storage, for sealPlain/openData (which never touch the storage). */
class VectorRepository extends Repository {
  static make(config: RepoConfig, secret: RepoSecret): VectorRepository {
    return new VectorRepository(null as unknown as Storage, config, secret, 'vector', null);
  }
}

/** The smallest storage Repository.open needs: config and key files in current, no snapshots. */
function keyOnlyStorage(config: Buffer, keyFiles: Record<string, Buffer>): Storage {
  const unsupported = (): never => {
    throw new Error('not used by Repository.open');
  };
  const reader: ObjectReader = {
    getObject: async () => unsupported(),
    readFile: async (name) => (name === 'config' ? config : keyFiles[name.replace(/^keys\//, '')] ?? null),
    listKeys: async () => Object.keys(keyFiles).sort(),
    listObjects: () => unsupported(),
  };
  return {
    ...reader, location: 'vectors', exists: async () => true, init: unsupported, writeFile: unsupported,
    putObject: unsupported, commit: unsupported, listSnapshots: async (): Promise<SnapshotInfo[]> => [],
    openSnapshot: unsupported, lock: unsupported, close: async () => {},
  };
}

// ---------------------------------------------------------------------------------------------

/** The tests of one vector file: format version 1 (ids by HMAC-SHA256) or 2 (ids by HMAC-BLAKE2b). */
function vectorTests(version: 1 | 2): void {
  const V = JSON.parse(readFileSync(join(dirname(fileURLToPath(import.meta.url)), `../../test/vectors/format-v${version}.json`), 'utf8')) as Vectors;
  const idHash = version === 1 ? IdHash.sha256 : IdHash.blake2b;
  const master = H(V.master);
  const keys = deriveKeys(master, idHash);
  const secretOf = (k: KeyFileVector): RepoSecret => ({ master: H(k.secret.master), repoId: k.secret.repoId, chunkSize: k.secret.chunkSize, idHash: (k.secret.idHash ?? IdHash.sha256) as IdHashCode });

  test(`format v${version} vectors: constants of format version ${version}`, () => {
    assert.equal(V.format, FORMAT_NAME);
    assert.equal(V.version, version);
    assert.equal(formatVersionOf(idHash), version);
    assert.deepEqual(V.constants, {
      FORMAT_VERSION: version, ...(version === 1 ? {} : { IdHash: { ...IdHash } }), OBJECT_VERSION, TREE_VERSION, ID_LEN, MIN_PADDED_SIZE, OBJECT_HEADER_LEN: OBJECT_HEADER_LEN,
      OBJECT_OVERHEAD, SALT_LEN: 16, NONCE_LEN: 12, TAG_LEN: 16, DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE,
      WRAP_LABEL, OBJECT_LABEL: 'snapcrypt/v1/object', ID_INFO: 'snapcrypt/v1/id', ENC_INFO: 'snapcrypt/v1/enc',
      ObjectType: { ...ObjectType }, Compression: { ...Compression }, NodeKind: { ...NodeKind },
      DEFAULT_KDF: { ...DEFAULT_KDF }, DEFAULT_SCRYPT: { ...DEFAULT_SCRYPT }, TEST_KDF: { ...TEST_KDF },
      ZERO_CHUNK: hex(ZERO_CHUNK),
    });
    // The values themselves, as FORMAT.md states them.
    assert.equal(FORMAT_VERSION, 1);
    assert.equal(FORMAT_VERSION_2, 2);
    assert.deepEqual(IdHash, { sha256: 1, blake2b: 2 });
    assert.equal(OBJECT_VERSION, 1);
    assert.equal(TREE_VERSION, 1);
    assert.equal(OBJECT_HEADER_LEN, 29);
    assert.equal(OBJECT_OVERHEAD, 45);
    assert.equal(MIN_PADDED_SIZE, 256);
    assert.equal(DEFAULT_CHUNK_SIZE, 1 << 20);
    assert.deepEqual(DEFAULT_KDF, { name: 'argon2id', memoryKiB: 65536, passes: 3, parallelism: 4 });
    assert.deepEqual(DEFAULT_SCRYPT, { name: 'scrypt', N: 131072, r: 8, p: 1 });
  });

  test(`format v${version} vectors: HKDF-SHA256 derives the id key and the encryption key from the master secret`, () => {
    assert.equal(master.length, 64);
    assert.equal(hex(keys.idKey), V.keys.idKey);
    assert.equal(hex(keys.encKey), V.keys.encKey);
  });

  test(`format v${version} vectors: Padmé and the padded object size`, () => {
    for (const [n, p] of V.padme) assert.equal(padme(n), p, `padme(${n})`);
    for (const [n, p] of V.paddedObjectSize) assert.equal(paddedObjectSize(n), p, `paddedObjectSize(${n})`);
  });

  test(`format v${version} vectors: object ids and sealed objects are exact`, () => {
    assert.ok(V.objects.length >= 6);
    for (const o of V.objects) {
      const plain = H(o.plaintext);
      const id = objectId(keys, o.type, plain);
      assert.equal(hex(id), o.id, `${o.name}: id`);
      const rng = replayRng(H(o.salt), H(o.nonce));
      const sealed = sealObject(keys, id, o.type, o.compression, H(o.payload), rng);
      assert.equal(rng.left(), 0, `${o.name}: salt and nonce both drawn`);
      assert.equal(sealed.length, o.size, `${o.name}: size`);
      assert.equal(hex(sealed), o.sealed, `${o.name}: sealed bytes`);
      // The layout FORMAT.md describes: version, salt, nonce, ..., tag; the size is the padded size.
      assert.equal(sealed[0], 1);
      assert.equal(hex(sealed.subarray(1, 17)), o.salt);
      assert.equal(hex(sealed.subarray(17, 29)), o.nonce);
      assert.equal(hex(Buffer.concat([sealed.subarray(0, 29), id])), o.aad);
      const varintLen = o.payload.length / 2 < 128 ? 1 : o.payload.length / 2 < 16384 ? 2 : 3;
      assert.equal(sealed.length, paddedObjectSize(2 + varintLen + o.payload.length / 2));
    }
  });

  test(`format v${version} vectors: sealed objects open to their type, compression, payload and plaintext`, () => {
    const repo = VectorRepository.make(V.config.value, { master, repoId: V.config.value.id, chunkSize: DEFAULT_CHUNK_SIZE, idHash });
    for (const o of V.objects) {
      const id = H(o.id);
      const opened = openObject(keys, id, H(o.sealed));
      assert.equal(opened.type, o.type, o.name);
      assert.equal(opened.compression, o.compression, o.name);
      assert.equal(hex(opened.payload), o.payload, o.name);
      const plain = o.compression === Compression.zstd ? zstdDecompressSync(opened.payload) : opened.payload;
      assert.equal(hex(plain), o.plaintext, o.name);
      checkObjectId(keys, id, o.type, plain);
      assert.equal(hex(repo.openData(id, o.type, H(o.sealed))), o.plaintext, `${o.name}: Repository.openData`);
    }
  });

  test(`format v${version} vectors: any change to a sealed object, or another id, fails authentication`, () => {
    const o = V.objects[0]!;
    const id = H(o.id);
    const sealed = H(o.sealed);
    for (const pos of [0, 1, 16, 17, 28, 29, 100, sealed.length - 17, sealed.length - 1]) {
      const bad = Buffer.from(sealed);
      bad[pos]! ^= 0x01;
      assert.throws(() => openObject(keys, id, bad), IntegrityError, `flipped byte ${pos}`);
    }
    assert.throws(() => openObject(keys, id, sealed.subarray(0, sealed.length - 1)), IntegrityError, 'truncated');
    assert.throws(() => openObject(keys, id, Buffer.concat([sealed, Buffer.alloc(1)])), IntegrityError, 'extended');
    assert.throws(() => openObject(keys, H(V.objects[1]!.id), sealed), IntegrityError, 'under another id');
    const other = deriveKeys(Buffer.alloc(64, 0x55));
    assert.throws(() => openObject(other, id, sealed), IntegrityError, 'under another master secret');
    const repo = VectorRepository.make(V.config.value, { master, repoId: V.config.value.id, chunkSize: DEFAULT_CHUNK_SIZE, idHash });
    assert.throws(() => repo.openData(id, ObjectType.tree, sealed), IntegrityError, 'as another type');
  });

  test(`format v${version} vectors: objects are compressed with zstd only from 128 bytes and when it saves more than 3%`, async () => {
    const repo = VectorRepository.make(V.config.value, { master, repoId: V.config.value.id, chunkSize: DEFAULT_CHUNK_SIZE, idHash });
    for (const c of V.compressionDecisions) {
      const plain = H(c.plaintext);
      const sealed = await repo.sealPlain(ObjectType.data, plain);
      const id = objectId(keys, ObjectType.data, plain);
      assert.equal(openObject(keys, id, sealed).compression, c.compression, `${plain.length} bytes`);
      assert.equal(hex(repo.openData(id, ObjectType.data, sealed)), c.plaintext);
    }
  });

  test(`format v${version} vectors: the tree encoding decodes to the entries and re-encodes identically`, () => {
    const encoded = H(V.tree.encoded);
    const expected = V.tree.entries.map(entryOf);
    const kinds = new Set(expected.map((e) => e.kind));
    for (const k of Object.values(NodeKind)) assert.ok(kinds.has(k), `a vector entry of kind ${k}`);
    assert.deepEqual(decodeTree(encoded), expected);
    assert.equal(hex(encodeTree(expected)), V.tree.encoded);
    assert.equal(hex(encodeTree(decodeTree(encoded))), V.tree.encoded);
    assert.equal(hex(objectId(keys, ObjectType.tree, encoded)), V.tree.id);
    assert.equal(V.emptyTree.encoded, '0100');
    assert.deepEqual(decodeTree(H(V.emptyTree.encoded)), []);
    assert.equal(hex(objectId(keys, ObjectType.tree, H(V.emptyTree.encoded))), V.emptyTree.id);
  });

  test(`format v${version} vectors: the snapshot root decodes to its value and re-encodes identically`, () => {
    const encoded = Buffer.from(V.snapshotRoot.encoded, 'utf8');
    const root = decodeSnapshotRoot(encoded);
    assert.deepEqual({ ...root, paths: root.paths.map(hex) }, V.snapshotRoot.value);
    assert.equal(encodeSnapshotRoot(root).toString('utf8'), V.snapshotRoot.encoded);
    const fromValue: SnapshotRoot = { ...V.snapshotRoot.value, paths: V.snapshotRoot.value.paths.map(H) };
    assert.equal(encodeSnapshotRoot(fromValue).toString('utf8'), V.snapshotRoot.encoded);
    assert.equal(hex(objectId(keys, ObjectType.snapshot, encoded)), V.snapshotRoot.id);
    assert.equal(root.tree, V.tree.id);
  });

  test(`format v${version} vectors: head, index and config`, () => {
    assert.equal(hex(encodeHead(V.head.rootId)), V.head.encoded);
    assert.equal(decodeHead(H(V.head.encoded)), V.head.rootId);
    assert.equal(V.head.rootId, V.snapshotRoot.id);
    assert.equal(hex(encodeIndex(V.index.ids.map(H))), V.index.encoded);
    const sortedUnique = [...new Set(V.index.ids)].sort();
    assert.equal(V.index.encoded, sortedUnique.join(''));
    assert.equal(encodeConfig(V.config.value).toString('utf8'), V.config.encoded);
    assert.deepEqual(decodeConfig(Buffer.from(V.config.encoded), 'vectors'), V.config.value);
  });

  test(`format v${version} vectors: key files cover the test KDF, default Argon2id and default scrypt`, () => {
    assert.deepEqual(V.keyFiles.map((k) => k.kdf), [TEST_KDF, DEFAULT_KDF, DEFAULT_SCRYPT]);
  });

  for (const k of V.keyFiles) {
    test(`format v${version} vectors: key file ${k.name} encodes, derives, wraps and unwraps exactly`, async () => {
      const file = Buffer.from(k.file, 'utf8');
      const kf = decodeKeyFile(file, k.name);
      assert.deepEqual(kf.kdf, k.kdf);
      assert.equal(hex(kf.salt), k.salt);
      assert.equal(hex(kf.nonce), k.nonce);
      assert.equal(hex(kf.data), k.data);
      assert.equal(kf.created, k.created);
      assert.equal(encodeKeyFile(kf).toString('utf8'), k.file);
      assert.equal(hex(encodeSecret(secretOf(k))), k.secretEncoded);
      assert.equal(hex(wrapAad(kf.kdf, kf.salt)), k.aad);
      const wrapKey = await deriveWrapKey(Buffer.from(k.passphrase), kf.kdf, kf.salt);
      assert.equal(hex(wrapKey), k.wrapKey);
      assert.equal(hex(wrapSecret(wrapKey, H(k.aad), kf.nonce, H(k.secretEncoded))), k.data);
      const plain = unwrapSecret(wrapKey, wrapAad(kf.kdf, kf.salt), kf.nonce, kf.data);
      assert.ok(plain, 'the passphrase opens the key file');
      assert.equal(hex(plain), k.secretEncoded);
      assert.deepEqual(decodeSecret(plain), secretOf(k));
      // A wrong passphrase fails.
      const wrong = await deriveWrapKey(Buffer.from(k.wrongPassphrase), kf.kdf, kf.salt);
      assert.equal(unwrapSecret(wrong, wrapAad(kf.kdf, kf.salt), kf.nonce, kf.data), null);
      // The KDF parameters and the salt are bound as associated data.
      const otherKdf: KdfParams = kf.kdf.name === 'argon2id' ? { ...kf.kdf, passes: kf.kdf.passes + 1 } : { ...kf.kdf, r: kf.kdf.r + 1 };
      assert.equal(unwrapSecret(wrapKey, wrapAad(otherKdf, kf.salt), kf.nonce, kf.data), null);
      assert.equal(unwrapSecret(wrapKey, wrapAad(kf.kdf, Buffer.alloc(32)), kf.nonce, kf.data), null);
    });
  }

  test(`format v${version} vectors: Repository.open unwraps the key file with the passphrase and refuses a wrong one`, async () => {
    const k = V.keyFiles[0]!;
    const storage = keyOnlyStorage(Buffer.from(V.config.encoded), { '0123456789abcdef': Buffer.from(k.file) });
    const repo = await Repository.open(storage, Buffer.from(k.passphrase));
    assert.equal(hex(repo.secret.master), V.master);
    assert.equal(hex(repo.keys.idKey), V.keys.idKey);
    assert.equal(repo.chunkSize, k.secret.chunkSize);
    assert.equal(repo.keys.idHash, idHash);
    assert.equal(hex(objectId(repo.keys, ObjectType.data, Buffer.from('hello, snapcrypt\n'))), V.objects[0]!.id, 'the id function the secret names');
    await assert.rejects(Repository.open(storage, Buffer.from(k.wrongPassphrase)), (err: unknown) => err instanceof SnapError && err.code === 'wrong-password');
  });

  test(`format v${version} vectors: readers reject unknown versions`, () => {
    const o = V.objects[0]!;
    const sealed = H(o.sealed);
    sealed[0] = 2;
    assert.throws(() => openObject(keys, H(o.id), sealed), /unknown version 2/);
    const tree = H(V.tree.encoded);
    tree[0] = 2;
    assert.throws(() => decodeTree(tree), /unknown tree version 2/);
    const root = JSON.parse(V.snapshotRoot.encoded) as Record<string, unknown>;
    assert.throws(() => decodeSnapshotRoot(Buffer.from(JSON.stringify({ ...root, version: 2 }))), (e: unknown) => e instanceof SnapError && e.code === 'unsupported-version');
    const kf = JSON.parse(V.keyFiles[0]!.file) as Record<string, unknown>;
    assert.throws(() => decodeKeyFile(Buffer.from(JSON.stringify({ ...kf, version: 2 })), 'k'), (e: unknown) => e instanceof SnapError && e.code === 'unsupported-version');
    assert.throws(() => decodeConfig(Buffer.from(JSON.stringify({ ...V.config.value, version: 3 })), 'r'), (e: unknown) => e instanceof SnapError && e.code === 'unsupported-version');
    const secret = H(V.keyFiles[0]!.secretEncoded);
    secret[0] = 3;
    assert.throws(() => decodeSecret(secret), /unknown secret version 3/);
    if (version === 2) {
      // the id function byte, the last of a version 2 secret: only 1 and 2 are known
      const fn = H(V.keyFiles[0]!.secretEncoded);
      assert.equal(fn[fn.length - 1], IdHash.blake2b);
      fn[fn.length - 1] = 3;
      assert.throws(() => decodeSecret(fn), /unknown id function 3/);
      assert.throws(() => decodeSecret(fn.subarray(0, fn.length - 1)), /key secret/, 'a version 2 secret without its id function');
    }
  });
}

vectorTests(1);
vectorTests(2);

/** Entries of every kind, and names that sort by bytes (not by string): what a tree of a backup holds. */
function sampleEntries(): TreeEntry[] {
  const base: TreeEntry = {
    kind: NodeKind.file, name: Buffer.from('a.txt'), mode: 0o644, uid: 1000, gid: 1000, mtimeNs: 1_700_000_000_123_456_789n,
    ctimeNs: 1_700_000_001_000_000_001n, inode: 42, nlink: 1, xattrs: [{ name: Buffer.from('user.k'), value: Buffer.from('v') }],
    size: 5, chunks: [Buffer.alloc(32, 7)], subtree: null, target: null, rdev: 0,
  };
  const out: TreeEntry[] = [
    base,
    { ...base, name: Buffer.from('b'), kind: NodeKind.dir, size: 0, chunks: [], subtree: Buffer.alloc(32, 9), xattrs: [], inode: 7 },
    { ...base, name: Buffer.from('c'), kind: NodeKind.symlink, size: 0, chunks: [], target: Buffer.from('x'), mtimeNs: -5n },
    { ...base, name: Buffer.from('d'), kind: NodeKind.chardev, size: 0, chunks: [], rdev: 0x0501 },
    { ...base, name: Buffer.from('e'), kind: NodeKind.fifo, size: 0, chunks: [] },
    { ...base, name: Buffer.from('f'), size: 3 << 20, chunks: [Buffer.alloc(32, 1), ZERO_CHUNK, Buffer.alloc(32, 3)], inode: 2 ** 40 },
    { ...base, name: Buffer.from([0xc3, 0xa9]), size: 0, chunks: [] },
    { ...base, name: Buffer.alloc(300, 0x7a), xattrs: [] },
  ];
  for (let i = 0; i < 40; i++) out.push({ ...base, name: Buffer.from(`n${String(i).padStart(3, '0')}`), inode: 100 + i, chunks: [Buffer.alloc(32, i)] });
  return out.sort((a, b) => Buffer.compare(a.name, b.name));
}

test('a tree view reads each entry as decodeTree does, finds names by bytes, and refuses what decodeTree refuses', () => {
  const entries = sampleEntries();
  const bytes = encodeTree(entries);
  const view = TreeView.parse(bytes);
  assert.equal(view.length, entries.length);
  assert.deepEqual(view.entries(), decodeTree(bytes));
  entries.forEach((e, i) => {
    assert.deepEqual(view.entry(i), e);
    assert.equal(view.kind(i), e.kind);
    assert.equal(view.inode(i), e.inode);
    assert.equal(view.find(e.name), i);
    assert.equal(view.compareName(i, e.name), 0);
    assert.equal(Math.sign(view.compareName(i, Buffer.from('n020'))), Math.sign(Buffer.compare(e.name, Buffer.from('n020'))));
    assert.ok(view.raw(i).subarray(view.nameOffset(i), view.nameOffset(i) + view.nameLength(i)).equals(e.name));
  });
  assert.equal(Buffer.concat(entries.map((_e, i) => view.raw(i))).length + 2, bytes.length, 'the entries are the tree after its header');
  for (const absent of ['', 'a', 'n0205', 'zz', '\xff']) assert.equal(view.find(Buffer.from(absent, 'latin1')), -1, absent);
  assert.equal(TreeView.parse(encodeTree([])).length, 0);

  // every single-byte change and every cut: the view and decodeTree agree on what is a tree
  let refused = 0;
  const tries: Buffer[] = [];
  for (let i = 0; i < bytes.length; i++) {
    for (const x of i % 3 === 0 ? [0x01, 0xff] : [0x80]) {
      const b = Buffer.from(bytes);
      b[i]! ^= x;
      tries.push(b);
    }
    if (i % 7 === 0) tries.push(bytes.subarray(0, i));
  }
  tries.push(Buffer.concat([bytes, Buffer.from([0])]));
  // two entries swapped (each still well-formed): not sorted
  const swapped = Buffer.from(bytes);
  swapped[1] = 2;
  tries.push(Buffer.concat([swapped.subarray(0, 2), view.raw(1), view.raw(0)]));
  tries.push(Buffer.concat([swapped.subarray(0, 2), view.raw(0), view.raw(0)]));
  for (const b of tries) {
    let decoded: TreeEntry[] | Error;
    try {
      decoded = decodeTree(b);
    } catch (err) {
      decoded = err as Error;
    }
    if (decoded instanceof Error) {
      assert.throws(() => TreeView.parse(b), (err: unknown) => err instanceof SnapError && err.code === 'integrity' && err.message === decoded.message);
      refused++;
    } else {
      assert.deepEqual(TreeView.parse(b).entries(), decoded);
    }
  }
  assert.ok(refused > 500 && tries.length - refused > 500, `changes refused and changes taken (${refused} of ${tries.length} refused)`);
});

test('a tree built from new entries and entries copied from a view, in any order, has encodeTree\'s bytes', () => {
  const entries = sampleEntries();
  const view = TreeView.parse(encodeTree(entries));
  const rnd = ((seed) => () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31)(7);
  for (let round = 0; round < 20; round++) {
    const changed = entries.map((e) => (rnd() < 0.3 ? { ...e, mtimeNs: e.mtimeNs + 1n, inode: e.inode + 1 } : e));
    const kept = changed.filter(() => rnd() < 0.9);
    const order = kept.map((_e, i) => i).sort(() => rnd() - 0.5);
    if (round === 0) order.sort((a, b) => a - b); // (in order: copied as they are)
    const b = new TreeBuilder();
    for (const i of order) {
      const e = kept[i]!;
      const k = view.find(e.name);
      if (e === entries[k] && rnd() < 0.8) b.addRaw(view, k);
      else b.add(e);
    }
    assert.equal(b.count, kept.length);
    assert.ok(b.finish().equals(encodeTree(kept)), `round ${round}`);
  }
  const dup = new TreeBuilder();
  dup.add(entries[0]!);
  dup.addRaw(view, 0);
  assert.throws(() => dup.finish(), /sorted and unique/);
  assert.ok(new TreeBuilder().finish().equals(encodeTree([])));
});
