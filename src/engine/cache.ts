/**
 * The local cache of tree objects (still encrypted, exactly as stored), so that a backup can compare
 * against the previous snapshot without downloading its trees. Losing it costs time, never correctness:
 * every entry is authenticated again when used, and a bad entry is dropped.
 */
export interface TreeCache {
  get(id: Buffer): Buffer | null;
  put(id: Buffer, data: Buffer): void;
  drop(id: Buffer): void;
}
