/**
 * Sealing with reused memory (engine/seal.ts Compressor and Sealer, core/memory.ts release, the
 * sealObject `into` buffer) and the compact id structures (core/idset.ts): the same bytes as the
 * one-shot paths, buffers that come back are used again, and nothing that is still in use is freed.
 * Loading a tree (Repository.loadTree) frees what it read and decrypted, and decompresses into one
 * buffer of the size the zstd frame declares (zstdContentSize).
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { constants as zc, zstdCompressSync, zstdDecompressSync } from 'node:zlib';
import { Compression, IdHash, OBJECT_HEADER_LEN, ObjectType, deriveKeys, objectId, openObject, sealObject, sealedSize, type Rng } from '../src/core/crypto.js';
import { IdList, IdSet } from '../src/core/idset.js';
import { release } from '../src/core/memory.js';
import { Compressor, Sealer, ZSTD_LEVEL, compressAndSeal } from '../src/engine/seal.js';
import { DEFAULT_CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION, NodeKind, encodeTree, type TreeEntry } from '../src/core/format.js';
import { Repository } from '../src/engine/repository.js';
import { zstdContentSize } from '../src/engine/open.js';
import type { TreeCache } from '../src/engine/cache.js';
import type { Storage } from '../src/storage/types.js';

const keys = deriveKeys(Buffer.alloc(64, 7));

/** Bytes that compress a little (text-like) or not at all (random). */
function sample(len: number, random: boolean, seed: number): Buffer {
  if (random) return randomBytes(len);
  const words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', String(seed)];
  let s = '';
  for (let i = 0; s.length < len; i++) s += words[(i * 7 + seed) % words.length] + (i % 13 === 0 ? '\n' : ' ');
  return Buffer.from(s.slice(0, len));
}

/** A deterministic rng: SHA-256 of a label and a counter. */
function counterRng(label: string): Rng {
  let n = 0;
  return (len) => {
    const out = Buffer.alloc(len);
    for (let off = 0; off < len; off += 32) createHash('sha256').update(`${label}/${n++}`).digest().copy(out, off);
    return out;
  };
}

describe('Compressor', () => {
  it('writes the same frames as zstdCompressSync, call after call, growing its buffer for larger inputs', () => {
    const c = new Compressor();
    const opts = { params: { [zc.ZSTD_c_compressionLevel]: ZSTD_LEVEL } };
    const sizes = [200, 70_000, 1 << 20, 5000, (1 << 20) + 12_345, 3 << 20, 129];
    sizes.forEach((len, i) => {
      for (const random of [false, true]) {
        const plain = sample(len, random, i);
        const z = c.compress(plain);
        assert.deepEqual(z, zstdCompressSync(plain, opts), `${len} bytes, random ${random}`);
        assert.deepEqual(zstdDecompressSync(z), plain);
      }
    });
  });
});

describe('Sealer', () => {
  it('gives every object a fresh salt and nonce across refills of its random pool, and each opens', () => {
    const s = new Sealer(keys, 1 << 20);
    const headers = new Set<string>();
    const n = 6_000; // 28 bytes of salt and nonce each: more than two 64 KiB draws
    for (let i = 0; i < n; i++) {
      const plain = Buffer.from(`object ${i % 10}`); // the same few plaintexts again and again
      const id = objectId(keys, ObjectType.data, plain);
      const sealed = s.seal(ObjectType.data, id, plain);
      headers.add(sealed.toString('hex', 1, OBJECT_HEADER_LEN));
      assert.deepEqual(openObject(keys, id, sealed).payload, plain);
      s.reuse(sealed);
    }
    assert.equal(headers.size, n, 'no (salt, nonce) is used twice');
  });
  it('seals objects that open to their plaintext; large ones into pooled buffers that reuse() hands out again', () => {
    const chunk = 1 << 20;
    const s = new Sealer(keys, chunk);
    assert.equal(s.outputSize, sealedSize(chunk));
    let pooled: ArrayBuffer | null = null;
    for (const [i, len] of [chunk, 300, chunk, 100_000, 64 * 1024 - 100, chunk].entries()) {
      const plain = sample(len, i % 2 === 1, i);
      const id = objectId(keys, ObjectType.data, plain);
      const sealed = s.seal(ObjectType.data, id, plain);
      const o = openObject(keys, id, sealed);
      const body = o.compression === Compression.zstd ? zstdDecompressSync(o.payload) : o.payload;
      assert.deepEqual(body, plain);
      // always a buffer of its own (whole), so that it moves to another thread without a copy
      assert.equal(sealed.byteOffset, 0);
      if (sealed.buffer.byteLength === s.outputSize) {
        if (pooled) assert.equal(sealed.buffer, pooled, 'a pooled buffer given back is used again');
        pooled = sealed.buffer as ArrayBuffer;
      } else {
        assert.equal(sealed.byteLength, sealed.buffer.byteLength);
      }
      s.reuse(sealed);
      if (sealed.buffer.byteLength !== s.outputSize) assert.equal(sealed.length, 0, 'a buffer of its own is freed on reuse()');
    }
    assert.ok(pooled);
  });

  it('sealObject into a given buffer writes the same bytes as into a new one', () => {
    for (const len of [0, 10, 5000, 200_000]) {
      const payload = sample(len, true, len);
      const id = objectId(keys, ObjectType.tree, payload);
      const a = sealObject(keys, id, ObjectType.tree, Compression.none, payload, counterRng('x'));
      const into = Buffer.alloc(sealedSize(len) + 1000, 0xee);
      const b = sealObject(keys, id, ObjectType.tree, Compression.none, payload, counterRng('x'), into);
      assert.equal(a.length, sealedSize(len));
      assert.deepEqual(b, a);
      assert.equal(b.buffer, into.buffer);
    }
  });
});

describe('release', () => {
  it('frees a buffer that is all of its ArrayBuffer, and leaves views into larger ones alone', () => {
    const own = Buffer.allocUnsafeSlow(1000);
    release(own);
    assert.equal(own.length, 0);
    const shared = Buffer.from('small'); // a view of Node's shared pool
    release(shared);
    assert.equal(shared.toString(), 'small');
    const big = Buffer.alloc(100);
    const part = big.subarray(10, 20);
    release(part);
    assert.equal(big.length, 100);
    release(own); // twice: no error
  });
});

describe('IdList and IdSet', () => {
  const ids = Array.from({ length: 70_000 }, () => randomBytes(32)); // more than two blocks of 32,768 ids
  it('IdList.sortedUnique sorts and de-duplicates across blocks', () => {
    const l = new IdList();
    for (const id of ids) l.push(id);
    for (let i = 0; i < ids.length; i += 97) l.push(ids[i]!);
    // ids that tie on their first 6 bytes (the sort's key) and differ after
    const twins = ids.slice(0, 3_000).map((id) => {
      const t = Buffer.from(id);
      t[20] = t[20]! ^ 0x40;
      return t;
    });
    for (const t of twins) l.push(t);
    const expected = [...new Set([...ids, ...twins].map((b) => b.toString('hex')))].sort().join('');
    assert.equal(l.sortedUnique().toString('hex'), expected);
    assert.equal(l.length, 0, 'the list is emptied');
    l.push(ids[7]!);
    l.push(ids[7]!);
    assert.equal(l.sortedUnique().toString('hex'), ids[7]!.toString('hex'), 'and can be filled again');
    assert.equal(new IdList().sortedUnique().length, 0);
  });
  it('IdSet finds the sorted ids and the added ones, and nothing else', () => {
    const base = new IdList();
    for (const id of ids.slice(0, 30_000)) base.push(id);
    const set = new IdSet(base.sortedUnique());
    for (const id of ids.slice(30_000)) set.add(id);
    set.add(ids[40_000]!); // again: no change
    set.add(ids[5]!); // already in the sorted part
    assert.equal(set.size, ids.length);
    for (const id of ids) assert.ok(set.has(id));
    for (let i = 0; i < 20_000; i++) {
      const other = Buffer.from(ids[i]!);
      other[31] = other[31]! ^ 1; // differs in the last byte only
      assert.equal(set.has(other), false);
    }
  });
  it('IdSet keeps 16 bytes of an added id: ids that differ only after them are one, any earlier difference tells them apart; dispose frees it', () => {
    const base = new IdList();
    for (const id of ids.slice(0, 10_000)) base.push(id);
    const set = new IdSet(base.sortedUnique());
    for (const id of ids) if (!set.has(id)) set.addNew(id);
    assert.equal(set.size, ids.length);
    for (const id of ids) assert.ok(set.has(id));
    for (let i = 0; i < 20_000; i++) {
      for (const byte of [0, 3, 4, 15]) {
        const other = Buffer.from(ids[i]!);
        other[byte] = other[byte]! ^ 0x80; // differs in one of the bytes kept
        assert.equal(set.has(other), false, `byte ${byte}`);
      }
    }
    // an added id (not one of the sorted ones, which are compared whole) changed after its 16th byte
    const late = Buffer.from(ids[60_000]!);
    late[16] = late[16]! ^ 1;
    assert.equal(set.has(late), true, 'the bytes after the 16th of an added id are not kept');
    const sortedLate = Buffer.from(ids[5]!);
    sortedLate[31] = sortedLate[31]! ^ 1;
    assert.equal(set.has(sortedLate), false, 'a sorted id is compared whole');
    set.add(ids[3]!); // known: nothing added
    assert.equal(set.size, ids.length);
    set.dispose();
    assert.equal(set.size, 0);
    assert.equal(set.has(ids[1]!), false);
    assert.equal(set.has(ids[60_000]!), false);
  });
});

/** A repository over no storage, with the given tree cache (loadTree reads the cache first). */
class CacheOnlyRepository extends Repository {
  static make(cache: TreeCache): CacheOnlyRepository {
    const secret = { master: Buffer.alloc(64, 7), repoId: '0'.repeat(32), chunkSize: DEFAULT_CHUNK_SIZE, idHash: IdHash.sha256 };
    return new CacheOnlyRepository(null as unknown as Storage, { format: FORMAT_NAME, version: FORMAT_VERSION, id: secret.repoId }, secret, 'test', cache);
  }
}

describe('Loading trees', () => {
  it('zstdContentSize reads the size from the frame header of every size class, and null from anything else', () => {
    for (const len of [1, 255, 256, 300, 65_791, 65_792, 70_000, 1 << 20, 5_000_000]) {
      const plain = sample(len, false, len);
      assert.equal(zstdContentSize(new Compressor().compress(plain)), len, `Compressor, ${len} bytes`);
      assert.equal(zstdContentSize(zstdCompressSync(plain)), len, `zstdCompressSync, ${len} bytes`);
    }
    assert.equal(zstdContentSize(Buffer.from('not zstd at all')), null);
    assert.equal(zstdContentSize(new Compressor().compress(sample(70_000, false, 1)).subarray(0, 6)), null, 'a header cut short');
  });

  it('Repository.loadTree frees what it read from the cache and decrypted, and returns entries that do not depend on it', async () => {
    const entries: TreeEntry[] = Array.from({ length: 2000 }, (_, i) => ({
      kind: NodeKind.file, name: Buffer.from(`file-${String(i).padStart(5, '0')}`), mode: 0o644, uid: 1, gid: 2, mtimeNs: 1_700_000_000_000_000_000n + BigInt(i),
      ctimeNs: 1_700_000_000_000_000_001n, inode: 1000 + i, nlink: 1, xattrs: [], size: 10 + i, chunks: [createHash('sha256').update(String(i)).digest()],
      subtree: null, target: null, rdev: 0,
    }));
    const plain = encodeTree(entries);
    let stored: Buffer | null = null;
    let handedOut: Buffer | null = null;
    const cache: TreeCache = {
      get: () => {
        handedOut = Buffer.from(stored!); // a copy of its own, as a file read from the cache is
        return handedOut;
      },
      put: () => {},
      drop: () => assert.fail('the cached tree is not damaged'),
    };
    const repo = CacheOnlyRepository.make(cache);
    const id = objectId(repo.keys, ObjectType.tree, plain);
    stored = compressAndSeal(repo.keys, ObjectType.tree, id, plain);
    assert.ok(stored.length > 32 * 1024, 'large enough to be a buffer of its own, not a view of the shared pool');
    const tree = await repo.loadTree(null as unknown as Storage, id);
    assert.equal((handedOut!.buffer as ArrayBuffer).detached, true, 'the bytes read from the cache are freed');
    assert.deepEqual(tree, entries);
    assert.equal(encodeTree(tree).equals(plain), true);
    // compact entries: "no xattrs" is one shared (frozen) array, not one per entry
    assert.ok(tree.every((e) => e.xattrs === tree[0]!.xattrs) && Object.isFrozen(tree[0]!.xattrs));
  });

  it('loads small trees through one zstd context: each tree keeps its own bytes, and a frame that lies about its size is refused', async () => {
    const stored = new Map<string, Buffer>();
    const cache: TreeCache = {
      get: (id) => (stored.has(id.toString('hex')) ? Buffer.from(stored.get(id.toString('hex'))!) : null),
      put: () => {},
      drop: (id) => stored.delete(id.toString('hex')),
    };
    const repo = CacheOnlyRepository.make(cache);
    const trees = [1, 3, 40, 300, 700, 900, 2].map((n) =>
      encodeTree(Array.from({ length: n }, (_, i) => ({
        kind: NodeKind.symlink, name: Buffer.from(`link-${n}-${String(i).padStart(4, '0')}`), mode: 0o777, uid: 0, gid: 0, mtimeNs: BigInt(i), ctimeNs: 1n,
        inode: i, nlink: 1, xattrs: [], size: 0, chunks: [], subtree: null, target: sample(40 + (i % 90), false, i), rdev: 0,
      }))),
    );
    assert.ok(trees.some((t) => t.length < 65_536) && trees.some((t) => t.length > 65_536), 'trees on both sides of the reused context\'s limit');
    const ids = trees.map((plain) => {
      const id = objectId(repo.keys, ObjectType.tree, plain);
      stored.set(id.toString('hex'), compressAndSeal(repo.keys, ObjectType.tree, id, plain));
      return id;
    });
    const views = [];
    for (const id of ids) views.push(await repo.loadTreeView(null as unknown as Storage, id));
    views.forEach((v, k) => assert.equal(v.bytes.equals(trees[k]!), true, `tree ${k} after all were loaded`));
    // a frame that declares one byte less than it holds (the zstd frame sealed and authenticated as such)
    const plain = trees[2]!;
    const frame = Buffer.from(zstdCompressSync(plain, { params: { [zc.ZSTD_c_contentSizeFlag]: 1 } }));
    assert.equal(zstdContentSize(frame), plain.length);
    assert.equal(frame[4]! >> 6, 1, 'a two-byte size field (the size less 256)');
    frame.writeUInt16LE(plain.length - 256 - 1, 5 + ((frame[4]! >> 5) & 1 ? 0 : 1)); // (no dictionary id)
    assert.equal(zstdContentSize(frame), plain.length - 1);
    const liar = objectId(repo.keys, ObjectType.tree, plain);
    stored.set(liar.toString('hex'), sealObject(repo.keys, liar, ObjectType.tree, Compression.zstd, frame, counterRng('liar')));
    await assert.rejects(repo.loadTreeView({ getObject: async () => { throw new Error('not in the repository either'); } } as unknown as Storage, liar), /not in the repository either/);
    assert.equal(stored.has(liar.toString('hex')), false, 'the cache entry dropped as damaged');
    assert.equal((await repo.loadTreeView(null as unknown as Storage, ids[0]!)).bytes.equals(trees[0]!), true, 'the context works after the refused frame');
  });
});
