/**
 * The server's limits on uploads (policy.json "quota" and "freeSpaceFloor", docs/SERVER.md "Quotas"):
 * checked by serve before it stores anything a client sends, so an upload over a limit stops with a
 * clear error before the disk fills, and nothing is committed (I4: a half-sent backup is never sealed;
 * the next run resumes once there is room).
 *
 * - Quota: the bytes of the objects in the user's `current` (the latest backup plus an upload in
 *   progress, counted by Storage.currentBytes from the usage ledger) may not pass the user's quota. It
 *   does not count the snapshots' history, which retention bounds.
 * - Free-space floor: uploads stop while the file system has less free space than the floor. The free
 *   space is read (statfs) at the first upload and again after each quarter of the room that was left,
 *   at most every 64 MiB, so other users' uploads in between can overshoot the floor by that much.
 */
import { SnapError } from '../core/errors.js';
import { formatBytes } from '../core/size.js';
import type { Storage } from '../storage/types.js';
import type { ServerPolicy } from './policy.js';

/** The most bytes admitted between two reads of the free space. */
const RECHECK_BYTES = 64 * 1024 * 1024;

export interface UploadLimits {
  /** Names the area in messages, e.g. "the backup area of alice". */
  readonly label: string;
  readonly quotaBytes: number | null;
  readonly freeSpaceFloor: ServerPolicy['freeSpaceFloor'];
}

const RESUME = 'nothing was committed, earlier snapshots are intact';

export class UploadGuard {
  private readonly limits: UploadLimits;
  private readonly storage: Storage;
  /** Bytes admitted but not yet stored (uploads in flight). */
  private inFlight = 0;
  /** Bytes admitted since the free space was last read, and the room above the floor then. */
  private sinceCheck = 0;
  private room: number | null = null;

  constructor(storage: Storage, limits: UploadLimits) {
    if (limits.quotaBytes !== null && !storage.currentBytes) throw new SnapError('internal', `${storage.location} cannot count its bytes, so a quota cannot be enforced`);
    if (limits.freeSpaceFloor !== null && !storage.freeSpace) throw new SnapError('internal', `${storage.location} cannot tell its free space, so a floor cannot be enforced`);
    this.storage = storage;
    this.limits = limits;
  }

  /**
   * Runs store (which writes `bytes` into current or beside it) if the limits allow it, else throws a
   * SnapError('io') that says which limit and what to do.
   */
  async admit<T>(bytes: number, countsToQuota: boolean, store: () => Promise<T>): Promise<T> {
    await this.checkFloor(bytes);
    // counted even without a quota, so that the usage ledger stays valid for status and the metrics
    const used = countsToQuota && this.storage.currentBytes ? await this.storage.currentBytes() : 0;
    const quota = countsToQuota ? this.limits.quotaBytes : null;
    if (quota !== null) {
      if (used + this.inFlight + bytes > quota) {
        throw new SnapError('io', `${cap(this.limits.label)} is full: ${formatBytes(used + this.inFlight)} of its quota of ${formatBytes(quota)} are used; ${RESUME}`, {
          hint: 'ask the backup server\'s administrator to raise the quota (policy.json "quota"), or exclude files from the backup; then run it again: it resumes where it stopped',
        });
      }
    }
    this.inFlight += bytes;
    try {
      return await store();
    } finally {
      this.inFlight -= bytes;
    }
  }

  private async checkFloor(bytes: number): Promise<void> {
    const floor = this.limits.freeSpaceFloor;
    if (floor === null) return;
    if (this.room === null || this.sinceCheck + bytes > Math.min(RECHECK_BYTES, this.room / 4)) {
      const { available, total } = await this.storage.freeSpace!();
      const floorBytes = 'bytes' in floor ? floor.bytes : Math.ceil((total * floor.percent) / 100);
      this.room = available - floorBytes;
      this.sinceCheck = 0;
      if (this.room - bytes < 0) {
        const what = 'bytes' in floor ? formatBytes(floor.bytes) : `${floor.percent}% (${formatBytes(floorBytes)})`;
        throw new SnapError('io', `The backup server's disk is too full to accept uploads: ${formatBytes(available)} free, and the administrator keeps at least ${what} free; ${RESUME}`, {
          hint: 'ask the backup server\'s administrator to free space (snapcrypt-server expire) or lower "freeSpaceFloor" in policy.json; then run it again: it resumes where it stopped',
        });
      }
    }
    this.sinceCheck += bytes;
  }
}

function cap(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}
