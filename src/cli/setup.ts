import fs from 'node:fs';
import { SnapError } from '../core/errors.js';
import { ensureKeyPair, keyExists, parseSshTarget, recordHostKeys, sshIdentity, sshUrl } from '../drivers/sshkeys.js';
import { defaultConfigRoot } from '../drivers/cachedir.js';
import { type Command, commonHelp } from './common.js';

export const setupCommand: Command = {
  name: 'setup',
  summary: "prepare this workstation's SSH key for a server",
  usage: `Usage: snapcrypt setup USER@HOST[:PORT]

Prepares this workstation to back up to a snapcrypt server over SSH:
  - makes snapcrypt's own SSH key pair (ed25519) in $SNAPCRYPT_CONFIG_DIR/ssh/ (default
    ~/.config/snapcrypt/ssh/) if there is none, protected by the passphrase (the same one that protects
    the repository; SNAPCRYPT_PASSWORD, --password-file, or asked twice on a terminal). An existing key
    is never replaced: the passphrase must decrypt it.
  - contacts HOST once (ssh-keyscan) and records its host key in snapcrypt's own known_hosts; later
    connections refuse a server whose host key differs. If a recorded key differs now, setup refuses.
  - prints the public key, the command the server's administrator runs to admit it, and the --repo
    value to use.

Compare the printed host key fingerprint with the one the administrator gives you
(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the server).

${commonHelp}`,
  options: {},
  allowPositionals: true,
  async run(ctx) {
    if (ctx.positionals.length !== 1) throw new SnapError('usage', 'setup needs exactly one argument: USER@HOST[:PORT]', { hint: 'see "snapcrypt setup --help"' });
    const parsed = parseSshTarget(ctx.positionals[0]!);
    if (parsed.user === undefined) {
      throw new SnapError('usage', `setup needs the user name on the server: USER@HOST[:PORT], not ${JSON.stringify(ctx.positionals[0])}`);
    }
    // the port is written out (22 when none is given): known_hosts and the --repo URL name it
    const target = { user: parsed.user, host: parsed.host, port: parsed.port ?? 22 };
    const id = sshIdentity(defaultConfigRoot());
    const hadKey = keyExists(id);
    const given = ctx.str('password-file') !== undefined || ctx.io.env['SNAPCRYPT_PASSWORD'] !== undefined;
    const pass = hadKey || given ? await ctx.passphrase(hadKey ? 'Passphrase (of the existing snapcrypt key): ' : 'Passphrase: ') : await ctx.newPassphrase(undefined, 'SNAPCRYPT_PASSWORD');
    if (pass.length === 0) throw new SnapError('usage', 'An empty passphrase is not allowed; choose a long one');

    const pair = await ensureKeyPair(pass, id);
    if (pair.created) ctx.out(`created the SSH key ${id.keyFile} (protected by the passphrase)`);
    else ctx.out(`using the existing SSH key ${id.keyFile} (passphrase checked)`);

    const rec = await recordHostKeys(target, id);
    const where = target.port === 22 ? target.host : `${target.host} port ${target.port}`;
    ctx.out(rec.added ? `recorded the host key of ${where} in ${id.knownHostsFile}:` : `the host key of ${where} is already recorded and unchanged:`);
    for (const f of rec.scanned.fingerprints) ctx.out(`  ${f}`);

    const keyName = `${target.user}.pub`;
    const adminCommand = `snapcrypt-server adduser ${target.user} --key ${keyName}`;
    const repo = sshUrl(target);
    ctx.out('');
    ctx.out(`This workstation's public key (${id.pubFile}):`);
    ctx.out(`  ${pair.publicKey}`);
    ctx.out('');
    ctx.out(`Send that file to the server's administrator, who saves it as ${keyName} and runs, as root:`);
    ctx.out(`  ${adminCommand}`);
    ctx.out('');
    ctx.out('Then back up with:');
    ctx.out(`  snapcrypt init --repo ${repo}      (once, unless the repository exists already)`);
    ctx.out(`  snapcrypt backup --repo ${repo} DIR`);
    ctx.emit({
      type: 'setup',
      user: target.user,
      host: target.host,
      port: target.port,
      keyFile: id.keyFile,
      publicKeyFile: id.pubFile,
      publicKey: pair.publicKey,
      keyCreated: pair.created,
      knownHostsFile: id.knownHostsFile,
      hostKeysRecorded: rec.added,
      hostKeys: rec.scanned.keys.map((k) => k.type),
      hostKeyFingerprints: rec.scanned.fingerprints,
      adminCommand,
      repo,
    });
    // the public key file is readable by all by design; make sure the private one is not
    if ((fs.statSync(id.keyFile).mode & 0o077) !== 0) ctx.warn(`${id.keyFile} is readable by others: chmod 600 it`);
    return 0;
  },
};
