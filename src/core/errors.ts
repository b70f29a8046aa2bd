/**
 * The one error type of snapcrypt. Every failure a user can meet carries a code from a closed set;
 * each code maps to one documented exit status (README "Exit status").
 */
export const ExitStatus = {
  ok: 0,
  failure: 1, // unexpected internal error
  usage: 2, // bad command line or configuration
  partial: 3, // backup finished but some files could not be read
  wrongPassword: 4, // no key file opens with the given passphrase
  locked: 5, // repository is locked by another process
  integrity: 6, // authentication/integrity failure: data corrupt, missing or tampered with
  notFound: 7, // repository, snapshot or path does not exist
  interrupted: 8, // stopped by a signal
  io: 9, // the target or source could not be read/written (permissions, disk full)
  protocol: 10, // the peer spoke a protocol we do not understand
} as const;

export type ErrorCode =
  | 'usage'
  | 'exists'
  | 'not-found'
  | 'not-a-repository'
  | 'wrong-password'
  | 'locked'
  | 'integrity'
  | 'unsupported-version'
  | 'io'
  | 'partial'
  | 'interrupted'
  | 'protocol'
  | 'internal';

const exitByCode: Record<ErrorCode, number> = {
  usage: ExitStatus.usage,
  exists: ExitStatus.usage,
  'not-found': ExitStatus.notFound,
  'not-a-repository': ExitStatus.notFound,
  'wrong-password': ExitStatus.wrongPassword,
  locked: ExitStatus.locked,
  integrity: ExitStatus.integrity,
  'unsupported-version': ExitStatus.usage,
  io: ExitStatus.io,
  partial: ExitStatus.partial,
  interrupted: ExitStatus.interrupted,
  protocol: ExitStatus.protocol,
  internal: ExitStatus.failure,
};

export class SnapError extends Error {
  readonly code: ErrorCode;
  readonly hint: string | undefined;
  constructor(code: ErrorCode, message: string, options?: { hint?: string; cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'SnapError';
    this.code = code;
    this.hint = options?.hint;
  }
  get exitStatus(): number {
    return exitByCode[this.code];
  }
}

/** Integrity failures name the object and, where known, the path that needed it. */
export class IntegrityError extends SnapError {
  readonly objectId: string;
  constructor(objectId: string, message: string) {
    super('integrity', message);
    this.objectId = objectId;
  }
}

export function exitStatusOf(err: unknown): number {
  return err instanceof SnapError ? err.exitStatus : ExitStatus.failure;
}

export function isSnapError(err: unknown, code?: ErrorCode): err is SnapError {
  return err instanceof SnapError && (code === undefined || err.code === code);
}

/** Linux's EDQUOT, which Node's libuv reports as code "UNKNOWN" (a btrfs qgroup limit, a disk quota). */
const EDQUOT_ERRNO = -122;

/** The errno name of a system error ("ENOSPC"), with EDQUOT recognised where Node says "UNKNOWN". */
export function errnoCode(err: unknown): string | undefined {
  const e = err as { code?: unknown; errno?: unknown } | null;
  if (e?.code === 'UNKNOWN' && e.errno === EDQUOT_ERRNO) return 'EDQUOT';
  return typeof e?.code === 'string' ? e.code : undefined;
}

/**
 * An I/O failure as a SnapError ('io'), with "what" naming the operation and its target. A full disk
 * or an exhausted quota says so in words, and what to do: nothing half-written is ever committed, so
 * the command can simply run again once there is room.
 */
export function ioFailure(what: string, err: unknown): SnapError {
  if (err instanceof SnapError) return err;
  const errno = errnoCode(err);
  if (errno === 'ENOSPC' || errno === 'EDQUOT') {
    const why = errno === 'ENOSPC' ? 'no space left on the disk' : 'the disk quota is used up';
    return new SnapError('io', `${what}: ${why} (${errno}); nothing was committed, earlier snapshots are intact`, {
      cause: err,
      hint: 'free space on that disk, or ask the backup server\'s administrator; then run it again: it resumes where it stopped',
    });
  }
  return new SnapError('io', `${what}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
}
