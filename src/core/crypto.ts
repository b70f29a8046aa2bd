/**
 * All cryptography of snapcrypt (docs/FORMAT.md, "Cryptography"). Pure: randomness comes in as a
 * parameter, nothing here touches files, the network or the clock.
 *
 * - Master secret: 64 random bytes. HKDF-SHA256 derives the id key and the encryption key from it.
 * - Object id: HMAC(idKey, type || plaintext), so equal plaintexts dedup and the server learns nothing
 *   from ids; the hash is the repository's id function (IdHash): SHA-256 (format version 1), or
 *   BLAKE2b-512 with the first 32 bytes kept (version 2: 1.8 times as fast where the CPU has no SHA
 *   instructions).
 * - Object encryption: AES-256-GCM under a per-object key
 *     subkey = HMAC-SHA256(encKey, "snapcrypt/v1/object" || id || salt)
 *   with a fresh random 16-byte salt and 12-byte nonce for every write (I2: key and nonce never repeat,
 *   even when the same id is written twice), the header and id as associated data (an object only opens
 *   under its own name, I3), and the plaintext padded with Padmé so sizes leak little (I1).
 * - Key files: the master secret and repository parameters, sealed with AES-256-GCM under a key
 *   derived from a passphrase by Argon2id (or scrypt), parameters recorded in the file (I9).
 */
import { type KeyObject, argon2, createCipheriv, createDecipheriv, createHmac, createSecretKey, hkdfSync, scrypt, timingSafeEqual } from 'node:crypto';
import { SnapError, IntegrityError } from './errors.js';
import { release } from './memory.js';

export type Rng = (n: number) => Buffer;

export const OBJECT_VERSION = 1;
export const ObjectType = { data: 1, tree: 2, snapshot: 3 } as const;
export type ObjectTypeCode = (typeof ObjectType)[keyof typeof ObjectType];
export const Compression = { none: 0, zstd: 1 } as const;

const SALT_LEN = 16;
const NONCE_LEN = 12;
const TAG_LEN = 16;
export const OBJECT_HEADER_LEN = 1 + SALT_LEN + NONCE_LEN;
export const OBJECT_OVERHEAD = OBJECT_HEADER_LEN + TAG_LEN;
/** Padded objects are never smaller than this, so tiny files all look alike. */
export const MIN_PADDED_SIZE = 256;
const OBJECT_LABEL = Buffer.from('snapcrypt/v1/object');
const ZERO_PAD = Buffer.alloc(64 * 1024);

/**
 * The id function of a repository (docs/FORMAT.md section 5), recorded in its secret: HMAC-SHA256,
 * or HMAC-BLAKE2b-512 cut to its first 32 bytes.
 */
export const IdHash = { sha256: 1, blake2b: 2 } as const;
export type IdHashCode = (typeof IdHash)[keyof typeof IdHash];
const ID_DIGEST: Record<IdHashCode, string> = { [IdHash.sha256]: 'sha256', [IdHash.blake2b]: 'blake2b512' };
const ID_LEN = 32;

/** Whether a number is an IdHash code. */
export function isIdHash(n: number): n is IdHashCode {
  return n === IdHash.sha256 || n === IdHash.blake2b;
}

export interface Keys {
  readonly idKey: Buffer;
  readonly encKey: Buffer;
  /** The same keys imported once: Node parses a raw key on every use, which costs ~30 µs. */
  readonly idKeyObject: KeyObject;
  readonly encKeyObject: KeyObject;
  /** The repository's id function. */
  readonly idHash: IdHashCode;
}

export function deriveKeys(master: Buffer, idHash: IdHashCode = IdHash.sha256): Keys {
  if (master.length !== 64) throw new SnapError('integrity', 'Master secret must be 64 bytes');
  if (!isIdHash(idHash)) throw new SnapError('integrity', `Unknown id function ${String(idHash)}`);
  const salt = Buffer.alloc(0);
  const idKey = Buffer.from(hkdfSync('sha256', master, salt, 'snapcrypt/v1/id', 32));
  const encKey = Buffer.from(hkdfSync('sha256', master, salt, 'snapcrypt/v1/enc', 32));
  return { idKey, encKey, idKeyObject: createSecretKey(idKey), encKeyObject: createSecretKey(encKey), idHash };
}

/** Object id (32 bytes, in an ArrayBuffer of its own) of a plaintext of the given type. */
export function objectId(keys: Keys, type: ObjectTypeCode, plaintext: Uint8Array): Buffer {
  const digest = createHmac(ID_DIGEST[keys.idHash], keys.idKeyObject).update(Uint8Array.of(type)).update(plaintext).digest();
  if (digest.length === ID_LEN) return digest;
  const id = Buffer.allocUnsafeSlow(ID_LEN);
  digest.copy(id, 0, 0, ID_LEN);
  release(digest);
  return id;
}

/** Padmé (Nikitin et al. 2019): round L up so that at most O(log log L) bits of it remain. */
export function padme(len: number): number {
  if (len <= 2) return len;
  const e = Math.floor(Math.log2(len));
  const s = Math.floor(Math.log2(e)) + 1;
  const lastBits = e - s;
  const mask = 2 ** lastBits - 1;
  return Math.ceil(len / (mask + 1)) * (mask + 1);
}

/** Size of the stored object for an inner plaintext (type, compression, length, payload) of n bytes. */
export function paddedObjectSize(innerLen: number): number {
  return Math.max(MIN_PADDED_SIZE, padme(innerLen + OBJECT_OVERHEAD));
}

/** The per-object key, as a KeyObject: Node 24 turns raw key bytes into one anyway, ten times slower (70 µs). */
function objectSubkey(keys: Keys, id: Buffer, salt: Buffer): KeyObject {
  const raw = createHmac('sha256', keys.encKeyObject).update(OBJECT_LABEL).update(id).update(salt).digest();
  const key = createSecretKey(raw); // a copy
  release(raw);
  return key;
}

/** The inner plaintext's prefix: type, compression and the payload's length (varint). */
function innerPrefix(type: number, compression: number, payloadLen: number): number[] {
  const prefix = [type, compression];
  let n = payloadLen;
  while (n >= 0x80) {
    prefix.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  prefix.push(n);
  return prefix;
}

/** Size of the object sealObject makes of a payload of this many bytes. */
export function sealedSize(payloadLen: number): number {
  return paddedObjectSize(innerPrefix(0, 0, payloadLen).length + payloadLen);
}

/** Bytes of payload encrypted per cipher call in sealObject (each call returns a fresh buffer). */
const SEAL_PIECE = 64 * 1024;

/**
 * Encrypt one object. `payload` is what is stored (already compressed if compression != none);
 * the id was computed over the uncompressed plaintext. With `into` (at least sealedSize bytes), the
 * object is written there and a view of it returned; else into a new buffer.
 */
export function sealObject(
  keys: Keys,
  id: Buffer,
  type: ObjectTypeCode,
  compression: number,
  payload: Uint8Array,
  rng: Rng,
  into?: Buffer,
): Buffer {
  const prefix = innerPrefix(type, compression, payload.length);
  const innerLen = prefix.length + payload.length;
  const total = paddedObjectSize(innerLen);
  const out = into && into.length >= total ? into.subarray(0, total) : Buffer.allocUnsafe(total);
  out[0] = OBJECT_VERSION;
  rng(SALT_LEN).copy(out, 1);
  rng(NONCE_LEN).copy(out, 1 + SALT_LEN);
  const header = out.subarray(0, OBJECT_HEADER_LEN);
  const salt = out.subarray(1, 1 + SALT_LEN);
  const nonce = out.subarray(1 + SALT_LEN, OBJECT_HEADER_LEN);
  const cipher = createCipheriv('aes-256-gcm', objectSubkey(keys, id, salt), nonce, { authTagLength: TAG_LEN });
  cipher.setAAD(objectAad(header, id));
  // GCM is a stream mode: encrypting the inner plaintext piece by piece (prefix, payload, zero
  // padding) gives the same bytes as encrypting it whole, without first copying it together. The
  // payload goes in pieces whose outputs are copied and freed at once: one output of the whole
  // payload would be ~1 MiB of garbage per chunk.
  let off = OBJECT_HEADER_LEN;
  off += copyOut(cipher.update(Uint8Array.from(prefix)), out, off);
  for (let p = 0; p < payload.length; p += SEAL_PIECE) {
    off += copyOut(cipher.update(payload.subarray(p, Math.min(payload.length, p + SEAL_PIECE))), out, off);
  }
  const pad = total - OBJECT_OVERHEAD - innerLen;
  for (let done = 0; done < pad; ) {
    const len = Math.min(pad - done, ZERO_PAD.length);
    off += copyOut(cipher.update(ZERO_PAD.subarray(0, len)), out, off);
    done += len;
  }
  off += copyOut(cipher.final(), out, off);
  copyOut(cipher.getAuthTag(), out, off);
  return out;
}

/** Reused for objectAad: setAAD copies what it is given. */
const AAD = Buffer.allocUnsafeSlow(OBJECT_HEADER_LEN + 32);

/**
 * An object's additional authenticated data, its header and its id, in a buffer that is overwritten
 * by the next call (see copyOut: a slice of Node's shared 8 KiB pool per object kept the pools).
 */
function objectAad(header: Buffer, id: Buffer): Buffer {
  if (id.length !== AAD.length - OBJECT_HEADER_LEN) return Buffer.concat([header, id]);
  header.copy(AAD, 0, 0, OBJECT_HEADER_LEN);
  id.copy(AAD, OBJECT_HEADER_LEN);
  return AAD;
}

/**
 * Copies a buffer that OpenSSL's bindings returned into out at off and frees it at once; returns its
 * length. Each such buffer has memory of its own, freed only when a collection finds it dead: a
 * backup's seal worker allocates little on its heap, and these (with the AAD's pool slice and the
 * id's message copy) added 75 bytes per object to its ArrayBuffers, 15 MiB for 200,000 small files
 * (docs/DESIGN.md section 9).
 */
function copyOut(b: Buffer, out: Buffer, off: number): number {
  const n = b.copy(out, off);
  release(b);
  return n;
}

export interface OpenedObject {
  readonly type: ObjectTypeCode;
  readonly compression: number;
  /** Stored payload (still compressed if compression != none). */
  readonly payload: Buffer;
  /** The decrypted bytes that payload is a view of: the caller's to release() once payload is done with. */
  readonly inner: Buffer;
}

/** Decrypt and authenticate one object stored under `id`. Throws IntegrityError on any mismatch. */
export function openObject(keys: Keys, id: Buffer, data: Buffer): OpenedObject {
  const hex = id.toString('hex');
  if (data.length < OBJECT_OVERHEAD + 3) throw new IntegrityError(hex, `Object ${hex} is truncated (${data.length} bytes)`);
  if (data[0] !== OBJECT_VERSION) throw new IntegrityError(hex, `Object ${hex} has unknown version ${data[0]}`);
  const header = data.subarray(0, OBJECT_HEADER_LEN);
  const salt = data.subarray(1, 1 + SALT_LEN);
  const nonce = data.subarray(1 + SALT_LEN, OBJECT_HEADER_LEN);
  const tag = data.subarray(data.length - TAG_LEN);
  const decipher = createDecipheriv('aes-256-gcm', objectSubkey(keys, id, salt), nonce, { authTagLength: TAG_LEN });
  decipher.setAAD(objectAad(header, id));
  decipher.setAuthTag(tag);
  let inner: Buffer;
  try {
    inner = decipher.update(data.subarray(OBJECT_HEADER_LEN, data.length - TAG_LEN));
    const rest = decipher.final(); // (GCM: empty; it checks the tag)
    if (rest.length > 0) inner = Buffer.concat([inner, rest]);
  } catch {
    throw new IntegrityError(hex, `Object ${hex} failed authentication (corrupt, truncated, or not the object of this id)`);
  }
  const type = inner[0]!;
  const compression = inner[1]!;
  let p = 2;
  let len = 0;
  let mul = 1;
  for (;;) {
    if (p >= inner.length || mul > 2 ** 49) throw new IntegrityError(hex, `Object ${hex} has a malformed length`);
    const b = inner[p++]!;
    len += (b & 0x7f) * mul;
    if ((b & 0x80) === 0) break;
    mul *= 0x80;
  }
  if (p + len > inner.length) throw new IntegrityError(hex, `Object ${hex} has a malformed length`);
  if (type !== ObjectType.data && type !== ObjectType.tree && type !== ObjectType.snapshot) {
    throw new IntegrityError(hex, `Object ${hex} has unknown type ${type}`);
  }
  return { type, compression, payload: inner.subarray(p, p + len), inner };
}

/** Check that a decoded plaintext really has this id (catches a wrong key or a forged object). */
export function checkObjectId(keys: Keys, id: Buffer, type: ObjectTypeCode, plaintext: Uint8Array): void {
  const actual = objectId(keys, type, plaintext);
  const same = timingSafeEqual(actual, id);
  release(actual);
  if (!same) {
    const hex = id.toString('hex');
    throw new IntegrityError(hex, `Object ${hex} does not hash to its id`);
  }
}

// ---------------------------------------------------------------------------------------------
// Passphrase key derivation and key wrapping

export type KdfParams =
  | { readonly name: 'argon2id'; readonly memoryKiB: number; readonly passes: number; readonly parallelism: number }
  | { readonly name: 'scrypt'; readonly N: number; readonly r: number; readonly p: number };

/** RFC 9106, second recommended option: 64 MiB, 3 passes, 4 lanes (about 0.25 s here). */
export const DEFAULT_KDF: KdfParams = { name: 'argon2id', memoryKiB: 65536, passes: 3, parallelism: 4 };
export const DEFAULT_SCRYPT: KdfParams = { name: 'scrypt', N: 2 ** 17, r: 8, p: 1 };
/** Weak parameters, only for tests (SNAPCRYPT_TEST_WEAK_KDF=1); the file records them. */
export const TEST_KDF: KdfParams = { name: 'argon2id', memoryKiB: 64, passes: 1, parallelism: 1 };

export function checkKdfParams(p: KdfParams): void {
  const ok =
    p.name === 'argon2id'
      ? Number.isInteger(p.memoryKiB) && p.memoryKiB >= 8 * p.parallelism && p.memoryKiB <= 1024 * 1024 &&
        Number.isInteger(p.passes) && p.passes >= 1 && p.passes <= 16 &&
        Number.isInteger(p.parallelism) && p.parallelism >= 1 && p.parallelism <= 64
      : Number.isInteger(Math.log2(p.N)) && p.N >= 2 && p.N <= 2 ** 20 &&
        Number.isInteger(p.r) && p.r >= 1 && p.r <= 32 && Number.isInteger(p.p) && p.p >= 1 && p.p <= 16;
  if (!ok) throw new SnapError('integrity', `Key file has unusable KDF parameters ${JSON.stringify(p)}`);
}

export const WRAP_LABEL = 'snapcrypt/v1/key';

/** Associated data that binds a wrapped key to its KDF parameters and salt. */
export function wrapAad(kdf: KdfParams, salt: Buffer): Buffer {
  return Buffer.from(`${WRAP_LABEL}\n${JSON.stringify(kdf)}\n${salt.toString('base64')}`);
}

export function wrapSecret(wrapKey: Buffer, aad: Buffer, nonce: Buffer, secret: Buffer): Buffer {
  const cipher = createCipheriv('aes-256-gcm', wrapKey, nonce, { authTagLength: TAG_LEN });
  cipher.setAAD(aad);
  return Buffer.concat([cipher.update(secret), cipher.final(), cipher.getAuthTag()]);
}

/** Returns null when the key does not open the data (wrong passphrase). */
export function unwrapSecret(wrapKey: Buffer, aad: Buffer, nonce: Buffer, data: Buffer): Buffer | null {
  if (data.length < TAG_LEN) return null;
  const decipher = createDecipheriv('aes-256-gcm', wrapKey, nonce, { authTagLength: TAG_LEN });
  decipher.setAAD(aad);
  decipher.setAuthTag(data.subarray(data.length - TAG_LEN));
  try {
    return Buffer.concat([decipher.update(data.subarray(0, data.length - TAG_LEN)), decipher.final()]);
  } catch {
    return null;
  }
}

/** Derive the 32-byte wrapping key from a passphrase. */
export function deriveWrapKey(passphrase: Buffer, kdf: KdfParams, salt: Buffer): Promise<Buffer> {
  checkKdfParams(kdf);
  return new Promise((resolve, reject) => {
    const done = (err: Error | null, key: Buffer) => (err ? reject(err) : resolve(Buffer.from(key)));
    if (kdf.name === 'argon2id') {
      argon2(
        'argon2id',
        { message: passphrase, nonce: salt, parallelism: kdf.parallelism, tagLength: 32, memory: kdf.memoryKiB, passes: kdf.passes },
        (err, key) => done(err, key as Buffer),
      );
    } else {
      scrypt(passphrase, salt, 32, { N: kdf.N, r: kdf.r, p: kdf.p, maxmem: 256 * kdf.N * kdf.r + 1024 * 1024 }, done);
    }
  });
}

const LOCAL_LABEL = Buffer.from('snapcrypt/v1/local');

/**
 * The key of one local cache file sealed in blocks (the walk's directory records, docs/DESIGN.md
 * section 10): HMAC-SHA256(encKey, "snapcrypt/v1/local" || salt), with a fresh random salt per file,
 * so block numbers can serve as nonces.
 */
export function localFileKey(keys: Keys, salt: Uint8Array): KeyObject {
  return createSecretKey(createHmac('sha256', keys.encKeyObject).update(LOCAL_LABEL).update(salt).digest());
}

/** A tag binding a local file to the head it describes: HMAC-SHA256(file key, "head" || head). */
export function localHeadTag(key: KeyObject, head: Uint8Array): Buffer {
  return createHmac('sha256', key).update('head').update(head).digest();
}

function localNonce(index: number): Buffer {
  const nonce = Buffer.alloc(NONCE_LEN);
  nonce.writeUInt32BE(index, NONCE_LEN - 4);
  return nonce;
}

/**
 * Block `index` of a local file: AES-256-GCM under the file's key, nonce = index, associated data
 * = whether it is the file's last block (so a file cut at a block border is seen as cut). Returns
 * ciphertext || tag.
 */
export function sealLocalBlock(key: KeyObject, index: number, last: boolean, plain: Uint8Array): Buffer {
  const cipher = createCipheriv('aes-256-gcm', key, localNonce(index), { authTagLength: TAG_LEN });
  cipher.setAAD(Uint8Array.of(last ? 1 : 0));
  // into one buffer of its own (which the caller can free at once), the cipher's outputs freed as copied
  const out = Buffer.allocUnsafeSlow(plain.length + TAG_LEN);
  let off = copyOut(cipher.update(plain), out, 0);
  off += copyOut(cipher.final(), out, off);
  copyOut(cipher.getAuthTag(), out, off);
  return out;
}

/**
 * Opens a block of sealLocalBlock into `into` (at least the plaintext's length; the cipher's output
 * is copied there and freed at once); returns the plaintext, a view of into, or null if the block
 * does not open as block `index` with that last flag.
 */
export function openLocalBlock(key: KeyObject, index: number, last: boolean, sealed: Uint8Array, into: Buffer): Buffer | null {
  const len = sealed.length - TAG_LEN;
  if (len < 0 || into.length < len) return null;
  const decipher = createDecipheriv('aes-256-gcm', key, localNonce(index), { authTagLength: TAG_LEN });
  decipher.setAAD(Uint8Array.of(last ? 1 : 0));
  decipher.setAuthTag(sealed.subarray(len));
  try {
    let off = 0;
    for (let p = 0; p < len; p += SEAL_PIECE) off += copyOut(decipher.update(sealed.subarray(p, Math.min(len, p + SEAL_PIECE))), into, off);
    copyOut(decipher.final(), into, off);
    return into.subarray(0, len);
  } catch {
    return null;
  }
}

/** Bytes a block of sealLocalBlock adds to its plaintext. */
export const LOCAL_BLOCK_OVERHEAD = TAG_LEN;
