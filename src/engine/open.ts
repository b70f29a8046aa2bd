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

/** Largest plaintext of unknown length that openSealed decompresses with a given Decompressor. */
const SMALL_PLAINTEXT = 64 * 1024;

/**
 * The authenticated plaintext of an object. expectedLength (when the caller knows it, e.g. a chunk's):
 * decompress into one buffer of that size (+1, so that a longer plaintext shows), not in 16 KiB
 * pieces concatenated at the end; with a Decompressor too, into its buffer (the plaintext is then a
 * view of it, valid until its next call, and the decrypted bytes are freed at once). With a
 * Decompressor and no expectedLength (a tree), the size the frame declares is expected and the
 * plaintext, up to SMALL_PLAINTEXT, is copied out into a buffer of its own: a context per call cost
 * 30 µs more per tree of a few KB (900 trees loaded after the benchmark's mutation). Larger ones
 * decompress as before, so that the Decompressor's buffer stays small.
 */
export function openSealed(keys: Keys, id: Buffer, type: ObjectTypeCode, data: Buffer, expectedLength?: number, z?: Decompressor): Buffer {
  const hex = id.toString('hex');
  const o = openObject(keys, id, data);
  if (o.type !== type) throw new IntegrityError(hex, `Object ${hex} has type ${o.type}, expected ${type}`);
  let plain: Buffer;
  // a small tree's size, from its frame, when z is given without one (its plaintext is then copied out)
  const declared = z !== undefined && expectedLength === undefined && o.compression === Compression.zstd ? zstdContentSize(o.payload) : null;
  const expected = expectedLength ?? (declared !== null && declared <= SMALL_PLAINTEXT ? declared : undefined);
  if (z !== undefined && expected !== undefined && (o.compression === Compression.zstd || o.compression === Compression.none)) {
    let out: Buffer | null;
    try {
      out = o.compression === Compression.zstd ? z.decompress(o.payload, expected) : z.copy(o.payload);
    } catch {
      throw new IntegrityError(hex, `Object ${hex} does not decompress`);
    } finally {
      release(o.inner); // (the plaintext is in z's buffer)
    }
    if (out === null) throw new IntegrityError(hex, `Object ${hex} does not decompress to the ${expected} bytes expected`);
    plain = expectedLength === undefined ? Buffer.from(out) : out; // (z's buffer serves the next call)
  } else if (o.compression === Compression.zstd) {
    try {
      const maxOutputLength = type === ObjectType.data ? MAX_CHUNK_SIZE : MAX_TREE_SIZE;
      const size = expectedLength ?? declared ?? zstdContentSize(o.payload);
      const chunkSize = size === null ? undefined : Math.max(64, Math.min(size + 1, maxOutputLength));
      plain = zstdDecompressSync(o.payload, chunkSize === undefined ? { maxOutputLength } : { maxOutputLength, chunkSize });
    } catch {
      throw new IntegrityError(hex, `Object ${hex} does not decompress`);
    } finally {
      release(o.inner); // freed now, not when the garbage collector gets to it
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

/**
 * The size a zstd frame declares for its content (Frame_Content_Size, RFC 8878 section 3.1.1.1), or
 * null when its header does not give one. Objects are compressed in one call (seal.ts Compressor),
 * which writes it. Used only to size the output buffer, and read only from an authenticated object
 * (openObject checked it first), whose output is still limited and checked against its id:
 * zstdDecompressSync otherwise decompresses into 16 KiB pieces and concatenates them, 16 KiB or more
 * of garbage for every tree of a few KB loaded (4,928 trees of the benchmark corpus: about 79 MB).
 */
export function zstdContentSize(frame: Uint8Array): number | null {
  if (frame.length < 6 || frame[0] !== 0x28 || frame[1] !== 0xb5 || frame[2] !== 0x2f || frame[3] !== 0xfd) return null;
  const descriptor = frame[4]!;
  const singleSegment = (descriptor >> 5) & 1;
  const fcsFlag = descriptor >> 6;
  const fieldSize = fcsFlag === 0 ? singleSegment : 1 << fcsFlag; // 0 or 1, 2, 4, 8 bytes
  const at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][descriptor & 3]!;
  if (fieldSize === 0 || at + fieldSize > frame.length) return null;
  let size = 0;
  for (let i = fieldSize - 1; i >= 0; i--) size = size * 256 + frame[at + i]!; // little-endian
  return fieldSize === 2 ? size + 256 : size;
}
