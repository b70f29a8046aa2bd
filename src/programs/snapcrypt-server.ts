#!/usr/bin/env node
/**
 * snapcrypt-server: the keyless side. It never imports the crypto code (I1, I6): it sees object ids,
 * clear-text indexes and snapshot names, nothing else.
 */
import { parseArgs } from 'node:util';
import { SnapError, ExitStatus, exitStatusOf } from '../core/errors.js';
import { openStorage } from '../drivers/open.js';

const help = `snapcrypt-server: the backup server's side of snapcrypt (needs no key)

Usage: snapcrypt-server COMMAND [options]

Commands:
  snapshots --repo DIR [--json]   list the sealed snapshots of a repository area with their object
                                  counts (from each snapshot's clear-text index)

Exit status: 0 ok, 2 usage, 7 not found, 9 I/O error.`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined || cmd === '--help' || cmd === '-h') {
    process.stdout.write(help + '\n');
    return cmd === undefined ? ExitStatus.usage : 0;
  }
  try {
    if (cmd !== 'snapshots') throw new SnapError('usage', `Unknown command "${cmd}" (see "snapcrypt-server --help")`);
    let values;
    try {
      values = parseArgs({ args: rest, options: { repo: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean' } } }).values;
    } catch (err) {
      throw new SnapError('usage', `snapshots: ${(err as Error).message}`);
    }
    if (values.help) {
      process.stdout.write(help + '\n');
      return 0;
    }
    if (!values.repo) throw new SnapError('usage', 'snapshots: --repo DIR is required');
    const storage = await openStorage(values.repo);
    if (!(await storage.exists())) throw new SnapError('not-found', `No repository at ${values.repo}`);
    for (const info of await storage.listSnapshots()) {
      const snap = await storage.openSnapshot(info.name);
      const index = await snap.readFile('index');
      const objects = index ? index.length / 32 : 0;
      if (values.json) process.stdout.write(JSON.stringify({ type: 'snapshot', name: info.name, time: info.time, objects }) + '\n');
      else process.stdout.write(`${info.name}  ${objects} objects\n`);
    }
    await storage.close();
    return 0;
  } catch (err) {
    process.stderr.write(`snapcrypt-server: ${err instanceof Error ? err.message : String(err)}\n`);
    return exitStatusOf(err);
  }
}

process.exit(await main(process.argv.slice(2)));
