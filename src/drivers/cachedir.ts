/** A TreeCache in a directory: one file per tree object, written atomically. */
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import type { KeyStore, TreeCache } from '../engine/cache.js';

export function defaultCacheRoot(): string {
  const env = process.env['SNAPCRYPT_CACHE_DIR'];
  if (env) return env;
  const xdg = process.env['XDG_CACHE_HOME'];
  return path.join(xdg && path.isAbsolute(xdg) ? xdg : path.join(os.homedir(), '.cache'), 'snapcrypt');
}

export class DirTreeCache implements TreeCache {
  private readonly dir: string;
  private ok = true;
  constructor(root: string, repoId: string) {
    this.dir = path.join(root, repoId, 'trees');
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
}

export function openTreeCache(root: string | null): ((repoId: string) => TreeCache | null) | null {
  if (root === null) return null;
  return (repoId) => new DirTreeCache(root, repoId);
}

/** $SNAPCRYPT_CONFIG_DIR, or $XDG_CONFIG_HOME/snapcrypt, or ~/.config/snapcrypt. */
export function defaultConfigRoot(): string {
  const env = process.env['SNAPCRYPT_CONFIG_DIR'];
  if (env) return env;
  const xdg = process.env['XDG_CONFIG_HOME'];
  return path.join(xdg && path.isAbsolute(xdg) ? xdg : path.join(os.homedir(), '.config'), 'snapcrypt');
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
  async write(repoId: string, name: string, data: Buffer): Promise<void> {
    if (!KEY_NAME.test(name)) return;
    const dir = this.dir(repoId);
    await fs.promises.mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = path.join(dir, `.${name}.${process.pid}.tmp`);
    await fs.promises.writeFile(tmp, data, { mode: 0o600 });
    await fs.promises.rename(tmp, path.join(dir, name));
  }
}
