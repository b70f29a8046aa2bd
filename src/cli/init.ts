import { IdHash, type IdHashCode } from '../core/crypto.js';
import { SnapError } from '../core/errors.js';
import { hasSha256Instructions } from '../drivers/cpu.js';
import { Repository } from '../engine/repository.js';
import { type Command, commonHelp } from './common.js';

export const initCommand: Command = {
  name: 'init',
  summary: 'create a new repository',
  usage: `Usage: snapcrypt init --repo R [--id-hash auto|sha256|blake2b]

Creates an empty repository at R (a directory; created if needed) protected by a new passphrase
(SNAPCRYPT_PASSWORD, --password-file, or asked twice on a terminal). On btrfs, current/ is a subvolume
and every backup is sealed as a read-only snapshot; elsewhere snapshots are hard-link copies.

  --id-hash F   the id function of the repository, fixed for its life: sha256 (HMAC-SHA256, format
                version 1), blake2b (HMAC-BLAKE2b, format version 2: faster on CPUs without SHA
                instructions), or auto (the default: sha256 where this CPU has SHA instructions)

${commonHelp}`,
  options: { 'id-hash': { type: 'string' } },
  allowPositionals: false,
  async run(ctx) {
    const storage = await ctx.openStorage();
    const pass = ctx.str('password-file') !== undefined || ctx.io.env['SNAPCRYPT_PASSWORD'] !== undefined
      ? await ctx.passphrase()
      : await ctx.newPassphrase(undefined, 'SNAPCRYPT_PASSWORD');
    if (pass.length === 0) throw new SnapError('usage', 'An empty passphrase is not allowed; choose a long one');
    const id = await Repository.init(storage, pass, { keyStore: ctx.keyStore(), idHash: idHashOption(ctx.str('id-hash')) });
    ctx.out(`created repository ${id} at ${storage.location}`);
    ctx.out('Keep the passphrase safe: without it nothing in the repository can be read.');
    ctx.emit({ type: 'init', id, repository: storage.location });
    return 0;
  },
};

/** The id function for a new repository on this machine: HMAC-SHA256 where the CPU has SHA instructions, else HMAC-BLAKE2b. */
export function preferredIdHash(): IdHashCode {
  return hasSha256Instructions() ? IdHash.sha256 : IdHash.blake2b;
}

/** --id-hash: auto (or absent), sha256 or blake2b. */
function idHashOption(value: string | undefined): IdHashCode {
  if (value === undefined || value === 'auto') return preferredIdHash();
  if (value === 'sha256') return IdHash.sha256;
  if (value === 'blake2b') return IdHash.blake2b;
  throw new SnapError('usage', `init: --id-hash must be auto, sha256 or blake2b, not "${value}"`);
}
