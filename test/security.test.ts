/**
 * Security invariants, end to end through the compiled CLI on real files (docs: ARCHITECTURE.md):
 * - I2 and I1: the encfs revision attack (change a few bytes, back up again, compare what is stored)
 *   finds no repeated (salt, nonce), no repeated cipher block and no plaintext difference in the XOR of
 *   two ciphertexts; the same content stored twice gives different bytes; no name, path, host or
 *   content appears in any stored byte.
 * - I3: flipped, truncated, swapped, rolled-back and deleted chunks, damaged trees, a tampered cache
 *   and a tampered head: restore exits 6 naming the path and writes nothing wrong; verify exits 6.
 * - I9: a wrong passphrase exits 4 with one line and changes nothing; key add and key passwd; a damaged
 *   key file does not lock out the others; a key file planted from another repository is refused.
 *
 * The repositories live on a plain directory (hard-link snapshots): tampering with an object file in
 * place changes it in current and in every snapshot that links it, as a real attacker's edit would.
 * The library (Repository, lookup) is used only to find which object belongs to which file.
 */
import assert from 'node:assert/strict';
import { createCipheriv, createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { ExitStatus } from '../src/core/errors.js';
import { MIN_PADDED_SIZE, OBJECT_HEADER_LEN, deriveWrapKey, openObject, padme, unwrapSecret, wrapAad } from '../src/core/crypto.js';
import { type TreeEntry, decodeKeyFile } from '../src/core/format.js';
import { openStorage } from '../src/drivers/open.js';
import { Repository } from '../src/engine/repository.js';
import { lookup } from '../src/engine/restore.js';
import { type CliResult, type TestRepo, expectExit, jsonLines, makeRepo, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';

const PASS = 'correct horse battery staple';
const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// helpers

function show(r: CliResult): string {
  return `exit ${r.code ?? r.signal}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;
}

/** Run `snapcrypt CMD --repo R ...rest` with the test repository's environment plus `env`. */
function cli(t: TestRepo, args: readonly string[], env: Readonly<Record<string, string | undefined>> = {}): Promise<CliResult> {
  const [cmd, ...rest] = args;
  return runCli([cmd!, '--repo', t.repo, ...rest], { env: { ...t.env, ...env } });
}

async function backup(t: TestRepo, paths: readonly string[], extra: readonly string[] = []): Promise<void> {
  expectExit(await cli(t, ['backup', ...extra, ...paths]), `snapcrypt backup ${paths.join(' ')}`);
}

/** A fresh, empty cache dir: the tree cache would otherwise serve authentic copies of tampered trees. */
async function freshCache(): Promise<string> {
  return path.join(await tempDir('cache'), 'c');
}

/** Deterministic, text-like (compressible) content. */
function text(bytes: number, seed: number, marker: string): Buffer {
  let s = seed >>> 0 || 1;
  const rnd = (): number => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
  const words = ['the', 'backup', 'of', 'a', 'file', 'is', 'encrypted', 'before', 'it', 'leaves', 'and', 'every',
    'chunk', 'gets', 'fresh', 'nonce', 'server', 'learns', 'nothing', 'about', 'content', 'names', 'or', 'sizes',
    'quarterly', 'numbers', 'were', 'good', 'but', 'next', 'year', 'looks', 'better', 'than', 'this', 'one'];
  const parts: string[] = [];
  let len = 0;
  let n = 0;
  while (len < bytes) {
    let w = words[Math.floor(rnd() * words.length)]!;
    if (++n % 997 === 0) w = marker;
    else if (rnd() < 0.05) w = String(Math.floor(rnd() * 100000));
    const piece = w + (rnd() < 0.08 ? '.\n' : ' ');
    parts.push(piece);
    len += piece.length;
  }
  return Buffer.from(parts.join('')).subarray(0, bytes);
}

interface StoredFile {
  readonly id: string;
  /** "current" or the snapshot's name. */
  readonly state: string;
  readonly file: string;
}

function stateDirs(repoDir: string): Array<[string, string]> {
  const snaps = path.join(repoDir, 'snapshots');
  const names = fs.existsSync(snaps) ? fs.readdirSync(snaps).filter((n) => !n.startsWith('.')).sort() : [];
  return [['current', path.join(repoDir, 'current')], ...names.map((n): [string, string] => [n, path.join(snaps, n)])];
}

/** Every object file of current and of every snapshot. */
function storedFiles(repoDir: string): StoredFile[] {
  const out: StoredFile[] = [];
  for (const [state, dir] of stateDirs(repoDir)) {
    const objects = path.join(dir, 'objects');
    if (!fs.existsSync(objects)) continue;
    for (const prefix of fs.readdirSync(objects).sort()) {
      for (const id of fs.readdirSync(path.join(objects, prefix)).sort()) {
        if (/^[0-9a-f]{64}$/.test(id)) out.push({ id, state, file: path.join(objects, prefix, id) });
      }
    }
  }
  return out;
}

function objectFiles(repoDir: string, id: string): string[] {
  return storedFiles(repoDir).filter((f) => f.id === id).map((f) => f.file);
}

function snapshotNames(repoDir: string): string[] {
  return stateDirs(repoDir).slice(1).map(([n]) => n);
}

/** One file per inode (hard-linked copies are the same file). */
function distinctInodes(files: readonly string[]): string[] {
  const seen = new Set<string>();
  return files.filter((f) => {
    const st = fs.statSync(f);
    const k = `${st.dev}:${st.ino}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

/** Rewrite a file in place (same inode, so every hard link sees it), keeping its mode. */
function rewriteInPlace(file: string, f: (b: Buffer) => Buffer): void {
  const mode = fs.statSync(file).mode & 0o7777;
  fs.chmodSync(file, 0o600);
  try {
    fs.writeFileSync(file, f(fs.readFileSync(file)));
  } finally {
    fs.chmodSync(file, mode);
  }
}

/** Run fn with dir (and dir2) made writable, restoring their modes (sealed snapshot dirs are 0500). */
function withWritableDirs(dirs: readonly string[], fn: () => void): void {
  const unique = [...new Set(dirs)];
  const modes = unique.map((d) => fs.statSync(d).mode & 0o7777);
  for (const d of unique) fs.chmodSync(d, 0o700);
  try {
    fn();
  } finally {
    unique.forEach((d, i) => fs.chmodSync(d, modes[i]!));
  }
}

/** All non-directories under dir, relative paths (["."] if dir itself is not a directory). */
function listFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string): void => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) walk(path.join(d, e.name), r);
      else out.push(r);
    }
  };
  const st = fs.lstatSync(dir, { throwIfNoEntry: false });
  if (st?.isDirectory()) walk(dir, '');
  else if (st) out.push('.');
  return out.sort();
}

/** Names, types, modes and contents of everything under dir, as one hash. */
function hashTree(dir: string): string {
  const h = createHash('sha256');
  const walk = (d: string, rel: string): void => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.lstatSync(p);
      h.update(`${rel}/${name}\0${st.mode.toString(8)}\0`);
      if (st.isDirectory()) walk(p, `${rel}/${name}`);
      else if (st.isSymbolicLink()) h.update(fs.readlinkSync(p));
      else h.update(fs.readFileSync(p));
      h.update('\0');
    }
  };
  walk(dir, '');
  return h.digest('hex');
}

async function withRepo<T>(repoDir: string, pass: string, fn: (repo: Repository) => Promise<T>): Promise<T> {
  const storage = await openStorage(repoDir);
  try {
    return await fn(await Repository.open(storage, Buffer.from(pass)));
  } finally {
    await storage.close();
  }
}

/** The tree entry of an absolute source path in a snapshot ("latest", a name or an ID). */
function entryAt(repoDir: string, ref: string, absPath: string, pass = PASS): Promise<TreeEntry> {
  return withRepo(repoDir, pass, async (repo) => {
    const { entry } = await lookup(repo, await repo.resolveSnapshot(ref), Buffer.from(absPath));
    assert.ok(entry, `${absPath} is in snapshot ${ref}`);
    return entry;
  });
}

async function chunksOf(repoDir: string, ref: string, absPath: string): Promise<string[]> {
  return (await entryAt(repoDir, ref, absPath)).chunks.map((c) => c.toString('hex'));
}

/** Count of equal bytes at equal offsets, over the common length. */
function equalBytes(a: Buffer, b: Buffer): { equal: number; n: number } {
  const n = Math.min(a.length, b.length);
  let equal = 0;
  for (let i = 0; i < n; i++) if (a[i] === b[i]) equal++;
  return { equal, n };
}

/** For independent random bytes, equal positions are Binomial(n, 1/256): allow 8 sigma and a little. */
function chanceBound(n: number): number {
  return n / 256 + 8 * Math.sqrt(n / 256) + 8;
}

/** The header-free part of a stored object: what the cipher produced (ciphertext and tag). */
const body = (b: Buffer): Buffer => b.subarray(OBJECT_HEADER_LEN);

// ---------------------------------------------------------------------------------------------
// I2, I1: the revision attack

describe('security: revision attack and secrecy (I1, I2)', () => {
  it('finds no repeated nonce, block or plaintext difference, and no plaintext in any stored byte', async () => {
    const t = await makeRepo({ password: PASS });
    const base = await tempDir('secret-src');
    const src = path.join(base, 'private-dir-4e2b7c');
    fs.mkdirSync(src);
    const bigName = 'quarterly-report-7f3a91.txt';
    const smallName = 'diary-entry-9c1d55.txt';
    const bigFile = path.join(src, bigName);
    const smallFile = path.join(src, smallName);
    const big1 = text(3 * MiB, 1, 'BIGMARKER-a81f');
    const small1 = text(5000, 2, 'SMALLMARKER-c3d9');
    fs.writeFileSync(bigFile, big1);
    fs.writeFileSync(smallFile, small1);
    const hostMarker = 'host-marker-5b8e0f';
    await backup(t, [src]);

    // change a few bytes in the middle of each file, keeping the size
    const big2 = Buffer.from(big1);
    big2.write('CHANGED!', Math.floor(1.5 * MiB));
    const small2 = Buffer.from(small1);
    small2.write('XY', 2500);
    fs.writeFileSync(bigFile, big2);
    fs.writeFileSync(smallFile, small2);
    await backup(t, [src], ['--host', hostMarker]);

    // the same plaintext stored a second time under the same id: drop the file, then bring it back
    fs.rmSync(smallFile);
    await backup(t, [src]);
    fs.writeFileSync(smallFile, small2);
    await backup(t, [src]);

    // I1: no name, path, host, user or content appears in any stored byte (clear files included)
    const needles: string[] = [
      bigName, smallName, 'private-dir-4e2b7c', src, base, path.basename(base), Buffer.from(src).toString('base64'),
      'BIGMARKER-a81f', 'SMALLMARKER-c3d9', 'CHANGED!', hostMarker,
      big1.toString('latin1', 2 * MiB + 1000, 2 * MiB + 1048), small1.toString('latin1', 1000, 1048),
      big2.toString('latin1', 1.5 * MiB - 20, 1.5 * MiB + 20),
    ];
    if (os.hostname().length >= 6) needles.push(os.hostname());
    if (os.userInfo().username.length >= 6) needles.push(os.userInfo().username);
    const repoFiles = distinctInodes(listFiles(t.repo).map((r) => path.join(t.repo, r)));
    assert.ok(repoFiles.length > 10);
    for (const f of repoFiles) {
      const bytes = fs.readFileSync(f);
      for (const needle of needles) {
        assert.equal(bytes.indexOf(Buffer.from(needle)), -1, `${path.relative(t.repo, f)} contains ${JSON.stringify(needle.slice(0, 40))}`);
      }
    }

    const snaps = snapshotNames(t.repo);
    assert.equal(snaps.length, 4);
    const [s1, s2, s3, s4] = snaps as [string, string, string, string];
    const bigV1 = await chunksOf(t.repo, s1, bigFile);
    const bigV2 = await chunksOf(t.repo, s2, bigFile);
    const smallV1 = await chunksOf(t.repo, s1, smallFile);
    const smallV2 = await chunksOf(t.repo, s2, smallFile);
    assert.equal(bigV1.length, 3);
    assert.deepEqual([bigV2[0], bigV2[2]], [bigV1[0], bigV1[2]], 'unchanged chunks keep their ids');
    assert.notEqual(bigV2[1], bigV1[1], 'the changed chunk has a new id');
    assert.notEqual(smallV2[0], smallV1[0]);
    assert.deepEqual(await chunksOf(t.repo, s4, smallFile), smallV2, 'the restored file has the same chunk id again');
    assert.ok(!objectFiles(t.repo, smallV2[0]!).some((f) => f.includes(s3)), 'snapshot 3 does not hold the dropped chunk');

    // every distinct stored byte string, current and every snapshot
    const distinct = new Map<string, { id: string; bytes: Buffer; where: string }>();
    for (const f of storedFiles(t.repo)) {
      const bytes = fs.readFileSync(f.file);
      const h = createHash('sha256').update(bytes).digest('hex');
      if (!distinct.has(h)) distinct.set(h, { id: f.id, bytes, where: `${f.state}/${f.id}` });
    }
    const objects = [...distinct.values()];
    assert.ok(objects.length >= 10, `expected many objects, got ${objects.length}`);

    // the same id written twice (snapshot 2 and snapshot 4) gives different bytes
    const [old2, new4] = [s2, s4].map((s) => fs.readFileSync(objectFiles(t.repo, smallV2[0]!).find((f) => f.includes(s))!));
    assert.notDeepEqual(old2, new4, 'a re-stored object gets a fresh salt and nonce');
    assert.equal(old2!.length, new4!.length);

    // (salt, nonce) never repeats, nor salt or nonce alone; sizes are padded
    const headers = new Map<string, string>();
    const salts = new Set<string>();
    const nonces = new Set<string>();
    for (const o of objects) {
      assert.ok(o.bytes.length >= MIN_PADDED_SIZE && padme(o.bytes.length) === o.bytes.length, `${o.where}: size ${o.bytes.length} is padded`);
      const salt = o.bytes.toString('hex', 1, 17);
      const nonce = o.bytes.toString('hex', 17, OBJECT_HEADER_LEN);
      const prev = headers.get(salt + nonce);
      assert.equal(prev, undefined, `(salt, nonce) of ${o.where} repeats that of ${prev}`);
      headers.set(salt + nonce, o.where);
      assert.ok(!salts.has(salt), `salt of ${o.where} repeats`);
      assert.ok(!nonces.has(nonce), `nonce of ${o.where} repeats`);
      salts.add(salt);
      nonces.add(nonce);
    }

    // no 16-byte cipher block appears twice anywhere (a reused key stream over equal plaintext would)
    const blocks = new Map<string, string>();
    let repeats = 0;
    let firstRepeat = '';
    for (const o of objects) {
      const b = body(o.bytes);
      for (let off = 0; off + 16 <= b.length; off += 16) {
        const k = b.toString('latin1', off, off + 16);
        const prev = blocks.get(k);
        if (prev !== undefined) {
          repeats++;
          firstRepeat ||= `${o.where}@${off} = ${prev}`;
        } else {
          blocks.set(k, `${o.where}@${off}`);
        }
      }
    }
    assert.equal(repeats, 0, `repeated cipher blocks, first: ${firstRepeat}`);

    // XOR of any two ciphertexts: equal bytes only by chance (1/256), never where plaintexts agree
    for (let i = 0; i < objects.length; i++) {
      for (let j = i + 1; j < objects.length; j++) {
        const { equal, n } = equalBytes(body(objects[i]!.bytes), body(objects[j]!.bytes));
        assert.ok(equal <= chanceBound(n), `${objects[i]!.where} and ${objects[j]!.where}: ${equal} of ${n} bytes equal`);
      }
    }

    // ... and what a key-stream-reusing scheme would show for the same pairs
    // (zstd's entropy tables span a whole block, so only the 1 MiB chunk keeps long equal runs once
    // compressed; the small file's compressed versions differ throughout)
    const pairs: Array<[string, string, string, Buffer, Buffer, boolean]> = [
      ['big chunk 1, before and after', bigV1[1]!, bigV2[1]!, big1.subarray(MiB, 2 * MiB), big2.subarray(MiB, 2 * MiB), true],
      ['small file, before and after', smallV1[0]!, smallV2[0]!, small1, small2, false],
    ];
    await withRepo(t.repo, PASS, async (repo) => {
      for (const [what, idA, idB, plainA, plainB, payloadsAlike] of pairs) {
        const a = fs.readFileSync(objectFiles(t.repo, idA)[0]!);
        const b = fs.readFileSync(objectFiles(t.repo, idB)[0]!);
        const real = equalBytes(body(a), body(b));
        // stored payloads (compressed) XORed, as a reused key stream would expose them
        const pa = openObject(repo.keys, Buffer.from(idA, 'hex'), a).payload;
        const pb = openObject(repo.keys, Buffer.from(idB, 'hex'), b).payload;
        const reused = equalBytes(pa, pb);
        // a textbook reuse: one AES-CTR key stream over both plaintexts
        const ctr = (p: Buffer): Buffer => createCipheriv('aes-256-ctr', Buffer.alloc(32, 7), Buffer.alloc(16, 9)).update(p);
        const textbook = equalBytes(ctr(plainA), ctr(plainB));
        if (payloadsAlike) assert.ok(reused.equal / reused.n > 0.25, `${what}: a reused key stream would show ${reused.equal}/${reused.n} equal bytes`);
        assert.ok(textbook.equal / textbook.n > 0.99, `${what}: textbook reuse shows ${textbook.equal}/${textbook.n}`);
        assert.ok(real.equal <= chanceBound(real.n), `${what}: ${real.equal} of ${real.n} ciphertext bytes equal (expected about ${Math.round(real.n / 256)})`);
        assert.ok(real.equal / real.n < 0.02, `${what}: ${((100 * real.equal) / real.n).toFixed(2)}% of ciphertext bytes equal`);
      }
      // the twice-stored object: identical plaintext, so a reused key stream would give all zeros
      const same = equalBytes(body(old2!), body(new4!));
      assert.ok(same.equal <= chanceBound(same.n), `re-stored object: ${same.equal} of ${same.n} bytes equal`);
    });

    // the same content in another repository: other ids (keyed), other bytes, no shared block
    const other = await makeRepo({ password: PASS });
    await backup(other, [src]);
    const idsA = new Set(storedFiles(t.repo).map((f) => f.id));
    const otherFiles = storedFiles(other.repo).filter((f) => f.state === 'current');
    assert.ok(otherFiles.length > 0);
    for (const f of otherFiles) {
      assert.ok(!idsA.has(f.id), `object id ${f.id} is the same in two repositories: ids must be keyed`);
      const b = body(fs.readFileSync(f.file));
      for (let off = 0; off + 16 <= b.length; off += 16) {
        assert.ok(!blocks.has(b.toString('latin1', off, off + 16)), `a cipher block of ${f.id} appears in the other repository`);
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------
// I3: tampering with the target

interface Fixture {
  readonly t: TestRepo;
  readonly src: string;
  /** Absolute paths. */
  readonly victim: string;
  readonly other: string;
  readonly keep: string;
  readonly docs: string;
}

/** A repository with one backup of src/{docs/victim.txt, other.txt, sub/keep.txt}. */
async function fixture(): Promise<Fixture> {
  const t = await makeRepo({ password: PASS });
  const src = path.join(await tempDir('tamper-src'), 'src');
  const docs = path.join(src, 'docs');
  fs.mkdirSync(docs, { recursive: true });
  fs.mkdirSync(path.join(src, 'sub'));
  const f: Fixture = {
    t, src, docs,
    victim: path.join(docs, 'victim.txt'),
    other: path.join(src, 'other.txt'),
    keep: path.join(src, 'sub', 'keep.txt'),
  };
  fs.writeFileSync(f.victim, text(5000, 11, 'victim'));
  fs.writeFileSync(f.other, text(7000, 12, 'other'));
  fs.writeFileSync(f.keep, text(3000, 13, 'keep'));
  await backup(t, [src]);
  return f;
}

function partials(dir: string): string[] {
  return listFiles(dir).filter((r) => r.includes('snapcrypt-partial'));
}

/**
 * restore latest into a fresh target with a fresh cache: exits 6, names every affected path on
 * stderr, writes none of them (nor a partial file), and restores the intact files exactly.
 */
async function expectRestoreFails(f: Fixture, affected: readonly string[], intact: readonly string[], ref = 'latest'): Promise<void> {
  const target = path.join(await tempDir('tamper-out'), 'target');
  const r = await cli(f.t, ['restore', ref, '--target', target], { SNAPCRYPT_CACHE_DIR: await freshCache() });
  assert.equal(r.code, ExitStatus.integrity, `restore must fail with ${ExitStatus.integrity}\n${show(r)}`);
  for (const a of affected) {
    assert.ok(r.stderr.includes(a), `restore's stderr names ${a}\n${show(r)}`);
    // a file must not exist; a directory whose tree failed may exist, but empty
    assert.deepEqual(listFiles(path.join(target, a)), [], `nothing of ${a} may be written`);
    assert.ok(!fs.existsSync(path.join(target, a)) || fs.statSync(path.join(target, a)).isDirectory(), `${a} must not be written`);
  }
  assert.deepEqual(partials(target), [], 'no partial files are left');
  for (const i of intact) assert.deepEqual(fs.readFileSync(path.join(target, i)), fs.readFileSync(i), `${i} is restored intact`);
}

async function expectVerifyFails(f: Fixture, affected: readonly string[], opts: { cacheDir?: string; readData?: boolean } = {}): Promise<void> {
  const args = ['verify', ...(opts.readData === false ? [] : ['--read-data'])];
  const r = await cli(f.t, args, { SNAPCRYPT_CACHE_DIR: opts.cacheDir ?? (await freshCache()) });
  assert.equal(r.code, ExitStatus.integrity, `${args.join(' ')} must fail with ${ExitStatus.integrity}\n${show(r)}`);
  for (const a of affected) assert.ok(r.stderr.includes(a), `verify's stderr names ${a}\n${show(r)}`);
}

type Tamper = (f: Fixture) => Promise<{ affected: string[]; intact: string[] }>;

const dataTampers: Record<string, Tamper> = {
  'a flipped bit': async (f) => {
    const [id] = await chunksOf(f.t.repo, 'latest', f.victim);
    for (const file of distinctInodes(objectFiles(f.t.repo, id!))) {
      rewriteInPlace(file, (b) => {
        b[Math.floor(b.length / 2)]! ^= 0x10;
        return b;
      });
    }
    return { affected: [f.victim], intact: [f.other, f.keep] };
  },
  'a truncated object': async (f) => {
    const [id] = await chunksOf(f.t.repo, 'latest', f.victim);
    for (const file of distinctInodes(objectFiles(f.t.repo, id!))) rewriteInPlace(file, (b) => b.subarray(0, Math.floor(b.length / 2)));
    return { affected: [f.victim], intact: [f.other, f.keep] };
  },
  'two objects swapped': async (f) => {
    const [a] = await chunksOf(f.t.repo, 'latest', f.victim);
    const [b] = await chunksOf(f.t.repo, 'latest', f.other);
    for (const [, dir] of stateDirs(f.t.repo)) {
      const fa = path.join(dir, 'objects', a!.slice(0, 2), a!);
      const fb = path.join(dir, 'objects', b!.slice(0, 2), b!);
      if (!fs.existsSync(fa) || !fs.existsSync(fb)) continue;
      withWritableDirs([path.dirname(fa), path.dirname(fb)], () => {
        fs.renameSync(fa, `${fa}.swap`);
        fs.renameSync(fb, fa);
        fs.renameSync(`${fa}.swap`, fb);
      });
    }
    return { affected: [f.victim, f.other], intact: [f.keep] };
  },
  'a chunk rolled back to its older version': async (f) => {
    const [oldId] = await chunksOf(f.t.repo, 'latest', f.victim);
    const v2 = fs.readFileSync(f.victim);
    v2.write('v2', 100);
    fs.writeFileSync(f.victim, v2);
    await backup(f.t, [f.src]);
    const [newId] = await chunksOf(f.t.repo, 'latest', f.victim);
    assert.notEqual(newId, oldId);
    const [first] = snapshotNames(f.t.repo);
    const oldBytes = fs.readFileSync(objectFiles(f.t.repo, oldId!).find((p) => p.includes(first!))!);
    const latest = snapshotNames(f.t.repo).at(-1)!;
    const target = objectFiles(f.t.repo, newId!).find((p) => p.includes(latest))!;
    rewriteInPlace(target, () => oldBytes); // hard-linked: current changes too
    return { affected: [f.victim], intact: [f.other, f.keep] };
  },
  'a deleted object': async (f) => {
    const [id] = await chunksOf(f.t.repo, 'latest', f.victim);
    for (const file of objectFiles(f.t.repo, id!)) withWritableDirs([path.dirname(file)], () => fs.unlinkSync(file));
    return { affected: [f.victim], intact: [f.other, f.keep] };
  },
};

describe('security: tampering with the target is detected and named (I3)', { concurrency: 3 }, () => {
  for (const [what, tamper] of Object.entries(dataTampers)) {
    it(`${what}: restore and verify --read-data exit 6 naming the file; nothing wrong is written`, async () => {
      const f = await fixture();
      const { affected, intact } = await tamper(f);
      await expectRestoreFails(f, affected, intact);
      await expectVerifyFails(f, affected);
      // the --json summary lists the same paths as integrity failures
      const target = path.join(await tempDir('tamper-out'), 'target');
      const r = await cli(f.t, ['restore', 'latest', '--target', target, '--json'], { SNAPCRYPT_CACHE_DIR: await freshCache() });
      assert.equal(r.code, ExitStatus.integrity, show(r));
      const summary = jsonLines(r.stdout).find((l) => l['type'] === 'summary');
      const errors = (summary?.['errors'] ?? []) as Array<{ path: string; integrity: boolean }>;
      for (const a of affected) assert.ok(errors.some((e) => e.path.endsWith(a) && e.integrity), `summary names ${a}: ${r.stdout}`);
    });
  }

  it('a damaged tree: restore (fresh cache and --no-cache) and verify (even with a warm cache) exit 6 naming the directory', async () => {
    const f = await fixture();
    // warm the tree cache with authentic copies, as an earlier restore on this machine would
    expectExit(await cli(f.t, ['restore', 'latest', '--target', path.join(await tempDir('warm'), 'x')]), 'restore');
    const tree = (await entryAt(f.t.repo, 'latest', f.docs)).subtree!.toString('hex');
    for (const file of distinctInodes(objectFiles(f.t.repo, tree))) {
      rewriteInPlace(file, (b) => {
        b[b.length - 20]! ^= 0x01;
        return b;
      });
    }
    await expectRestoreFails(f, [f.docs], [f.other, f.keep]);
    const target = path.join(await tempDir('tamper-out'), 'target');
    const r = await cli(f.t, ['restore', 'latest', '--target', target, '--no-cache']);
    assert.equal(r.code, ExitStatus.integrity, show(r));
    assert.ok(r.stderr.includes(f.docs), show(r));
    assert.ok(!fs.existsSync(path.join(target, f.victim)));
    // verify reads trees from the repository, not from the (authentic) cached copies
    await expectVerifyFails(f, [f.docs], { cacheDir: f.t.cacheDir, readData: false });
    await expectVerifyFails(f, [f.docs], { cacheDir: f.t.cacheDir });
  });

  it('a damaged or substituted cache entry is ignored: restore and backup stay correct, verify stays clean', async () => {
    const f = await fixture();
    expectExit(await cli(f.t, ['restore', 'latest', '--target', path.join(await tempDir('warm'), 'x')]), 'restore');
    const repoId = (JSON.parse(fs.readFileSync(path.join(f.t.repo, 'current', 'config'), 'utf8')) as { id: string }).id;
    const cached = (id: string): string => path.join(f.t.cacheDir, repoId, 'trees', id.slice(0, 2), id);
    const docsTree = (await entryAt(f.t.repo, 'latest', f.docs)).subtree!.toString('hex');
    const subTree = (await entryAt(f.t.repo, 'latest', path.dirname(f.keep))).subtree!.toString('hex');
    assert.ok(fs.existsSync(cached(docsTree)) && fs.existsSync(cached(subTree)), 'restore filled the tree cache');
    // flip a bit in one entry; put another (authentic) tree's bytes under the other's name
    rewriteInPlace(cached(docsTree), (b) => {
      b[40]! ^= 0x80;
      return b;
    });
    fs.copyFileSync(objectFiles(f.t.repo, docsTree)[0]!, cached(subTree));
    const target = path.join(await tempDir('out'), 'target');
    expectExit(await cli(f.t, ['restore', 'latest', '--target', target]), 'restore with a tampered cache');
    for (const p of [f.victim, f.other, f.keep]) assert.deepEqual(fs.readFileSync(path.join(target, p)), fs.readFileSync(p));
    for (const id of [docsTree, subTree]) {
      assert.ok(!fs.existsSync(cached(id)) || fs.readFileSync(cached(id)).equals(fs.readFileSync(objectFiles(f.t.repo, id)[0]!)), `cache entry ${id} was dropped or replaced by the stored object`);
    }
    // a backup that compares against the (again tampered) cache stays correct
    fs.copyFileSync(objectFiles(f.t.repo, docsTree)[0]!, cached(subTree));
    fs.appendFileSync(f.keep, 'more');
    await backup(f.t, [f.src]);
    expectExit(await cli(f.t, ['verify', '--read-data']), 'verify after a backup with a tampered cache');
    const target2 = path.join(await tempDir('out'), 'target');
    expectExit(await cli(f.t, ['restore', 'latest', '--target', target2, '--no-cache']), 'restore');
    for (const p of [f.victim, f.other, f.keep]) assert.deepEqual(fs.readFileSync(path.join(target2, p)), fs.readFileSync(p));
  });

  it('a tampered head: restore and verify exit 6 naming the snapshot; the other snapshots stay usable', async () => {
    const f = await fixture();
    fs.appendFileSync(f.other, 'second version');
    await backup(f.t, [f.src]);
    const [s1, s2] = snapshotNames(f.t.repo) as [string, string];
    const headFile = path.join(f.t.repo, 'snapshots', s2, 'head');
    const original = fs.readFileSync(headFile);
    const id1 = fs.readFileSync(path.join(f.t.repo, 'snapshots', s1, 'head'), 'latin1').trim();
    const rootTree = await withRepo(f.t.repo, PASS, async (repo) => (await repo.resolveSnapshot(s2)).root.tree);
    const heads: Record<string, string> = {
      garbage: 'this is not a head\n',
      'a flipped digit': original.toString('latin1').replace(/^./, (c) => (c === '0' ? '1' : '0')),
      'a tree instead of a snapshot root': `${rootTree}\n`,
      "the previous snapshot's root (not in this snapshot)": `${id1}\n`,
    };
    for (const [what, head] of Object.entries(heads)) {
      rewriteInPlace(headFile, () => Buffer.from(head));
      const target = path.join(await tempDir('out'), 'target');
      const r = await cli(f.t, ['restore', 'latest', '--target', target], { SNAPCRYPT_CACHE_DIR: await freshCache() });
      assert.equal(r.code, ExitStatus.integrity, `${what}: ${show(r)}`);
      assert.ok(r.stderr.includes(s2), `${what}: restore names snapshot ${s2}\n${show(r)}`);
      assert.deepEqual(listFiles(target), [], `${what}: nothing restored`);
      const v = await cli(f.t, ['verify'], { SNAPCRYPT_CACHE_DIR: await freshCache() });
      assert.equal(v.code, ExitStatus.integrity, `${what}: ${show(v)}`);
      assert.ok(v.stderr.includes(s2), `${what}: verify names snapshot ${s2}\n${show(v)}`);
      assert.ok(!v.stderr.includes(`snapshot ${s1}:`), `${what}: snapshot ${s1} is fine\n${show(v)}`);
      // the first snapshot, by name and by ID, is still restorable (by ID only while this snapshot
      // does not claim the same root: then the ID is rightly ambiguous)
      for (const ref of head === `${id1}\n` ? [s1] : [s1, id1.slice(0, 8)]) {
        const t1 = path.join(await tempDir('out'), 'target');
        expectExit(await cli(f.t, ['restore', ref, '--target', t1]), `${what}: restore ${ref}`);
        assert.ok(fs.existsSync(path.join(t1, f.victim)));
      }
    }
    rewriteInPlace(headFile, () => original);
    expectExit(await cli(f.t, ['verify', '--read-data']), 'verify after the head is put back');
  });

  it('a snapshot replaced by a copy of an older one is reported by verify', async () => {
    const f = await fixture();
    fs.appendFileSync(f.other, 'second version');
    await backup(f.t, [f.src]);
    const [s1, s2] = snapshotNames(f.t.repo) as [string, string];
    const d1 = path.join(f.t.repo, 'snapshots', s1);
    const d2 = path.join(f.t.repo, 'snapshots', s2);
    // the server puts snapshot 1's head, index and objects into snapshot 2
    const dirs = [d2, ...fs.readdirSync(path.join(d2, 'objects')).map((p) => path.join(d2, 'objects', p)), path.join(d2, 'objects')];
    withWritableDirs(dirs, () => {
      for (const name of ['head', 'index']) {
        fs.rmSync(path.join(d2, name));
        fs.copyFileSync(path.join(d1, name), path.join(d2, name));
      }
      for (const s of storedFiles(f.t.repo).filter((o) => o.state === s1)) {
        const dest = path.join(d2, 'objects', s.id.slice(0, 2));
        if (!fs.existsSync(dest)) fs.mkdirSync(dest);
        if (!fs.existsSync(path.join(dest, s.id))) fs.linkSync(s.file, path.join(dest, s.id));
      }
    });
    const v = await cli(f.t, ['verify'], { SNAPCRYPT_CACHE_DIR: await freshCache() });
    assert.equal(v.code, ExitStatus.integrity, show(v));
    assert.match(v.stderr, new RegExp(`snapshot ${s2}:.*${s1}`), show(v));
  });
});

// ---------------------------------------------------------------------------------------------
// I9: passphrases and key files

/** Exit 4, one sensible line on stderr, nothing on stdout. */
function expectWrongPassphrase(r: CliResult, what: string): void {
  assert.equal(r.code, ExitStatus.wrongPassword, `${what}: ${show(r)}`);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `${what}: one line on stderr\n${show(r)}`);
  assert.match(lines[0]!, /wrong passphrase/i, what);
  assert.doesNotMatch(r.stderr, /\n\s+at |internal error|Error:/, `${what}: no stack trace`);
  assert.equal(r.stdout, '', `${what}: nothing on stdout`);
}

/** Does this passphrase unwrap the key file at `file`? */
async function keyOpens(file: string, pass: string): Promise<boolean> {
  const kf = decodeKeyFile(fs.readFileSync(file), path.basename(file));
  const wrapKey = await deriveWrapKey(Buffer.from(pass), kf.kdf, kf.salt);
  return unwrapSecret(wrapKey, wrapAad(kf.kdf, kf.salt), kf.nonce, kf.data) !== null;
}

function keyNames(repoDir: string, state = 'current'): string[] {
  const dir = state === 'current' ? path.join(repoDir, 'current', 'keys') : path.join(repoDir, 'snapshots', state, 'keys');
  return fs.readdirSync(dir).filter((n) => !n.startsWith('.')).sort();
}

describe('security: passphrases and key files (I9)', { concurrency: 2 }, () => {
  it('a wrong passphrase exits 4 with one line and changes no byte of the repository', async () => {
    const f = await fixture();
    const before = hashTree(f.t.repo);
    const wrong = { SNAPCRYPT_PASSWORD: 'not the passphrase', SNAPCRYPT_NEW_PASSWORD: 'another one' };
    const target = path.join(await tempDir('out'), 'target');
    const runs: Array<[string, string[]]> = [
      ['backup', ['backup', f.src]],
      ['restore', ['restore', 'latest', '--target', target]],
      ['snapshots', ['snapshots']],
      ['ls', ['ls', 'latest']],
      ['verify', ['verify', '--read-data']],
      ['key add', ['key', 'add']],
      ['key passwd', ['key', 'passwd']],
    ];
    for (const [what, args] of runs) {
      expectWrongPassphrase(await cli(f.t, args, wrong), what);
      assert.equal(hashTree(f.t.repo), before, `${what} with a wrong passphrase changed the repository`);
    }
    assert.ok(!fs.existsSync(target), 'restore with a wrong passphrase creates no target');
    const j = await cli(f.t, ['snapshots', '--json'], wrong);
    assert.equal(j.code, ExitStatus.wrongPassword);
    const [err] = jsonLines(j.stdout);
    assert.equal(err?.['type'], 'error');
    assert.equal(err?.['code'], 'wrong-password');
    assert.equal(err?.['exitStatus'], ExitStatus.wrongPassword);
    expectExit(await cli(f.t, ['snapshots']), 'the right passphrase still opens');
    assert.equal(hashTree(f.t.repo), before);
  });

  it('key add: both passphrases open; key passwd: the old one no longer opens current, but still its snapshots', async () => {
    const f = await fixture();
    const [s1] = snapshotNames(f.t.repo) as [string];
    const [k1] = keyNames(f.t.repo) as [string];
    // key add
    const add = await cli(f.t, ['key', 'add'], { SNAPCRYPT_NEW_PASSWORD: 'second passphrase' });
    expectExit(add, 'key add');
    const k2 = /added key ([A-Za-z0-9._-]+)/.exec(add.stdout)?.[1];
    assert.ok(k2 !== undefined && k2 !== k1, `key add names the new key: ${add.stdout}`);
    assert.deepEqual(keyNames(f.t.repo), [k1, k2].sort());
    for (const pass of [PASS, 'second passphrase']) expectExit(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: pass }), `snapshots with ${pass}`);
    const list = await cli(f.t, ['key', 'list'], { SNAPCRYPT_PASSWORD: 'second passphrase' });
    expectExit(list, 'key list');
    assert.match(list.stdout, new RegExp(`^\\* ${k2}$`, 'm'), 'key list marks the key that opened');
    assert.match(list.stdout, new RegExp(`^  ${k1}$`, 'm'));

    // key passwd of the first key
    const pw = await cli(f.t, ['key', 'passwd'], { SNAPCRYPT_NEW_PASSWORD: 'third passphrase' });
    expectExit(pw, 'key passwd');
    assert.match(pw.stdout, new RegExp(`changed the passphrase of key ${k1}`), pw.stdout);
    assert.deepEqual(keyNames(f.t.repo), [k1, k2].sort(), 'passwd replaces the key file, adds none');
    const currentK1 = path.join(f.t.repo, 'current', 'keys', k1);
    assert.equal(await keyOpens(currentK1, PASS), false, "the old passphrase no longer opens current's key file");
    assert.equal(await keyOpens(currentK1, 'third passphrase'), true);
    assert.equal(await keyOpens(path.join(f.t.repo, 'snapshots', s1, 'keys', k1), PASS), true, 'the sealed copy is unchanged');
    expectExit(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: 'third passphrase' }), 'the new passphrase opens');
    expectExit(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: 'second passphrase' }), 'the added passphrase still opens');

    // a later backup seals only the new key files; the old passphrase still opens the older snapshot
    await backup(f.t, [f.src], []);
    const s2 = snapshotNames(f.t.repo).at(-1)!;
    assert.equal(await keyOpens(path.join(f.t.repo, 'snapshots', s2, 'keys', k1), PASS), false);
    const target = path.join(await tempDir('out'), 'target');
    expectExit(await cli(f.t, ['restore', s1, '--target', target], { SNAPCRYPT_PASSWORD: PASS }), 'the old passphrase restores the snapshot taken while it was valid');
    assert.deepEqual(fs.readFileSync(path.join(target, f.victim)), fs.readFileSync(f.victim));
    expectWrongPassphrase(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: 'never valid' }), 'a passphrase that never was valid');
  });

  it('a damaged key file does not prevent opening with another one', async () => {
    const f = await fixture();
    expectExit(await cli(f.t, ['key', 'add'], { SNAPCRYPT_NEW_PASSWORD: 'second passphrase' }), 'key add');
    const keysDir = path.join(f.t.repo, 'current', 'keys');
    const [k1] = keyNames(f.t.repo, snapshotNames(f.t.repo)[0]!) as [string];
    // damage the first key in place (valid JSON, wrong ciphertext), and plant damaged ones that sort first
    rewriteInPlace(path.join(keysDir, k1), (b) => {
      const o = JSON.parse(b.toString('utf8')) as { data: string };
      const data = Buffer.from(o.data, 'base64');
      data[5]! ^= 1;
      return Buffer.from(JSON.stringify({ ...o, data: data.toString('base64') }));
    });
    fs.writeFileSync(path.join(keysDir, '0-garbage'), 'not a key file at all \x00\xff');
    const valid = JSON.parse(fs.readFileSync(path.join(keysDir, keyNames(f.t.repo).find((n) => n !== k1 && !n.startsWith('0-'))!), 'utf8')) as Record<string, unknown>;
    fs.writeFileSync(path.join(keysDir, '0-no-data'), JSON.stringify({ ...valid, data: undefined }));
    fs.writeFileSync(path.join(keysDir, '0-bad-kdf'), JSON.stringify({ ...valid, kdf: { name: 'argon2id', memoryKiB: 1, passes: 0, parallelism: 1 } }));
    expectExit(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: 'second passphrase' }), 'the other key file opens');
    // the first passphrase still opens through the copy sealed in the snapshot
    expectExit(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: PASS }), 'the sealed copy of the damaged key opens');
    expectWrongPassphrase(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: 'wrong' }), 'wrong passphrase with damaged key files');
  });

  it('a key file planted from another repository is refused', async () => {
    const f = await fixture();
    const before = hashTree(f.t.repo);
    const keysDir = path.join(f.t.repo, 'current', 'keys');
    // another repository with its own passphrase, and one that shares this repository's passphrase
    for (const [otherPass, expectOwnOpens] of [['other passphrase', false], [PASS, true]] as const) {
      const other = await makeRepo({ password: otherPass });
      const [ko] = keyNames(other.repo) as [string];
      fs.copyFileSync(path.join(other.repo, 'current', 'keys', ko), path.join(keysDir, `0-planted`)); // sorts first
      const r = await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: otherPass });
      if (expectOwnOpens) {
        // the same passphrase opens this repository's own key, never the planted one
        expectExit(r, 'the own key file opens despite a planted one with the same passphrase');
        assert.ok(!r.stderr.includes('planted'));
        const list = await cli(f.t, ['key', 'list']);
        assert.doesNotMatch(list.stdout, /^\* 0-planted$/m, 'the planted key is not the one that opened');
      } else {
        assert.equal(r.code, ExitStatus.integrity, show(r));
        assert.match(r.stderr, /another repository/, show(r));
        assert.equal(r.stderr.trimEnd().split('\n').length, 1, show(r));
        expectExit(await cli(f.t, ['snapshots'], { SNAPCRYPT_PASSWORD: PASS }), 'the own passphrase still opens');
      }
      // nothing was written with a foreign key: the repository is as before, apart from the planted file
      fs.rmSync(path.join(keysDir, '0-planted'));
      assert.equal(hashTree(f.t.repo), before);
    }
  });
});
