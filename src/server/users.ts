/**
 * What the root-run server commands (expire, status, check) share: the server configuration read with
 * errors as SnapError, and the users a command walks.
 */
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { SnapError } from '../core/errors.js';
import { readServerConfig, USER_NAME, type ServerConfig } from './seal-helper.js';

/** readServerConfig, with its failures as SnapError ('not-found' unless already a SnapError). */
export async function serverConfig(file: string, trusted: boolean): Promise<ServerConfig> {
  return readServerConfig(file, trusted).catch((err: unknown) => {
    throw err instanceof SnapError ? err : new SnapError('not-found', (err as Error).message);
  });
}

/**
 * The users to visit: only `user` (a valid name, else a usage error), or every user with a directory
 * in <root>/snapshots, sorted. deniedHint is added to the message when that listing is not allowed.
 */
export async function serverUsers(root: string, user: string | undefined, deniedHint = ''): Promise<string[]> {
  if (user !== undefined) {
    if (!USER_NAME.test(user)) throw new SnapError('usage', `Invalid user name ${JSON.stringify(user)}`);
    return [user];
  }
  const dir = join(root, 'snapshots');
  const names = await fsp.readdir(dir).catch((err: unknown) => {
    const code = (err as { code?: unknown }).code;
    const hint = code === 'EACCES' || code === 'EPERM' ? deniedHint : '';
    throw new SnapError('io', `Cannot list ${dir}: ${(err as Error).message}${hint}`);
  });
  return names.filter((n) => USER_NAME.test(n)).sort();
}
