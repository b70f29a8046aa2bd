import { SnapError } from '../core/errors.js';
import { type Command, commonHelp } from './common.js';

export const keyCommand: Command = {
  name: 'key',
  summary: 'manage passphrases: key list | key add | key passwd',
  usage: `Usage: snapcrypt key list|add|passwd --repo R [--new-password-file F]

  key list      list the key files (each opens the repository with its own passphrase)
  key add       add a key file for another passphrase
  key passwd    change the passphrase of the key file that the current passphrase opens

The new passphrase comes from --new-password-file F, SNAPCRYPT_NEW_PASSWORD, or is asked twice.
Key files are also sealed into every later snapshot, so an old passphrase still opens the snapshots
taken while it was valid.

${commonHelp}`,
  options: { 'new-password-file': { type: 'string' } },
  allowPositionals: true,
  async run(ctx) {
    const sub = ctx.positionals[0];
    if (ctx.positionals.length !== 1 || (sub !== 'list' && sub !== 'add' && sub !== 'passwd')) {
      throw new SnapError('usage', 'key: give one of list, add, passwd', { hint: 'see "snapcrypt key --help"' });
    }
    const repo = await ctx.openRepo();
    if (sub === 'list') {
      for (const name of await repo.listKeyNames()) {
        const current = name === repo.keyName;
        ctx.out(`${current ? '*' : ' '} ${name}`);
        ctx.emit({ type: 'key', name, current });
      }
      return 0;
    }
    const next = await ctx.newPassphrase(ctx.str('new-password-file'), 'SNAPCRYPT_NEW_PASSWORD');
    const lock = await repo.storage.lock(`key ${sub} pid ${process.pid}`);
    try {
      if (sub === 'add') {
        const name = await repo.addKey(next);
        ctx.out(`added key ${name}`);
        ctx.emit({ type: 'key-added', name });
      } else {
        await repo.changePassphrase(next);
        ctx.out(`changed the passphrase of key ${repo.keyName}`);
        ctx.emit({ type: 'key-changed', name: repo.keyName });
      }
    } finally {
      await lock.release();
    }
    return 0;
  },
};
