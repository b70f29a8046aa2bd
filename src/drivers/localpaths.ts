/**
 * Where the workstation keeps its state. Apart from cachedir.ts so that the SSH key code, which the
 * server program also reaches, does not load node:crypto with it.
 */
import path from 'node:path';
import os from 'node:os';

export function defaultCacheRoot(): string {
  const env = process.env['SNAPCRYPT_CACHE_DIR'];
  if (env) return env;
  const xdg = process.env['XDG_CACHE_HOME'];
  return path.join(xdg && path.isAbsolute(xdg) ? xdg : path.join(os.homedir(), '.cache'), 'snapcrypt');
}

/** $SNAPCRYPT_CONFIG_DIR, or $XDG_CONFIG_HOME/snapcrypt, or ~/.config/snapcrypt. */
export function defaultConfigRoot(): string {
  const env = process.env['SNAPCRYPT_CONFIG_DIR'];
  if (env) return env;
  const xdg = process.env['XDG_CONFIG_HOME'];
  return path.join(xdg && path.isAbsolute(xdg) ? xdg : path.join(os.homedir(), '.config'), 'snapcrypt');
}
