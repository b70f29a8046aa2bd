/**
 * The storage interface: it moves bytes and knows nothing of keys, formats or plaintext.
 *
 * A repository lives in an *area*: a directory (local, btrfs, or behind the SSH server) laid out as
 *
 *   current/            the state being written; after a commit exactly what the latest backup references
 *     config            small clear-text file: format name, version, repository id (no secrets)
 *     keys/<name>       key files (master key wrapped by a passphrase)
 *     objects/<2 hex>/<64 hex>   immutable encrypted objects, named by their 256-bit id
 *     head              id of the snapshot root object (64 hex + "\n") of the last commit
 *     index             sorted list of the 32-byte ids of all objects the head references
 *   snapshots/<name>/   sealed, read-only copies of current, one per commit, named by the storage's clock
 *
 * Contracts (every driver passes test/storage-conformance):
 * - putObject is atomic and idempotent: after it resolves, the object is durable enough to survive a
 *   crash of the writing process and getObject returns exactly those bytes; readers never see a
 *   partial object under its final name. Putting an id that exists is a no-op.
 * - getObject throws SnapError('not-found') for a missing object, and never returns partial data for
 *   an object that was fully written.
 * - writeFile (config, keys/*) is atomic: readers see the old or the new content, never a mix.
 * - commit(head, index) checks that every id in index is present in current (else SnapError
 *   'integrity', nothing sealed), writes head and index, removes objects of current that index does
 *   not list, makes everything durable, then seals current as a new snapshot whose name comes from the
 *   storage's own clock. A snapshot exists completely or not at all.
 * - stageIndex (optional) is commit with the index handed over in parts: they are kept on disk outside
 *   current (never in memory, never visible to readers) until the stage's commit(head), which has
 *   exactly the contract of commit(head, <the parts concatenated>); a stage that is discarded, or whose
 *   process ends, leaves nothing behind.
 * - Sealed snapshots are never changed by any method of this interface.
 * - The Buffers passed to init, writeFile, putObject and commit are the caller's again once the returned
 *   promise settles: a driver that keeps their bytes copies them (the SSH server reuses that memory for
 *   the next request).
 * - lock() takes the area's exclusive writer lock or throws SnapError('locked'); a lock whose holder
 *   is gone (a dead process on this host) is taken over. The lock file lives beside current/, so no
 *   sealed snapshot carries it.
 */

export interface SnapshotInfo {
  /** Name chosen by the storage's clock, e.g. 2026-11-26T23:15:02.123Z; unique, sorts by time. */
  readonly name: string;
  /** Seal time, milliseconds since the epoch, from the storage's clock. */
  readonly time: number;
}

/** Read access to one state of the area: `current` or one sealed snapshot. */
export interface ObjectReader {
  /** Bytes of one object; SnapError('not-found') if absent. */
  getObject(id: string): Promise<Buffer>;
  /**
   * Optional: many objects at once (fewer round trips to a remote store). each(i, data) is called once
   * for every ids[i] (not necessarily in order), with its bytes or null if it is absent; data is only
   * valid during the call (its memory may be reused). A failure other than an absent object rejects, and the objects
   * not yet given to each are not given.
   */
  getObjects?(ids: readonly string[], each: (index: number, data: Buffer | null) => void): Promise<void>;
  /**
   * Optional (directory stores, for the server): reads one object into the memory that into(size)
   * gives (exactly size bytes) instead of a Buffer of its own; SnapError('not-found') if absent.
   */
  readObjectInto?(id: string, into: (size: number) => Promise<Buffer>): Promise<void>;
  /**
   * Optional (directory stores, for the server): many objects, each read into the memory that the sink
   * gives, several at once: up to `ahead` objects are opened and read while the sink handles earlier
   * ones. For i = 0, 1, ... in order, sink.place(i, size) (or sink.absent(i) for an absent object) is
   * called and awaited before the next object is placed; sink.filled(i) is called once the object's
   * bytes are in its memory, in any order. A failure other than an absent object (including one thrown
   * by place) stops it: nothing after the failed object is placed, and the promise rejects with the
   * failure of the first failed object in order. The promise settles only once nothing of the call runs
   * any more (no read into the sink's memory, no file open).
   */
  readObjectsInto?(ids: readonly string[], sink: ObjectSink, ahead: number): Promise<void>;
  /** One of the small files (config, head, index, keys/NAME); null if absent. */
  readFile(name: string): Promise<Buffer | null>;
  /** Names of files under keys/. */
  listKeys(): Promise<string[]>;
  /** Every object id present (64 lower-case hex), in no particular order. */
  listObjects(): AsyncIterable<string>;
}

/** Where readObjectsInto puts the objects it reads. */
export interface ObjectSink {
  /** Memory for ids[index], of exactly size bytes (called in order, awaited). */
  place(index: number, size: number): Promise<Buffer>;
  /** ids[index] is absent (in order with place, awaited). */
  absent(index: number): Promise<void>;
  /** The bytes of ids[index] are in the memory that place gave (in any order). */
  filled(index: number): void;
}

export interface DirectWriterSpec {
  /** URL of the module (file: URL string). */
  readonly module: string;
  /** Structured-cloneable argument for its createWriter(). */
  readonly arg: unknown;
}

/**
 * The index a commit is given: one Buffer, or parts read in order as if concatenated (each a whole
 * number of ids), so that a client never needs a contiguous copy of a large index (IdList.sortedParts).
 */
export type IndexBytes = Buffer | readonly Buffer[];

/**
 * The bytes of an index (sorted 32-byte ids), read a chunk at a time, from memory or from a file (a
 * server's staged index, the index of current, a client's kept index being written): what a commit
 * may be given instead of IndexBytes, so that it never needs the whole index in memory when it comes
 * from a file.
 */
export interface IndexSource {
  /** Total bytes (a whole number of ids). */
  readonly length: number;
  /**
   * Exactly n bytes from pos (0 < n <= scratch.length, pos + n <= length), possibly read into scratch:
   * valid until the next read with the same scratch buffer.
   */
  read(pos: number, n: number, scratch: Buffer): Promise<Buffer>;
}

/** Whether a commit's index is an IndexSource (else IndexBytes). */
export function isIndexSource(index: IndexBytes | IndexSource): index is IndexSource {
  return !Buffer.isBuffer(index) && !Array.isArray(index);
}

/** The parts of an index, in order. */
export function indexParts(index: IndexBytes): readonly Buffer[] {
  return Buffer.isBuffer(index) ? [index] : (index as readonly Buffer[]);
}

/** Total bytes of an index. */
export function indexLength(index: IndexBytes): number {
  return indexParts(index).reduce((n, p) => n + p.length, 0);
}

export interface Lock {
  release(): Promise<void>;
}

/** An index received in parts for one commit (Storage.stageIndex). */
export interface StagedIndex {
  /** Bytes appended so far. */
  readonly length: number;
  /** Appends the next ids (a whole number of 32-byte ids). */
  append(ids: Buffer): Promise<void>;
  /** Storage.commit(head, <everything appended>); the stage is discarded afterwards, whatever the outcome. */
  commit(head: Buffer): Promise<SnapshotInfo>;
  /** Drops what was appended; idempotent. */
  discard(): Promise<void>;
}

export interface Storage extends ObjectReader {
  /** Human-readable location for messages (a path or an ssh:// URL). */
  readonly location: string;
  /** Whether an area (current/config) exists. */
  exists(): Promise<boolean>;
  /** Create the layout with the given config; SnapError('exists') if a repository is there. */
  init(config: Buffer): Promise<void>;
  /** Atomically write config or keys/NAME in current. */
  writeFile(name: string, data: Buffer): Promise<void>;
  /** Store an object in current (atomic, idempotent). */
  putObject(id: string, data: Buffer): Promise<void>;
  /** Check, prune, make durable and seal current; returns the new snapshot. */
  commit(head: Buffer, index: IndexBytes | IndexSource): Promise<SnapshotInfo>;
  /** Sealed snapshots, oldest first. */
  listSnapshots(): Promise<SnapshotInfo[]>;
  /** Read-only view of one sealed snapshot; SnapError('not-found') if absent. */
  openSnapshot(name: string): Promise<ObjectReader>;
  /**
   * Optional fast path: a module that worker threads can load to write objects themselves (same
   * contract as putObject). Resolves after the storage is ready for writes; null if not offered.
   * The module exports createWriter(arg) returning a synchronous (id, data) => void.
   */
  directWriter?(): Promise<DirectWriterSpec | null>;
  /**
   * Optional: a commit whose index arrives in parts and is kept on disk, not in memory (the server
   * receives large indexes this way). Without it, the index must be passed whole to commit().
   */
  stageIndex?(): Promise<StagedIndex>;
  /**
   * Optional: the bytes of the objects in current, kept up to date as this Storage adds and prunes
   * objects; call it before the session's first putObject. The server enforces quotas with it.
   */
  currentBytes?(): Promise<number>;
  /** Optional: the available and total bytes of the file system that holds current. */
  freeSpace?(): Promise<{ available: number; total: number }>;
  /** Exclusive writer lock on current. */
  lock(owner: string): Promise<Lock>;
  close(): Promise<void>;
}

/** Names accepted by writeFile/readFile: config, head, index, keys/<safe name>. */
export function isValidFileName(name: string): boolean {
  return (
    name === 'config' || name === 'head' || name === 'index' || /^keys\/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/.test(name)
  );
}

export function isValidObjectId(id: string): boolean {
  return /^[0-9a-f]{64}$/.test(id);
}

/**
 * getObjects on any reader: its own where it has one, else getObject one id after the other (an id
 * that is not-found is handed over as null).
 */
export async function getObjects(reader: ObjectReader, ids: readonly string[], each: (index: number, data: Buffer | null) => void): Promise<void> {
  if (reader.getObjects) return reader.getObjects(ids, each);
  for (const [i, id] of ids.entries()) {
    let data: Buffer | null;
    try {
      data = await reader.getObject(id);
    } catch (err) {
      if ((err as { code?: unknown } | null)?.code !== 'not-found') throw err;
      data = null;
    }
    each(i, data);
  }
}

/**
 * readObjectInto on any reader: its own where it has one, else getObject, copied into the memory that
 * `into` gives.
 */
export async function readObjectInto(reader: ObjectReader, id: string, into: (size: number) => Promise<Buffer>): Promise<void> {
  if (reader.readObjectInto) return reader.readObjectInto(id, into);
  const data = await reader.getObject(id);
  data.copy(await into(data.length));
}

/** readObjectsInto on any reader: its own where it has one, else readObjectsOneByOne. */
export function readObjectsInto(reader: ObjectReader, ids: readonly string[], sink: ObjectSink, ahead: number): Promise<void> {
  return reader.readObjectsInto ? reader.readObjectsInto(ids, sink, ahead) : readObjectsOneByOne(reader, ids, sink);
}

/**
 * The contract of readObjectsInto with nothing read ahead: one object after the other (readObjectInto).
 */
export async function readObjectsOneByOne(reader: ObjectReader, ids: readonly string[], sink: ObjectSink): Promise<void> {
  let i = 0;
  let placed = false;
  const place = (size: number): Promise<Buffer> => {
    placed = true;
    return sink.place(i, size);
  };
  for (; i < ids.length; i++) {
    const id = ids[i]!;
    placed = false;
    try {
      await readObjectInto(reader, id, place);
    } catch (err) {
      if (placed || (err as { code?: unknown } | null)?.code !== 'not-found') throw err;
      await sink.absent(i);
      continue;
    }
    sink.filled(i);
  }
}
