/** The workstation's local state: the tree cache and kept index (DirTreeCache) and key copies (DirKeyStore). */
import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import type { KeyStore, TreeCache } from '../engine/cache.js';

export { defaultCacheRoot, defaultConfigRoot } from './localpaths.js';

/** First line of the kept index file; then the head (64 hex), a newline, the ids, and SHA-256 of all before. */
const INDEX_MAGIC = 'snapcrypt-index-cache 1\n';

export class DirTreeCache implements TreeCache {
  private readonly dir: string;
  private ok = true;
  private readonly indexFile: string;
  constructor(root: string, repoId: string) {
    this.dir = path.join(root, repoId, 'trees');
    this.indexFile = path.join(root, repoId, 'index');
  }
  private file(id: Buffer): string {
    const hex = id.toString('hex');
    return path.join(this.dir, hex.slice(0, 2), hex);
  }
  get(id: Buffer): Buffer | null {
    if (!this.ok) return null;
    try {
      return fs.readFileSync(this.file(id));
    } catch {
      return null;
    }
  }
  put(id: Buffer, data: Buffer): void {
    if (!this.ok) return;
    const f = this.file(id);
    const tmp = `${f}.${process.pid}.tmp`;
    try {
      fs.mkdirSync(path.dirname(f), { recursive: true, mode: 0o700 });
      fs.writeFileSync(tmp, data, { mode: 0o600 });
      fs.renameSync(tmp, f);
    } catch {
      this.ok = false; // a read-only or full cache disables itself for this run
      try {
        fs.rmSync(tmp, { force: true });
      } catch {
        /* ignore */
      }
    }
  }
  drop(id: Buffer): void {
    try {
      fs.rmSync(this.file(id), { force: true });
    } catch {
      /* ignore */
    }
  }
  getIndex(head: string): Buffer | null {
    let data: Buffer;
    try {
      data = fs.readFileSync(this.indexFile);
    } catch {
      return null;
    }
    const start = INDEX_MAGIC.length + 65;
    if (data.length < start + 32 || (data.length - start - 32) % 32 !== 0) return null;
    if (data.toString('latin1', 0, start) !== `${INDEX_MAGIC}${head}\n`) return null;
    const body = data.subarray(0, data.length - 32);
    if (!createHash('sha256').update(body).digest().equals(data.subarray(data.length - 32))) return null;
    return data.subarray(start, data.length - 32);
  }
  putIndex(head: string, index: Buffer): void {
    if (!this.ok) return;
    const tmp = `${this.indexFile}.${process.pid}.tmp`;
    try {
      const header = Buffer.from(`${INDEX_MAGIC}${head}\n`, 'latin1');
      const hash = createHash('sha256').update(header).update(index).digest();
      fs.mkdirSync(path.dirname(this.indexFile), { recursive: true, mode: 0o700 });
      fs.writeFileSync(tmp, Buffer.concat([header, index, hash]), { mode: 0o600 });
      fs.renameSync(tmp, this.indexFile);
    } catch {
      fs.rmSync(tmp, { force: true });
    }
  }
  dropIndex(): void {
    try {
      fs.rmSync(this.indexFile, { force: true });
    } catch {
      /* harmless: an index left behind lacks only what a later session uploaded, which is sent again */
    }
  }
}

export function openTreeCache(root: string | null): ((repoId: string) => TreeCache | null) | null {
  if (root === null) return null;
  return (repoId) => new DirTreeCache(root, repoId);
}

const KEY_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/** Local copies of key files: <root>/repos/<repo id>/keys/<name>, private to the user. */
export class DirKeyStore implements KeyStore {
  private readonly root: string;
  constructor(root: string) {
    this.root = root;
  }
  private dir(repoId: string): string {
    if (!/^[0-9a-f]{32}$/.test(repoId)) throw new Error(`bad repository id ${repoId}`);
    return path.join(this.root, 'repos', repoId, 'keys');
  }
  async list(repoId: string): Promise<string[]> {
    try {
      return (await fs.promises.readdir(this.dir(repoId))).filter((n) => KEY_NAME.test(n)).sort();
    } catch {
      return [];
    }
  }
  async read(repoId: string, name: string): Promise<Buffer | null> {
    if (!KEY_NAME.test(name)) return null;
    try {
      return await fs.promises.readFile(path.join(this.dir(repoId), name));
    } catch {
      return null;
    }
  }
  private locationFile(location: string): string {
    return path.join(this.root, 'locations', createHash('sha256').update(location).digest('hex'));
  }
  async repoIdAt(location: string): Promise<string | null> {
    try {
      const id = (await fs.promises.readFile(this.locationFile(location), 'latin1')).trim();
      return /^[0-9a-f]{32}$/.test(id) ? id : null;
    } catch {
      return null;
    }
  }
  async rememberRepoId(location: string, repoId: string): Promise<void> {
    if ((await this.repoIdAt(location)) === repoId) return;
    const file = this.locationFile(location);
    await fs.promises.mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    const tmp = `${file}.${process.pid}.tmp`;
    await fs.promises.writeFile(tmp, `${repoId}\n`, { mode: 0o600 });
    await fs.promises.rename(tmp, file);
  }
  async write(repoId: string, name: string, data: Buffer): Promise<void> {
    if (!KEY_NAME.test(name)) return;
    const dir = this.dir(repoId);
    await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = path.join(dir, `.${name}.${process.pid}.tmp`);
    await fs.promises.writeFile(tmp, data, { mode: 0o600 });
    await fs.promises.rename(tmp, path.join(dir, name));
  }
}
