import type { RunStore, SortedIds } from '../core/idset.js';
import type { IndexBytes, IndexSource } from '../storage/types.js';

/**
 * The local cache of tree objects (still encrypted, exactly as stored), so that a backup can compare
 * against the previous snapshot without downloading its trees. Losing it costs time, never correctness:
 * every entry is authenticated again when used, and a bad entry is dropped.
 */
export interface TreeCache {
  get(id: Buffer): Buffer | null;
  put(id: Buffer, data: Buffer): void;
  drop(id: Buffer): void;
  /**
   * Removes the entries of these 32-byte ids (one after another in one buffer), if present: the trees
   * a committed backup replaced. Optional; never fails.
   */
  dropAll?(ids: Buffer): Promise<void>;
  /**
   * The index this workstation committed with head `head` (sorted 32-byte ids), if the cache holds
   * it; a backup whose current still has that head takes it as the list of objects current holds,
   * instead of listing them. Optional: a cache without it makes every backup list current.
   */
  getIndex?(head: string): SortedIds | null;
  /** Keep the index just committed with `head` (replacing any other). */
  putIndex?(head: string, index: IndexBytes): void;
  /** Forget the kept index (a backup that may upload objects outside it does this first). */
  dropIndex?(): void;
  /**
   * The walk's directory records (engine/dirrecords.ts; opaque, sealed bytes to the cache), kept
   * beside the kept index: the file of the last commit, opened for reading, or null.
   */
  readRecords?(): RecordsIn | null;
  /** A new records file, written as the walk goes and kept (replacing the last) only by keep(). */
  writeRecords?(): RecordsOut | null;
  /** Forget the records file (done with dropIndex, for the same reason). */
  dropRecords?(): void;
  /**
   * A temp file for the sorted runs of a backup's references (RefRuns), which nothing else sees, or
   * null: the runs then stay in memory.
   */
  refRuns?(): RunStore | null;
  /**
   * The kept index of the commit with `head`, written as the commit's index is made (replacing the
   * last one only by keep()), or null.
   */
  writeIndex?(head: string): KeptIndexWriter | null;
}

/** A kept index being written (TreeCache.writeIndex). */
export interface KeptIndexWriter {
  /** Appends ids (sorted, after the ones before); false once a write failed. */
  append(ids: Buffer): boolean;
  /** Ends the ids; what was appended, read from the file, or null when a write failed. */
  finish(): IndexSource | null;
  /** Closes the file and makes it the kept index. */
  keep(): void;
  /** Closes and deletes the file (never throws). */
  discard(): void;
}

/** A records file open for reading (it stays readable after dropRecords). */
export interface RecordsIn {
  /** Reads into buf at the file position; returns the bytes read (fewer only at the end). */
  read(buf: Buffer, position: number): number;
  close(): void;
}

/** A records file being written; every call may throw (a full or read-only cache). */
export interface RecordsOut {
  /** Appends data, or writes it at position (the header, written last). */
  write(data: Uint8Array, position?: number): void;
  /** Closes the file and makes it the records file. */
  keep(): void;
  /** Closes and deletes the file (never throws). */
  discard(): void;
}

/**
 * Local copies of the repository's key files (I9: the wrapped master key is kept in the repository and
 * on the workstation). They are tried after the repository's own, so a server that deletes or damages
 * key files cannot lock the workstation out.
 */
export interface KeyStore {
  list(repoId: string): Promise<string[]>;
  read(repoId: string, name: string): Promise<Buffer | null>;
  write(repoId: string, name: string, data: Buffer): Promise<void>;
  /**
   * The id of the repository last opened at this location (a hint: it lets the key be derived from
   * the local key files while the connection is still being made; never trusted for anything else).
   */
  repoIdAt?(location: string): Promise<string | null>;
  rememberRepoId?(location: string, repoId: string): Promise<void>;
}
