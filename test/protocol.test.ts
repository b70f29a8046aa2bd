/**
 * The wire protocol: codec round trips, the frame decoder's limits, and a fuzz test of the server loop
 * (random and mutated frames) that must always end with a valid answer or one ERROR frame, within a
 * time limit, without touching anything outside the area.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { join, relative } from 'node:path';
import { PassThrough } from 'node:stream';
import { describe, it, mock } from 'node:test';
import { ExitStatus, SnapError, isSnapError } from '../src/core/errors.js';
import {
  FrameReader,
  LIST_BATCH,
  MAX_FRAME_LENGTH,
  MAX_INDEX_BYTES,
  MAX_INDEX_PART,
  MAX_PAYLOAD,
  MAX_PUT_OBJECTS,
  Msg,
  PROTOCOL_VERSION,
  decodeError,
  decodeHello,
  decodeHelloOk,
  decodeRequest,
  decodeResponse,
  encodeError,
  encodeFrame,
  encodeHello,
  encodeHelloOk,
  encodeRequest,
  encodeResponse,
} from '../src/core/protocol.js';
import type { Frame, ObjectToPut, Request, Response } from '../src/core/protocol.js';
import { FrameDecoder } from './frame-decoder.js';
import { RemoteStorage } from '../src/drivers/ssh.js';
import { parseSshTarget, sshIdentity, sshInvocation } from '../src/drivers/sshkeys.js';
import { LocalDirStorage } from '../src/drivers/localdir.js';
import { serve, type ReusedBufferInput, type ServeOptions } from '../src/server/serve.js';
import type { UploadLimits } from '../src/server/limits.js';
import type { Storage } from '../src/storage/types.js';
import { tempDir } from './env.js';
import { inProcessRemote } from './in-process-remote.js';

function bytesOf(parts: Buffer[]): Buffer {
  return Buffer.concat(parts);
}

function u32be(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}

/** Frames parsed from bytes (through the decoder, fed in pieces of `step` bytes). */
function frames(bytes: Buffer, step = bytes.length || 1): Frame[] {
  const d = new FrameDecoder();
  const out: Frame[] = [];
  for (let i = 0; i < bytes.length; i += step) out.push(...d.push(bytes.subarray(i, i + step)));
  assert.ok(d.atBoundary);
  return out;
}

const ID = 'ab'.repeat(32);
const SNAP = '2026-11-26T23:15:02.123Z';

const requests: Request[] = [
  { type: 'exists' },
  { type: 'init', config: Buffer.from('config') },
  { type: 'readFile', scope: null, name: 'config' },
  { type: 'readFile', scope: SNAP, name: 'keys/main' },
  { type: 'writeFile', name: 'keys/a.b', data: Buffer.from('key') },
  { type: 'listKeys', scope: null },
  { type: 'listKeys', scope: SNAP },
  { type: 'listObjects', scope: SNAP },
  { type: 'getObject', scope: null, id: ID },
  { type: 'getObject', scope: SNAP, id: ID },
  { type: 'getObjects', scope: null, ids: [ID] },
  { type: 'getObjects', scope: SNAP, ids: Array.from({ length: 1024 }, (_, i) => i.toString(16).padStart(64, '0')) },
  { type: 'putObject', id: ID, data: Buffer.alloc(1000, 3) },
  { type: 'putObject', id: ID, data: Buffer.alloc(0) },
  { type: 'putObjects', objects: [{ id: ID, data: Buffer.alloc(1000, 3) }, { id: 'cd'.repeat(32), data: Buffer.alloc(0) }, { id: ID, data: Buffer.alloc(1000, 3) }] },
  { type: 'putObjects', objects: Array.from({ length: MAX_PUT_OBJECTS }, (_, i) => ({ id: i.toString(16).padStart(64, '0'), data: Buffer.alloc(i % 5, i & 0xff) })) },
  { type: 'indexPart', offset: 0, ids: Buffer.from(ID, 'hex') },
  { type: 'indexPart', offset: MAX_INDEX_BYTES - 64, ids: Buffer.alloc(64, 1) },
  { type: 'commit', head: Buffer.from(`${ID}\n`), indexLength: 32 },
  { type: 'commit', head: Buffer.from(`${ID}\n`), indexLength: MAX_INDEX_BYTES },
  { type: 'commit', head: Buffer.alloc(0), indexLength: 0 },
  { type: 'listSnapshots' },
  { type: 'openSnapshot', name: SNAP },
  { type: 'lock', owner: 'backup of ~ on laptop ✓' },
  { type: 'unlock', token: 0xfffffffe },
];

const responses: Response[] = [
  { type: 'ok' },
  { type: 'bool', value: true },
  { type: 'bool', value: false },
  { type: 'data', data: null },
  { type: 'data', data: Buffer.alloc(0) },
  { type: 'data', data: Buffer.from('bytes') },
  { type: 'names', names: ['a', 'b.key'] },
  { type: 'names', names: [] },
  { type: 'ids', ids: [ID, 'cd'.repeat(32)] },
  { type: 'listEnd' },
  { type: 'snapshot', info: { name: SNAP, time: Date.parse(SNAP) } },
  { type: 'snapshots', infos: [{ name: SNAP, time: Date.parse(SNAP) }, { name: '2027-01-01T00:00:00.000Z', time: 5 }] },
  { type: 'lockToken', token: 7 },
  { type: 'objects', first: 0, objects: [Buffer.from('one'), null, Buffer.alloc(0)] },
  { type: 'objects', first: 1023, objects: [null] },
];

describe('protocol codec', () => {
  it('every request survives encode, framing (byte by byte) and decode', () => {
    for (const req of requests) {
      const { type, payload } = encodeRequest(req);
      const [f, ...rest] = frames(bytesOf(encodeFrame(type, 42, payload)), 1);
      assert.equal(rest.length, 0);
      assert.equal(f!.id, 42);
      assert.deepEqual(decodeRequest(f!), req);
    }
  });

  it('the largest index part fits one frame', () => {
    const req: Request = { type: 'indexPart', offset: MAX_INDEX_BYTES - MAX_INDEX_PART, ids: Buffer.alloc(MAX_INDEX_PART, 1) };
    const { type, payload } = encodeRequest(req);
    const [f] = frames(bytesOf(encodeFrame(type, 7, payload)));
    assert.deepEqual(decodeRequest(f!), req);
  });

  it('every response survives encode and decode', () => {
    for (const res of responses) {
      const { type, payload } = encodeResponse(res);
      const [f] = frames(bytesOf(encodeFrame(type, 0xffffffff, payload)), 7);
      assert.deepEqual(decodeResponse(f!), res);
    }
  });

  it('hello, hello-ok and error round trip', () => {
    const [h] = frames(bytesOf(encodeFrame(Msg.HELLO, 1, encodeHello({ version: 1, wish: 'serve' }))));
    assert.deepEqual(decodeHello(h!.payload), { version: 1, wish: 'serve' });
    const ok = { version: 1, maxFrameLength: MAX_FRAME_LENGTH, maxInFlight: 64 };
    assert.deepEqual(decodeHelloOk(bytesOf(encodeHelloOk(ok))), ok);
    const e = { code: 'locked' as const, message: 'Repository is locked by "x"', hint: 'delete it' };
    assert.deepEqual(decodeError(bytesOf(encodeError(e))), e);
    assert.deepEqual(decodeError(bytesOf(encodeError({ ...e, hint: undefined }))), { ...e, hint: undefined });
    const long = decodeError(bytesOf(encodeError({ code: 'io', message: 'é'.repeat(5000), hint: undefined })));
    assert.ok(Buffer.byteLength(long.message) <= 4096);
  });

  it('invalid arguments are refused with usage before anything is sent', () => {
    const bad: Request[] = [
      { type: 'getObject', scope: null, id: ID.toUpperCase() },
      { type: 'putObject', id: '../x', data: Buffer.alloc(1) },
      { type: 'putObjects', objects: [] },
      { type: 'putObjects', objects: Array.from({ length: MAX_PUT_OBJECTS + 1 }, () => ({ id: ID, data: Buffer.alloc(0) })) },
      { type: 'putObjects', objects: [{ id: ID, data: Buffer.alloc(1) }, { id: ID.toUpperCase(), data: Buffer.alloc(1) }] },
      { type: 'readFile', scope: null, name: '../config' },
      { type: 'writeFile', name: 'keys/a/b', data: Buffer.alloc(1) },
      { type: 'listKeys', scope: '2026-02-30T00:00:00.000Z' },
      { type: 'openSnapshot', name: '..' },
      { type: 'indexPart', offset: 0, ids: Buffer.alloc(0) },
      { type: 'indexPart', offset: 0, ids: Buffer.alloc(33) },
      { type: 'indexPart', offset: 16, ids: Buffer.alloc(32) },
      { type: 'indexPart', offset: 0, ids: Buffer.alloc(MAX_INDEX_PART + 32) },
      { type: 'indexPart', offset: MAX_INDEX_BYTES, ids: Buffer.alloc(32) },
      { type: 'commit', head: Buffer.alloc(65), indexLength: 33 },
      { type: 'commit', head: Buffer.alloc(65), indexLength: MAX_INDEX_BYTES + 32 },
    ];
    for (const req of bad) assert.throws(() => encodeRequest(req), (err: unknown) => isSnapError(err, 'usage'));
    assert.throws(() => encodeFrame(Msg.PUT_OBJECT, 1, [Buffer.alloc(MAX_PAYLOAD + 1)]), (err: unknown) => isSnapError(err, 'usage'));
  });

  it('malformed payloads are protocol errors', () => {
    const proto = (err: unknown) => isSnapError(err, 'protocol');
    const f = (type: number, payload: Buffer): Frame => ({ type, id: 1, payload });
    assert.throws(() => decodeRequest(f(0x7f, Buffer.alloc(0))), proto);
    assert.throws(() => decodeRequest(f(Msg.EXISTS, Buffer.alloc(1))), proto);
    assert.throws(() => decodeRequest(f(Msg.GET_OBJECT, Buffer.alloc(32))), proto); // scope length 0, 31 id bytes
    assert.throws(() => decodeRequest(f(Msg.READ_FILE, Buffer.from([0, 9, ...Buffer.from('../config')]))), proto);
    assert.throws(() => decodeRequest(f(Msg.READ_FILE, Buffer.from([0, 6, 0x63, 0x6f, 0x6e, 0x66, 0xff, 0x67]))), proto);
    assert.throws(() => decodeRequest(f(Msg.COMMIT, Buffer.from([0, 0, 1, 0]))), proto); // u64 index length cut short
    const u64 = (v: number | bigint) => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(BigInt(v));
      return b;
    };
    assert.throws(() => decodeRequest(f(Msg.COMMIT, Buffer.concat([u64(33), Buffer.from(`${ID}\n`)]))), proto); // not whole ids
    assert.throws(() => decodeRequest(f(Msg.COMMIT, Buffer.concat([u64(MAX_INDEX_BYTES + 32), Buffer.from(`${ID}\n`)]))), proto);
    assert.throws(() => decodeRequest(f(Msg.COMMIT, Buffer.concat([u64(2n ** 64n - 1n)]))), proto);
    assert.throws(() => decodeRequest(f(Msg.INDEX_PART, u64(0))), proto); // no ids
    assert.throws(() => decodeRequest(f(Msg.INDEX_PART, Buffer.concat([u64(0), Buffer.alloc(31)]))), proto);
    assert.throws(() => decodeRequest(f(Msg.INDEX_PART, Buffer.concat([u64(8), Buffer.alloc(32)]))), proto);
    assert.throws(() => decodeRequest(f(Msg.INDEX_PART, Buffer.concat([u64(MAX_INDEX_BYTES), Buffer.alloc(32)]))), proto);
    assert.throws(() => decodeRequest(f(Msg.INDEX_PART, Buffer.concat([u64(0), Buffer.alloc(MAX_INDEX_PART + 32)]))), proto);
    assert.deepEqual(decodeRequest(f(Msg.COMMIT, u64(64))), { type: 'commit', head: Buffer.alloc(0), indexLength: 64 });
    // PUT_OBJECTS: 1 .. MAX_PUT_OBJECTS whole entries (id, u32 length, bytes)
    const entry = (len: number, have = len) => Buffer.concat([Buffer.from(ID, 'hex'), u32be(len), Buffer.alloc(have)]);
    assert.throws(() => decodeRequest(f(Msg.PUT_OBJECTS, Buffer.alloc(0))), proto);
    assert.throws(() => decodeRequest(f(Msg.PUT_OBJECTS, entry(10, 9))), proto); // cut short
    assert.throws(() => decodeRequest(f(Msg.PUT_OBJECTS, Buffer.concat([entry(3), Buffer.alloc(35)]))), proto); // a cut entry head
    assert.throws(() => decodeRequest(f(Msg.PUT_OBJECTS, Buffer.concat(Array.from({ length: MAX_PUT_OBJECTS + 1 }, () => entry(0))))), proto);
    const most = decodeRequest(f(Msg.PUT_OBJECTS, Buffer.concat(Array.from({ length: MAX_PUT_OBJECTS }, () => entry(1)))));
    assert.equal(most.type === 'putObjects' && most.objects.length, MAX_PUT_OBJECTS);
    assert.throws(() => decodeResponse(f(Msg.BOOL, Buffer.from([2]))), proto);
    assert.throws(() => decodeResponse(f(Msg.ID_BATCH, Buffer.alloc(33))), proto);
    assert.throws(() => decodeResponse(f(Msg.NAMES, Buffer.from([0xff, 0xff, 0xff, 0xff]))), proto);
    assert.throws(() => decodeHello(Buffer.from('snapcrypX\0\x01\0')), proto);
  });

  it('the decoder refuses a too long or too short frame as soon as its length is in, and stays failed', () => {
    for (const len of [MAX_FRAME_LENGTH + 1, 0xffffffff, 0, 4]) {
      const d = new FrameDecoder();
      const head = Buffer.alloc(4);
      head.writeUInt32BE(len);
      assert.deepEqual(d.push(head.subarray(0, 3)), []);
      assert.throws(() => d.push(head.subarray(3)), (err: unknown) => isSnapError(err, 'protocol'));
      assert.equal(d.buffered, 0);
      assert.throws(() => d.push(Buffer.alloc(10)), (err: unknown) => isSnapError(err, 'protocol'));
    }
    const d = new FrameDecoder();
    const head = Buffer.alloc(4);
    head.writeUInt32BE(MAX_FRAME_LENGTH);
    assert.deepEqual(d.push(head), []); // the largest frame is accepted, and nothing is allocated for it yet
    assert.equal(d.buffered, 4);
  });

  it('the copying reader gives the same frames whatever the pieces, keeps none of their bytes, and waits for memory', () => {
    const all = Buffer.concat([
      ...requests.map((r, i) => {
        const { type, payload } = encodeRequest(r);
        return bytesOf(encodeFrame(type, i + 1, payload));
      }),
      bytesOf(encodeFrame(Msg.PUT_OBJECT, 99, [Buffer.from(ID, 'hex'), Buffer.alloc(200_000, 7)])),
    ]);
    const expected = frames(all);
    for (const step of [1, 2, 5, 9, 64, 4096, all.length]) {
      const r = new FrameReader((_type, n) => Buffer.alloc(n));
      const out: Frame[] = [];
      const lent = Buffer.alloc(step);
      for (let pos = 0; pos < all.length; pos += step) {
        const n = all.copy(lent, 0, pos, pos + step);
        assert.equal(r.read(lent.subarray(0, n), out), n);
        lent.fill(0xee); // the bytes were only lent for the call
      }
      assert.ok(r.atBoundary);
      assert.deepEqual(out, expected, `pieces of ${step} bytes`);
    }
    // alloc refuses: read() stops right after the header and goes on once memory is given
    let allow = false;
    const r = new FrameReader((_type, n) => (allow || n === 0 ? Buffer.alloc(n) : null));
    const out: Frame[] = [];
    const two = Buffer.concat([bytesOf(encodeFrame(Msg.EXISTS, 1, [])), bytesOf(encodeFrame(Msg.PUT_OBJECT, 2, [Buffer.alloc(40, 1)]))]);
    // a frame without payload needs no memory; the second waits after its 9 header bytes
    assert.equal(r.read(two, out), 9 + 9);
    assert.ok(r.waiting && !r.atBoundary);
    assert.equal(out.length, 1);
    assert.equal(r.read(two.subarray(18), out), 0);
    allow = true;
    assert.equal(r.read(two.subarray(18), out), 40);
    assert.ok(r.atBoundary && !r.waiting);
    assert.deepEqual(out, frames(two));
    // oneFrame: read() returns once a frame is complete (the caller reuses its memory for the next)
    const one = new FrameReader((_type, n) => Buffer.alloc(n));
    const got: Frame[] = [];
    assert.equal(one.read(two, got, true), 9);
    assert.equal(got.length, 1);
    assert.equal(one.read(two.subarray(9), got, true), 9 + 40);
    assert.ok(one.atBoundary);
    assert.deepEqual(got, frames(two));
    // the length limits hold as for FrameDecoder
    const bad = new FrameReader((_type, n) => Buffer.alloc(n));
    const head = Buffer.alloc(4);
    head.writeUInt32BE(MAX_FRAME_LENGTH + 1);
    assert.equal(bad.read(head.subarray(0, 3), []), 3);
    assert.throws(() => bad.read(head.subarray(3), []), (err: unknown) => isSnapError(err, 'protocol'));
    assert.throws(() => bad.read(Buffer.alloc(1), []), (err: unknown) => isSnapError(err, 'protocol'));
  });
});

describe('ssh URLs', () => {
  it('parses ssh://[user@]host[:port]/ and builds a safe plain ssh command line where snapcrypt has no key', async () => {
    assert.deepEqual(parseSshTarget('ssh://alice@backup.example:2222/'), { user: 'alice', host: 'backup.example', port: 2222 });
    assert.deepEqual(parseSshTarget('ssh://h'), { user: undefined, host: 'h', port: undefined });
    assert.deepEqual(parseSshTarget('ssh://[::1]:22/'), { user: undefined, host: '::1', port: 22 });
    for (const bad of ['ssh://-oProxyCommand=x/', 'ssh://a@b/path', 'ssh://a b@c/', 'ssh://h:99999/', 'sftp://h/', 'ssh://@h/', 'ssh://-l@h/', 'ssh://[-x]/', 'ssh://h:/']) {
      assert.throws(() => parseSshTarget(bad), (err: unknown) => isSnapError(err, 'usage'), bad);
    }
    // no snapcrypt key in this configuration directory: plain ssh, even with a passphrase at hand
    const id = sshIdentity(await tempDir('no-key'));
    let asked = false;
    const passphrase = async () => ((asked = true), Buffer.from('x'));
    const inv = await sshInvocation(parseSshTarget('ssh://alice@h:22/'), 'snapcrypt-server serve', { identity: id, passphrase, extraOptions: ['-v'] });
    assert.equal(inv.snapcryptKey, false);
    assert.equal(inv.env, undefined);
    assert.equal(asked, false, 'the passphrase is not asked without a key');
    const args = inv.args;
    assert.deepEqual(args.slice(-8), ['-v', '-p', '22', '-l', 'alice', '--', 'h', 'snapcrypt-server serve']);
    assert.ok(args.includes('BatchMode=yes') && args.includes('-T') && args.includes('Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com'));
    const bare = (await sshInvocation(parseSshTarget('ssh://h'), 'snapcrypt-server serve', { identity: id })).args;
    assert.deepEqual(bare.slice(-3), ['--', 'h', 'snapcrypt-server serve']);
    assert.ok(!bare.includes('-p') && !bare.includes('-l'), 'ssh picks port and user from its configuration');
  });
});

// ---------------------------------------------------------------------------------------------------
// The server loop under fuzzing

/**
 * Objects with ids 1, 2, ... (64 hex digits) put into a storage: object i is `size(i, rnd)` bytes of
 * i & 0xff starting with i (4 bytes, when it has room), or absent when `absent(i)`. Returns the ids and
 * what each should read back (null: absent).
 */
async function putNumberedObjects(
  storage: { putObject(id: string, data: Buffer): Promise<void> }, count: number, seed: number,
  absent: (i: number) => boolean, size: (i: number, rnd: () => number) => number,
): Promise<{ ids: string[]; expected: Array<Buffer | null> }> {
  const rnd = prng(seed);
  const ids: string[] = [];
  const expected: Array<Buffer | null> = [];
  for (let i = 0; i < count; i++) {
    const id = (i + 1).toString(16).padStart(64, '0');
    ids.push(id);
    if (absent(i)) {
      expected.push(null);
      continue;
    }
    const data = Buffer.alloc(size(i, rnd), i & 0xff);
    if (data.length >= 4) data.writeUInt32BE(i, 0);
    await storage.putObject(id, data);
    expected.push(data);
  }
  return { ids, expected };
}

/** A small deterministic PRNG (mulberry32), so a failure can be reproduced from its seed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface SessionResult {
  status: number;
  out: Frame[];
}

/** Runs one server session on in-memory streams with the given input; fails after timeoutMs. */
async function session(
  storage: LocalDirStorage, input: Buffer[], opts: { end?: boolean; sshOriginalCommand?: string; limits?: UploadLimits } = {}, timeoutMs = 10_000,
): Promise<SessionResult> {
  const up = new PassThrough();
  const down = new PassThrough();
  const chunks: Buffer[] = [];
  down.on('data', (b: Buffer) => chunks.push(Buffer.from(b))); // (a copy: the server reuses its send buffers once written)
  const options: ServeOptions = {
    ...(opts.sshOriginalCommand === undefined ? {} : { sshOriginalCommand: opts.sshOriginalCommand }),
    ...(opts.limits === undefined ? {} : { limits: opts.limits }),
  };
  const served = serve(up, down, storage, options);
  for (const b of input) up.write(b);
  if (opts.end !== false) up.end();
  let timer: NodeJS.Timeout | undefined;
  const status = await Promise.race([
    served,
    new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('server session hung')), timeoutMs))),
  ]);
  clearTimeout(timer);
  await new Promise<void>((resolve) => (down.writableFinished ? resolve() : down.on('finish', () => resolve())));
  const d = new FrameDecoder();
  const out = d.push(Buffer.concat(chunks));
  assert.ok(d.atBoundary, 'the server wrote whole frames');
  return { status, out };
}

/** A LocalDirStorage with a repository, in root/area. */
async function newRepository(name: string): Promise<{ root: string; storage: LocalDirStorage }> {
  const root = await tempDir(name);
  const storage = new LocalDirStorage(join(root, 'area'));
  await storage.init(Buffer.from('c'));
  return { root, storage };
}

const HELLO = bytesOf(encodeFrame(Msg.HELLO, 1, encodeHello({ version: PROTOCOL_VERSION, wish: 'serve' })));

async function treeOf(dir: string, skip: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fsp.readdir(dir, { withFileTypes: true, recursive: true })) {
    const p = join(e.parentPath, e.name);
    if (p === skip || p.startsWith(`${skip}/`)) continue;
    out.push(relative(dir, p));
  }
  return out.sort();
}

describe('server loop', () => {
  it('answers pipelined requests by id and ends cleanly after BYE', async () => {
    const root = await tempDir('serve');
    const storage = new LocalDirStorage(join(root, 'area'));
    const reqs: Buffer[] = [HELLO];
    reqs.push(bytesOf(encodeFrame(Msg.EXISTS, 5, [])));
    const init = encodeRequest({ type: 'init', config: Buffer.from('c') });
    reqs.push(bytesOf(encodeFrame(init.type, 6, init.payload)));
    reqs.push(bytesOf(encodeFrame(Msg.LIST_SNAPSHOTS, 7, [])));
    reqs.push(bytesOf(encodeFrame(Msg.BYE, 8, [])));
    reqs.push(bytesOf(encodeFrame(Msg.EXISTS, 9, []))); // after BYE: ignored
    const { status, out } = await session(storage, [Buffer.concat(reqs)], { end: false });
    assert.equal(status, ExitStatus.ok);
    const byId = new Map(out.map((f) => [f.id, f]));
    assert.equal(byId.get(1)?.type, Msg.HELLO_OK);
    assert.deepEqual(decodeResponse(byId.get(5)!), { type: 'bool', value: false });
    assert.equal(byId.get(6)?.type, Msg.OK);
    assert.equal(byId.get(8)?.type, Msg.BYE_OK);
    assert.equal(byId.has(9), false);
    assert.equal(out.at(-1)?.type, Msg.BYE_OK);
  });

  it('stores objects byte for byte from a reused read buffer, with payloads larger than the arena and requests in between', async () => {
    const root = await tempDir('serve-arena');
    const storage = new LocalDirStorage(join(root, 'area'));
    await storage.init(Buffer.from('c'));
    const rnd = prng(7);
    const objects = new Map<string, Buffer>();
    const input: Buffer[] = [HELLO];
    for (let i = 0; i < 40; i++) {
      // mostly about 1 MiB (a default chunk), some small ones, and two larger than the arena (2 MiB)
      const size = i === 13 || i === 31 ? 3 * 1024 * 1024 + i : i % 5 === 0 ? 1 + Math.floor(rnd() * 5000) : 900_000 + Math.floor(rnd() * 250_000);
      const data = Buffer.alloc(size);
      for (let k = 0; k < size; k += 4096) data[k] = Math.floor(rnd() * 256);
      data.writeUInt32BE(i, 0);
      const id = (i + 1).toString(16).padStart(64, '0');
      objects.set(id, data);
      input.push(bytesOf(encodeFrame(Msg.PUT_OBJECT, 10 + i, [Buffer.from(id, 'hex'), data])));
      if (i % 7 === 0) input.push(bytesOf(encodeFrame(Msg.EXISTS, 100 + i, [])));
    }
    input.push(bytesOf(encodeFrame(Msg.BYE, 1000, [])));
    const bytes = Buffer.concat(input);

    // A fake of reusedBufferInput(): every read is lent in one buffer, overwritten after the call, and
    // only while the session has not paused the stream.
    const stream = new PassThrough();
    const lent: ReusedBufferInput = { stream, onBytes: null };
    const down = new PassThrough();
    const chunks: Buffer[] = [];
    down.on('data', (b: Buffer) => chunks.push(b));
    let finished = false;
    const served = serve(lent, down, storage).finally(() => (finished = true));
    const shared = Buffer.alloc(65_536);
    for (let pos = 0; pos < bytes.length && !finished; ) {
      if (lent.onBytes === null || stream.isPaused()) {
        await new Promise((resolve) => setImmediate(resolve));
        continue;
      }
      const n = bytes.copy(shared, 0, pos, pos + 1 + Math.floor(rnd() * shared.length));
      lent.onBytes(shared.subarray(0, n));
      shared.fill(0xee);
      pos += n;
    }
    assert.equal(await served, ExitStatus.ok);
    const out = new FrameDecoder().push(Buffer.concat(chunks));
    assert.deepEqual(out.filter((f) => f.type !== Msg.OK && f.type !== Msg.BOOL).map((f) => f.type), [Msg.HELLO_OK, Msg.BYE_OK]);
    assert.equal(out.filter((f) => f.type === Msg.OK).length, objects.size);
    for (const [id, data] of objects) assert.ok((await storage.getObject(id)).equals(data), `object ${id}`);
  });

  it('refuses a wish other than serve, a frame before HELLO, an oversized frame and a wrong version', async () => {
    const root = await tempDir('serve');
    const storage = new LocalDirStorage(join(root, 'area'));
    const huge = Buffer.alloc(4);
    huge.writeUInt32BE(MAX_FRAME_LENGTH + 1);
    const cases: Array<{ input: Buffer[]; sshOriginalCommand?: string; end?: boolean }> = [
      { input: [HELLO], sshOriginalCommand: 'rm -rf /' },
      { input: [bytesOf(encodeFrame(Msg.EXISTS, 1, []))] },
      { input: [HELLO, huge], end: false }, // no more input follows: the refusal must not wait for it
      { input: [bytesOf(encodeFrame(Msg.HELLO, 1, encodeHello({ version: 99, wish: '' })))] },
      { input: [HELLO, HELLO.subarray(0, 7)] }, // ends inside a frame
    ];
    for (const c of cases) {
      const { status, out } = await session(storage, c.input, c);
      assert.equal(status, ExitStatus.protocol);
      const last = out.at(-1)!;
      assert.equal(last.type, Msg.ERROR);
      assert.equal(last.id, 0);
      assert.ok(['protocol', 'unsupported-version'].includes(decodeError(last.payload).code));
    }
  });

  it('version 1 (the index inside COMMIT) is refused clearly, by the server and by the client', async () => {
    const root = await tempDir('serve-v1');
    const storage = new LocalDirStorage(join(root, 'area'));
    const v1 = bytesOf(encodeFrame(Msg.HELLO, 1, encodeHello({ version: 1, wish: 'serve' })));
    const { status, out } = await session(storage, [v1]);
    assert.equal(status, ExitStatus.protocol);
    const e = decodeError(out.at(-1)!.payload);
    assert.equal(e.code, 'unsupported-version');
    assert.match(e.message, /version 1 is not supported .* speaks versions 2 to 4/);
    assert.match(e.hint ?? '', /update the older one/);
    // An older server answers a newer HELLO with ERROR unsupported-version (and no hint).
    const up = new PassThrough();
    const down = new PassThrough();
    up.once('data', () => {
      for (const p of encodeFrame(Msg.ERROR, 0, encodeError({ code: 'unsupported-version', message: 'Protocol version 4 is not supported by this server (it speaks versions 2 to 3)', hint: undefined }))) down.write(p);
      down.end();
    });
    const transport = { readable: down, writable: up, describe: () => 'old server', close: async () => void up.end() };
    await assert.rejects(RemoteStorage.open(transport, 'ssh://old/'), (err: unknown) => {
      assert.ok(isSnapError(err, 'unsupported-version'), String(err));
      assert.match(err.message, /ssh:\/\/old\/: the server ended the session: Protocol version 4 is not supported/);
      assert.match(err.hint ?? '', /speaks protocol version 4: update the side that is older/);
      return true;
    });
  });

  it('GET_OBJECTS answers every object in order, whole or absent, across OBJECTS frames; GET_OBJECT too', async () => {
    const root = await tempDir('serve-get-objects');
    const storage = new LocalDirStorage(join(root, 'area'));
    await storage.init(Buffer.from('c'));
    // mostly small objects, some larger than a send buffer (256 KiB), one larger than all of them (4 MiB);
    // some never stored
    const { ids, expected } = await putNumberedObjects(storage, 300, 11, (i) => i % 17 === 5, (i, rnd) =>
      i === 150 ? 5 * 1024 * 1024 : i % 40 === 0 ? 300_000 + i : 1 + Math.floor(rnd() * 9000),
    );
    const { remote } = await inProcessRemote(storage, 'ssh://test/');
    try {
      const got: Array<Buffer | null> = [];
      await remote.getObjects(ids, (i, data) => {
        assert.equal(i, got.length, 'in order');
        got.push(data === null ? null : Buffer.from(data)); // (a view of memory reused for the next frame)
      });
      assert.equal(got.length, ids.length);
      for (const [i, data] of expected.entries()) assert.deepEqual(got[i], data, `object ${i}`);
      // more than one request's worth, concurrently with single objects
      const many = Array.from({ length: 2500 }, (_, i) => ids[i % ids.length]!);
      const seen = new Set<number>();
      const singles = Promise.all(ids.slice(0, 20).map(async (id, i) => (expected[i] ? assert.ok((await remote.getObject(id)).equals(expected[i]!)) : undefined)));
      await remote.getObjects(many, (i, data) => {
        assert.ok(!seen.has(i), `object ${i} once`); // (in order within each request of 1024)
        seen.add(i);
        assert.deepEqual(data, expected[i % ids.length]);
      });
      await singles;
      assert.equal(seen.size, many.length);
      assert.ok((await remote.getObject(ids[150]!)).equals(expected[150]!), 'a large object through GET_OBJECT');
    } finally {
      await remote.close();
    }
    // A version 2 session may not ask for it.
    const v2 = bytesOf(encodeFrame(Msg.HELLO, 1, encodeHello({ version: 2, wish: 'serve' })));
    const get = encodeRequest({ type: 'getObjects', scope: null, ids: [ids[0]!] });
    const { status, out } = await session(storage, [v2, bytesOf(encodeFrame(get.type, 2, get.payload))]);
    assert.deepEqual(decodeHelloOk(out[0]!.payload).version, 2, 'a version 2 client is served as version 2');
    assert.equal(status, ExitStatus.protocol);
    assert.equal(decodeError(out.at(-1)!.payload).code, 'protocol');
  });

  it('PUT_OBJECTS stores a batch in order (mixed sizes, empty, repeated, larger than the arena), answered by one OK', async () => {
    const { root, storage } = await newRepository('serve-put-objects');
    const rnd = prng(17);
    const expected = new Map<string, Buffer>();
    const input: Buffer[] = [HELLO];
    const object = (n: number, size: number): ObjectToPut => {
      const id = (n + 1).toString(16).padStart(64, '0');
      const data = Buffer.alloc(size, n & 0xff);
      if (size >= 4) data.writeUInt32BE(n, 0);
      expected.set(id, data);
      return { id, data };
    };
    let n = 0;
    const batches: ObjectToPut[][] = [];
    for (let b = 0; b < 6; b++) {
      const count = b === 5 ? MAX_PUT_OBJECTS : 1 + Math.floor(rnd() * 60);
      // empty objects, small ones, one of 1 MiB, and in batch 3 one of 3 MiB (the batch is larger than the 2 MiB arena)
      batches.push(Array.from({ length: count }, (_, i) => object(n++, i % 13 === 0 ? 0 : b === 3 && i === 1 ? 3 * 1024 * 1024 : i === 2 ? 1024 * 1024 : Math.floor(rnd() * 20_000))));
    }
    batches[2]!.push(batches[2]![0]!, batches[1]![1]!); // again within the batch, and from an earlier one: nothing happens
    for (const [b, objects] of batches.entries()) {
      const req = encodeRequest({ type: 'putObjects', objects });
      input.push(bytesOf(encodeFrame(req.type, 10 + b, req.payload)));
    }
    input.push(bytesOf(encodeFrame(Msg.BYE, 99, [])));
    const { status, out } = await session(storage, input);
    assert.equal(status, ExitStatus.ok);
    assert.deepEqual(out.map((f) => [f.type, f.id]), [[Msg.HELLO_OK, 1], ...batches.map((_, b) => [Msg.OK, 10 + b]), [Msg.BYE_OK, 99]]);
    for (const [id, data] of expected) {
      assert.ok((await storage.getObject(id)).equals(data), `object ${id}`);
      assert.equal((await fsp.stat(join(root, 'area', 'current', 'objects', id.slice(0, 2), id))).mode & 0o777, 0o400, 'complete objects are 0400');
    }
  });

  it('PUT_OBJECTS: the first object that fails ends its batch with that object\'s error (those before it stored, those after it not tried); quotas and the session go on', async () => {
    const { root, storage } = await newRepository('serve-put-objects-fail');
    const objects = Array.from({ length: 6 }, (_, i) => ({ id: `${i + 1}`.padStart(64, 'e'), data: Buffer.alloc(1000 + i, i) }));
    const [a, b, c, d, e, f] = objects as [ObjectToPut, ObjectToPut, ObjectToPut, ObjectToPut, ObjectToPut, ObjectToPut];
    // b is there incomplete (mode 0200), as a writer that died leaves it and only the lock's next holder removes it
    const bPath = join(root, 'area', 'current', 'objects', b.id.slice(0, 2), b.id);
    await fsp.mkdir(join(bPath, '..'), { recursive: true });
    await fsp.writeFile(bPath, 'torn', { mode: 0o200 });
    const frame = (id: number, batch: ObjectToPut[]) => {
      const req = encodeRequest({ type: 'putObjects', objects: batch });
      return bytesOf(encodeFrame(req.type, id, req.payload));
    };
    // quota: 5,000 bytes; a and d take 2,003, so the batch of e and f (2,009) fits, and then one of 1,500 does not
    const limits: UploadLimits = { label: 'the backup area of alice', quotaBytes: 5000, freeSpaceFloor: null };
    await storage.currentBytes!();
    const big = { id: '7'.padStart(64, 'e'), data: Buffer.alloc(1500, 7) };
    // (one session per step where the order matters: requests run concurrently)
    const byId = new Map<number, Frame>();
    for (const input of [[frame(5, [a, b, c]), frame(6, [d])], [frame(7, [e, f])], [frame(8, [big]), bytesOf(encodeFrame(Msg.BYE, 9, []))]]) {
      const { status, out } = await session(storage, [HELLO, ...input], { limits });
      assert.equal(status, ExitStatus.ok);
      for (const fr of out) byId.set(fr.id, fr);
    }
    const failed = decodeError(byId.get(5)!.payload);
    assert.equal(byId.get(5)!.type, Msg.ERROR);
    assert.equal(failed.code, 'io');
    assert.match(failed.message, new RegExp(`Cannot store object ${b.id} .*incomplete`));
    assert.ok((await storage.getObject(a.id)).equals(a.data), 'the object before the failed one is stored');
    await assert.rejects(storage.getObject(c.id), (err: unknown) => isSnapError(err, 'not-found'), 'the object after it was not tried');
    assert.equal(byId.get(6)!.type, Msg.OK, 'the session goes on');
    assert.equal(byId.get(7)!.type, Msg.OK);
    for (const o of [d, e, f]) assert.ok((await storage.getObject(o.id)).equals(o.data));
    const full = decodeError(byId.get(8)!.payload);
    assert.equal(full.code, 'io');
    assert.match(full.message, /The backup area of alice is full: .* of its quota of .* are used; nothing was committed/);
    await assert.rejects(storage.getObject(big.id), (err: unknown) => isSnapError(err, 'not-found'));
    assert.equal(byId.get(9)!.type, Msg.BYE_OK);
  });

  it('PUT_OBJECTS limits: more than 1024 objects or a cut entry end the session; a version 2 or 3 client is served without it', async () => {
    const { root, storage } = await newRepository('serve-put-objects-limits');
    const entry = (i: number, len: number, have = len) => Buffer.concat([Buffer.from(i.toString(16).padStart(64, '0'), 'hex'), u32be(len), Buffer.alloc(have, i)]);
    const tooMany = Buffer.concat(Array.from({ length: MAX_PUT_OBJECTS + 1 }, (_, i) => entry(i, 1)));
    for (const payload of [tooMany, Buffer.concat([entry(1, 5), entry(2, 100, 99)]), Buffer.alloc(0)]) {
      const { status, out } = await session(storage, [HELLO, bytesOf(encodeFrame(Msg.PUT_OBJECTS, 2, [payload]))]);
      assert.equal(status, ExitStatus.protocol);
      assert.deepEqual([out.at(-1)!.type, out.at(-1)!.id, decodeError(out.at(-1)!.payload).code], [Msg.ERROR, 0, 'protocol']);
    }
    assert.deepEqual(await fsp.readdir(join(root, 'area', 'current', 'objects')), [], 'nothing of a refused frame was stored');
    // Clients of versions 2 and 3 put one object per PUT_OBJECT and commit as before; PUT_OBJECTS is not theirs.
    for (const version of [2, 3]) {
      const id = (0x100 + version).toString(16).padStart(64, '0');
      const data = Buffer.alloc(500, version);
      const req = (r: Request, rid: number) => {
        const { type, payload } = encodeRequest(r);
        return bytesOf(encodeFrame(type, rid, payload));
      };
      const hello = bytesOf(encodeFrame(Msg.HELLO, 1, encodeHello({ version, wish: 'serve' })));
      // (two sessions: requests run concurrently, and the commit must come after the put)
      const put = await session(storage, [hello, req({ type: 'putObject', id, data }, 2), bytesOf(encodeFrame(Msg.BYE, 3, []))]);
      const commit = await session(storage, [
        hello,
        req({ type: 'indexPart', offset: 0, ids: Buffer.from(id, 'hex') }, 2),
        req({ type: 'commit', head: Buffer.from(`${id}\n`), indexLength: 32 }, 3),
        bytesOf(encodeFrame(Msg.BYE, 4, [])),
      ]);
      for (const ok of [put, commit]) {
        assert.equal(ok.status, ExitStatus.ok);
        assert.equal(decodeHelloOk(ok.out[0]!.payload).version, version, `a version ${version} client is served as version ${version}`);
      }
      assert.deepEqual(put.out.slice(1).map((fr) => fr.type), [Msg.OK, Msg.BYE_OK]);
      assert.deepEqual(commit.out.slice(1).map((fr) => fr.type), [Msg.OK, Msg.SNAPSHOT, Msg.BYE_OK]);
      assert.ok((await storage.getObject(id)).equals(data));
      const refused = await session(storage, [hello, req({ type: 'putObjects', objects: [{ id, data }] }, 2)]);
      assert.equal(refused.status, ExitStatus.protocol);
      assert.match(decodeError(refused.out.at(-1)!.payload).message, new RegExp(`type 0x1f in a session of protocol version ${version}`));
    }
  });

  it('the client gathers small objects into PUT_OBJECTS batches and sends large ones alone; a failed object fails its own batch only', async () => {
    const { root, storage } = await newRepository('remote-put-batches');
    const up = new PassThrough();
    const down = new PassThrough();
    const sent = new Map<number, number>(); // message type -> objects carried; -1 -> PUT_OBJECTS frames
    const tap = new FrameDecoder();
    up.on('data', (b: Buffer) => {
      for (const fr of tap.push(Buffer.from(b))) {
        if (fr.type !== Msg.PUT_OBJECT && fr.type !== Msg.PUT_OBJECTS) continue;
        const req = decodeRequest(fr);
        sent.set(fr.type, (sent.get(fr.type) ?? 0) + (req.type === 'putObjects' ? req.objects.length : 1));
        if (req.type === 'putObjects') sent.set(-1, (sent.get(-1) ?? 0) + 1); // (-1: PUT_OBJECTS frames)
      }
    });
    const served = serve(up, down, storage);
    const remote = await RemoteStorage.open({ readable: down, writable: up, describe: () => 'in-process server', close: async () => void up.end() }, 'ssh://test/');
    const rnd = prng(3);
    const objects = Array.from({ length: 3000 }, (_, i) => {
      const size = i % 300 === 7 ? 200_000 + i : Math.floor(rnd() * 6000);
      return { id: `a${i.toString(16).padStart(63, '0')}`, data: Buffer.alloc(size, i & 0xff) };
    });
    await Promise.all(objects.map((o) => remote.putObject(o.id, o.data)));
    await Promise.all(objects.slice(0, 50).map((o) => remote.putObject(o.id, o.data))); // again: nothing happens
    for (const o of objects) assert.ok((await storage.getObject(o.id)).equals(o.data));
    assert.equal(sent.get(Msg.PUT_OBJECT), 10 + 1, 'the objects above 128 KiB went alone (10, one of them twice)');
    assert.equal(sent.get(Msg.PUT_OBJECTS), 2990 + 49, 'every small object went in a batch');
    assert.ok((sent.get(-1) ?? 0) * 20 < 2990, `in batches of 20 objects or more on average (${sent.get(-1)} batches)`);
    // one batch's failure: an incomplete object fails the calls of its batch with its error, nothing else
    const torn = 'f'.repeat(64);
    await fsp.mkdir(join(root, 'area', 'current', 'objects', 'ff'), { recursive: true });
    await fsp.writeFile(join(root, 'area', 'current', 'objects', 'ff', torn), 'torn', { mode: 0o200 });
    const more = Array.from({ length: 400 }, (_, i) => ({ id: `b${i.toString(16).padStart(63, '0')}`, data: Buffer.alloc(3000, i) }));
    more.splice(200, 0, { id: torn, data: Buffer.alloc(10) });
    const results = await Promise.allSettled(more.map((o) => remote.putObject(o.id, o.data)));
    const rejected = results.flatMap((r, i) => (r.status === 'rejected' ? [{ i, err: r.reason as unknown }] : []));
    assert.ok(rejected.some((r) => r.i === 200), 'the failed object\'s call rejects');
    assert.ok(rejected.length < more.length / 2, `only its batch fails (${rejected.length} of ${more.length})`);
    for (const r of rejected) {
      assert.ok(isSnapError(r.err, 'io'), String(r.err));
      assert.match(r.err.message, new RegExp(`^ssh://test/: Cannot store object ${torn} .*incomplete`));
    }
    for (const [i, r] of results.entries()) if (r.status === 'fulfilled') assert.ok((await storage.getObject(more[i]!.id)).equals(more[i]!.data));
    await remote.putObject('c'.repeat(64), Buffer.alloc(5)); // the session goes on
    await remote.close();
    assert.equal(await served, ExitStatus.ok);
  });

  it('GET_OBJECTS read ahead answers as one by one does: every object in order, absent ones marked, a failed one ending the answer', async () => {
    const root = await tempDir('serve-read-ahead');
    const area = join(root, 'area');
    // Two storages on one area: one reads one object after the other with synchronous calls, the
    // other reads ahead on the thread pool.
    const oneByOne = new LocalDirStorage(area, { readAhead: false });
    const ahead = new LocalDirStorage(area, { readAhead: true });
    await oneByOne.init(Buffer.from('c'));
    // mostly small objects, some larger than a frame (256 KiB), some empty; absent ones alone and in a run
    const { ids, expected } = await putNumberedObjects(oneByOne, 700, 23, (i) => i % 7 === 3 || (i >= 400 && i < 420), (i, rnd) =>
      i % 97 === 0 ? 300_000 + i : i % 101 === 50 ? 0 : 1 + Math.floor(rnd() * 12_000),
    );
    const objectPath = (i: number) => join(area, 'current', 'objects', ids[i]!.slice(0, 2), ids[i]!);
    // A read that fails at open (a symlink: O_NOFOLLOW) and one that fails at read (a directory).
    await fsp.rm(objectPath(250));
    await fsp.symlink(objectPath(251), objectPath(250));
    await fsp.rm(objectPath(600));
    await fsp.mkdir(objectPath(600));
    await fsp.writeFile(join(objectPath(600), 'x'), 'x');
    const get = (id: number, wanted: readonly string[]) => {
      const r = encodeRequest({ type: 'getObjects', scope: null, ids: wanted });
      return bytesOf(encodeFrame(r.type, id, r.payload));
    };
    const requests = [HELLO, get(2, ids.slice(0, 240)), get(3, ids.slice(240, 540)), get(4, ids.slice(540, 700))];
    const answers = async (storage: LocalDirStorage) => {
      const { status, out } = await session(storage, requests);
      assert.equal(status, ExitStatus.ok);
      const by = new Map<number, Frame[]>();
      for (const f of out.slice(1)) by.set(f.id, [...(by.get(f.id) ?? []), f]);
      return [2, 3, 4].map((id) => by.get(id) ?? []);
    };
    /** What the client sees of an answer: its objects (checked against what was stored) and its ERROR, if any. */
    const seen = (frames: Frame[], first: number) => {
      const got: Array<Buffer | null> = [];
      let error: string | null = null;
      for (const f of frames) {
        assert.equal(error, null, 'nothing after an ERROR');
        if (f.type === Msg.ERROR) {
          const e = decodeError(f.payload);
          error = `${e.code}: ${e.message}`;
          continue;
        }
        const res = decodeResponse(f) as Extract<Response, { type: 'objects' }>;
        assert.equal(res.first, got.length, 'frames follow each other');
        got.push(...res.objects);
      }
      for (const [k, data] of got.entries()) assert.deepEqual(data, expected[first + k], `object ${first + k}`);
      return { count: got.length, error };
    };
    const open = mock.method(fs, 'open');
    try {
      const views = [];
      for (const storage of [oneByOne, ahead]) {
        const calls = open.mock.callCount();
        const [whole, failedAtOpen, failedAtRead] = (await answers(storage)) as [Frame[], Frame[], Frame[]];
        if (storage === oneByOne) assert.equal(open.mock.callCount(), calls, 'one by one: synchronous calls only');
        else assert.ok(open.mock.callCount() - calls > 300, 'read ahead: objects opened on the thread pool');
        assert.deepEqual(seen(whole, 0), { count: 240, error: null });
        // Up to the frame before the failed object, then ERROR io (where frames are cut depends on the
        // sizes of the reused send buffers, so the count may differ).
        const view = [];
        for (const [frames, first, failed] of [[failedAtOpen, 240, 250], [failedAtRead, 540, 600]] as const) {
          const { count, error } = seen(frames, first);
          assert.ok(count < failed - first, `objects after the failed one's frame are not sent (${count})`);
          assert.match(error ?? '', new RegExp(`^io: Cannot read object ${ids[failed]}`));
          view.push(error);
          if (failed === 600) assert.ok(count > 0, 'frames before the failed object are sent');
        }
        views.push(view);
      }
      assert.deepEqual(views[1], views[0], 'the same errors');
    } finally {
      open.mock.restore();
    }
  });

  it('a listing waiting for LIST_CONTINUE ends with the input, and streams batches on CONTINUE', async () => {
    const root = await tempDir('serve-list');
    const area = join(root, 'area');
    const storage = new LocalDirStorage(area);
    await storage.init(Buffer.from('c'));
    const total = LIST_BATCH + 10;
    for (let i = 0; i < total; i++) {
      const id = i.toString(16).padStart(64, '0');
      await fsp.mkdir(join(area, 'current', 'objects', id.slice(0, 2)), { recursive: true });
      await fsp.writeFile(join(area, 'current', 'objects', id.slice(0, 2), id), 'x');
    }
    const list = bytesOf(encodeFrame(Msg.LIST_OBJECTS, 3, [Buffer.from([0])]));
    // No LIST_CONTINUE, then end of input: the session must still end.
    const a = await session(storage, [HELLO, list]);
    assert.equal(a.status, ExitStatus.ok);
    assert.deepEqual(a.out.map((f) => f.type), [Msg.HELLO_OK, Msg.ID_BATCH, Msg.LIST_END]);
    // With a LIST_CONTINUE(1) after the first batch, every id arrives.
    const more = bytesOf(encodeFrame(Msg.LIST_CONTINUE, 3, [Buffer.from([1])]));
    const up = new PassThrough();
    const down = new PassThrough();
    const decoder = new FrameDecoder();
    const got: Frame[] = [];
    let sentMore = false;
    down.on('data', (chunk: Buffer) => {
      for (const f of decoder.push(chunk)) {
        got.push(f);
        if (f.type === Msg.ID_BATCH && !sentMore) {
          sentMore = true;
          up.write(more); // the answer to the first (full) batch
        }
        if (f.type === Msg.LIST_END) up.end();
      }
    });
    up.write(Buffer.concat([HELLO, list]));
    assert.equal(await serve(up, down, storage), ExitStatus.ok);
    const ids = got.filter((f) => f.type === Msg.ID_BATCH).flatMap((f) => (decodeResponse(f) as { ids: string[] }).ids);
    assert.equal(new Set(ids).size, total);
    assert.equal(got.at(-1)?.type, Msg.LIST_END);
    // A LIST_CONTINUE nobody waits for is a protocol error.
    const c = await session(storage, [HELLO, more]);
    assert.equal(c.status, ExitStatus.protocol);
  });

  it('the index travels in INDEX_PARTs before its COMMIT; a broken index stream is a protocol error that leaves nothing behind', async () => {
    const root = await tempDir('serve-index');
    const area = join(root, 'area');
    const storage = new LocalDirStorage(area);
    await storage.init(Buffer.from('c'));
    const blobs = ['a', 'b', 'c'].map((x) => Buffer.from(x));
    const ids = blobs.map((b, i) => (i + 1).toString(16).padStart(2, '0').repeat(32));
    for (const [i, id] of ids.entries()) await storage.putObject(id, blobs[i]!);
    const index = Buffer.concat(ids.map((id) => Buffer.from(id, 'hex')));
    const head = Buffer.from(`${ids[0]}\n`);
    const req = (r: Request, id: number) => {
      const { type, payload } = encodeRequest(r);
      return bytesOf(encodeFrame(type, id, payload));
    };
    const part = (offset: number, end: number, id: number) => req({ type: 'indexPart', offset, ids: index.subarray(offset, end) }, id);
    const commit = (indexLength: number, id: number) => req({ type: 'commit', head, indexLength }, id);
    const bye = bytesOf(encodeFrame(Msg.BYE, 99, []));
    /** No staged index left: no temp file in the area, no open file of a deleted one in this process. */
    const nothingLeft = async () => {
      assert.deepEqual((await fsp.readdir(area)).filter((n) => n.startsWith('.tmp-')), []);
      const fds = await fsp.readdir('/proc/self/fd');
      const targets = await Promise.all(fds.map((fd) => fsp.readlink(`/proc/self/fd/${fd}`).catch(() => '')));
      assert.deepEqual(targets.filter((t) => t.includes('.tmp-index-')), []);
    };

    // In order: two parts, the COMMIT naming their total, BYE.
    const ok = await session(storage, [HELLO, part(0, 64, 2), part(64, 96, 3), commit(96, 4), bye]);
    assert.equal(ok.status, ExitStatus.ok);
    const byId = new Map(ok.out.map((f) => [f.id, f]));
    assert.equal(byId.get(2)?.type, Msg.OK);
    assert.equal(byId.get(3)?.type, Msg.OK);
    const snap = decodeResponse(byId.get(4)!);
    assert.equal(snap.type, 'snapshot');
    assert.deepEqual(await storage.readFile('index'), index);
    assert.equal(ok.out.at(-1)?.type, Msg.BYE_OK);
    await nothingLeft();

    const broken: Array<{ what: string; input: Buffer[]; end?: boolean }> = [
      { what: 'a part out of order', input: [HELLO, part(32, 96, 2), commit(64, 3)] },
      { what: 'a part sent twice', input: [HELLO, part(0, 64, 2), part(0, 64, 3), commit(64, 4)] },
      { what: 'a COMMIT naming more than was sent', input: [HELLO, part(0, 64, 2), commit(96, 3)] },
      { what: 'a COMMIT naming less than was sent', input: [HELLO, part(0, 96, 2), commit(64, 3)] },
      { what: 'a COMMIT without parts', input: [HELLO, commit(96, 2)] },
      { what: 'parts, then BYE', input: [HELLO, part(0, 96, 2), bye] },
      { what: 'parts, then the end of input', input: [HELLO, part(0, 64, 2), part(64, 96, 3)] },
      { what: 'the end of input inside a part', input: [HELLO, part(0, 64, 2), part(64, 96, 3).subarray(0, 20)] },
    ];
    for (const c of broken) {
      const { status, out } = await session(storage, c.input);
      assert.equal(status, ExitStatus.protocol, c.what);
      const last = out.at(-1)!;
      assert.equal(last.type, Msg.ERROR, c.what);
      assert.equal(last.id, 0, c.what);
      assert.equal(decodeError(last.payload).code, 'protocol', c.what);
      assert.ok(!out.some((f) => f.type === Msg.SNAPSHOT || f.type === Msg.BYE_OK), c.what);
      assert.deepEqual(await storage.listSnapshots(), [(snap as { info: { name: string; time: number } }).info], c.what);
      await nothingLeft();
    }
  });

  it('a part that cannot be staged fails the parts after it and its COMMIT; the session goes on', async () => {
    const root = await tempDir('serve-stage-fail');
    const dir = join(root, 'repo');
    const local = new LocalDirStorage(dir);
    let appends = 0;
    let failing = true;
    const storage = Object.assign(Object.create(local) as LocalDirStorage, {
      async stageIndex() {
        const staged = await local.stageIndex();
        return {
          get length() {
            return staged.length;
          },
          append: async (ids: Buffer) => {
            if (failing && ++appends === 2) throw new SnapError('io', 'disk full (test)');
            await staged.append(ids);
          },
          commit: (head: Buffer) => staged.commit(head),
          discard: () => staged.discard(),
        };
      },
    });
    const { remote, served } = await inProcessRemote(storage, dir);
    await remote.init(Buffer.from('c'));
    const blob = Buffer.from('x');
    const small = 'ab'.repeat(32);
    await remote.putObject(small, blob);
    // 150,000 ids (4.6 MB): more than one part; the second part fails before anything is committed
    const big = Buffer.alloc(150_000 * 32);
    for (let i = 0; i < 150_000; i++) big.writeUInt32BE(i, i * 32);
    await assert.rejects(remote.commit(Buffer.from(`${'00'.repeat(32)}\n`), big), (err: unknown) => isSnapError(err, 'io') && /disk full/.test(err.message));
    assert.deepEqual(await remote.listSnapshots(), []);
    failing = false;
    const info = await remote.commit(Buffer.from(`${small}\n`), Buffer.from(small, 'hex'));
    assert.deepEqual(await remote.listSnapshots(), [info]);
    await remote.close();
    assert.equal(await served, ExitStatus.ok);
    assert.deepEqual((await fsp.readdir(dir)).filter((n) => n.startsWith('.tmp-')), []);
  });

  it('a Storage without stageIndex receives the index in memory', async () => {
    const root = await tempDir('serve-memory-stage');
    const dir = join(root, 'repo');
    const local = new LocalDirStorage(dir);
    const storage: Storage = Object.assign(Object.create(local) as LocalDirStorage, { stageIndex: undefined });
    assert.equal(storage.stageIndex, undefined);
    const { remote, served } = await inProcessRemote(storage, dir);
    await remote.init(Buffer.from('c'));
    const id = 'cd'.repeat(32);
    await remote.putObject(id, Buffer.from('y'));
    const info = await remote.commit(Buffer.from(`${id}\n`), Buffer.from(id, 'hex'));
    assert.deepEqual(await remote.listSnapshots(), [info]);
    await remote.close();
    assert.equal(await served, ExitStatus.ok);
  });

  it('fuzz: 10,000 random and mutated frames always end in answers or one ERROR frame, inside the area', async () => {
    const root = await tempDir('fuzz');
    const area = join(root, 'area');
    await fsp.writeFile(join(root, 'outside'), 'x');
    const storage = new LocalDirStorage(area);
    await storage.init(Buffer.from('config'));
    const before = await treeOf(root, area);
    const rnd = prng(20261126);
    const int = (n: number) => Math.floor(rnd() * n);
    const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
    const names = ['config', 'head', 'index', 'keys/a', 'keys/..', '../x', 'keys/x/../../y', '/etc/passwd', 'current/config', ''];
    const snaps = [null, SNAP, '../current', '2026-11-26T23:15:02.123Z/..', ''];
    const ids = [ID, 'cd'.repeat(32), '00'.repeat(32)];
    const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;

    const u64 = (v: number) => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(BigInt(v));
      return b;
    };

    /** A request frame, valid or with invalid fields encoded by hand. */
    function request(id: number): Buffer {
      const kind = int(18);
      const text = (s: string) => Buffer.concat([Buffer.from([Buffer.byteLength(s)]), Buffer.from(s)]);
      const scope = () => text(pick(snaps) ?? '');
      switch (kind) {
        case 0: return bytesOf(encodeFrame(Msg.EXISTS, id, []));
        case 1: return bytesOf(encodeFrame(Msg.INIT, id, [bytes(int(20))]));
        case 2: return bytesOf(encodeFrame(Msg.READ_FILE, id, [scope(), text(pick(names))]));
        case 3: return bytesOf(encodeFrame(Msg.WRITE_FILE, id, [text(pick(names)), bytes(int(50))]));
        case 4: return bytesOf(encodeFrame(Msg.LIST_KEYS, id, [scope()]));
        case 5: return bytesOf(encodeFrame(Msg.LIST_OBJECTS, id, [scope()]));
        case 6: return bytesOf(encodeFrame(Msg.GET_OBJECT, id, [scope(), Buffer.from(pick(ids), 'hex')]));
        case 7: return bytesOf(encodeFrame(Msg.PUT_OBJECT, id, [rnd() < 0.5 ? Buffer.from(pick(ids), 'hex') : bytes(32), bytes(int(300))]));
        case 8: {
          // the index in one or two INDEX_PARTs, then its COMMIT (sometimes naming another length)
          const head = Buffer.from(`${pick(ids)}\n`);
          const index = Buffer.concat([...new Set([pick(ids), pick(ids)])].sort().map((x) => Buffer.from(x, 'hex')));
          const split = index.length > 32 && rnd() < 0.5 ? 32 : index.length;
          const out = [bytesOf(encodeFrame(Msg.INDEX_PART, id, [u64(0), index.subarray(0, split)]))];
          if (split < index.length) out.push(bytesOf(encodeFrame(Msg.INDEX_PART, id + 50, [u64(split), index.subarray(split)])));
          out.push(bytesOf(encodeFrame(Msg.COMMIT, id + 100, [u64(rnd() < 0.9 ? index.length : 32 * int(3)), head])));
          return Buffer.concat(out);
        }
        case 9: return bytesOf(encodeFrame(Msg.LIST_SNAPSHOTS, id, []));
        case 10: return bytesOf(encodeFrame(Msg.OPEN_SNAPSHOT, id, [scope()]));
        case 11: return bytesOf(encodeFrame(Msg.LOCK, id, [Buffer.from([0, 3]), Buffer.from('fuz')]));
        case 12: return bytesOf(encodeFrame(Msg.UNLOCK, id, [Buffer.from([0, 0, 0, int(3)])]));
        case 13: return bytesOf(encodeFrame(Msg.LIST_CONTINUE, id, [Buffer.from([int(2)])]));
        case 14: return bytesOf(encodeFrame(int(256), id, [bytes(int(40))]));
        case 15: return bytes(int(64)); // junk
        case 16: return bytesOf(encodeFrame(Msg.INDEX_PART, id, [u64(pick([0, 0, 32, 64, 5, MAX_INDEX_BYTES])), rnd() < 0.8 ? Buffer.from(pick(ids), 'hex') : bytes(int(70))]));
        default: return bytesOf(encodeFrame(Msg.BYE, id, []));
      }
    }

    function mutate(frame: Buffer): Buffer {
      const b = Buffer.from(frame);
      switch (int(5)) {
        case 0: // flip some bytes
          for (let i = 0, n = 1 + int(3); i < n && b.length > 0; i++) b[int(b.length)] = int(256);
          return b;
        case 1: // truncate
          return b.subarray(0, int(b.length));
        case 2: // extend
          return Buffer.concat([b, bytes(1 + int(16))]);
        case 3: { // lie about the length
          const lens = [0, 1, 4, 5, MAX_FRAME_LENGTH, MAX_FRAME_LENGTH + 1, 0xffffffff, b.length - 3, b.length + 100];
          if (b.length >= 4) b.writeUInt32BE(pick(lens) >>> 0, 0);
          return b;
        }
        default: // change the type
          if (b.length > 4) b[4] = int(256);
          return b;
      }
    }

    let frameCount = 0;
    let sessions = 0;
    const statuses = new Map<number, number>();
    const peak = process.memoryUsage().rss;
    while (frameCount < 10_000) {
      const input: Buffer[] = [rnd() < 0.95 ? HELLO : mutate(HELLO)];
      const n = 1 + int(30);
      for (let i = 0; i < n; i++) {
        const f = request(2 + int(40));
        input.push(rnd() < 0.3 ? mutate(f) : f);
      }
      frameCount += input.length;
      sessions++;
      // Split the input at random points so that frames also arrive in pieces.
      const all = Buffer.concat(input);
      const pieces: Buffer[] = [];
      for (let pos = 0; pos < all.length; ) {
        const k = 1 + int(200);
        pieces.push(all.subarray(pos, pos + k));
        pos += k;
      }
      let result: SessionResult;
      try {
        result = await session(storage, pieces, {}, 10_000);
      } catch (err) {
        throw new Error(`session ${sessions} failed: ${(err as Error).message}; input ${all.toString('hex').slice(0, 400)}`);
      }
      const { status, out } = result;
      statuses.set(status, (statuses.get(status) ?? 0) + 1);
      assert.ok(status === ExitStatus.ok || status === ExitStatus.protocol, `status ${status}`);
      const fatal = out.filter((f) => f.type === Msg.ERROR && f.id === 0);
      if (status === ExitStatus.protocol) {
        assert.equal(fatal.length, 1);
        assert.equal(out.at(-1), fatal[0]);
        assert.ok(['protocol', 'unsupported-version'].includes(decodeError(fatal[0]!.payload).code));
      } else {
        assert.equal(fatal.length, 0);
      }
      for (const f of out) {
        if (f.type === Msg.ERROR) decodeError(f.payload);
        else if (f.type === Msg.HELLO_OK) decodeHelloOk(f.payload);
        else if (f.type !== Msg.BYE_OK) decodeResponse(f);
      }
    }
    assert.ok(frameCount >= 10_000);
    assert.ok((statuses.get(ExitStatus.ok) ?? 0) > 0 && (statuses.get(ExitStatus.protocol) ?? 0) > 0, JSON.stringify([...statuses]));
    assert.deepEqual(await treeOf(root, area), before, 'nothing changed outside the area');
    assert.equal(await fsp.readFile(join(root, 'outside'), 'utf8'), 'x');
    assert.ok(process.memoryUsage().rss - peak < 256 * 1024 * 1024, 'memory stayed bounded');
    // The area is still a sound repository: readable config, no lock left behind.
    assert.deepEqual(await storage.readFile('config') !== null, true);
    const lock = await storage.lock('after fuzz');
    await lock.release();
  });
});
