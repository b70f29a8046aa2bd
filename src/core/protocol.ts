/**
 * The snapcrypt wire protocol (docs/PROTOCOL.md): the Storage interface of src/storage/types.ts as
 * framed, versioned binary messages. Pure: no fs, net, child_process, clock or randomness.
 *
 * Frame: u32 BE length of the rest | u8 message type | u32 BE request id | payload.
 * Every length is checked against MAX_FRAME_LENGTH before anything is allocated for it, and every
 * decoded field is validated strictly (object ids, file names, snapshot names, counts).
 */
import { SnapError } from './errors.js';
import type { ErrorCode } from './errors.js';
import type { SnapshotInfo } from '../storage/types.js';
import { isValidFileName } from '../storage/types.js';

export const PROTOCOL_MAGIC = 'snapcrypt';
/**
 * Version 2: COMMIT carries the index length, the index itself travels before it in INDEX_PART frames
 * (version 1 sent the index inside COMMIT, which limited it to one frame: about 1 Mi ids).
 * Version 3: GET_OBJECTS asks for many objects at once, answered by OBJECTS frames.
 * Version 4: PUT_OBJECTS stores many objects at once, answered by one OK.
 * A version 4 server also serves version 2 and 3 clients (versions 3 and 4 only add messages).
 */
export const PROTOCOL_VERSION = 4;
/** Oldest client version a server still serves. */
export const MIN_PROTOCOL_VERSION = 2;
/** Largest payload of one frame: a padded 16 MiB chunk (about 16.5 MiB) with room to spare. */
export const MAX_PAYLOAD = 32 * 1024 * 1024 + 64 * 1024;
/** Bytes of type + request id, counted in the length field. */
export const FRAME_HEAD = 5;
/** Largest value of a frame's length field. */
export const MAX_FRAME_LENGTH = MAX_PAYLOAD + FRAME_HEAD;
/** Requests a client may have outstanding at once (listings count until their LIST_END). */
export const MAX_IN_FLIGHT = 64;
/** Object ids per ID_BATCH frame. */
export const LIST_BATCH = 4096;
/** Object ids one GET_OBJECTS may ask for. */
export const MAX_GET_OBJECTS = 1024;
/** Objects one PUT_OBJECTS may carry. */
export const MAX_PUT_OBJECTS = 1024;
/** Bytes PUT_OBJECTS spends per object before its bytes (id, u32 length). */
export const PUT_ENTRY_HEAD = 36;
/** Bytes an OBJECTS payload spends before its objects (u32 index of the first) and per object (flag, u32 length). */
export const OBJECTS_HEAD = 4;
export const OBJECT_ENTRY_HEAD = 5;
/** Longest error message or hint carried (longer ones are cut). */
export const MAX_MESSAGE = 4096;
/** Longest owner string of LOCK. */
export const MAX_OWNER = 1024;
/** Longest client wish in HELLO. */
export const MAX_WISH = 255;
const ID_BYTES = 32;
/** Largest index a COMMIT may name: 64 Mi object ids (2 GiB). */
export const MAX_INDEX_BYTES = 64 * 1024 * 1024 * ID_BYTES;
/** Largest slice of the index in one INDEX_PART: 1 Mi ids (32 MiB). */
export const MAX_INDEX_PART = 1024 * 1024 * ID_BYTES;

export const Msg = {
  // handshake and control
  HELLO: 0x01,
  HELLO_OK: 0x02,
  ERROR: 0x03,
  BYE: 0x04,
  BYE_OK: 0x05,
  LIST_CONTINUE: 0x06,
  // requests
  EXISTS: 0x10,
  INIT: 0x11,
  READ_FILE: 0x12,
  WRITE_FILE: 0x13,
  LIST_KEYS: 0x14,
  LIST_OBJECTS: 0x15,
  GET_OBJECT: 0x16,
  PUT_OBJECT: 0x17,
  COMMIT: 0x18,
  LIST_SNAPSHOTS: 0x19,
  OPEN_SNAPSHOT: 0x1a,
  LOCK: 0x1b,
  UNLOCK: 0x1c,
  INDEX_PART: 0x1d,
  GET_OBJECTS: 0x1e,
  PUT_OBJECTS: 0x1f,
  // responses
  OK: 0x40,
  BOOL: 0x41,
  DATA: 0x42,
  NAMES: 0x43,
  ID_BATCH: 0x44,
  LIST_END: 0x45,
  SNAPSHOT: 0x46,
  SNAPSHOTS: 0x47,
  LOCK_TOKEN: 0x48,
  OBJECTS: 0x49,
} as const;

/** Error codes on the wire, by index. Never reorder; append only. */
export const WIRE_ERROR_CODES: readonly ErrorCode[] = [
  'usage',
  'exists',
  'not-found',
  'not-a-repository',
  'wrong-password',
  'locked',
  'integrity',
  'unsupported-version',
  'io',
  'partial',
  'interrupted',
  'protocol',
  'internal',
];

export interface Frame {
  readonly type: number;
  readonly id: number;
  readonly payload: Buffer;
}

/** The state a read addresses: null for current, else a sealed snapshot's name. */
export type Scope = string | null;

export type Request =
  | { readonly type: 'exists' }
  | { readonly type: 'init'; readonly config: Buffer }
  | { readonly type: 'readFile'; readonly scope: Scope; readonly name: string }
  | { readonly type: 'writeFile'; readonly name: string; readonly data: Buffer }
  | { readonly type: 'listKeys'; readonly scope: Scope }
  | { readonly type: 'listObjects'; readonly scope: Scope }
  | { readonly type: 'getObject'; readonly scope: Scope; readonly id: string }
  /** 1 .. MAX_GET_OBJECTS objects, answered in order by OBJECTS frames. */
  | { readonly type: 'getObjects'; readonly scope: Scope; readonly ids: readonly string[] }
  | { readonly type: 'putObject'; readonly id: string; readonly data: Buffer }
  /** 1 .. MAX_PUT_OBJECTS objects, stored in order; one OK answers all of them. */
  | { readonly type: 'putObjects'; readonly objects: readonly ObjectToPut[] }
  /** The next slice of the index of the coming COMMIT; offset is the number of index bytes sent before it. */
  | { readonly type: 'indexPart'; readonly offset: number; readonly ids: Buffer }
  /** Commits with the index sent in INDEX_PARTs since the last COMMIT, which must total indexLength bytes. */
  | { readonly type: 'commit'; readonly head: Buffer; readonly indexLength: number }
  | { readonly type: 'listSnapshots' }
  | { readonly type: 'openSnapshot'; readonly name: string }
  | { readonly type: 'lock'; readonly owner: string }
  | { readonly type: 'unlock'; readonly token: number };

export interface ObjectToPut {
  readonly id: string;
  readonly data: Buffer;
}

export type Response =
  | { readonly type: 'ok' }
  | { readonly type: 'bool'; readonly value: boolean }
  | { readonly type: 'data'; readonly data: Buffer | null }
  | { readonly type: 'names'; readonly names: string[] }
  | { readonly type: 'ids'; readonly ids: string[] }
  /** The next objects of a GET_OBJECTS, from its first-th id on (null: not in the store). */
  | { readonly type: 'objects'; readonly first: number; readonly objects: Array<Buffer | null> }
  | { readonly type: 'listEnd' }
  | { readonly type: 'snapshot'; readonly info: SnapshotInfo }
  | { readonly type: 'snapshots'; readonly infos: SnapshotInfo[] }
  | { readonly type: 'lockToken'; readonly token: number };

export interface Hello {
  readonly version: number;
  /** What the client wants the server to do; "serve" (or empty) is the only wish understood today. */
  readonly wish: string;
}

export interface HelloOk {
  readonly version: number;
  readonly maxFrameLength: number;
  readonly maxInFlight: number;
}

export interface WireError {
  readonly code: ErrorCode;
  readonly message: string;
  readonly hint: string | undefined;
}

export function protocolError(message: string): SnapError {
  return new SnapError('protocol', `Protocol error: ${message}`);
}

/** A snapshot name is exactly what Date.toISOString() gives for some time (no path tricks possible). */
export function isSnapshotName(name: string): boolean {
  if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/.test(name)) return false;
  const time = Date.parse(name);
  return Number.isFinite(time) && new Date(time).toISOString() === name;
}

// ---------------------------------------------------------------------------------------------------
// Frames

/** The bytes of one frame as parts (header, then payload parts), so large payloads are never copied. */
export function encodeFrame(type: number, id: number, payload: readonly Buffer[] = []): Buffer[] {
  if (!Number.isInteger(type) || type < 0 || type > 0xff) throw new RangeError(`bad message type ${type}`);
  if (!Number.isInteger(id) || id < 0 || id > 0xffffffff) throw new RangeError(`bad request id ${id}`);
  let len = 0;
  for (const p of payload) len += p.length;
  if (len > MAX_PAYLOAD) throw new SnapError('usage', `Message of ${len} bytes exceeds the protocol limit of ${MAX_PAYLOAD} bytes`);
  const head = Buffer.allocUnsafe(4 + FRAME_HEAD);
  head.writeUInt32BE(len + FRAME_HEAD, 0);
  head.writeUInt8(type, 4);
  head.writeUInt32BE(id, 5);
  return [head, ...payload.filter((p) => p.length > 0)];
}

/**
 * Frame decoder for a receiver that bounds its memory (the server). It copies every byte out of the
 * chunks it is given, so the caller may reuse a chunk's memory as soon as read() returns, into one
 * payload buffer per frame that `alloc(type, length)` provides once the frame's header is in. The
 * length is checked as soon as its 4 bytes are in, before anything is allocated for it. alloc may refuse (null) while
 * memory is short: read() then stops right after that header and reports how far it got; the caller
 * keeps the rest of its bytes and calls read() again (with them, or with an empty buffer) later.
 */
export class FrameReader {
  private readonly head = Buffer.alloc(4 + FRAME_HEAD);
  private headHave = 0;
  private payload: Buffer | null = null;
  private payloadHave = 0;
  private failed = false;
  private readonly alloc: (type: number, length: number) => Buffer | null;
  private readonly maxLength: number;
  constructor(alloc: (type: number, length: number) => Buffer | null, maxLength = MAX_FRAME_LENGTH) {
    this.alloc = alloc;
    this.maxLength = maxLength;
  }

  /**
   * Takes bytes from chunk, appending the frames it completes to `frames`; returns the number of bytes
   * taken: all of them, unless alloc refused memory for a frame (then waiting is true), or `oneFrame`
   * and a frame is complete (for a caller that reuses a frame's memory for the next).
   */
  read(chunk: Buffer, frames: Frame[], oneFrame = false): number {
    if (this.failed) throw protocolError('input after a framing error');
    let off = 0;
    for (;;) {
      if (this.payload === null) {
        if (this.headHave < this.head.length) {
          const k = Math.min(this.head.length - this.headHave, chunk.length - off);
          chunk.copy(this.head, this.headHave, off, off + k);
          const had = this.headHave;
          this.headHave += k;
          off += k;
          if (had < 4 && this.headHave >= 4) {
            const len = this.head.readUInt32BE(0);
            if (len < FRAME_HEAD || len > this.maxLength) {
              this.failed = true;
              throw protocolError(
                len < FRAME_HEAD ? `frame length ${len} is too small` : `frame length ${len} exceeds the limit of ${this.maxLength}`,
              );
            }
          }
          if (this.headHave < this.head.length) return off;
        }
        const payload = this.alloc(this.head[4]!, this.head.readUInt32BE(0) - FRAME_HEAD);
        if (payload === null) return off;
        this.payload = payload;
        this.payloadHave = 0;
      }
      const k = Math.min(this.payload.length - this.payloadHave, chunk.length - off);
      chunk.copy(this.payload, this.payloadHave, off, off + k);
      this.payloadHave += k;
      off += k;
      if (this.payloadHave < this.payload.length) return off;
      frames.push({ type: this.head[4]!, id: this.head.readUInt32BE(5), payload: this.payload });
      this.payload = null;
      this.headHave = 0;
      if (off === chunk.length || oneFrame) return off;
    }
  }

  /** A frame's header is in and waits for alloc to give it memory. */
  get waiting(): boolean {
    return this.payload === null && this.headHave === this.head.length;
  }

  /** Whether the input so far ended on a frame boundary. */
  get atBoundary(): boolean {
    return this.payload === null && this.headHave === 0;
  }
}

/**
 * ID_BATCH payloads built one id at a time in a 128 KiB scratch buffer reused from batch to batch.
 * Thousands of id strings, or a fresh buffer, held while a batch fills up would outlive young-generation
 * collections and pile up in the old generation until a full one; a payload taken is a fresh copy that
 * is dead as soon as it is written.
 */
export class IdBatchBuilder {
  private buf: Buffer | null = null;
  private n = 0;
  /** Adds one id (64 lower-case hex digits; SnapError('usage') otherwise). */
  add(id: string): void {
    this.buf ??= Buffer.allocUnsafe(LIST_BATCH * ID_BYTES);
    if (this.n === LIST_BATCH) throw new RangeError('the batch is full');
    this.buf.write(checkedId(id), this.n * ID_BYTES, ID_BYTES, 'hex');
    this.n++;
  }
  get count(): number {
    return this.n;
  }
  /** The payload of the ids added since the last take() (a copy). */
  take(): Buffer {
    const out = Buffer.allocUnsafe(this.n * ID_BYTES);
    if (this.buf !== null) this.buf.copy(out, 0, 0, out.length);
    this.n = 0;
    return out;
  }
}

/**
 * One OBJECTS frame built in place in a caller's buffer (the server reads each object straight into
 * it): begin(), then absent() or present(n) per object in request order, then finish() gives the
 * frame's bytes (a view of the buffer).
 */
export class ObjectsFrameWriter {
  private buf: Buffer = Buffer.alloc(0);
  private pos = 0;
  private n = 0;
  /** Bytes of the frame head and the OBJECTS head. */
  static readonly HEAD = 4 + FRAME_HEAD + OBJECTS_HEAD;

  /** Starts a frame answering request `id` from its first-th object on; buf must hold at least HEAD bytes. */
  begin(buf: Buffer, id: number, first: number): void {
    if (buf.length < ObjectsFrameWriter.HEAD) throw new RangeError('buffer too small for an OBJECTS frame');
    this.buf = buf;
    buf.writeUInt8(Msg.OBJECTS, 4);
    buf.writeUInt32BE(id, 5);
    buf.writeUInt32BE(first, 9);
    this.pos = ObjectsFrameWriter.HEAD;
    this.n = 0;
  }
  /** Objects in the frame so far. */
  get count(): number {
    return this.n;
  }
  /** Whether an object of n bytes (n < 0: an absent one) still fits. */
  fits(n: number): boolean {
    return this.buf.length - this.pos >= (n < 0 ? 1 : OBJECT_ENTRY_HEAD + n) && this.pos - 4 + OBJECT_ENTRY_HEAD + Math.max(n, 0) <= MAX_FRAME_LENGTH;
  }
  absent(): void {
    this.buf[this.pos++] = 0;
    this.n++;
  }
  /** Room for the next object's n bytes, to be filled by the caller before finish(). */
  present(n: number): Buffer {
    this.buf[this.pos] = 1;
    this.buf.writeUInt32BE(n, this.pos + 1);
    const at = this.pos + OBJECT_ENTRY_HEAD;
    this.pos = at + n;
    this.n++;
    return this.buf.subarray(at, at + n);
  }
  /** The frame's bytes. */
  finish(): Buffer {
    this.buf.writeUInt32BE(this.pos - 4, 0);
    return this.buf.subarray(0, this.pos);
  }
}

/**
 * Writes the head of a DATA frame carrying n bytes of data (present) into buf; the data goes at the
 * returned offset, and the frame is buf[0, offset + n).
 */
export function writeDataFrameHead(buf: Buffer, id: number, n: number): number {
  buf.writeUInt32BE(FRAME_HEAD + 1 + n, 0);
  buf.writeUInt8(Msg.DATA, 4);
  buf.writeUInt32BE(id, 5);
  buf.writeUInt8(1, 9);
  return 10;
}

// ---------------------------------------------------------------------------------------------------
// Field helpers

class PayloadReader {
  private pos = 0;
  private readonly buf: Buffer;
  private readonly what: string;
  constructor(buf: Buffer, what: string) {
    this.buf = buf;
    this.what = what;
  }
  fail(msg: string): never {
    throw protocolError(`malformed ${this.what}: ${msg}`);
  }
  get remaining(): number {
    return this.buf.length - this.pos;
  }
  raw(n: number): Buffer {
    if (n > this.remaining) this.fail(`needs ${n} bytes, ${this.remaining} left`);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  u8(): number {
    return this.raw(1)[0]!;
  }
  u16(): number {
    return this.raw(2).readUInt16BE(0);
  }
  u32(): number {
    return this.raw(4).readUInt32BE(0);
  }
  /** A u64 that must be at most max (checked before it becomes a number). */
  u64(max: number): number {
    const v = this.raw(8).readBigUInt64BE(0);
    if (v > BigInt(max)) this.fail(`value ${v} exceeds ${max}`);
    return Number(v);
  }
  bool(): boolean {
    const b = this.u8();
    if (b > 1) this.fail(`flag byte ${b}`);
    return b === 1;
  }
  /** UTF-8 text with a u8 or u16 length; rejects bytes that are not exactly valid UTF-8. */
  text(lenBytes: 1 | 2, limit: number): string {
    const n = lenBytes === 1 ? this.u8() : this.u16();
    if (n > limit) this.fail(`text of ${n} bytes exceeds ${limit}`);
    const bytes = this.raw(n);
    const s = bytes.toString('utf8');
    if (!Buffer.from(s, 'utf8').equals(bytes)) this.fail('text is not valid UTF-8');
    return s;
  }
  id(): string {
    return this.raw(ID_BYTES).toString('hex');
  }
  rest(): Buffer {
    return this.raw(this.remaining);
  }
  end(): void {
    if (this.remaining !== 0) this.fail(`${this.remaining} trailing bytes`);
  }
}

function u8(v: number): Buffer {
  return Buffer.from([v]);
}
function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v, 0);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(v, 0);
  return b;
}
function u64(v: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(v), 0);
  return b;
}
function text(lenBytes: 1 | 2, s: string, limit: number): Buffer[] {
  let b = Buffer.from(s, 'utf8');
  if (b.length > limit) b = Buffer.from(b.subarray(0, limit).toString('utf8').replace(/\uFFFD+$/, ''), 'utf8');
  return [lenBytes === 1 ? u8(b.length) : u16(b.length), b];
}
/** The id itself (64 lower-case hex digits), else SnapError('usage'). */
export function checkedId(id: string): string {
  if (!/^[0-9a-f]{64}$/.test(id)) throw new SnapError('usage', `Invalid object id ${JSON.stringify(id.slice(0, 80))}: expected 64 lower-case hex digits`);
  return id;
}
function idBytes(id: string): Buffer {
  return Buffer.from(checkedId(id), 'hex');
}
/** Ids as one buffer of 32 bytes each (one allocation for a whole ID_BATCH). */
function idsBytes(ids: readonly string[]): Buffer {
  const out = Buffer.allocUnsafe(ids.length * ID_BYTES);
  for (const [i, id] of ids.entries()) out.write(checkedId(id), i * ID_BYTES, ID_BYTES, 'hex');
  return out;
}
function checkedName(name: string): string {
  if (!isValidFileName(name)) throw new SnapError('usage', `Invalid file name ${JSON.stringify(name.slice(0, 80))}: expected config, head, index or keys/NAME`);
  return name;
}
function checkedSnapshot(name: string): string {
  if (!isSnapshotName(name)) throw new SnapError('usage', `Invalid snapshot name ${JSON.stringify(name.slice(0, 80))}: expected a time like 2026-11-26T23:15:02.123Z`);
  return name;
}
function scopeParts(scope: Scope): Buffer[] {
  return scope === null ? [u8(0)] : text(1, checkedSnapshot(scope), 64);
}
function readScope(r: PayloadReader): Scope {
  const s = r.text(1, 64);
  if (s === '') return null;
  if (!isSnapshotName(s)) r.fail('invalid snapshot name');
  return s;
}
function readFileName(r: PayloadReader): string {
  const name = r.text(1, 255);
  if (!isValidFileName(name)) r.fail('invalid file name');
  return name;
}
function time8(time: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(time), 0);
  return b;
}
function readTime(r: PayloadReader): number {
  const t = r.raw(8).readBigUInt64BE(0);
  if (t > BigInt(Number.MAX_SAFE_INTEGER)) r.fail('time out of range');
  return Number(t);
}
function snapshotParts(info: SnapshotInfo): Buffer[] {
  if (!Number.isSafeInteger(info.time) || info.time < 0) throw new RangeError(`bad snapshot time ${info.time}`);
  return [...text(1, checkedSnapshot(info.name), 64), time8(info.time)];
}
function readSnapshot(r: PayloadReader): SnapshotInfo {
  const name = r.text(1, 64);
  if (!isSnapshotName(name)) r.fail('invalid snapshot name');
  return { name, time: readTime(r) };
}

// ---------------------------------------------------------------------------------------------------
// Handshake, errors, continuation

export function encodeHello(h: Hello): Buffer[] {
  return [Buffer.from(PROTOCOL_MAGIC), u16(h.version), ...text(1, h.wish, MAX_WISH)];
}
export function decodeHello(payload: Buffer): Hello {
  const r = new PayloadReader(payload, 'HELLO');
  if (!r.raw(PROTOCOL_MAGIC.length).equals(Buffer.from(PROTOCOL_MAGIC))) r.fail('bad magic');
  const version = r.u16();
  const wish = r.text(1, MAX_WISH);
  r.end();
  return { version, wish };
}
export function encodeHelloOk(h: HelloOk): Buffer[] {
  return [u16(h.version), u32(h.maxFrameLength), u16(h.maxInFlight)];
}
export function decodeHelloOk(payload: Buffer): HelloOk {
  const r = new PayloadReader(payload, 'HELLO_OK');
  const version = r.u16();
  const maxFrameLength = r.u32();
  const maxInFlight = r.u16();
  r.end();
  if (maxFrameLength < FRAME_HEAD + 64 || maxInFlight < 1) r.fail('implausible limits');
  return { version, maxFrameLength, maxInFlight };
}

export function encodeError(e: WireError): Buffer[] {
  const index = WIRE_ERROR_CODES.indexOf(e.code);
  return [
    u8(index < 0 ? WIRE_ERROR_CODES.indexOf('internal') : index),
    ...text(2, e.message, MAX_MESSAGE),
    u8(e.hint === undefined ? 0 : 1),
    ...(e.hint === undefined ? [] : text(2, e.hint, MAX_MESSAGE)),
  ];
}
export function decodeError(payload: Buffer): WireError {
  const r = new PayloadReader(payload, 'ERROR');
  const code = WIRE_ERROR_CODES[r.u8()];
  if (code === undefined) return r.fail('unknown error code');
  const message = r.text(2, MAX_MESSAGE);
  const hint = r.bool() ? r.text(2, MAX_MESSAGE) : undefined;
  r.end();
  return { code, message, hint };
}

export function encodeContinue(more: boolean): Buffer[] {
  return [u8(more ? 1 : 0)];
}
export function decodeContinue(payload: Buffer): boolean {
  const r = new PayloadReader(payload, 'LIST_CONTINUE');
  const more = r.bool();
  r.end();
  return more;
}

export function decodeEmpty(payload: Buffer, what: string): void {
  new PayloadReader(payload, what).end();
}

// ---------------------------------------------------------------------------------------------------
// Requests

/** Message type and payload parts of a request; throws SnapError('usage') for invalid arguments. */
export function encodeRequest(req: Request): { type: number; payload: Buffer[] } {
  switch (req.type) {
    case 'exists':
      return { type: Msg.EXISTS, payload: [] };
    case 'init':
      return { type: Msg.INIT, payload: [req.config] };
    case 'readFile':
      return { type: Msg.READ_FILE, payload: [...scopeParts(req.scope), ...text(1, checkedName(req.name), 255)] };
    case 'writeFile':
      return { type: Msg.WRITE_FILE, payload: [...text(1, checkedName(req.name), 255), req.data] };
    case 'listKeys':
      return { type: Msg.LIST_KEYS, payload: scopeParts(req.scope) };
    case 'listObjects':
      return { type: Msg.LIST_OBJECTS, payload: scopeParts(req.scope) };
    case 'getObject':
      return { type: Msg.GET_OBJECT, payload: [...scopeParts(req.scope), idBytes(req.id)] };
    case 'getObjects':
      if (req.ids.length === 0 || req.ids.length > MAX_GET_OBJECTS) {
        throw new SnapError('usage', `GET_OBJECTS asks for 1 to ${MAX_GET_OBJECTS} objects, not ${req.ids.length}`);
      }
      return { type: Msg.GET_OBJECTS, payload: [...scopeParts(req.scope), idsBytes(req.ids)] };
    case 'putObject':
      return { type: Msg.PUT_OBJECT, payload: [idBytes(req.id), req.data] };
    case 'putObjects': {
      const n = req.objects.length;
      if (n === 0 || n > MAX_PUT_OBJECTS) throw new SnapError('usage', `PUT_OBJECTS carries 1 to ${MAX_PUT_OBJECTS} objects, not ${n}`);
      // each object's id and length in one buffer for all of them, followed by its bytes
      const heads = Buffer.allocUnsafe(n * PUT_ENTRY_HEAD);
      const payload: Buffer[] = [];
      for (const [i, o] of req.objects.entries()) {
        const at = i * PUT_ENTRY_HEAD;
        heads.write(checkedId(o.id), at, ID_BYTES, 'hex');
        heads.writeUInt32BE(o.data.length, at + ID_BYTES);
        payload.push(heads.subarray(at, at + PUT_ENTRY_HEAD), o.data);
      }
      return { type: Msg.PUT_OBJECTS, payload };
    }
    case 'indexPart': {
      const { offset, ids } = req;
      if (ids.length === 0 || ids.length > MAX_INDEX_PART || ids.length % ID_BYTES !== 0) {
        throw new SnapError('usage', `An index part must hold 1 to ${MAX_INDEX_PART / ID_BYTES} whole 32-byte ids, not ${ids.length} bytes`);
      }
      if (!Number.isSafeInteger(offset) || offset < 0 || offset % ID_BYTES !== 0 || offset + ids.length > MAX_INDEX_BYTES) {
        throw new SnapError('usage', `An index part at offset ${offset} does not fit the protocol's index limit of ${MAX_INDEX_BYTES} bytes`);
      }
      return { type: Msg.INDEX_PART, payload: [u64(offset), ids] };
    }
    case 'commit': {
      const n = req.indexLength;
      if (!Number.isSafeInteger(n) || n < 0 || n % ID_BYTES !== 0 || n > MAX_INDEX_BYTES) {
        throw new SnapError('usage', `An index of ${n} bytes cannot be committed: at most ${MAX_INDEX_BYTES / ID_BYTES} whole 32-byte ids`);
      }
      return { type: Msg.COMMIT, payload: [u64(n), req.head] };
    }
    case 'listSnapshots':
      return { type: Msg.LIST_SNAPSHOTS, payload: [] };
    case 'openSnapshot':
      return { type: Msg.OPEN_SNAPSHOT, payload: text(1, checkedSnapshot(req.name), 64) };
    case 'lock':
      return { type: Msg.LOCK, payload: text(2, req.owner, MAX_OWNER) };
    case 'unlock':
      return { type: Msg.UNLOCK, payload: [u32(req.token)] };
  }
}

/** The request a frame carries; SnapError('protocol') for an unknown type or a malformed payload. */
export function decodeRequest(frame: Frame): Request {
  const r = new PayloadReader(frame.payload, `request type 0x${frame.type.toString(16)}`);
  let req: Request;
  switch (frame.type) {
    case Msg.EXISTS:
      req = { type: 'exists' };
      break;
    case Msg.INIT:
      req = { type: 'init', config: r.rest() };
      break;
    case Msg.READ_FILE: {
      const scope = readScope(r);
      req = { type: 'readFile', scope, name: readFileName(r) };
      break;
    }
    case Msg.WRITE_FILE: {
      const name = readFileName(r);
      req = { type: 'writeFile', name, data: r.rest() };
      break;
    }
    case Msg.LIST_KEYS:
      req = { type: 'listKeys', scope: readScope(r) };
      break;
    case Msg.LIST_OBJECTS:
      req = { type: 'listObjects', scope: readScope(r) };
      break;
    case Msg.GET_OBJECT: {
      const scope = readScope(r);
      req = { type: 'getObject', scope, id: r.id() };
      break;
    }
    case Msg.GET_OBJECTS: {
      const scope = readScope(r);
      const n = r.remaining / ID_BYTES;
      if (!Number.isInteger(n) || n === 0 || n > MAX_GET_OBJECTS) r.fail(`${r.remaining} bytes of ids`);
      const ids: string[] = [];
      for (let i = 0; i < n; i++) ids.push(r.id());
      req = { type: 'getObjects', scope, ids };
      break;
    }
    case Msg.PUT_OBJECT: {
      const id = r.id();
      req = { type: 'putObject', id, data: r.rest() };
      break;
    }
    case Msg.PUT_OBJECTS: {
      const objects: ObjectToPut[] = [];
      while (r.remaining > 0) {
        if (objects.length === MAX_PUT_OBJECTS) r.fail(`more than ${MAX_PUT_OBJECTS} objects`);
        const id = r.id();
        objects.push({ id, data: r.raw(r.u32()) });
      }
      if (objects.length === 0) r.fail('no objects');
      req = { type: 'putObjects', objects };
      break;
    }
    case Msg.INDEX_PART: {
      const offset = r.u64(MAX_INDEX_BYTES);
      const ids = r.rest();
      if (offset % ID_BYTES !== 0) r.fail(`offset ${offset} is not a multiple of ${ID_BYTES}`);
      if (ids.length === 0 || ids.length > MAX_INDEX_PART || ids.length % ID_BYTES !== 0) r.fail(`part of ${ids.length} bytes`);
      if (offset + ids.length > MAX_INDEX_BYTES) r.fail(`index beyond the limit of ${MAX_INDEX_BYTES} bytes`);
      req = { type: 'indexPart', offset, ids };
      break;
    }
    case Msg.COMMIT: {
      const indexLength = r.u64(MAX_INDEX_BYTES);
      if (indexLength % ID_BYTES !== 0) r.fail(`index length ${indexLength} is not a multiple of ${ID_BYTES}`);
      req = { type: 'commit', head: r.rest(), indexLength };
      break;
    }
    case Msg.LIST_SNAPSHOTS:
      req = { type: 'listSnapshots' };
      break;
    case Msg.OPEN_SNAPSHOT: {
      const name = r.text(1, 64);
      if (!isSnapshotName(name)) r.fail('invalid snapshot name');
      req = { type: 'openSnapshot', name };
      break;
    }
    case Msg.LOCK:
      req = { type: 'lock', owner: r.text(2, MAX_OWNER) };
      break;
    case Msg.UNLOCK:
      req = { type: 'unlock', token: r.u32() };
      break;
    default:
      throw protocolError(`unknown request type 0x${frame.type.toString(16)}`);
  }
  r.end();
  return req;
}

// ---------------------------------------------------------------------------------------------------
// Responses

export function encodeResponse(res: Response): { type: number; payload: Buffer[] } {
  switch (res.type) {
    case 'ok':
      return { type: Msg.OK, payload: [] };
    case 'bool':
      return { type: Msg.BOOL, payload: [u8(res.value ? 1 : 0)] };
    case 'data':
      return { type: Msg.DATA, payload: res.data === null ? [u8(0)] : [u8(1), res.data] };
    case 'names': {
      const parts: Buffer[] = [u32(res.names.length)];
      for (const n of res.names) parts.push(...text(1, n, 255));
      return { type: Msg.NAMES, payload: parts };
    }
    case 'ids':
      if (res.ids.length > LIST_BATCH) throw new RangeError(`batch of ${res.ids.length} ids`);
      return { type: Msg.ID_BATCH, payload: [idsBytes(res.ids)] };
    case 'listEnd':
      return { type: Msg.LIST_END, payload: [] };
    case 'objects': {
      const parts: Buffer[] = [u32(res.first)];
      for (const o of res.objects) parts.push(...(o === null ? [u8(0)] : [u8(1), u32(o.length), o]));
      return { type: Msg.OBJECTS, payload: parts };
    }
    case 'snapshot':
      return { type: Msg.SNAPSHOT, payload: snapshotParts(res.info) };
    case 'snapshots': {
      const parts: Buffer[] = [u32(res.infos.length)];
      for (const info of res.infos) parts.push(...snapshotParts(info));
      return { type: Msg.SNAPSHOTS, payload: parts };
    }
    case 'lockToken':
      return { type: Msg.LOCK_TOKEN, payload: [u32(res.token)] };
  }
}

/** Which response types answer each request type (ERROR answers any). */
export function expectedResponses(req: Request['type']): readonly Response['type'][] {
  switch (req) {
    case 'exists':
      return ['bool'];
    case 'readFile':
    case 'getObject':
      return ['data'];
    case 'getObjects':
      return ['objects'];
    case 'listKeys':
      return ['names'];
    case 'listObjects':
      return ['ids', 'listEnd'];
    case 'commit':
      return ['snapshot'];
    case 'listSnapshots':
      return ['snapshots'];
    case 'lock':
      return ['lockToken'];
    default:
      return ['ok'];
  }
}

export function decodeResponse(frame: Frame): Response {
  const r = new PayloadReader(frame.payload, `response type 0x${frame.type.toString(16)}`);
  let res: Response;
  switch (frame.type) {
    case Msg.OK:
      res = { type: 'ok' };
      break;
    case Msg.BOOL:
      res = { type: 'bool', value: r.bool() };
      break;
    case Msg.DATA:
      res = { type: 'data', data: r.bool() ? r.rest() : null };
      break;
    case Msg.NAMES: {
      const n = r.u32();
      if (n * 2 > r.remaining) r.fail(`count ${n} is implausible`);
      const names: string[] = [];
      for (let i = 0; i < n; i++) {
        const name = r.text(1, 255);
        if (!isValidFileName(`keys/${name}`)) r.fail('invalid key name');
        names.push(name);
      }
      res = { type: 'names', names };
      break;
    }
    case Msg.ID_BATCH: {
      const bytes = r.rest();
      if (bytes.length % ID_BYTES !== 0 || bytes.length / ID_BYTES > LIST_BATCH) r.fail(`batch of ${bytes.length} bytes`);
      const ids: string[] = [];
      for (let off = 0; off < bytes.length; off += ID_BYTES) ids.push(bytes.toString('hex', off, off + ID_BYTES));
      res = { type: 'ids', ids };
      break;
    }
    case Msg.LIST_END:
      res = { type: 'listEnd' };
      break;
    case Msg.OBJECTS: {
      const first = r.u32();
      const objects: Array<Buffer | null> = [];
      while (r.remaining > 0) objects.push(r.bool() ? r.raw(r.u32()) : null);
      if (objects.length === 0 || first + objects.length > MAX_GET_OBJECTS) r.fail(`objects ${first} to ${first + objects.length}`);
      res = { type: 'objects', first, objects };
      break;
    }
    case Msg.SNAPSHOT:
      res = { type: 'snapshot', info: readSnapshot(r) };
      break;
    case Msg.SNAPSHOTS: {
      const n = r.u32();
      if (n * 10 > r.remaining) r.fail(`count ${n} is implausible`);
      const infos: SnapshotInfo[] = [];
      for (let i = 0; i < n; i++) infos.push(readSnapshot(r));
      res = { type: 'snapshots', infos };
      break;
    }
    case Msg.LOCK_TOKEN:
      res = { type: 'lockToken', token: r.u32() };
      break;
    default:
      throw protocolError(`unknown response type 0x${frame.type.toString(16)}`);
  }
  r.end();
  return res;
}
