/** Test environment: temp directories with cleanup, and the btrfs file system tests may use. */
import { execFileSync } from 'node:child_process';
import { chmodSync, lstatSync, readdirSync, rmdirSync, statfsSync, unlinkSync } from 'node:fs';
import * as fsp from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const BTRFS_SUPER_MAGIC = 0x9123683e;
const SUBVOLUME_ROOT_INO = 256;

function isBtrfs(path: string): boolean {
  try {
    return statfsSync(path).type === BTRFS_SUPER_MAGIC;
  } catch {
    return false;
  }
}

/**
 * The btrfs directory named by SNAPCRYPT_TEST_BTRFS, or null when there is none. In CI (CI=true) a
 * missing btrfs is an error: tests that need it must run there, not skip.
 */
export function btrfsTestDir(): string | null {
  const dir = process.env['SNAPCRYPT_TEST_BTRFS'];
  if (dir !== undefined && dir !== '' && isBtrfs(dir)) return dir;
  if (process.env['CI'] === 'true') {
    throw new Error(
      dir
        ? `SNAPCRYPT_TEST_BTRFS=${dir} is not on a btrfs file system; CI must run the btrfs tests`
        : 'SNAPCRYPT_TEST_BTRFS is not set; CI must run the btrfs tests (point it at a btrfs mount)',
    );
  }
  return null;
}

const toRemove = new Set<string>();

function removeOnExit(dir: string): void {
  if (toRemove.size === 0) {
    process.once('exit', () => {
      for (const d of toRemove) removeSync(d);
    });
  }
  toRemove.add(dir);
}

/** rm -rf that also copes with read-only directories and deletes btrfs subvolumes (read-only or not). */
function removeSync(path: string | Buffer): void {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isDirectory()) {
    unlinkSync(path);
    return;
  }
  if (st.ino === SUBVOLUME_ROOT_INO && isBtrfs(path.toString())) {
    execFileSync('btrfs', ['subvolume', 'delete', path.toString()], { stdio: 'ignore' });
    return;
  }
  chmodSync(path, 0o700);
  // names as bytes: a name that is not UTF-8 would not survive a string
  for (const name of readdirSync(path, { encoding: 'buffer' })) removeSync(Buffer.concat([Buffer.from(path), Buffer.from('/'), name]));
  rmdirSync(path);
}

/** A fresh directory under the system temp dir (or under base), removed when the process exits. */
export async function tempDir(prefix: string, base: string = tmpdir()): Promise<string> {
  const dir = await fsp.mkdtemp(join(base, `snapcrypt-${prefix}-`));
  removeOnExit(dir);
  return dir;
}

/** A fresh directory inside btrfsTestDir() (subvolumes in it are deleted at exit), or null. */
export async function btrfsTempDir(prefix: string): Promise<string | null> {
  const base = btrfsTestDir();
  if (base === null) return null;
  const dir = await fsp.mkdtemp(join(base, `snapcrypt-${prefix}-`));
  removeOnExit(dir);
  return dir;
}
