import { SnapError } from '../core/errors.js';
import { Repository } from '../engine/repository.js';
import { type Command, commonHelp } from './common.js';

export const initCommand: Command = {
  name: 'init',
  summary: 'create a new repository',
  usage: `Usage: snapcrypt init --repo R

Creates an empty repository at R (a directory; created if needed) protected by a new passphrase
(SNAPCRYPT_PASSWORD, --password-file, or asked twice on a terminal). On btrfs, current/ is a subvolume
and every backup is sealed as a read-only snapshot; elsewhere snapshots are hard-link copies.

${commonHelp}`,
  options: {},
  allowPositionals: false,
  async run(ctx) {
    const storage = await ctx.openStorage();
    const pass = ctx.str('password-file') !== undefined || ctx.io.env['SNAPCRYPT_PASSWORD'] !== undefined
      ? await ctx.passphrase()
      : await ctx.newPassphrase(undefined, 'SNAPCRYPT_PASSWORD');
    if (pass.length === 0) throw new SnapError('usage', 'An empty passphrase is not allowed; choose a long one');
    const id = await Repository.init(storage, pass, { keyStore: ctx.keyStore() });
    ctx.out(`created repository ${id} at ${storage.location}`);
    ctx.out('Keep the passphrase safe: without it nothing in the repository can be read.');
    ctx.emit({ type: 'init', id, repository: storage.location });
    return 0;
  },
};
