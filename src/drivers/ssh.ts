/**
 * RemoteStorage: the Storage interface spoken over the snapcrypt protocol (docs/PROTOCOL.md) on any
 * pair of byte streams; usually the stdin/stdout of `ssh ... snapcrypt-server serve`.
 *
 * Requests are pipelined (up to the server's maxInFlight outstanding, matched by request id), so the
 * backup's concurrent putObject calls keep the link busy; small objects travel in PUT_OBJECTS batches
 * (RemoteStorage.putObject). A broken connection, a protocol violation or
 * a fatal server error rejects every pending call with a SnapError naming the location; errors the
 * server reports for one request keep their code (locked, integrity, not-found, exists, ...).
 */
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import net from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { SnapError } from '../core/errors.js';
import type { ErrorCode } from '../core/errors.js';
import {
  FrameReader,
  LIST_BATCH,
  MAX_FRAME_LENGTH,
  MAX_GET_OBJECTS,
  MAX_INDEX_BYTES,
  MAX_IN_FLIGHT,
  MAX_PUT_OBJECTS,
  Msg,
  PROTOCOL_VERSION,
  checkedId,
  decodeError,
  decodeHelloOk,
  decodeResponse,
  encodeContinue,
  encodeFrame,
  encodeHello,
  encodeRequest,
  expectedResponses,
} from '../core/protocol.js';
import type { Frame, ObjectToPut, Request, Response, Scope } from '../core/protocol.js';
import type { IndexBytes, IndexSource, Lock, ObjectReader, SnapshotInfo, Storage } from '../storage/types.js';
import { indexLength, indexParts, isIndexSource } from '../storage/types.js';
import { parseSshTarget, sshInvocation } from './sshkeys.js';
import type { SshInvocationOptions } from './sshkeys.js';

export interface Transport {
  readonly readable: Readable;
  readonly writable: Writable;
  /** Ends the connection and waits for it (and any child process) to be gone. */
  close(): Promise<void>;
  /** What to say about the connection in an error message (e.g. the last lines ssh wrote to stderr). */
  describe(): string;
}

/** Bytes waiting in the output before new requests wait for it to drain. */
const OUTPUT_HIGH_WATER = 32 * 1024 * 1024;
const STDERR_KEEP = 8192;
/** Request id of BYE; ordinary requests use 1 .. BYE_ID - 1. */
const BYE_ID = 0xffffffff;
/** Bytes of the index per INDEX_PART (32 Ki ids): small, so that the server holds little of it. */
const INDEX_PART_BYTES = 1024 * 1024;
/** INDEX_PART frames sent before the answer to the oldest one arrives (4 MiB unanswered at most). */
const INDEX_PARTS_IN_FLIGHT = 4;
const ID_BYTES = 32;
/** Objects up to this size are put in PUT_OBJECTS batches; larger ones travel alone in a PUT_OBJECT. */
const BATCH_OBJECT_MAX = 128 * 1024;
/** A batch is sent once it holds this many bytes (or MAX_PUT_OBJECTS objects). */
const BATCH_BYTES = 256 * 1024;
/**
 * PUT_OBJECTS requests unanswered while a batch that is not full waits for more objects: below it, a
 * batch is sent once the event loop has run what is ready (setImmediate); at it, the batch waits for an
 * answer, so batches grow while the server or the link is the slower side.
 */
const BATCHES_AHEAD = 2;

/** Objects put since the last PUT_OBJECTS, and the putObject calls waiting for its answer. */
interface PutBatch {
  readonly objects: ObjectToPut[];
  bytes: number;
  readonly waiters: Array<{ resolve(): void; reject(err: unknown): void }>;
}

/** ssh options from the environment: SNAPCRYPT_SSH_OPTIONS holds extra ssh arguments split on white space. */
export function sshOptionsFromEnv(env: Readonly<Record<string, string | undefined>>): { extraOptions?: string[] } {
  const extra = env['SNAPCRYPT_SSH_OPTIONS']?.trim();
  return extra ? { extraOptions: extra.split(/\s+/) } : {};
}

/** Bytes of one read of the child's output (a pipe holds 64 KiB). */
const READ_SIZE = 64 * 1024;

/**
 * The child's stdout read into one reused buffer: each 'data' chunk is a view of it, valid only while
 * the listeners run (the Connection copies what it keeps). Node otherwise reads into a new 64 KiB
 * Buffer each time, garbage that V8 frees only once tens of MB of it have piled up; with the restore's
 * work on worker threads, the main thread allocated too little else for a collection to come sooner
 * (70 MB more peak RSS). The pipe's libuv handle moves from the child's stdout stream to a net.Socket
 * made with `onread`, before anything was read (the server reads its stdin the same way, serve.ts
 * reusedBufferInput); where that handle is not there, null (the stream is used as it is).
 */
function reusedBufferOutput(child: ChildProcessWithoutNullStreams): Readable | null {
  const stdout = child.stdout as Readable & { _handle?: unknown };
  const handle = stdout._handle;
  if (handle === null || typeof handle !== 'object') return null;
  const buffer = Buffer.allocUnsafeSlow(READ_SIZE);
  let socket: net.Socket;
  try {
    const onread = { buffer, callback: (n: number) => socket.emit('data', buffer.subarray(0, n)) };
    socket = new net.Socket({ handle, readable: true, writable: false, onread } as net.SocketConstructorOpts);
  } catch {
    return null;
  }
  stdout._handle = null;
  stdout.destroy();
  return socket;
}

/** A transport over a child process's stdin/stdout; its stderr is kept for error messages. */
export function childTransport(cmd: string, args: readonly string[], env?: NodeJS.ProcessEnv): Transport {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], ...(env ? { env } : {}) });
  const output = reusedBufferOutput(child) ?? child.stdout;
  let stderr = '';
  let spawnError: Error | null = null;
  let exit: string | null = null;
  const exited = new Promise<void>((resolve) => {
    child.on('error', (err) => {
      spawnError = err;
      resolve();
    });
    child.on('close', (code, signal) => {
      exit = signal ? `killed by ${signal}` : `exit status ${code}`;
      resolve();
    });
  });
  child.stderr.on('data', (b: Buffer) => {
    stderr = (stderr + b.toString('utf8')).slice(-STDERR_KEEP);
  });
  child.stdin.on('error', () => {}); // reported through the connection's end instead
  return {
    readable: output,
    writable: child.stdin,
    describe() {
      const parts: string[] = [];
      if (spawnError) parts.push(`cannot run ${cmd}: ${(spawnError as Error).message}`);
      if (exit) parts.push(`${cmd} ended with ${exit}`);
      const err = stderr.trim();
      if (err) parts.push(`it said: ${err.split('\n').slice(-5).join(' / ')}`);
      return parts.join('; ');
    },
    async close() {
      child.stdin.end();
      const timer = setTimeout(() => child.kill('SIGTERM'), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

interface Pending {
  readonly request: Request['type'];
  resolve(res: Response): void;
  reject(err: Error): void;
  /** For listings: called with each batch; the id stays pending until LIST_END. */
  onBatch?(ids: string[]): void;
  /** For GET_OBJECTS: called with each OBJECTS frame; true once the last object arrived. */
  onObjects?(res: Extract<Response, { type: 'objects' }>): boolean;
}

class Connection {
  /**
   * Every received byte is copied out of the transport's chunks (which may be one reused buffer,
   * childTransport), into a Buffer per frame, except OBJECTS frames: they are handed to getObjects'
   * callback and done with when it returns, so they go into one buffer reused for the next.
   */
  private readonly reader = new FrameReader((type, length) => (type === Msg.OBJECTS ? this.scratch(length) : Buffer.allocUnsafe(length)), MAX_FRAME_LENGTH);
  private scratchBuffer: Buffer | null = null;
  private readonly frames: Frame[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private slots = MAX_IN_FLIGHT;
  private readonly slotWaiters: Array<() => void> = [];
  private failure: SnapError | null = null;
  private hello: ((frame: Frame) => void) | null = null;
  private byeOk: (() => void) | null = null;
  readonly location: string;
  private readonly transport: Transport;

  constructor(transport: Transport, location: string) {
    this.transport = transport;
    this.location = location;
    transport.readable.on('data', (b: Buffer) => this.onData(b));
    // Wait for the peer (e.g. ssh) to exit first, so that the message can quote its last words.
    const lost = () => {
      if (this.failure) return;
      void transport.close().finally(() => this.fail(null, 'the connection was lost'));
    };
    transport.readable.on('end', lost);
    transport.readable.on('error', (err) => this.fail(null, `reading failed: ${err.message}`));
    // EPIPE, or a write after the peer's end was seen: the peer is gone (ssh killed, network down);
    // say so, with how it ended
    const gone = new Set(['EPIPE', 'ERR_STREAM_WRITE_AFTER_END', 'ERR_STREAM_DESTROYED']);
    transport.writable.on('error', (err) => (gone.has(String((err as NodeJS.ErrnoException).code)) ? lost() : this.fail(null, `writing failed: ${err.message}`)));
  }

  /** HELLO → HELLO_OK. */
  async handshake(): Promise<void> {
    const frame = await new Promise<Frame>((resolve, reject) => {
      this.hello = resolve;
      this.helloReject = reject;
      this.write(encodeFrame(Msg.HELLO, 1, encodeHello({ version: PROTOCOL_VERSION, wish: 'serve' })));
    });
    this.hello = null;
    if (frame.type === Msg.ERROR) {
      const e = decodeError(frame.payload);
      if (e.code === 'unsupported-version' && e.hint === undefined) {
        throw this.serverError({ ...e, hint: `snapcrypt here speaks protocol version ${PROTOCOL_VERSION}: update the side that is older` }, true);
      }
      throw this.serverError(e, true);
    }
    if (frame.type !== Msg.HELLO_OK) throw this.protocolFailure(`expected HELLO_OK, got message type 0x${frame.type.toString(16)}`);
    const ok = decodeHelloOk(frame.payload);
    if (ok.version !== PROTOCOL_VERSION) throw this.protocolFailure(`the server answered with protocol version ${ok.version}`);
    this.slots = Math.min(MAX_IN_FLIGHT, ok.maxInFlight);
  }
  private helloReject: ((err: Error) => void) | null = null;

  private serverError(e: { code: ErrorCode; message: string; hint: string | undefined }, fatal: boolean): SnapError {
    const prefix = fatal ? `${this.location}: the server ended the session: ` : `${this.location}: `;
    return new SnapError(e.code, `${prefix}${e.message}`, e.hint === undefined ? undefined : { hint: e.hint });
  }

  private protocolFailure(msg: string): SnapError {
    const err = new SnapError('protocol', `${this.location}: protocol error: ${msg}`);
    this.fail(err, msg);
    return err;
  }

  private scratch(length: number): Buffer {
    if (this.scratchBuffer === null || this.scratchBuffer.length < length) this.scratchBuffer = Buffer.allocUnsafeSlow(Math.max(length, 256 * 1024));
    return this.scratchBuffer.subarray(0, length);
  }

  /** b is valid only during the call (see reader). */
  private onData(b: Buffer): void {
    try {
      for (let off = 0; off < b.length && !this.failure; ) {
        off += this.reader.read(off === 0 ? b : b.subarray(off), this.frames, true);
        const f = this.frames.pop();
        if (f !== undefined) this.onFrame(f);
      }
    } catch (err) {
      this.fail(new SnapError('protocol', `${this.location}: ${(err as Error).message}`), '');
    }
  }

  private onFrame(f: Frame): void {
    if (this.hello) return this.hello(f);
    if (f.type === Msg.ERROR && f.id === 0) {
      let e;
      try {
        e = decodeError(f.payload);
      } catch (err) {
        return void this.protocolFailure((err as Error).message);
      }
      return void this.fail(this.serverError(e, true), '');
    }
    if (f.type === Msg.BYE_OK) {
      this.byeOk?.();
      return;
    }
    const p = this.pending.get(f.id);
    if (!p) return void this.protocolFailure(`a response for request ${f.id}, which is not pending`);
    if (f.type === Msg.ERROR) {
      let e;
      try {
        e = decodeError(f.payload);
      } catch (err) {
        return void this.protocolFailure((err as Error).message);
      }
      this.done(f.id);
      return p.reject(this.serverError(e, false));
    }
    let res: Response;
    try {
      res = decodeResponse(f);
    } catch (err) {
      return void this.protocolFailure((err as Error).message);
    }
    if (!expectedResponses(p.request).includes(res.type)) {
      return void this.protocolFailure(`response ${res.type} to a ${p.request} request`);
    }
    if (res.type === 'ids') {
      p.onBatch?.(res.ids);
      return;
    }
    if (res.type === 'objects') {
      let last: boolean;
      try {
        last = p.onObjects!(res);
      } catch (err) {
        return void this.protocolFailure((err as Error).message);
      }
      if (!last) return;
    }
    this.done(f.id);
    p.resolve(res);
  }

  private done(id: number): void {
    this.pending.delete(id);
    const next = this.slotWaiters.shift();
    if (next) next();
    else this.slots++;
  }

  /** Rejects everything pending; later calls fail at once. */
  fail(err: SnapError | null, why: string): void {
    if (this.failure) return;
    const detail = this.transport.describe();
    this.failure =
      err ?? new SnapError('io', `Connection to ${this.location} failed: ${why}${detail ? ` (${detail})` : ''}`);
    if (err && detail && err.code === 'protocol') {
      this.failure = new SnapError(err.code, `${err.message} (${detail})`, err.hint === undefined ? undefined : { hint: err.hint });
    }
    this.helloReject?.(this.failure);
    this.helloReject = null;
    this.hello = null;
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
    for (const w of this.slotWaiters.splice(0)) w();
    this.byeOk?.();
  }

  /** Writes a frame's parts with one system call (writev) where the stream allows it. */
  private write(parts: Buffer[]): void {
    const w = this.transport.writable;
    if (parts.length > 1) w.cork();
    for (const p of parts) w.write(p);
    if (parts.length > 1) w.uncork();
  }

  private async acquire(): Promise<void> {
    if (this.slots > 0) {
      this.slots--;
      return;
    }
    await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
  }

  private async drained(): Promise<void> {
    const w = this.transport.writable;
    while (!this.failure && w.writableLength > OUTPUT_HIGH_WATER) {
      await new Promise<void>((resolve) => {
        const done = () => {
          w.off('drain', done);
          w.off('close', done);
          resolve();
        };
        w.on('drain', done);
        w.on('close', done);
      });
    }
  }

  private sentInOrder: Promise<void> = Promise.resolve();

  /**
   * Like call, but the request is written only after every earlier callInOrder request was written
   * (INDEX_PART frames and their COMMIT must arrive in order; the server carries them out in order).
   */
  callInOrder(req: Request): Promise<Response> {
    const previous = this.sentInOrder;
    let sent!: () => void;
    this.sentInOrder = new Promise<void>((resolve) => (sent = resolve));
    return (async () => {
      try {
        await previous;
        return await this.call(req, undefined, sent);
      } finally {
        sent();
      }
    })();
  }

  /** Sends one request and resolves with its (single) response; onSent runs once it is written. */
  async call(
    req: Request,
    onBatch?: (ids: string[], id: number) => void,
    onSent?: () => void,
    onObjects?: (res: Extract<Response, { type: 'objects' }>) => boolean,
  ): Promise<Response> {
    const { type, payload } = encodeRequest(req); // validates arguments before anything is sent
    if (this.failure) throw this.failure;
    await this.acquire();
    if (this.failure) throw this.failure;
    await this.drained();
    if (this.failure) throw this.failure;
    while (this.pending.has(this.nextId)) this.nextId = this.nextId >= BYE_ID - 1 ? 1 : this.nextId + 1;
    const id = this.nextId;
    this.nextId = this.nextId >= BYE_ID - 1 ? 1 : this.nextId + 1;
    return new Promise<Response>((resolve, reject) => {
      const p: Pending = { request: req.type, resolve, reject };
      if (onBatch) p.onBatch = (ids) => onBatch(ids, id);
      if (onObjects) p.onObjects = onObjects;
      this.pending.set(id, p);
      this.write(encodeFrame(type, id, payload));
      onSent?.();
    });
  }

  sendContinue(id: number, more: boolean): void {
    if (!this.failure) this.write(encodeFrame(Msg.LIST_CONTINUE, id, encodeContinue(more)));
  }

  async close(): Promise<void> {
    if (!this.failure) {
      const bye = new Promise<void>((resolve) => (this.byeOk = resolve));
      this.write(encodeFrame(Msg.BYE, BYE_ID, []));
      const timer = setTimeout(() => this.byeOk?.(), 10_000);
      await bye;
      clearTimeout(timer);
    }
    this.failure = new SnapError('usage', `The connection to ${this.location} is closed`);
    await this.transport.close();
  }
}

function expect<T extends Response['type']>(res: Response, type: T): Extract<Response, { type: T }> {
  if (res.type !== type) throw new SnapError('protocol', `Protocol error: expected ${type}, got ${res.type}`);
  return res as Extract<Response, { type: T }>;
}

class RemoteReader implements ObjectReader {
  protected readonly conn: Connection;
  private readonly scope: Scope;
  constructor(conn: Connection, scope: Scope) {
    this.conn = conn;
    this.scope = scope;
  }
  async getObject(id: string): Promise<Buffer> {
    const res = expect(await this.conn.call({ type: 'getObject', scope: this.scope, id }), 'data');
    if (res.data === null) throw new SnapError('protocol', `${this.conn.location}: protocol error: no data for object ${id}`);
    return res.data;
  }
  /**
   * GET_OBJECTS in requests of at most MAX_GET_OBJECTS ids; each object is handed to `each` as its
   * OBJECTS frame arrives (a view of the received bytes), so nothing of it is held.
   */
  async getObjects(ids: readonly string[], each: (index: number, data: Buffer | null) => void): Promise<void> {
    let failure: { err: unknown } | null = null;
    const parts: Promise<void>[] = [];
    for (let start = 0; start < ids.length; start += MAX_GET_OBJECTS) {
      const slice = ids.slice(start, start + MAX_GET_OBJECTS);
      let next = 0;
      const onObjects = (res: Extract<Response, { type: 'objects' }>): boolean => {
        if (res.first !== next || next + res.objects.length > slice.length) {
          throw new Error(`objects ${res.first} to ${res.first + res.objects.length - 1} of ${slice.length}, expected ${next} next`);
        }
        for (const data of res.objects) {
          if (failure === null) {
            try {
              each(start + next, data);
            } catch (err) {
              failure = { err };
            }
          }
          next++;
        }
        return next === slice.length;
      };
      const part = this.conn.call({ type: 'getObjects', scope: this.scope, ids: slice }, undefined, undefined, onObjects);
      parts.push(part.then(() => undefined, (err: unknown) => void (failure ??= { err })));
    }
    await Promise.all(parts);
    if (failure !== null) throw (failure as { err: unknown }).err;
  }
  async readFile(name: string): Promise<Buffer | null> {
    return expect(await this.conn.call({ type: 'readFile', scope: this.scope, name }), 'data').data;
  }
  async listKeys(): Promise<string[]> {
    return expect(await this.conn.call({ type: 'listKeys', scope: this.scope }), 'names').names;
  }
  listObjects(): AsyncIterable<string> {
    const conn = this.conn;
    const scope = this.scope;
    return {
      [Symbol.asyncIterator]() {
        return listing(conn, scope);
      },
    };
  }
}

/**
 * The client side of a streamed listing: batches are queued as they arrive; a full batch is answered
 * with LIST_CONTINUE(true) once the consumer takes it (so at most about two batches are held), or
 * LIST_CONTINUE(false) after the consumer stopped early.
 */
async function* listing(conn: Connection, scope: Scope): AsyncGenerator<string> {
  const batches: Array<{ ids: string[]; id: number }> = [];
  let wake: (() => void) | null = null;
  let finished = false;
  let error: unknown = null;
  let cancelled = false;
  const signal = () => {
    const w = wake;
    wake = null;
    w?.();
  };
  conn
    .call({ type: 'listObjects', scope }, (ids, id) => {
      if (cancelled) {
        if (ids.length === LIST_BATCH) conn.sendContinue(id, false);
        return;
      }
      batches.push({ ids, id });
      signal();
    })
    .then(
      () => {
        finished = true;
        signal();
      },
      (err: unknown) => {
        error = err;
        finished = true;
        signal();
      },
    );
  try {
    for (;;) {
      const batch = batches.shift();
      if (batch) {
        if (batch.ids.length === LIST_BATCH) conn.sendContinue(batch.id, true);
        yield* batch.ids;
        continue;
      }
      if (finished) {
        if (error !== null) throw error;
        return;
      }
      await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    if (!finished) {
      cancelled = true;
      for (const b of batches.splice(0)) if (b.ids.length === LIST_BATCH) conn.sendContinue(b.id, false);
    }
  }
}

/** An IndexSource in parts of at most `size` bytes, each a Buffer of its own. */
async function* sourceParts(source: IndexSource, size: number): AsyncGenerator<Buffer> {
  for (let pos = 0; pos < source.length; ) {
    const n = Math.min(size, source.length - pos);
    const part = Buffer.allocUnsafe(n);
    const got = await source.read(pos, n, part);
    if (got !== part) got.copy(part);
    yield part;
    pos += n;
  }
}

export class RemoteStorage extends RemoteReader implements Storage {
  readonly location: string;

  private constructor(conn: Connection, location: string) {
    super(conn, null);
    this.location = location;
  }

  /** A session over any transport: HELLO is exchanged before this resolves. */
  static async open(transport: Transport, location: string): Promise<RemoteStorage> {
    const conn = new Connection(transport, location);
    try {
      await conn.handshake();
    } catch (err) {
      await transport.close().catch(() => undefined);
      throw err;
    }
    return new RemoteStorage(conn, location);
  }

  /** Runs cmd with args and speaks the protocol on its stdin/stdout. */
  static async spawn(cmd: string, args: string[], location: string, env?: NodeJS.ProcessEnv): Promise<RemoteStorage> {
    return RemoteStorage.open(childTransport(cmd, args, env), location);
  }

  /**
   * Connects with the system ssh to ssh://[user@]host[:port]/, whose forced command runs the server;
   * the command line comes from sshInvocation (snapcrypt's key where it exists, else plain ssh).
   */
  static async connectSsh(url: string, opts: SshInvocationOptions = {}): Promise<RemoteStorage> {
    const ssh = await sshInvocation(parseSshTarget(url), 'snapcrypt-server serve', opts);
    return RemoteStorage.spawn('ssh', ssh.args, url, ssh.env);
  }

  async exists(): Promise<boolean> {
    return expect(await this.conn.call({ type: 'exists' }), 'bool').value;
  }
  async init(config: Buffer): Promise<void> {
    expect(await this.conn.call({ type: 'init', config }), 'ok');
  }
  async writeFile(name: string, data: Buffer): Promise<void> {
    expect(await this.conn.call({ type: 'writeFile', name, data }), 'ok');
  }
  /**
   * Small objects are gathered into PUT_OBJECTS batches (a frame and an answer for many objects
   * instead of one each): a batch is sent when it holds BATCH_BYTES or MAX_PUT_OBJECTS objects, or
   * once the event loop has run what is ready while fewer than BATCHES_AHEAD batches are unanswered,
   * else when the next answer arrives. Each call resolves when the server has stored its batch. A
   * batch the server fails (at its first object that fails, after storing the ones before it) rejects
   * every call in it with that object's error, so a call may reject for an object that was stored
   * (a later put of it does nothing). Larger objects travel alone in a PUT_OBJECT.
   */
  async putObject(id: string, data: Buffer): Promise<void> {
    if (data.length > BATCH_OBJECT_MAX) {
      expect(await this.conn.call({ type: 'putObject', id, data }), 'ok');
      return;
    }
    checkedId(id); // refused before anything is sent, and without failing the others of the batch
    const batch = (this.batch ??= { objects: [], bytes: 0, waiters: [] });
    const stored = new Promise<void>((resolve, reject) => batch.waiters.push({ resolve, reject }));
    batch.objects.push({ id, data });
    batch.bytes += data.length;
    if (batch.bytes >= BATCH_BYTES || batch.objects.length >= MAX_PUT_OBJECTS) this.sendBatch();
    else this.scheduleBatch();
    return stored;
  }

  private batch: PutBatch | null = null;
  /** PUT_OBJECTS requests sent and not answered yet. */
  private readonly batchesSent = new Set<Promise<void>>();
  private batchScheduled = false;

  /** Sends the batch once the event loop has run what is ready, unless BATCHES_AHEAD are unanswered. */
  private scheduleBatch(): void {
    if (this.batchScheduled || this.batch === null || this.batchesSent.size >= BATCHES_AHEAD) return;
    this.batchScheduled = true;
    setImmediate(() => {
      this.batchScheduled = false;
      if (this.batchesSent.size < BATCHES_AHEAD) this.sendBatch();
    });
  }

  private sendBatch(): void {
    const batch = this.batch;
    if (batch === null) return;
    this.batch = null;
    let sent!: Promise<void>;
    sent = (async () => {
      try {
        expect(await this.conn.call({ type: 'putObjects', objects: batch.objects }), 'ok');
        for (const w of batch.waiters) w.resolve();
      } catch (err) {
        for (const w of batch.waiters) w.reject(err);
      } finally {
        this.batchesSent.delete(sent); // (after an await: sent is assigned)
        this.scheduleBatch();
      }
    })();
    this.batchesSent.add(sent);
  }

  /**
   * The index travels in INDEX_PART frames of INDEX_PART_BYTES (at most INDEX_PARTS_IN_FLIGHT
   * unanswered), then COMMIT names its length. After a failed part no more parts are sent; the COMMIT
   * then names what was sent, and the server answers it with that failure without committing.
   */
  async commit(head: Buffer, index: IndexBytes | IndexSource): Promise<SnapshotInfo> {
    const source = isIndexSource(index) ? index : null;
    const length = source ? source.length : indexLength(index as IndexBytes);
    if (source ? length % ID_BYTES !== 0 : indexParts(index as IndexBytes).some((p) => p.length % ID_BYTES !== 0)) {
      throw new SnapError('integrity', `Cannot commit to ${this.location}: index of ${length} bytes is not a whole number of 32-byte ids`);
    }
    if (length > MAX_INDEX_BYTES) {
      throw new SnapError('usage', `Cannot commit to ${this.location}: ${length / ID_BYTES} objects exceed the protocol's limit of ${MAX_INDEX_BYTES / ID_BYTES}`);
    }
    let failure: unknown = null;
    const inFlight: Promise<void>[] = [];
    let sent = 0;
    // an IndexSource is read one part at a time, each into memory of its own (a part in flight holds it)
    const wholes: Iterable<Buffer> | AsyncIterable<Buffer> = source ? sourceParts(source, INDEX_PART_BYTES) : indexParts(index as IndexBytes);
    for await (const whole of wholes) {
      for (let at = 0; at < whole.length && failure === null; ) {
        if (inFlight.length >= INDEX_PARTS_IN_FLIGHT) {
          await inFlight.shift();
          continue;
        }
        const ids = whole.subarray(at, Math.min(whole.length, at + INDEX_PART_BYTES));
        const part = this.conn.callInOrder({ type: 'indexPart', offset: sent, ids });
        inFlight.push(part.then((res) => void expect(res, 'ok'), (err: unknown) => void (failure ??= err)));
        sent += ids.length;
        at += ids.length;
      }
    }
    const committed = this.conn.callInOrder({ type: 'commit', head, indexLength: sent });
    await Promise.all(inFlight);
    if (failure !== null) {
      await committed.catch(() => undefined);
      throw failure;
    }
    return expect(await committed, 'snapshot').info;
  }
  async listSnapshots(): Promise<SnapshotInfo[]> {
    return expect(await this.conn.call({ type: 'listSnapshots' }), 'snapshots').infos;
  }
  async openSnapshot(name: string): Promise<ObjectReader> {
    expect(await this.conn.call({ type: 'openSnapshot', name }), 'ok');
    return new RemoteReader(this.conn, name);
  }
  async lock(owner: string): Promise<Lock> {
    const token = expect(await this.conn.call({ type: 'lock', owner }), 'lockToken').token;
    let released = false;
    return {
      release: async () => {
        if (released) return;
        released = true;
        expect(await this.conn.call({ type: 'unlock', token }), 'ok');
      },
    };
  }
  async close(): Promise<void> {
    // objects still gathered or on their way are stored (or fail) before BYE
    this.sendBatch();
    while (this.batchesSent.size > 0) await Promise.allSettled([...this.batchesSent]);
    await this.conn.close();
  }
}
