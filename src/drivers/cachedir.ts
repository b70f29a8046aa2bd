/** A TreeCache in a directory: one file per tree object, written atomically. */
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import type { TreeCache } from '../engine/cache.js';

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
