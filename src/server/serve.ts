/**
 * The server loop of `snapcrypt-server serve`: frames in on one byte stream, answers out on another,
 * each request carried out on a Storage (docs/PROTOCOL.md). It sees object ids, clear-text config,
 * key files (wrapped keys), head and index, never a key: it imports no crypto or engine code (I1, I6).
 *
 * Bounded memory (I8): at most maxInFlight requests run at once; input is paused while that many run;
 * a frame is only read once memory for its payload is admitted: the payloads of requests that carry
 * data to the Storage (PUT_OBJECT(S), INDEX_PART, COMMIT, WRITE_FILE, INIT) go into one reused arena of ARENA_SIZE
 * bytes (grown, when empty, to fit a larger one), other payloads count against PAYLOAD_BUDGET (a single
 * larger frame is admitted when no other is held); at most HEAVY requests that move whole objects or
 * indexes run at once; a response is only counted done when the output has taken it. The program
 * reads its stdin into one reused buffer (reusedBufferInput), so receiving a backup allocates next to
 * nothing per object: dead Buffers would otherwise pile up until V8 collects them (it waits for
 * tens of MB of them), and the C heap would keep their high-water mark.
 * The index of a commit arrives in INDEX_PART frames that the Storage stages on disk
 * (Storage.stageIndex), so even a 2 GiB index is never held in memory.
 * Any protocol violation ends the session with one ERROR frame (request id 0, code 'protocol').
 */
import net from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { ExitStatus, SnapError } from '../core/errors.js';
import { release } from '../core/memory.js';
import {
  FrameReader,
  IdBatchBuilder,
  LIST_BATCH,
  MAX_FRAME_LENGTH,
  MAX_INDEX_BYTES,
  MAX_IN_FLIGHT,
  MAX_PAYLOAD,
  MIN_PROTOCOL_VERSION,
  Msg,
  OBJECT_ENTRY_HEAD,
  ObjectsFrameWriter,
  PROTOCOL_VERSION,
  decodeContinue,
  decodeEmpty,
  decodeHello,
  decodeRequest,
  encodeError,
  encodeFrame,
  encodeHelloOk,
  encodeResponse,
  protocolError,
  writeDataFrameHead,
} from '../core/protocol.js';
import type { Frame, Request, Response, Scope } from '../core/protocol.js';
import { UploadGuard, type UploadLimits } from './limits.js';
import { readObjectInto, readObjectsInto } from '../storage/types.js';
import type { Lock, ObjectReader, ObjectSink, SnapshotInfo, StagedIndex, Storage } from '../storage/types.js';

/** Requests moving whole objects or indexes that may run at once. */
const HEAVY = 8;
/**
 * Bytes of the memory reused for the payloads of requests that carry data to the Storage (PUT_OBJECT(S),
 * COMMIT, WRITE_FILE, INIT): two objects of the default 1 MiB chunk size, or the index of about 65,000
 * objects. Grown, when empty, to fit a larger payload.
 */
const ARENA_SIZE = 2 * 1024 * 1024;
/** Payload bytes (arriving, queued or running) beyond which no new frame other than DATA_REQUESTS is read. */
const PAYLOAD_BUDGET = 1024 * 1024;
/** Bytes of one read of a reusedBufferInput. */
const READ_SIZE = 64 * 1024;
const EMPTY = Buffer.alloc(0);
/**
 * Bytes of a send buffer: objects are read from the Storage straight into one (OBJECTS frames are cut
 * at about this size; an object that does not fit gets a buffer of its own size), which is reused once
 * the output has taken it. A fresh Buffer per object sent would pile up as garbage until V8 collects
 * it (tens of MB of external memory) and leave the C heap at that high-water mark.
 */
const SEND_BUFFER_SIZE = 256 * 1024;
/** Bytes of all send buffers of a session. */
const SEND_BUDGET = 2 * 1024 * 1024;
/**
 * Objects of a GET_OBJECTS answer that the Storage may open and read at once, ahead of the one being
 * framed (Storage.readObjectsInto; the directory storages do so only while reads wait long for a
 * disk): the disk gets several requests at once, and the server frames and sends meanwhile instead of
 * waiting for each read.
 */
const READ_AHEAD = 16;
/**
 * Bytes of send buffers one GET_OBJECTS answer may hold ahead of the output (frames being read, and
 * written frames the output has not taken); one frame is always allowed. One frame: more made the
 * server's peak RSS 1.5-2 MiB higher in a restore of the benchmark corpus (64 MiB is its budget).
 */
const READ_AHEAD_BYTES = SEND_BUFFER_SIZE;
/** An OBJECTS frame being filled, or waiting to be written. */
interface OutFrame {
  readonly buf: Buffer;
  /** The frame's bytes once it is closed (no more objects go in); they are all there once pending is 0. */
  bytes: Buffer | null;
  /** Objects placed in the frame whose bytes are not read yet. */
  pending: number;
}
/** Locks one session may hold. */
const MAX_LOCKS = 16;
/**
 * Largest index staged in memory for a Storage without stageIndex (every directory storage has it):
 * as much as one frame could carry in protocol version 1.
 */
const MEMORY_STAGE_LIMIT = MAX_PAYLOAD;

/** Stages an index in memory, for a Storage that cannot stage it on disk. */
function memoryStage(storage: Storage): StagedIndex {
  let parts: Buffer[] = [];
  let length = 0;
  return {
    get length() {
      return length;
    },
    async append(ids: Buffer): Promise<void> {
      if (length + ids.length > MEMORY_STAGE_LIMIT) {
        throw new SnapError('usage', `This server's storage takes indexes of at most ${MEMORY_STAGE_LIMIT / 32} objects`);
      }
      parts.push(Buffer.from(ids)); // a copy: the payload's memory is reused once the request is done
      length += ids.length;
    },
    async commit(head: Buffer): Promise<SnapshotInfo> {
      const index = Buffer.concat(parts, length);
      parts = [];
      return storage.commit(head, index);
    },
    async discard(): Promise<void> {
      parts = [];
    },
  };
}

/** The index parts received since the last COMMIT, as the requests carrying them are carried out. */
interface Stage {
  staged: StagedIndex | null;
  /** The first failure of a part: later parts and the COMMIT answer with it; nothing is committed. */
  failure: SnapError | null;
}

export interface ServeOptions {
  /** The client's wish from SSH_ORIGINAL_COMMAND (data only, never run); undefined when not over SSH. */
  readonly sshOriginalCommand?: string | undefined;
  readonly maxInFlight?: number;
  /** Diagnostics (stderr in the program). */
  readonly log?: (line: string) => void;
  /** Quota and free-space floor checked before anything sent is stored (limits.ts); none by default. */
  readonly limits?: UploadLimits;
}

/**
 * A pipe or socket (the program's stdin) read into one reused buffer: onBytes gets each read's bytes,
 * valid only during the call. Created paused; serve() attaches and resumes it.
 */
export interface ReusedBufferInput {
  readonly stream: Readable;
  onBytes: ((bytes: Buffer) => void) | null;
}

/** A ReusedBufferInput on fd, or null when fd is not a pipe or socket (a file, a terminal). */
export function reusedBufferInput(fd: number): ReusedBufferInput | null {
  const buffer = Buffer.allocUnsafeSlow(READ_SIZE);
  let input: ReusedBufferInput;
  try {
    const onread = {
      buffer,
      callback: (n: number) => {
        input.onBytes?.(buffer.subarray(0, n));
        return true; // (serve() pauses the stream itself)
      },
    };
    input = { stream: new net.Socket({ fd, readable: true, writable: false, onread }), onBytes: null };
  } catch {
    return null; // ERR_INVALID_FD_TYPE
  }
  input.stream.pause();
  return input;
}

function isReusedBufferInput(input: Readable | ReusedBufferInput): input is ReusedBufferInput {
  return 'onBytes' in input;
}

/**
 * Memory reused for the payloads of DATA_REQUESTS (mostly PUT_OBJECT(S)): they are placed one after the
 * other, wrapping around, and given back in any order; the space of the oldest is reused once it and
 * all before it are given back.
 */
class Arena {
  private buf: Buffer;
  /** Payloads in the order they were placed (given-back ones stay until all before them are given back). */
  private readonly live: Array<{ start: number; free: boolean }> = [];
  private head = 0;
  constructor(size: number) {
    this.buf = Buffer.allocUnsafeSlow(size);
  }

  /** n > 0 bytes, or null while they do not fit; an empty arena grows to fit a larger payload. */
  take(n: number): Buffer | null {
    if (this.live.length === 0) {
      this.head = 0;
      if (n > this.buf.length) this.buf = Buffer.allocUnsafeSlow(n);
    }
    const tail = this.live[0]?.start;
    let start: number;
    if (tail === undefined || this.head > tail) {
      // in use: [tail, head); free: [head, end), then [0, tail)
      if (n <= this.buf.length - this.head) start = this.head;
      else if (tail !== undefined && n <= tail) start = 0;
      else return null;
    } else if (n <= tail - this.head) {
      // wrapped: in use [tail, end) and [0, head); free: [head, tail)
      start = this.head;
    } else {
      return null;
    }
    this.live.push({ start, free: false });
    this.head = start + n;
    return this.buf.subarray(start, start + n);
  }

  /** Gives back what take() returned; false for other buffers. */
  give(b: Buffer): boolean {
    if (b.buffer !== this.buf.buffer) return false;
    const start = b.byteOffset - this.buf.byteOffset;
    const rec = this.live.find((r) => r.start === start && !r.free);
    if (!rec) return false;
    rec.free = true;
    while (this.live[0]?.free) this.live.shift();
    if (this.live.length === 0) this.head = 0;
    return true;
  }
}

/**
 * Requests that hand data to the Storage (their decoded request refers to the frame's payload, which is
 * given back when the request is done): their payloads go into the arena.
 */
const DATA_REQUESTS: ReadonlySet<number> = new Set([Msg.PUT_OBJECT, Msg.PUT_OBJECTS, Msg.INDEX_PART, Msg.COMMIT, Msg.WRITE_FILE, Msg.INIT]);
/** The protocol version that introduced each message type not in version 2. */
const SINCE: ReadonlyMap<number, number> = new Map([
  [Msg.GET_OBJECTS, 3],
  [Msg.PUT_OBJECTS, 4],
]);

/** Commands an SSH client may ask for: the forced command runs us whatever it asked, we only check. */
export function isAcceptedWish(wish: string | undefined): boolean {
  if (wish === undefined) return true;
  const w = wish.trim();
  return w === '' || w === 'serve' || w === 'snapcrypt-server serve';
}

/** Writes one ERROR frame (id 0) to out and ends it; for failures before a session can start. */
export function refuse(out: Writable, code: SnapError['code'], message: string): Promise<void> {
  return new Promise((resolve) => {
    out.on('error', () => resolve());
    for (const p of encodeFrame(Msg.ERROR, 0, encodeError({ code, message, hint: undefined }))) out.write(p);
    out.end(() => resolve());
  });
}

/**
 * Send buffers, reused once the output has taken what was written from them. Together they hold at
 * most SEND_BUDGET bytes: take() waits for a buffer to come back rather than allocate beyond it (a
 * larger object waits until no other buffer is in use, and its buffer is dropped after use).
 */
class SendBuffers {
  private readonly free: Buffer[] = [];
  private allocated = 0;
  private readonly waiters: Array<() => void> = [];

  /** A buffer of at least n bytes. */
  async take(n: number): Promise<Buffer> {
    for (;;) {
      const i = this.free.findIndex((b) => b.length >= n);
      if (i >= 0) return this.free.splice(i, 1)[0]!;
      const size = Math.max(SEND_BUFFER_SIZE, n);
      if (this.allocated + size <= SEND_BUDGET || this.allocated === 0) {
        this.allocated += size;
        return Buffer.allocUnsafeSlow(size);
      }
      const small = this.free.shift();
      if (small !== undefined) {
        // too small for n: make room (freed now, not when V8 collects it: core/memory.ts)
        this.allocated -= small.length;
        release(small);
      } else await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  give(b: Buffer): void {
    if (this.allocated > SEND_BUDGET) {
      this.allocated -= b.length; // (an oversized one: dropped, and freed now)
      release(b);
    } else this.free.push(b);
    this.waiters.shift()?.();
  }
}

interface Listing {
  /** Resolves with the client's answer to the last batch sent. */
  waiting: ((more: boolean) => void) | null;
}

class Semaphore {
  private free: number;
  private readonly waiters: Array<() => void> = [];
  constructor(n: number) {
    this.free = n;
  }
  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }
  release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.free++;
  }
}

/**
 * Serves one session; resolves with the exit status (0 after BYE or end of input, ExitStatus.protocol
 * after a protocol violation). Never rejects. Locks taken in the session are released at its end.
 */
export function serve(input: Readable | ReusedBufferInput, output: Writable, storage: Storage, opts: ServeOptions = {}): Promise<number> {
  return new Session(input, output, storage, opts).run();
}

class Session {
  private readonly frameReader = new FrameReader((type, length) => this.admit(type, length), MAX_FRAME_LENGTH);
  private readonly arena = new Arena(ARENA_SIZE);
  private readonly sendBuffers = new SendBuffers();
  /** The protocol version of the session (from HELLO). */
  private version = PROTOCOL_VERSION;
  /** Input bytes the reader has not taken yet (it waits for memory); the input is paused meanwhile. */
  private carry: Buffer | null = null;
  /** Where carried bytes of a borrowed chunk are copied. */
  private carryBuf: Buffer | null = null;
  /** The input ended while bytes were still carried: handled once they are read. */
  private endPending = false;
  private readonly queue: Frame[] = [];
  private readonly running = new Set<number>();
  private readonly listings = new Map<number, Listing>();
  private readonly locks = new Map<number, Lock>();
  private readonly snapshots = new Map<string, ObjectReader>();
  private readonly heavy = new Semaphore(HEAVY);
  private readonly maxInFlight: number;
  private nextToken = 1;
  /** Payload bytes of frames other than DATA_REQUESTS (arriving, queued or running). */
  private heldBytes = 0;
  private greeted = false;
  private ending = false; // BYE or end of input: finish what runs, then stop
  private status: number = ExitStatus.ok;
  private closed = false; // no more output
  private finish!: () => void;
  private readonly done: Promise<void>;
  private outputBroken = false;
  private byeId: number | null = null;
  /** INDEX_PART bytes that arrived since the last COMMIT (counted on arrival, in order). */
  private indexSent = 0;
  private stage: Stage = { staged: null, failure: null };
  /** INDEX_PART and COMMIT run one after the other, in the order they arrived. */
  private indexChain: Promise<unknown> = Promise.resolve();

  private readonly input: Readable;
  private readonly reused: ReusedBufferInput | null;
  private readonly output: Writable;
  private readonly storage: Storage;
  private readonly guard: UploadGuard;
  private readonly opts: ServeOptions;

  constructor(input: Readable | ReusedBufferInput, output: Writable, storage: Storage, opts: ServeOptions) {
    this.reused = isReusedBufferInput(input) ? input : null;
    this.input = isReusedBufferInput(input) ? input.stream : input;
    this.output = output;
    this.storage = storage;
    this.guard = new UploadGuard(storage, opts.limits ?? { label: storage.location, quotaBytes: null, freeSpaceFloor: null });
    this.opts = opts;
    this.maxInFlight = opts.maxInFlight ?? MAX_IN_FLIGHT;
    this.done = new Promise((resolve) => (this.finish = resolve));
  }

  async run(): Promise<number> {
    if (!isAcceptedWish(this.opts.sshOriginalCommand)) {
      this.fatal(protocolError(`the server only runs "snapcrypt-server serve", not ${JSON.stringify(this.opts.sshOriginalCommand?.slice(0, 80))}`));
    } else {
      if (this.reused) this.reused.onBytes = (bytes) => this.onData(bytes, true);
      else this.input.on('data', (chunk: Buffer) => this.onData(chunk, false));
      this.input.on('end', () => this.onEnd());
      this.input.on('error', (err) => {
        this.opts.log?.(`input error: ${err.message}`);
        this.onEnd();
      });
      this.output.on('error', (err) => {
        this.opts.log?.(`output error: ${err.message}`);
        this.outputBroken = true;
        this.closed = true;
        this.ending = true;
        this.maybeFinish();
      });
      this.output.on('drain', () => this.pump());
      if (this.reused) this.input.resume();
    }
    await this.done;
    await this.indexChain;
    // Index parts without their COMMIT: dropped, and the session is a protocol violation.
    const staged = this.stage.staged;
    this.stage = { staged: null, failure: null };
    await staged?.discard().catch((err: unknown) => this.opts.log?.(`discarding a staged index: ${String(err)}`));
    if (this.indexSent > 0) {
      this.fatal(protocolError(`the session ended after ${this.indexSent} bytes of INDEX_PART without their COMMIT; they were discarded`));
    }
    if (this.reused) this.reused.onBytes = null;
    this.input.removeAllListeners('data');
    this.input.pause();
    for (const listing of this.listings.values()) listing.waiting?.(false);
    for (const lock of this.locks.values()) await lock.release().catch((err: unknown) => this.opts.log?.(`releasing a lock: ${String(err)}`));
    this.locks.clear();
    if (this.byeId !== null) await this.send(Msg.BYE_OK, this.byeId, []);
    if (!this.outputBroken) await new Promise<void>((resolve) => this.output.end(() => resolve()));
    return this.status;
  }

  /** Input bytes; `borrowed` ones are only valid during the call. */
  private onData(chunk: Buffer, borrowed: boolean): void {
    if (this.ending) return;
    if (this.carry !== null) {
      // (the input is paused while bytes are carried: only a stream that ignored the pause gets here)
      this.carry = Buffer.concat([this.carry, chunk]);
      return;
    }
    this.feed(chunk, borrowed);
    this.pump();
  }

  /** Memory for a frame's payload, or null (the reader waits) while too much is held. */
  private admit(type: number, length: number): Buffer | null {
    if (length === 0) return EMPTY;
    if (DATA_REQUESTS.has(type)) return this.arena.take(length);
    if (this.heldBytes > 0 && this.heldBytes + length > PAYLOAD_BUDGET) return null;
    this.heldBytes += length;
    return Buffer.allocUnsafe(length);
  }

  /** Gives back a payload's memory once nothing refers to it any more. */
  private release(payload: Buffer): void {
    if (payload.length > 0 && !this.arena.give(payload)) this.heldBytes -= payload.length;
  }

  /** Runs bytes through the reader; what it cannot take yet is carried. */
  private feed(bytes: Buffer, borrowed: boolean): void {
    const frames: Frame[] = [];
    let used: number;
    try {
      used = this.frameReader.read(bytes, frames);
    } catch (err) {
      this.fatal(err);
      return;
    }
    this.carry = null;
    if (used < bytes.length) {
      const rest = bytes.subarray(used);
      if (borrowed) {
        if (this.carryBuf === null || this.carryBuf.length < rest.length) this.carryBuf = Buffer.allocUnsafeSlow(Math.max(READ_SIZE, rest.length));
        this.carry = this.carryBuf.subarray(0, rest.copy(this.carryBuf));
      } else {
        this.carry = rest;
      }
    }
    for (const f of frames) {
      if (this.ending) break;
      if (f.type === Msg.LIST_CONTINUE) {
        // Answers to a listing are handled at once: they never wait behind requests.
        this.onContinue(f);
        this.release(f.payload);
        continue;
      }
      this.queue.push(f);
    }
  }

  /** Whether input read earlier still waits for memory. */
  private get blocked(): boolean {
    return this.carry !== null || this.frameReader.waiting;
  }

  private onEnd(): void {
    if (this.ending) return;
    if (this.blocked) {
      this.endPending = true;
      return;
    }
    if (!this.frameReader.atBoundary) {
      this.fatal(protocolError('input ended inside a frame'));
      return;
    }
    this.ending = true;
    this.queue.length = 0;
    this.maybeFinish();
  }

  private onContinue(f: Frame): void {
    let more: boolean;
    try {
      more = decodeContinue(f.payload);
    } catch (err) {
      this.fatal(err);
      return;
    }
    const listing = this.listings.get(f.id);
    const waiting = listing?.waiting;
    if (!listing || !waiting) {
      this.fatal(protocolError(`LIST_CONTINUE for request ${f.id}, which is not a listing waiting for one`));
      return;
    }
    listing.waiting = null;
    waiting(more);
  }

  /** Reads carried input once memory allows, starts queued requests while there is room; pauses or resumes the input. */
  private pump(): void {
    for (let progress = true; progress && !this.ending; ) {
      progress = false;
      if (this.blocked) this.feed(this.carry ?? EMPTY, false);
      while (!this.ending && this.queue.length > 0 && this.running.size < this.maxInFlight) {
        this.start(this.queue.shift()!);
        progress = this.blocked; // a started request may have given memory back at once
      }
    }
    if (this.ending) return;
    if (this.endPending && !this.blocked) {
      this.endPending = false;
      this.onEnd();
      return;
    }
    const full = this.queue.length > 0 || this.running.size >= this.maxInFlight || this.blocked || this.output.writableNeedDrain;
    if (full) this.input.pause();
    else this.input.resume();
  }

  private start(f: Frame): void {
    if (!this.greeted) {
      this.hello(f);
      this.release(f.payload);
      return;
    }
    if (f.type === Msg.BYE) {
      try {
        decodeEmpty(f.payload, 'BYE');
      } catch (err) {
        this.fatal(err);
        return;
      }
      this.ending = true;
      this.byeId = f.id;
      this.queue.length = 0;
      this.maybeFinish();
      return;
    }
    if (f.type === Msg.HELLO) return this.fatal(protocolError('a second HELLO'));
    if (f.id === 0) return this.fatal(protocolError('request id 0 is reserved'));
    if (this.running.has(f.id)) return this.fatal(protocolError(`request id ${f.id} is already in use`));
    let req: Request;
    try {
      const since = SINCE.get(f.type);
      if (since !== undefined && this.version < since) throw protocolError(`message type 0x${f.type.toString(16)} in a session of protocol version ${this.version}`);
      req = decodeRequest(f);
    } catch (err) {
      return this.fatal(err);
    }
    // The index stream is checked as it arrives: parts in order, COMMIT naming exactly what was sent.
    if (req.type === 'indexPart') {
      if (req.offset !== this.indexSent) {
        return this.fatal(protocolError(`INDEX_PART at offset ${req.offset}, but ${this.indexSent} index bytes were sent since the last COMMIT`));
      }
      if (this.indexSent + req.ids.length > MAX_INDEX_BYTES) {
        return this.fatal(protocolError(`the index exceeds the limit of ${MAX_INDEX_BYTES} bytes`));
      }
      this.indexSent += req.ids.length;
    } else if (req.type === 'commit') {
      if (req.indexLength !== this.indexSent) {
        return this.fatal(protocolError(`COMMIT names an index of ${req.indexLength} bytes, but ${this.indexSent} were sent in INDEX_PART frames`));
      }
      this.indexSent = 0;
    }
    const keep = DATA_REQUESTS.has(f.type);
    if (!keep) this.release(f.payload);
    this.running.add(f.id);
    void this.handle(f.id, req).finally(() => {
      this.running.delete(f.id);
      if (keep) this.release(f.payload);
      this.maybeFinish();
      this.pump();
    });
  }

  private hello(f: Frame): void {
    if (f.type !== Msg.HELLO) return this.fatal(protocolError(`expected HELLO, got message type 0x${f.type.toString(16)}`));
    let hello;
    try {
      hello = decodeHello(f.payload);
    } catch (err) {
      return this.fatal(err);
    }
    if (hello.version < MIN_PROTOCOL_VERSION || hello.version > PROTOCOL_VERSION) {
      return this.fatal(
        new SnapError('unsupported-version', `Protocol version ${hello.version} is not supported by this server (it speaks versions ${MIN_PROTOCOL_VERSION} to ${PROTOCOL_VERSION})`, {
          hint: 'snapcrypt (on the workstation) and snapcrypt-server (on the server) must speak the same protocol version: update the older one',
        }),
      );
    }
    if (!isAcceptedWish(hello.wish)) return this.fatal(protocolError(`unknown wish ${JSON.stringify(hello.wish)}`));
    this.greeted = true;
    this.version = hello.version;
    void this.send(Msg.HELLO_OK, f.id, encodeHelloOk({ version: hello.version, maxFrameLength: MAX_FRAME_LENGTH, maxInFlight: this.maxInFlight }));
  }

  private maybeFinish(): void {
    if (!this.ending) return;
    // Listings waiting for a LIST_CONTINUE that will never come stop now.
    for (const listing of this.listings.values()) {
      const waiting = listing.waiting;
      listing.waiting = null;
      waiting?.(false);
    }
    if (this.running.size === 0) this.finish();
  }

  /** Ends the session with one ERROR frame for id 0. */
  private fatal(err: unknown): void {
    if (this.closed) return;
    const e = err instanceof SnapError ? err : protocolError(err instanceof Error ? err.message : String(err));
    this.opts.log?.(e.message);
    this.status = ExitStatus.protocol;
    void this.send(Msg.ERROR, 0, encodeError({ code: e.code, message: e.message, hint: e.hint }));
    this.closed = true;
    this.ending = true;
    this.queue.length = 0;
    this.maybeFinish();
  }

  /** Writes one frame unless the session is closed; resolves once the output has taken it. */
  private async send(type: number, id: number, payload: Buffer[]): Promise<void> {
    if (this.closed) return;
    const parts = encodeFrame(type, id, payload);
    let ok = true;
    for (const p of parts) ok = this.output.write(p);
    if (!ok && !this.outputBroken) await this.drained();
  }

  /** Writes a frame held in a send buffer, which is given back once the output has taken it. */
  private async sendFromBuffer(frame: Buffer, buf: Buffer): Promise<void> {
    if (this.closed) return this.sendBuffers.give(buf);
    const ok = this.output.write(frame, () => this.sendBuffers.give(buf));
    if (!ok && !this.outputBroken) await this.drained();
  }

  /** Resolves once the output drained (or closed, or failed). */
  private async drained(): Promise<void> {
    await new Promise<void>((resolve) => {
      const done = () => {
        this.output.off('drain', done);
        this.output.off('close', done);
        this.output.off('error', done);
        resolve();
      };
      this.output.on('drain', done);
      this.output.on('close', done);
      this.output.on('error', done);
    });
  }

  /** GET_OBJECT: one DATA frame, built in a send buffer. */
  private async sendObject(id: number, reader: ObjectReader, objectId: string): Promise<void> {
    let buf: Buffer | null = null;
    let end = 0;
    try {
      await readObjectInto(reader, objectId, async (size) => {
        if (size > MAX_PAYLOAD - 1) throw new SnapError('io', `Object ${objectId} (${size} bytes) is too large to send`);
        const b = await this.sendBuffers.take(10 + size);
        buf = b;
        const at = writeDataFrameHead(b, id, size);
        end = at + size;
        return b.subarray(at, end);
      });
    } catch (err) {
      if (buf !== null) this.sendBuffers.give(buf);
      throw err;
    }
    const b = buf as Buffer | null;
    if (b !== null) await this.sendFromBuffer(b.subarray(0, end), b);
  }

  /**
   * GET_OBJECTS: the objects in order, read straight into send buffers, as OBJECTS frames of about
   * SEND_BUFFER_SIZE each; an absent object is marked absent. The Storage reads up to READ_AHEAD objects
   * at once (Storage.readObjectsInto) while earlier ones are framed and sent, and the frames of an
   * answer hold at most READ_AHEAD_BYTES that the output has not taken (one frame at least). A frame goes
   * out once every object in it was read, and frames go out in order. Another failure ends the answer
   * with an ERROR for the request: the frame holding the failed object and every later one are not sent
   * (the client drops the objects it did not receive).
   */
  private async sendObjects(id: number, reader: ObjectReader, ids: readonly string[]): Promise<void> {
    const w = new ObjectsFrameWriter();
    /** Frames not yet written to the output, in order; only the last may be open (still taking objects). */
    const frames: OutFrame[] = [];
    let open: OutFrame | null = null;
    /** The frame of each object being read. */
    const frameOf: Array<OutFrame | undefined> = new Array(ids.length);
    /** Bytes of send buffers this answer holds (from take() until the output has taken their frame). */
    let held = 0;
    let wake: (() => void) | null = null;
    const taken = (buf: Buffer): void => {
      held -= buf.length; // (before give(), which may free it)
      this.sendBuffers.give(buf);
      const waiting = wake;
      wake = null;
      waiting?.();
    };
    /** Writes the frames at the front that are complete. */
    const write = (): void => {
      for (let f = frames[0]; f !== undefined && f.bytes !== null && f.pending === 0; f = frames[0]) {
        frames.shift();
        const buf = f.buf;
        if (this.closed) taken(buf);
        else this.output.write(f.bytes, () => taken(buf));
      }
    };
    const close = (): void => {
      if (open === null) return;
      open.bytes = w.finish();
      open = null;
      write();
    };
    /** Makes room in the open frame for the next object of n bytes (n < 0: an absent one). */
    const room = async (i: number, n: number): Promise<OutFrame> => {
      if (this.closed) throw new SnapError('io', 'The session ended'); // (nothing more is sent)
      if (open !== null && w.fits(n)) return open;
      close();
      const need = ObjectsFrameWriter.HEAD + OBJECT_ENTRY_HEAD + Math.max(n, 0);
      if (need - 4 > MAX_FRAME_LENGTH) throw new SnapError('io', `Object ${ids[i]} (${n} bytes) is too large to send`);
      while (held > 0 && held + need > READ_AHEAD_BYTES) await new Promise<void>((resolve) => (wake = resolve));
      const buf = await this.sendBuffers.take(need);
      held += buf.length;
      const f: OutFrame = { buf, bytes: null, pending: 0 };
      frames.push(f);
      open = f;
      w.begin(buf, id, i);
      return f;
    };
    const placeIn = (f: OutFrame, i: number, size: number): Buffer => {
      f.pending++;
      frameOf[i] = f;
      return w.present(size);
    };
    const sink: ObjectSink = {
      place: (i, size) => {
        // (without a promise of its own while the object fits in the open frame: the usual case)
        if (open !== null && !this.closed && w.fits(size)) return Promise.resolve(placeIn(open, i, size));
        return room(i, size).then((f) => placeIn(f, i, size));
      },
      absent: async (i) => {
        await room(i, -1);
        w.absent();
      },
      filled: (i) => {
        const f = frameOf[i]!;
        frameOf[i] = undefined;
        if (--f.pending === 0 && f === frames[0]) write();
      },
    };
    try {
      await readObjectsInto(reader, ids, sink, READ_AHEAD);
      close();
      if (this.output.writableNeedDrain && !this.outputBroken) await this.drained();
    } finally {
      // After a failure: the frames not written (the failed object's and later ones) are dropped.
      for (const f of frames.splice(0)) taken(f.buf);
    }
  }

  private async respond(id: number, res: Response): Promise<void> {
    const { type, payload } = encodeResponse(res);
    await this.send(type, id, payload);
  }

  private async reader(scope: Scope): Promise<ObjectReader> {
    if (scope === null) return this.storage;
    let r = this.snapshots.get(scope);
    if (!r) {
      r = await this.storage.openSnapshot(scope);
      if (this.snapshots.size >= 16) this.snapshots.delete(this.snapshots.keys().next().value!);
      this.snapshots.set(scope, r);
    }
    return r;
  }

  private async handle(id: number, req: Request): Promise<void> {
    try {
      await this.execute(id, req);
    } catch (err) {
      const e =
        err instanceof SnapError
          ? err
          : new SnapError('internal', `Server failure on ${req.type}: ${err instanceof Error ? err.message : String(err)}`);
      await this.send(Msg.ERROR, id, encodeError({ code: e.code, message: e.message, hint: e.hint }));
    }
  }

  private async heavily<T>(fn: () => Promise<T>): Promise<T> {
    await this.heavy.acquire();
    try {
      return await fn();
    } finally {
      this.heavy.release();
    }
  }

  private async execute(id: number, req: Request): Promise<void> {
    const s = this.storage;
    switch (req.type) {
      case 'exists':
        return this.respond(id, { type: 'bool', value: await s.exists() });
      case 'init':
        await s.init(req.config);
        return this.respond(id, { type: 'ok' });
      case 'readFile': {
        const reader = await this.reader(req.scope);
        return this.heavily(async () => this.respond(id, { type: 'data', data: await reader.readFile(req.name) }));
      }
      case 'writeFile':
        await this.guard.admit(req.data.length, false, () => s.writeFile(req.name, req.data));
        return this.respond(id, { type: 'ok' });
      case 'listKeys':
        return this.respond(id, { type: 'names', names: await (await this.reader(req.scope)).listKeys() });
      case 'listObjects':
        return this.list(id, await this.reader(req.scope));
      case 'getObject': {
        const reader = await this.reader(req.scope);
        return this.heavily(() => this.sendObject(id, reader, req.id));
      }
      case 'getObjects': {
        const reader = await this.reader(req.scope);
        return this.heavily(() => this.sendObjects(id, reader, req.ids));
      }
      case 'putObject':
        await this.guard.admit(req.data.length, true, () => this.heavily(() => s.putObject(req.id, req.data)));
        return this.respond(id, { type: 'ok' });
      case 'putObjects': {
        // Admitted as a whole (quota, free-space floor), then stored in order; the first failure ends
        // the request with that object's error: the objects before it are stored, the ones after it
        // are not tried.
        let bytes = 0;
        for (const o of req.objects) bytes += o.data.length;
        await this.guard.admit(bytes, true, () =>
          this.heavily(async () => {
            for (const o of req.objects) await s.putObject(o.id, o.data);
          }),
        );
        return this.respond(id, { type: 'ok' });
      }
      case 'indexPart':
        await this.inIndexOrder(() => this.guard.admit(req.ids.length, false, () => this.appendPart(req.ids)));
        return this.respond(id, { type: 'ok' });
      case 'commit': {
        const info = await this.inIndexOrder(() => this.heavily(() => this.commitStaged(req.head)));
        return this.respond(id, { type: 'snapshot', info });
      }
      case 'listSnapshots':
        return this.respond(id, { type: 'snapshots', infos: await s.listSnapshots() });
      case 'openSnapshot':
        await this.reader(req.name);
        return this.respond(id, { type: 'ok' });
      case 'lock': {
        if (this.locks.size >= MAX_LOCKS) throw new SnapError('usage', `A session may hold at most ${MAX_LOCKS} locks`);
        const lock = await s.lock(req.owner);
        const token = this.nextToken++;
        this.locks.set(token, lock);
        return this.respond(id, { type: 'lockToken', token });
      }
      case 'unlock': {
        const lock = this.locks.get(req.token);
        if (lock) {
          this.locks.delete(req.token);
          await lock.release();
        }
        return this.respond(id, { type: 'ok' });
      }
    }
  }

  /** Runs fn after every INDEX_PART and COMMIT that arrived before (called synchronously on arrival). */
  private inIndexOrder<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.indexChain.then(fn);
    this.indexChain = p.catch(() => undefined);
    return p;
  }

  private async appendPart(ids: Buffer): Promise<void> {
    const stage = this.stage;
    if (stage.failure) throw stage.failure;
    try {
      stage.staged ??= this.storage.stageIndex ? await this.storage.stageIndex() : memoryStage(this.storage);
      await stage.staged.append(ids);
    } catch (err) {
      stage.failure = err instanceof SnapError ? err : new SnapError('io', `Cannot stage the index: ${err instanceof Error ? err.message : String(err)}`);
      const staged = stage.staged;
      stage.staged = null;
      await staged?.discard().catch(() => undefined);
      throw stage.failure;
    }
  }

  /** Commits the staged parts (an empty index when none were sent); the stage is gone afterwards. */
  private async commitStaged(head: Buffer): Promise<SnapshotInfo> {
    const stage = this.stage;
    this.stage = { staged: null, failure: null };
    if (stage.failure) throw stage.failure;
    if (stage.staged === null) return this.storage.commit(head, Buffer.alloc(0));
    return stage.staged.commit(head);
  }

  /** Streams ids in batches; after each batch waits for the client's LIST_CONTINUE. */
  private async list(id: number, reader: ObjectReader): Promise<void> {
    const listing: Listing = { waiting: null };
    this.listings.set(id, listing);
    const it = reader.listObjects()[Symbol.asyncIterator]();
    const batch = new IdBatchBuilder();
    try {
      for (;;) {
        const next = await it.next();
        if (!next.done) {
          batch.add(next.value);
          if (batch.count < LIST_BATCH) continue;
        }
        if (!next.done) {
          // A full batch: the client answers it with LIST_CONTINUE before the next one is sent.
          // After the end of input or BYE no LIST_CONTINUE can come: stop after this batch.
          const answer = this.ending ? Promise.resolve(false) : new Promise<boolean>((resolve) => (listing.waiting = resolve));
          await this.send(Msg.ID_BATCH, id, [batch.take()]);
          if (this.closed || !(await answer)) {
            await it.return?.();
            break;
          }
          continue;
        }
        // A short (possibly empty) final batch needs no answer: LIST_END follows at once.
        if (batch.count > 0) await this.send(Msg.ID_BATCH, id, [batch.take()]);
        break;
      }
      await this.respond(id, { type: 'listEnd' });
    } finally {
      listing.waiting = null;
      this.listings.delete(id);
    }
  }
}
