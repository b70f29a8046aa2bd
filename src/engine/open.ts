/**
 * Opening a stored object: decrypt, decompress and authenticate it (its id is the keyed hash of the
 * plaintext). One function for the main thread (Repository.openData) and the restore's worker threads.
 */
import { ZstdDecompress, zstdDecompressSync, constants as zc } from 'node:zlib';
import type { ZstdCompress } from 'node:zlib';
import { type Keys, type ObjectTypeCode, Compression, ObjectType, checkObjectId, openObject } from '../core/crypto.js';
import { release } from '../core/memory.js';
import { MAX_CHUNK_SIZE } from '../core/format.js';
import { IntegrityError } from '../core/errors.js';

/** Largest tree or snapshot root a reader accepts (a directory of millions of entries). */
export const MAX_TREE_SIZE = 1024 * 1024 * 1024;

/**
 * The authenticated plaintext of an object. expectedLength (when the caller knows it, e.g. a chunk's):
 * decompress into one buffer of that size (+1, so that a longer plaintext shows), not in 16 KiB
 * pieces concatenated at the end; with a Decompressor too, into its buffer (the plaintext is then a
 * view of it, valid until its next call, and the decrypted bytes are freed at once).
 */
export function openSealed(keys: Keys, id: Buffer, type: ObjectTypeCode, data: Buffer, expectedLength?: number, z?: Decompressor): Buffer {
  const hex = id.toString('hex');
  const o = openObject(keys, id, data);
  if (o.type !== type) throw new IntegrityError(hex, `Object ${hex} has type ${o.type}, expected ${type}`);
  let plain: Buffer;
  if (z !== undefined && expectedLength !== undefined && (o.compression === Compression.zstd || o.compression === Compression.none)) {
    let out: Buffer | null;
    try {
      out = o.compression === Compression.zstd ? z.decompress(o.payload, expectedLength) : z.copy(o.payload);
    } catch {
      throw new IntegrityError(hex, `Object ${hex} does not decompress`);
    } finally {
      release(o.inner); // (the plaintext is in z's buffer)
    }
    if (out === null) throw new IntegrityError(hex, `Object ${hex} does not decompress to the ${expectedLength} bytes expected`);
    plain = out;
  } else if (o.compression === Compression.zstd) {
    try {
      const maxOutputLength = type === ObjectType.data ? MAX_CHUNK_SIZE : MAX_TREE_SIZE;
      const chunkSize = expectedLength === undefined ? undefined : Math.max(64, Math.min(expectedLength + 1, maxOutputLength));
      plain = zstdDecompressSync(o.payload, chunkSize === undefined ? { maxOutputLength } : { maxOutputLength, chunkSize });
    } catch {
      throw new IntegrityError(hex, `Object ${hex} does not decompress`);
    }
  } else if (o.compression === Compression.none) {
    plain = o.payload;
  } else {
    throw new IntegrityError(hex, `Object ${hex} uses unknown compression ${o.compression}`);
  }
  checkObjectId(keys, id, type, plain);
  return plain;
}

/** What node:zlib's zstd streams keep inside: the native stream and where it reports progress. */
export interface ZstdInternals extends ZstdCompress {
  readonly _handle?: {
    writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  } | null;
  /** [bytes of output space left, bytes of input left] after writeSync. */
  readonly _writeState?: Uint32Array;
}

/**
 * zstd decompression of chunks with one context and one output buffer for all calls (as Compressor
 * in seal.ts compresses): zstdDecompressSync makes a context per call, 43 µs against 4 µs for a 3 KB
 * chunk here, and leaves its output as garbage. A frame that fails, or does not end where the input
 * does, drops the context (it is not used in an unknown state). Should node:zlib's internal
 * interface be missing, it falls back to zstdDecompressSync.
 */
export class Decompressor {
  private stream: ZstdInternals | null = null;
  private out = Buffer.alloc(0);
  private fallback = false;

  /**
   * The plaintext of a zstd frame that must be `expected` bytes long (else null): a view of this
   * decompressor's buffer, valid until the next call. Throws when the frame is damaged.
   */
  decompress(payload: Uint8Array, expected: number): Buffer | null {
    const room = expected + 1; // so that a longer plaintext shows
    if (this.fallback) {
      const plain = zstdDecompressSync(payload, { maxOutputLength: MAX_CHUNK_SIZE, chunkSize: Math.max(64, Math.min(room, MAX_CHUNK_SIZE)) });
      return plain.length === expected ? plain : null;
    }
    this.reserve(room);
    this.stream ??= (new ZstdDecompress() as unknown as ZstdInternals).on('error', () => {}); // failures show as a closed handle
    const { _handle: handle, _writeState: state } = this.stream;
    if (handle === undefined || !state) {
      this.fallback = true;
      return this.decompress(payload, expected);
    }
    let produced = -1;
    try {
      handle?.writeSync(zc.ZSTD_e_end, payload, 0, payload.length, this.out, 0, room);
      if (this.stream._handle && state[1] === 0) produced = room - state[0]!;
    } finally {
      if (produced !== expected) this.stream = null;
    }
    if (produced < 0) throw new Error('zstd failed');
    return produced === expected ? this.out.subarray(0, produced) : null;
  }

  /** A copy of bytes in this decompressor's buffer (valid until its next call), e.g. a stored chunk's. */
  copy(plain: Uint8Array): Buffer {
    this.reserve(plain.length);
    this.out.set(plain);
    return this.out.subarray(0, plain.length);
  }

  private reserve(n: number): void {
    if (this.out.length >= n) return;
    release(this.out);
    this.out = Buffer.allocUnsafeSlow(n);
  }
}

/**
 * The authenticated plaintext of a chunk from its stored bytes (null: absent), which must be `expected`
 * long. With a Decompressor, a compressed chunk's plaintext is a view of its buffer (valid until its
 * next call).
 */
export function openChunk(keys: Keys, id: Buffer, data: Buffer | null, expected: number, z?: Decompressor): Buffer {
  const hex = id.toString('hex');
  if (data === null) throw new IntegrityError(hex, `Chunk ${hex} is missing`);
  const plain = openSealed(keys, id, ObjectType.data, data, expected, z);
  if (plain.length !== expected) throw new IntegrityError(hex, `Chunk ${hex} has ${plain.length} bytes, expected ${expected}`);
  return plain;
}
