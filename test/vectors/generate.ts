/**
 * Generator of the format test vectors test/vectors/format-v1.json and format-v2.json (docs/FORMAT.md,
 * appendix A). Version 2 differs from version 1 only in the id function (HMAC-BLAKE2b-512 cut to 32
 * bytes, named in the secret), so its file has the same vectors under that function.
 *
 *   npx tsc -p . && node dist/test/vectors/generate.js           # write the JSON files that are missing
 *   npx tsc -p . && node dist/test/vectors/generate.js --check   # exit 1 if a JSON file would differ
 *
 * Every input is fixed: the master secret is the bytes 00..3f, salts and nonces come from a
 * deterministic rng (SHA-256 of a label and a counter) handed to sealObject, passphrases and key-file
 * salts are constants. The output therefore only changes when the format changes, or when Node's
 * zstd produces different compressed bytes for the one compressed vector (its payload is recorded, so
 * the vector stays valid either way). Regenerating the file is a format change: bump the version.
 */
import { createHash, createHmac } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { constants as zc, zstdCompressSync } from 'node:zlib';
import {
  type IdHashCode, type KdfParams, type Keys, type ObjectTypeCode, type Rng,
  Compression, DEFAULT_KDF, IdHash, DEFAULT_SCRYPT, MIN_PADDED_SIZE, OBJECT_VERSION, ObjectType, TEST_KDF, WRAP_LABEL,
  deriveKeys, deriveWrapKey, objectId, padme, paddedObjectSize, sealObject, wrapAad, wrapSecret,
} from '../../src/core/crypto.js';
import {
  type SnapshotRoot, type TreeEntry,
  DEFAULT_CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_2, ID_LEN, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, NodeKind, TREE_VERSION,
  ZERO_CHUNK, encodeConfig, encodeHead, encodeIndex, encodeKeyFile, encodeSecret, encodeSnapshotRoot, encodeTree,
} from '../../src/core/format.js';

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

/** n deterministic bytes named by a label: SHA-256(label || 0) || SHA-256(label || 1) || ... */
function fixedBytes(label: string, n: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; parts.length * 32 < n; i++) parts.push(createHash('sha256').update(`${label}\0${i}`).digest());
  return Buffer.concat(parts).subarray(0, n);
}

/** A deterministic Rng: successive calls give fixedBytes(label/1), fixedBytes(label/2), ... */
function labelledRng(label: string): Rng {
  let calls = 0;
  return (n: number) => fixedBytes(`${label}/${++calls}`, n);
}

/** What Repository.sealPlain decides: zstd level 2 when the plaintext is >= 128 bytes and it saves > 3%. */
function choosePayload(plain: Buffer): { compression: number; payload: Buffer } {
  if (plain.length >= 128) {
    const z = zstdCompressSync(plain, { params: { [zc.ZSTD_c_compressionLevel]: 2 } });
    if (z.length < plain.length * 0.97) return { compression: Compression.zstd, payload: z };
  }
  return { compression: Compression.none, payload: plain };
}

/** The stated decisions must be what the rule gives with this Node's zstd. */
function checkDecisions(list: Array<{ plaintext: string; compression: number }>): typeof list {
  for (const d of list) {
    const got = choosePayload(Buffer.from(d.plaintext, 'hex')).compression;
    if (got !== d.compression) throw new Error(`compression decision for ${d.plaintext.length / 2} bytes: ${got}, expected ${d.compression}`);
  }
  return list;
}

/** 4096 bytes: random bytes, then `zeros` zero bytes. */
function partlyCompressible(zeros: number): Buffer {
  return Buffer.concat([fixedBytes('data/partly-compressible', 4096 - zeros), Buffer.alloc(zeros)]);
}

interface ObjectVector {
  name: string;
  type: ObjectTypeCode;
  plaintext: string;
  id: string;
  compression: number;
  payload: string;
  salt: string;
  nonce: string;
  /** HMAC-SHA256(encKey, "snapcrypt/v1/object" || id || salt): the AES-256-GCM key of this object. */
  subkey: string;
  /** AAD = sealed[0..29] || id. */
  aad: string;
  size: number;
  sealed: string;
}

function objectVector(keys: Keys, name: string, type: ObjectTypeCode, plain: Buffer): ObjectVector {
  const id = objectId(keys, type, plain);
  const { compression, payload } = choosePayload(plain);
  const rng = labelledRng(`object/${name}`);
  const salt = fixedBytes(`object/${name}/1`, 16);
  const nonce = fixedBytes(`object/${name}/2`, 12);
  const sealed = sealObject(keys, id, type, compression, payload, rng);
  const subkey = hmacSha256(keys.encKey, Buffer.concat([Buffer.from('snapcrypt/v1/object'), id, salt]));
  return {
    name, type, plaintext: hex(plain), id: hex(id), compression, payload: hex(payload), salt: hex(salt), nonce: hex(nonce),
    subkey: hex(subkey), aad: hex(Buffer.concat([sealed.subarray(0, 29), id])), size: sealed.length, sealed: hex(sealed),
  };
}

/** Written out here (crypto.ts keeps it private) so that the vector states the derivation. */
function hmacSha256(key: Buffer, data: Buffer): Buffer {
  return createHmac('sha256', key).update(data).digest();
}

function entryJson(e: TreeEntry): Record<string, unknown> {
  return {
    kind: e.kind, name: hex(e.name), mode: e.mode, uid: e.uid, gid: e.gid,
    mtimeNs: e.mtimeNs.toString(), ctimeNs: e.ctimeNs.toString(), inode: e.inode, nlink: e.nlink,
    xattrs: e.xattrs.map((x) => ({ name: hex(x.name), value: hex(x.value) })),
    size: e.size, chunks: e.chunks.map(hex), subtree: e.subtree ? hex(e.subtree) : null,
    target: e.target ? hex(e.target) : null, rdev: e.rdev,
  };
}

function entry(kind: TreeEntry['kind'], name: Buffer | string, extra: Partial<TreeEntry> = {}): TreeEntry {
  return {
    kind, name: typeof name === 'string' ? Buffer.from(name) : name, mode: 0o644, uid: 1000, gid: 1000,
    mtimeNs: 1767225600_123456789n, ctimeNs: 1767225601_000000001n, inode: 4242, nlink: 1, xattrs: [],
    size: 0, chunks: [], subtree: null, target: null, rdev: 0, ...extra,
  };
}

interface KeyFileVector {
  name: string;
  passphrase: string;
  wrongPassphrase: string;
  kdf: KdfParams;
  salt: string;
  nonce: string;
  created: string;
  /** idHash only in version 2 (version 1: HMAC-SHA256, not named). */
  secret: { master: string; repoId: string; chunkSize: number; idHash?: number };
  secretEncoded: string;
  wrapKey: string;
  aad: string;
  data: string;
  file: string;
}

async function keyFileVector(name: string, kdf: KdfParams, master: Buffer, repoId: string, idHash: IdHashCode): Promise<KeyFileVector> {
  const passphrase = 'correct horse battery staple';
  const salt = fixedBytes(`keyfile/${name}/salt`, 32);
  const nonce = fixedBytes(`keyfile/${name}/nonce`, 12);
  const created = '2026-01-01T00:00:00.000Z';
  const secret = { master, repoId, chunkSize: DEFAULT_CHUNK_SIZE, idHash };
  const secretEncoded = encodeSecret(secret);
  const wrapKey = await deriveWrapKey(Buffer.from(passphrase), kdf, salt);
  const aad = wrapAad(kdf, salt);
  const data = wrapSecret(wrapKey, aad, nonce, secretEncoded);
  const file = encodeKeyFile({ version: 1, kdf, salt, nonce, data, created });
  return {
    name, passphrase, wrongPassphrase: 'correct horse battery stapler', kdf, salt: hex(salt), nonce: hex(nonce), created,
    secret: { master: hex(master), repoId, chunkSize: secret.chunkSize, ...(idHash === IdHash.sha256 ? {} : { idHash }) }, secretEncoded: hex(secretEncoded),
    wrapKey: hex(wrapKey), aad: hex(aad), data: hex(data), file: file.toString('utf8'),
  };
}

/** The vectors of format version 1 (ids by HMAC-SHA256) or 2 (ids by HMAC-BLAKE2b). */
export async function buildVectors(version: 1 | 2 = 1): Promise<Record<string, unknown>> {
  const idHash = version === 1 ? IdHash.sha256 : IdHash.blake2b;
  const formatVersion = version === 1 ? FORMAT_VERSION : FORMAT_VERSION_2;
  const master = Buffer.from(Array.from({ length: 64 }, (_, i) => i));
  const keys = deriveKeys(master, idHash);
  const repoId = '00112233445566778899aabbccddeeff';

  // Objects: a small chunk, a chunk with a two-byte length varint, a compressible chunk.
  const hello = Buffer.from('hello, snapcrypt\n');
  const binary = fixedBytes('data/binary', 300);
  const text = Buffer.from('All work and no play makes Jack a dull boy.\n'.repeat(93));
  const objects: ObjectVector[] = [
    objectVector(keys, 'data-small', ObjectType.data, hello),
    objectVector(keys, 'data-300', ObjectType.data, binary),
    objectVector(keys, 'data-zstd', ObjectType.data, text),
  ];

  // Trees: the empty tree (an empty directory), and one entry of every kind.
  const emptyTree = encodeTree([]);
  const emptyTreeId = objectId(keys, ObjectType.tree, emptyTree);
  const helloId = objectId(keys, ObjectType.data, hello);
  const entries: TreeEntry[] = [
    entry(NodeKind.fifo, 'a-fifo', { mode: 0o600 }),
    entry(NodeKind.chardev, 'b-chardev', { mode: 0o666, uid: 0, gid: 0, rdev: 259 }),
    entry(NodeKind.blockdev, 'c-blockdev', { mode: 0o660, uid: 0, gid: 6, rdev: 2049 }),
    entry(NodeKind.dir, 'd-dir', { mode: 0o1777, nlink: 2, subtree: emptyTreeId }),
    entry(NodeKind.file, 'e-file', {
      mode: 0o4755, nlink: 2, size: DEFAULT_CHUNK_SIZE + hello.length, chunks: [ZERO_CHUNK, helloId],
      xattrs: [{ name: Buffer.from('user.comment'), value: Buffer.from('vector') }],
    }),
    entry(NodeKind.socket, 'f-socket', { mode: 0o755 }),
    entry(NodeKind.symlink, 'g-symlink', { mode: 0o777, target: Buffer.from('e-file') }),
    // a non-UTF-8 name, an empty file, a time before 1970 (negative seconds)
    entry(NodeKind.file, Buffer.from([0xff, 0x66]), { mtimeNs: -1_500_000_000n, ctimeNs: 0n, inode: 2 ** 40 + 1 }),
  ];
  const tree = encodeTree(entries);
  const treeId = objectId(keys, ObjectType.tree, tree);
  objects.push(objectVector(keys, 'tree-empty', ObjectType.tree, emptyTree));
  objects.push(objectVector(keys, 'tree', ObjectType.tree, tree));

  const root: SnapshotRoot = {
    version: 1,
    tree: hex(treeId),
    paths: [Buffer.from('/home/alice'), Buffer.from([0x2f, 0x74, 0x6d, 0x70, 0x2f, 0xff])],
    host: 'workstation',
    user: 'alice',
    clientTime: '2026-01-01T00:00:00.000Z',
    parent: hex(fixedBytes('snapshot/parent', 32)),
    chunkSize: DEFAULT_CHUNK_SIZE,
    stats: { files: 2, dirs: 2, symlinks: 1, others: 4, bytes: DEFAULT_CHUNK_SIZE + hello.length, filesRead: 2, bytesRead: DEFAULT_CHUNK_SIZE + hello.length, objectsAdded: 3, bytesAdded: 768, errors: 0 },
    tags: ['vector'],
  };
  const rootPlain = encodeSnapshotRoot(root);
  const rootId = objectId(keys, ObjectType.snapshot, rootPlain);
  objects.push(objectVector(keys, 'snapshot', ObjectType.snapshot, rootPlain));

  const indexIds = [rootId, treeId, emptyTreeId, helloId, treeId];

  const padmeSizes = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 45, 48, 100, 211, 255, 256, 257, 300, 1000, 1023, 1024, 1025,
    4096, 4097, 65535, 65536, 65584, 1048576, 1048626, 16777216, 16777266, 2 ** 32 + 1];
  const innerSizes = [0, 3, 19, 210, 211, 212, 259, 260, 1000, 65541, 1048581, 16777220];

  const keyFiles = [
    await keyFileVector('test-kdf', TEST_KDF, master, repoId, idHash),
    await keyFileVector('argon2id-default', DEFAULT_KDF, master, repoId, idHash),
    await keyFileVector('scrypt-default', DEFAULT_SCRYPT, master, repoId, idHash),
  ];

  return {
    description: `snapcrypt on-disk format version ${formatVersion}: test vectors (docs/FORMAT.md, appendix A). Generated by test/vectors/generate.ts; checked by test/format-vectors.test.ts. All binary values are lower-case hex.`,
    format: FORMAT_NAME,
    version: formatVersion,
    constants: {
      FORMAT_VERSION: formatVersion, ...(version === 1 ? {} : { IdHash }), OBJECT_VERSION, TREE_VERSION, ID_LEN, MIN_PADDED_SIZE,
      OBJECT_HEADER_LEN: 29, OBJECT_OVERHEAD: 45, SALT_LEN: 16, NONCE_LEN: 12, TAG_LEN: 16,
      DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE,
      WRAP_LABEL, OBJECT_LABEL: 'snapcrypt/v1/object', ID_INFO: 'snapcrypt/v1/id', ENC_INFO: 'snapcrypt/v1/enc',
      ObjectType, Compression, NodeKind, DEFAULT_KDF, DEFAULT_SCRYPT, TEST_KDF,
      ZERO_CHUNK: hex(ZERO_CHUNK),
    },
    master: hex(master),
    keys: { idKey: hex(keys.idKey), encKey: hex(keys.encKey) },
    padme: padmeSizes.map((n) => [n, padme(n)]),
    paddedObjectSize: innerSizes.map((n) => [n, paddedObjectSize(n)]),
    compressionDecisions: checkDecisions([
      { plaintext: hex(Buffer.alloc(127, 0x61)), compression: Compression.none },
      { plaintext: hex(Buffer.alloc(128, 0x61)), compression: Compression.zstd },
      { plaintext: hex(fixedBytes('data/incompressible', 4096)), compression: Compression.none },
      // zstd saves about 2% (stored raw) and about 5.5% (stored compressed): the 3% rule in between
      { plaintext: hex(partlyCompressible(100)), compression: Compression.none },
      { plaintext: hex(partlyCompressible(246)), compression: Compression.zstd },
      { plaintext: hex(text), compression: Compression.zstd },
    ]),
    objects,
    tree: { entries: entries.map(entryJson), encoded: hex(tree), id: hex(treeId) },
    emptyTree: { encoded: hex(emptyTree), id: hex(emptyTreeId) },
    snapshotRoot: {
      value: { ...root, paths: root.paths.map(hex) },
      encoded: rootPlain.toString('utf8'),
      id: hex(rootId),
    },
    head: { rootId: hex(rootId), encoded: hex(encodeHead(hex(rootId))) },
    index: { ids: indexIds.map(hex), encoded: hex(encodeIndex([...indexIds])) },
    config: { value: { format: FORMAT_NAME, version: formatVersion, id: repoId }, encoded: encodeConfig({ format: FORMAT_NAME, version: formatVersion, id: repoId }).toString('utf8') },
    keyFiles,
  };
}

/** dist/test/vectors/generate.js -> test/vectors/format-vN.json in the source tree. */
export const vectorsPath = (version: 1 | 2): string => join(dirname(fileURLToPath(import.meta.url)), `../../../test/vectors/format-v${version}.json`);

async function main(): Promise<number> {
  let status = 0;
  for (const version of [1, 2] as const) {
    const path = vectorsPath(version);
    const text = `${JSON.stringify(await buildVectors(version), null, 1)}\n`;
    if (process.argv.includes('--check')) {
      let old = '';
      try {
        old = readFileSync(path, 'utf8');
      } catch {
        /* missing */
      }
      if (old === text) continue;
      process.stderr.write(`${path} differs from what the generator produces now\n`);
      status = 1;
    } else if (existsSync(path)) {
      process.stdout.write(`kept ${path} (a vector file, once written, is not rewritten: docs/FORMAT.md section 14)\n`);
    } else {
      writeFileSync(path, text);
      process.stdout.write(`wrote ${path}\n`);
    }
  }
  return status;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  process.exitCode = await main();
}
