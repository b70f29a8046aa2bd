#!/usr/bin/env node
/**
 * snapcrypt-server: the keyless side. It never imports the crypto code (I1, I6): it sees object ids,
 * clear-text indexes and snapshot names, nothing else.
 *
 * Each command is one entry of `commands` (usage line for the help, and a run function given the
 * arguments after the command name); add a command by adding an entry.
 */
import { parseArgs } from 'node:util';
import { SnapError, ExitStatus, exitStatusOf } from '../core/errors.js';
import { openStorage } from '../drivers/open.js';
import { refuse, reusedBufferInput, serve } from '../server/serve.js';
import type { Storage } from '../storage/types.js';
import type { UploadLimits } from '../server/limits.js';
import { userInfo } from 'node:os';
import { DEFAULTS } from '../server/defaults.js';
import { dropOutputToClosedPipes, finish, lowMemoryServer } from './runtime.js';

interface Command {
  /** Lines for the help text, e.g. "snapshots --repo DIR [--json]   list ..." */
  readonly usage: string;
  run(args: string[]): Promise<number>;
}

type OptionSpec = Record<string, { type: 'string' | 'boolean' }>;

/** parseArgs with usage errors as SnapError('usage'); --help is always accepted. */
function parse(cmd: string, args: string[], options: OptionSpec, positionals = 0) {
  let parsed;
  try {
    parsed = parseArgs({ args, options: { ...options, help: { type: 'boolean' } }, allowPositionals: positionals > 0, strict: true });
  } catch (err) {
    throw new SnapError('usage', `${cmd}: ${(err as Error).message}`);
  }
  if (parsed.positionals.length > positionals) {
    throw new SnapError('usage', `${cmd}: unexpected argument ${JSON.stringify(parsed.positionals[positionals])}`);
  }
  return { values: parsed.values as Record<string, string | boolean | undefined>, positionals: parsed.positionals };
}

function str(v: string | boolean | undefined): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

const log = (line: string): void => {
  process.stdout.write(`${line}\n`);
};

const commands: Record<string, Command> = {
  serve: {
    usage: `  serve [--area DIR | --config FILE]
                                  speak the snapcrypt protocol on stdin/stdout (the command that sshd
                                  forces); the area is DIR, else $SNAPCRYPT_SERVER_AREA, else the
                                  user's area in the server layout of FILE (default
                                  ${DEFAULTS.etc}/snapcrypt/server.json)`,
    run: (args) => serveCommand(args),
  },
  snapshots: {
    usage: `  snapshots --repo DIR [--json]   list the sealed snapshots of a repository area with their object
                                  counts (from each snapshot's clear-text index)`,
    async run(args) {
      const { values } = parse('snapshots', args, { repo: { type: 'string' }, json: { type: 'boolean' } });
      if (values['help']) return printHelp(0);
      const repo = str(values['repo']);
      if (!repo) throw new SnapError('usage', 'snapshots: --repo DIR is required');
      const storage = await openStorage(repo);
      if (!(await storage.exists())) throw new SnapError('not-found', `No repository at ${repo}`);
      for (const info of await storage.listSnapshots()) {
        const snap = await storage.openSnapshot(info.name);
        const index = await snap.readFile('index');
        const objects = index ? index.length / 32 : 0;
        if (values['json']) process.stdout.write(JSON.stringify({ type: 'snapshot', name: info.name, time: info.time, objects }) + '\n');
        else process.stdout.write(`${info.name}  ${objects} objects\n`);
      }
      await storage.close();
      return 0;
    },
  },
  check: {
    usage: `  check [--user NAME] [--read-data] [--json]
                                  without a key: every sealed snapshot's index (and current's) is
                                  well formed and each object it lists is present and non-empty;
                                  --read-data also reads them (btrfs verifies its checksums); any
                                  problem makes exit status 6, after all is checked. Override: --etc DIR`,
    async run(args) {
      const { values } = parse('check', args, { user: { type: 'string' }, 'read-data': { type: 'boolean' }, json: { type: 'boolean' }, etc: { type: 'string' } });
      if (values['help']) return printHelp(0);
      const user = str(values['user']);
      const json = values['json'] === true;
      const readData = values['read-data'] === true;
      const { check, summarize } = await import('../server/check.js');
      const { configFileOf } = await import('../server/seal-helper.js');
      const tty = process.stderr.isTTY === true;
      const problems = await check({
        configFile: configFileOf(str(values['etc'])),
        readData,
        ...(user === undefined ? {} : { user }),
        ...(tty ? { progress: (name: string, done: number, total: number) => process.stderr.write(`\rchecking ${name}: ${Math.floor((100 * done) / total)}%\x1b[K`) } : {}),
        report(name, reports) {
          if (tty) process.stderr.write('\r\x1b[K');
          const s = summarize(name, reports);
          if (json) {
            for (const r of reports) process.stdout.write(`${JSON.stringify({ type: 'snapshot', ...r })}\n`);
            process.stdout.write(`${JSON.stringify({ type: 'summary', ...s })}\n`);
            return;
          }
          const found = s.missing + s.unreadable + s.badIndexes === 0
            ? `all present${readData ? ' and readable' : ''}`
            : `${s.missing} missing, ${s.unreadable} unreadable, ${s.badIndexes} with a bad index or head`;
          const read = readData ? `; ${s.read} read (${(s.bytesRead / 1048576).toFixed(1)} MiB), ${s.shared} shared with an earlier snapshot` : '';
          log(`${name}: ${s.snapshots} snapshot${s.snapshots === 1 ? '' : 's'}${s.current ? ' and current' : ''}, ${s.objects} objects listed, ${found}${read}`);
          for (const r of reports) {
            const faults = [...(r.missing > 0 ? [`${r.missing} missing`] : []), ...(r.unreadable > 0 ? [`${r.unreadable} unreadable`] : []), ...r.index];
            const changed = r.changed ? ' (a backup committed during the check: run it again to confirm)' : '';
            log(`  ${r.name.padEnd(24)}  ${r.objects} objects  ${faults.length > 0 ? faults.join('; ') : 'ok'}${changed}`);
            for (const p of r.problems) log(`    ${p.problem}  ${p.path}`);
            const more = r.missing + r.unreadable - r.problems.length;
            if (more > 0) log(`    and ${more} more`);
          }
        },
      });
      return problems ? ExitStatus.integrity : 0;
    },
  },
  install: {
    usage: `  install --root DIR              (as root) set up this machine as a backup server: the layout in
                                  DIR (on btrfs), group ${DEFAULTS.group}, ${DEFAULTS.etc}/snapcrypt/server.json, the
                                  seal helper, a sudoers rule and an sshd drop-in (see docs/SERVER.md);
                                  safe to run again. Overrides: --etc DIR --sudoers-dir DIR
                                  --sudoers-name NAME --sshd-config-dir DIR --lib-dir DIR --group NAME
                                  --home-base DIR --serve-command CMD; metrics for node_exporter's
                                  textfile collector: --metrics-dir DIR|none (default
                                  ${DEFAULTS.metricsDir}); scheduling of the daily
                                  expire, the hourly alert and the monthly btrfs scrub: --scheduler
                                  systemd|cron|none (default: systemd if it runs, else cron)
                                  --systemd-dir DIR --cron-dir DIR`,
    async run(args) {
      const { values } = parse('install', args, {
        root: { type: 'string' },
        etc: { type: 'string' },
        'sudoers-dir': { type: 'string' },
        'sudoers-name': { type: 'string' },
        'sshd-config-dir': { type: 'string' },
        'lib-dir': { type: 'string' },
        group: { type: 'string' },
        'home-base': { type: 'string' },
        'serve-command': { type: 'string' },
        scheduler: { type: 'string' },
        'systemd-dir': { type: 'string' },
        'cron-dir': { type: 'string' },
        'metrics-dir': { type: 'string' },
      });
      const scheduler = str(values['scheduler']);
      if (scheduler !== undefined && scheduler !== 'systemd' && scheduler !== 'cron' && scheduler !== 'none') {
        throw new SnapError('usage', `install: --scheduler must be systemd, cron or none, not ${JSON.stringify(scheduler)}`);
      }
      if (values['help']) return printHelp(0);
      const root = str(values['root']);
      if (!root) throw new SnapError('usage', 'install: --root DIR is required');
      const metricsDir = str(values['metrics-dir']);
      const opt = <K extends string>(k: K, v: string | boolean | undefined) => (typeof v === 'string' ? { [k]: v } : {}) as Partial<Record<K, string>>;
      const { install } = await import('../server/admin.js');
      await install({
        root,
        log,
        ...opt('etc', values['etc']),
        ...opt('sudoersDir', values['sudoers-dir']),
        ...opt('sudoersName', values['sudoers-name']),
        ...opt('sshdConfigDir', values['sshd-config-dir']),
        ...opt('libDir', values['lib-dir']),
        ...opt('group', values['group']),
        ...opt('homeBase', values['home-base']),
        ...opt('serve', values['serve-command']),
        ...opt('systemdDir', values['systemd-dir']),
        ...opt('cronDir', values['cron-dir']),
        ...(scheduler === undefined ? {} : { scheduler: scheduler as 'systemd' | 'cron' | 'none' }),
        ...(metricsDir === undefined ? {} : { metricsDir: metricsDir === 'none' ? null : metricsDir }),
      });
      return 0;
    },
  },
  status: {
    usage: `  status [--user NAME] [--json]   per user: last backup (server time), its age, snapshots, bytes
                                  only in snapshots, bytes in current and the quota; overdue users
                                  (threshold: policy.json "overdue", default 2d) in red, and exit
                                  status 3. Override: --etc DIR`,
    async run(args) {
      const { values } = parse('status', args, { user: { type: 'string' }, json: { type: 'boolean' }, etc: { type: 'string' } });
      if (values['help']) return printHelp(0);
      const etc = str(values['etc']);
      const user = str(values['user']);
      const { status } = await import('../server/status.js');
      const { formatDuration, formatDurationShort } = await import('../core/duration.js');
      const { formatBytes } = await import('../core/size.js');
      const { configFileOf } = await import('../server/seal-helper.js');
      const rows = await status({ configFile: configFileOf(etc), history: true, ...(user === undefined ? {} : { user }) });
      if (values['json']) {
        for (const r of rows) process.stdout.write(`${JSON.stringify({ type: 'user', ...r })}\n`);
      } else {
        const age = (ms: number | null) => (ms === null ? 'never' : formatDurationShort(Math.max(0, ms - (ms % 60_000))));
        const table = [['user', 'last backup (server time)', 'age', 'snapshots', 'only in snapshots', 'current (of quota)', ''], ...rows.map((r) => [
          r.user,
          r.last ?? '-',
          age(r.ageMs),
          String(r.snapshots),
          r.historyBytes === null ? '-' : formatBytes(r.historyBytes),
          r.quotaBytes === null ? formatBytes(r.currentBytes) : `${formatBytes(r.currentBytes)} of ${formatBytes(r.quotaBytes)} (${Math.round((100 * r.currentBytes) / r.quotaBytes)}%)`,
          r.overdue ? `OVERDUE (no backup for more than ${formatDuration(r.overdueAfterMs)})` : '',
        ])];
        const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
        const red = process.stdout.isTTY === true;
        table.forEach((row, i) => {
          const line = row.map((c, j) => c.padEnd(widths[j]!)).join('  ').trimEnd();
          log(i > 0 && rows[i - 1]!.overdue && red ? `\x1b[31m${line}\x1b[0m` : line);
        });
      }
      return rows.some((r) => r.overdue) ? 3 : 0;
    },
  },
  expire: {
    usage: `  expire [--dry-run] [--user NAME] [--json]
                                  (as root) apply the retention policies of policy.json (beside
                                  server.json, see docs/SERVER.md) to the sealed snapshots: show what
                                  is kept and why, delete the rest; the newest is always kept; then
                                  rewrite the metrics files (server.json "metricsDir").
                                  Override: --etc DIR`,
    async run(args) {
      const { values } = parse('expire', args, {
        'dry-run': { type: 'boolean' },
        user: { type: 'string' },
        json: { type: 'boolean' },
        etc: { type: 'string' },
      });
      if (values['help']) return printHelp(0);
      const etc = str(values['etc']);
      const { configFileOf } = await import('../server/seal-helper.js');
      const configFile = configFileOf(etc);
      const dryRun = values['dry-run'] === true;
      const json = values['json'] === true;
      const user = str(values['user']);
      const { expire } = await import('../server/expire.js');
      const n = await expire({
        configFile,
        dryRun,
        ...(user === undefined ? {} : { user }),
        report(name, decisions) {
          if (json) {
            for (const d of decisions) {
              process.stdout.write(`${JSON.stringify({ type: 'snapshot', user: name, name: d.name, keep: d.keep, reasons: d.reasons, deleted: d.deleted })}\n`);
            }
            return;
          }
          const gone = decisions.filter((d) => !d.keep).length;
          log(`${name}: ${decisions.length - gone} kept, ${gone} ${dryRun ? 'to delete (dry run)' : 'deleted'}`);
          for (const d of decisions) log(`  ${d.keep ? 'keep  ' : dryRun ? 'would delete' : 'deleted'}  ${d.name}${d.keep ? `  ${d.reasons.join(', ')}` : ''}`);
        },
      });
      if (json) process.stdout.write(`${JSON.stringify({ type: 'summary', dryRun, [dryRun ? 'wouldDelete' : 'deleted']: n })}\n`);
      return 0;
    },
  },
  alert: {
    usage: `  alert [--dry-run] [--json]      (as root) once per change, run policy.json's alert.command with a
                                  mail on its stdin when a user becomes overdue or is back (state in
                                  ROOT/state/alerts.json; a failed command is retried next run, exit
                                  9), then rewrite the metrics files. Override: --etc DIR`,
    async run(args) {
      const { values } = parse('alert', args, { 'dry-run': { type: 'boolean' }, json: { type: 'boolean' }, etc: { type: 'string' } });
      if (values['help']) return printHelp(0);
      const { configFileOf } = await import('../server/seal-helper.js');
      const { alert } = await import('../server/alert.js');
      const dryRun = values['dry-run'] === true;
      const json = values['json'] === true;
      const failed = await alert({
        configFile: configFileOf(str(values['etc'])),
        dryRun,
        report(o) {
          if (json) {
            process.stdout.write(`${JSON.stringify({ type: 'user', ...o })}\n`);
            return;
          }
          const what = {
            unchanged: o.state === 'overdue' ? 'notified before' : 'unchanged',
            recorded: dryRun ? 'first seen, would be recorded' : 'first seen, recorded',
            notified: `notified: ${o.subject}`,
            unsent: `recorded; no alert.command in policy.json, so not sent: ${o.subject}`,
            'would-notify': `would send: ${o.subject}`,
            failed: `the alert command failed: ${o.error}; not recorded, the next run tries again`,
          }[o.action];
          if (o.action === 'failed') process.stderr.write(`snapcrypt-server: ${o.user}: ${o.state}, ${what}\n`);
          else log(`${o.user}: ${o.state}, ${what}`);
        },
      });
      if (json) process.stdout.write(`${JSON.stringify({ type: 'summary', dryRun, failed })}\n`);
      return failed > 0 ? ExitStatus.io : 0;
    },
  },
  adduser: {
    usage: `  adduser NAME --key FILE         (as root) create the account NAME (or add a key to it) with its
                                  area, allowed to log in with the public key in FILE only to run
                                  the server. Override: --etc DIR`,
    async run(args) {
      const { values, positionals } = parse('adduser', args, { key: { type: 'string' }, etc: { type: 'string' } }, 1);
      if (values['help']) return printHelp(0);
      const name = positionals[0];
      const key = str(values['key']);
      if (!name) throw new SnapError('usage', 'adduser: the account NAME is required');
      if (!key) throw new SnapError('usage', 'adduser: --key FILE (an OpenSSH public key) is required');
      const etc = str(values['etc']);
      const { addUser } = await import('../server/admin.js');
      await addUser({ name, keyFile: key, log, ...(etc === undefined ? {} : { etc }) });
      return 0;
    },
  },
};

function helpText(): string {
  return `snapcrypt-server: the backup server's side of snapcrypt (needs no key)

Usage: snapcrypt-server COMMAND [options]

Commands:
${Object.values(commands)
  .map((c) => c.usage)
  .join('\n')}

Exit status: 0 ok, 2 usage, 3 (status) a user is overdue, 5 (alert) another alert run is going on,
6 (check) an object is missing or unreadable or an index is malformed, 7 not found, 9 I/O error
(alert: the alert command failed), 10 protocol error.`;

}

/** The calling user's area in the server layout of configFile, and their limits from policy.json. */
async function userArea(configFile: string | undefined): Promise<{ storage: Storage; limits: UploadLimits }> {
  const [{ openUserArea }, { forUser, readServerPolicy }, { DEFAULT_CONFIG_FILE }] = await Promise.all([
    import('../server/area.js'),
    import('../server/policy.js'),
    import('../server/seal-helper.js'),
  ]);
  const file = configFile ?? DEFAULT_CONFIG_FILE;
  const user = userInfo().username;
  const policy = await readServerPolicy(file);
  const storage = await openUserArea({ configFile: file, user });
  return { storage, limits: { label: `the backup area of ${user}`, quotaBytes: forUser(policy.quota, user), freeSpaceFloor: policy.freeSpaceFloor } };
}

/** serve: stdout carries only protocol frames; diagnostics go to stderr. */
async function serveCommand(rest: string[]): Promise<number> {
  lowMemoryServer();
  const logErr = (line: string) => process.stderr.write(`snapcrypt-server: ${line}\n`);
  let storage: Storage;
  let limits: UploadLimits | undefined;
  try {
    let values;
    try {
      values = parseArgs({ args: rest, options: { area: { type: 'string' }, config: { type: 'string' } } }).values;
    } catch (err) {
      throw new SnapError('usage', `serve: ${(err as Error).message}`);
    }
    const area = values.area ?? process.env['SNAPCRYPT_SERVER_AREA'];
    if (area && values.config !== undefined) throw new SnapError('usage', 'serve: give --area or --config, not both');
    if (area) storage = await openStorage(area);
    else ({ storage, limits } = await userArea(values.config));
  } catch (err) {
    const e = err instanceof SnapError ? err : new SnapError('internal', String(err));
    logErr(e.message);
    await refuse(process.stdout, e.code, e.message);
    return e.exitStatus;
  }
  // stdin is read into one reused buffer when it is a pipe or socket (as under sshd), else as a stream
  const status = await serve(reusedBufferInput(0) ?? process.stdin, process.stdout, storage, {
    sshOriginalCommand: process.env['SSH_ORIGINAL_COMMAND'],
    log: logErr,
    ...(limits === undefined ? {} : { limits }),
  });
  await storage.close().catch(() => undefined);
  return status;
}

function printHelp(status: number): number {
  process.stdout.write(helpText() + '\n');
  return status;
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined || cmd === '--help' || cmd === '-h') return printHelp(cmd === undefined ? ExitStatus.usage : 0);
  try {
    const command = Object.hasOwn(commands, cmd) ? commands[cmd] : undefined;
    if (command === undefined) throw new SnapError('usage', `Unknown command "${cmd}" (see "snapcrypt-server --help")`);
    return await command.run(rest);
  } catch (err) {
    process.stderr.write(`snapcrypt-server: ${err instanceof Error ? err.message : String(err)}\n`);
    return exitStatusOf(err);
  }
}

dropOutputToClosedPipes();
finish(await main(process.argv.slice(2)), 'snapcrypt-server');
