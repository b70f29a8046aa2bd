/**
 * `snapcrypt-server alert` and the metrics files, on a server layout in a temp directory: snapshots
 * are plain directories named by (synthetic) server times, which is all status reads. policy.json's
 * alert.command is a shell script that appends its environment and stdin to a log, and fails while a
 * flag file exists. Runs the real program as root (the state file is root's); in CI it never skips.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as fsp from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { before, describe, it } from 'node:test';
import { formatDurationShort } from '../src/core/duration.js';
import { escapeLabelValue, formatMetrics, ledgerBytes, policyMetricsOf, SAFE_PATH } from '../src/server/seal-helper.js';
import { btrfsTestDir } from './env.js';
import { parseMetrics, readMetrics, SAMPLE } from './metrics-format.js';
import { handWrittenServer, server } from './server-fixture.js';

const CI = process.env['CI'] === 'true';
const isRoot = process.getuid?.() === 0;
// a root-owned directory chain is needed for the trusted server.json: the btrfs test mount has one
const haveDir = btrfsTestDir() !== null; // throws in CI without it
if (CI && !isRoot) throw new Error('CI must run test/alert as root');
const skip = !isRoot || !haveDir ? 'needs root and SNAPCRYPT_TEST_BTRFS' : false;
const H = 3_600_000;
const D = 24 * H;
const HEAD = 'cd'.repeat(32);

interface HookCall {
  env: Record<string, string>;
  stdin: string;
}

describe('snapcrypt-server alert and the metrics files', { skip }, () => {
  let top = '';
  let etc = '';
  let root = '';
  let metrics = '';
  let log = '';
  let failFlag = '';
  let hook = '';
  const policyFile = () => join(etc, 'snapcrypt', 'policy.json');
  const stateFile = () => join(root, 'state', 'alerts.json');
  const newest: Record<string, string> = {};

  const snapshot = async (user: string, time: number) => {
    const name = new Date(time).toISOString();
    await fsp.mkdir(join(root, 'snapshots', user, name), { recursive: true });
    newest[user] = name;
  };
  const writePolicy = (policy: object) => fsp.writeFile(policyFile(), JSON.stringify(policy), { mode: 0o644 });
  const basePolicy = () => ({ quota: { users: { alice: '1GiB' } }, alert: { command: [hook, 'admin@example.org'] } });
  const calls = async (): Promise<HookCall[]> => {
    const text = await fsp.readFile(log, 'utf8').catch(() => '');
    return text.split('=== call\n').slice(1).map((block) => {
      const [envText = '', stdin = ''] = block.split('=== stdin\n');
      const env = Object.fromEntries(envText.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
      return { env, stdin: stdin.replace(/=== end\n$/, '') };
    });
  };
  const state = async () => JSON.parse(await fsp.readFile(stateFile(), 'utf8')) as { version: number; users: Record<string, { state: string; since: string }> };
  const states = async () => Object.fromEntries(Object.entries((await state()).users).map(([u, s]) => [u, s.state]));
  const alert = (...args: string[]) => server('alert', '--etc', etc, ...args);

  before(async () => {
    ({ top, etc, root, metrics } = await handWrittenServer('alert'));
    log = join(top, 'hook.log');
    failFlag = join(top, 'fail');
    hook = join(top, 'hook.sh');
    await fsp.writeFile(
      hook,
      `#!/bin/sh\n{\n  echo "=== call"\n  echo "USER=$SNAPCRYPT_USER"\n  echo "STATE=$SNAPCRYPT_STATE"\n  echo "LAST=$SNAPCRYPT_LAST"\n  echo "AGE=$SNAPCRYPT_AGE_SECONDS"\n` +
        `  echo "PATH=$PATH"\n  echo "CI=\${CI-unset}"\n  echo "ARGS=$*"\n  echo "=== stdin"\n  cat\n  echo "=== end"\n} >> ${log}\n` +
        `if [ -e ${failFlag} ]; then echo "mail server down" >&2; exit 1; fi\n`,
      { mode: 0o755 },
    );
    const now = Date.now();
    // alice: last backup 10 days ago (overdue), with a usage ledger for her current head
    for (const t of [12, 11, 10]) await snapshot('alice', now - t * D);
    await fsp.mkdir(join(root, 'users', 'alice', 'current', 'repo'), { recursive: true });
    await fsp.writeFile(join(root, 'users', 'alice', 'current', 'repo', 'head'), `${HEAD}\n`);
    await fsp.mkdir(join(root, 'users', 'alice', 'run'));
    await fsp.writeFile(join(root, 'users', 'alice', 'run', 'usage'), JSON.stringify({ version: 1, head: HEAD, objectBytes: 7777 }));
    // bob and dave: an hour ago (ok); carol: an area, no snapshot yet (overdue)
    await snapshot('bob', now - H);
    await snapshot('dave', now - H);
    await fsp.mkdir(join(root, 'users', 'carol'), { recursive: true });
    await writePolicy(basePolicy());
    // a file snapcrypt wrote for a user who is gone, and files it did not write
    await fsp.writeFile(join(metrics, 'snapcrypt_user_ghost.prom'), '# old\n');
    await fsp.writeFile(join(metrics, 'other.prom'), 'other_metric 1\n');
    await fsp.writeFile(join(metrics, 'snapcrypt_user_Not-A-User.prom'), 'x 1\n');
  });

  it('formats metrics deterministically and escapes label values', () => {
    assert.equal(escapeLabelValue('a"b\\c\nd'), 'a\\"b\\\\c\\nd');
    const text = formatMetrics([
      { name: 'z_total', help: 'Z.', samples: [{ labels: { b: '2', a: 'x"y' }, value: 1.5 }, { labels: { a: 'a', b: '1' }, value: 0 }] },
      { name: 'a_empty', help: 'Left out.', samples: [] },
      { name: 'm_plain', help: 'Back\\slash\nand a line feed.', samples: [{ labels: {}, value: 2 ** 40 }] },
    ]);
    assert.equal(
      text,
      '# HELP m_plain Back\\\\slash\\nand a line feed.\n# TYPE m_plain gauge\nm_plain 1099511627776\n' +
        '# HELP z_total Z.\n# TYPE z_total gauge\nz_total{a="a",b="1"} 0\nz_total{a="x\\"y",b="2"} 1.5\n',
    );
    for (const line of text.split('\n').filter((l) => l !== '' && !l.startsWith('#'))) assert.match(line, SAMPLE);
    // what the seal helper takes from the ledger and from the previous file
    assert.equal(ledgerBytes(JSON.stringify({ version: 1, head: HEAD, objectBytes: 5 }), `${HEAD}\n`), 5);
    assert.equal(ledgerBytes(JSON.stringify({ version: 1, head: HEAD, objectBytes: 5 }), 'ab'.repeat(32)), null, 'another head');
    assert.equal(ledgerBytes(JSON.stringify({ version: 1, head: HEAD, objectBytes: -1 }), HEAD), null);
    assert.equal(ledgerBytes('{"version": 1, "head":', HEAD), null);
    assert.equal(ledgerBytes(null, HEAD), null);
    const previous = 'snapcrypt_quota_bytes{user="alice"} 1073741824\nsnapcrypt_overdue_threshold_seconds{user="alice"} 172800\nsnapcrypt_overdue{user="alice"} 1\n';
    assert.deepEqual(policyMetricsOf(previous, 'alice'), { quotaBytes: 1073741824, overdueAfterMs: 172800000, overdue: false });
    assert.deepEqual(policyMetricsOf(previous, 'bob'), {});
    assert.deepEqual([formatDurationShort(3 * D + 4 * H + 5000), formatDurationShort(3 * D + 5 * 60_000), formatDurationShort(330_000), formatDurationShort(900)], ['3d4h', '3d', '5m30s', '0s']);
  });

  it('the first run notifies exactly the overdue users, records every state and writes the metrics files', async () => {
    const r = await alert();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '');
    const lines = r.stdout.trim().split('\n');
    assert.deepEqual(lines, [
      'alice: overdue, notified: snapcrypt: alice has had no backup for 10d (threshold 2d)',
      'bob: ok, first seen, recorded',
      'carol: overdue, notified: snapcrypt: carol has no backup yet (threshold 2d)',
      'dave: ok, first seen, recorded',
    ]);
    const c = await calls();
    assert.deepEqual(c.map((x) => [x.env['USER'], x.env['STATE']]), [['alice', 'overdue'], ['carol', 'overdue']]);
    const [a, b] = c as [HookCall, HookCall];
    assert.equal(a.env['LAST'], newest['alice']);
    assert.ok(Math.abs(Number(a.env['AGE']) - 10 * 86_400) < 60, `age ${a.env['AGE']}`);
    assert.equal(a.env['PATH'], SAFE_PATH);
    assert.equal(a.env['CI'], 'unset', 'nothing else of the caller\'s environment');
    assert.equal(a.env['ARGS'], 'admin@example.org');
    assert.equal(a.stdin.split('\n')[0], 'Subject: snapcrypt: alice has had no backup for 10d (threshold 2d)');
    assert.equal(a.stdin.split('\n')[1], '', 'a blank line after the header');
    for (const re of [/^User: +alice$/m, new RegExp(`^Last backup: +${newest['alice']!.replace(/\./g, '\\.')} \\(server time\\)$`, 'm'), /^Age: +10d \(\d+ s\)$/m, /^Threshold: +2d$/m, /^Snapshots: +3$/m, new RegExp(`^Host: +${hostname()}$`, 'm')]) {
      assert.match(a.stdin, re);
    }
    assert.deepEqual([b.env['LAST'], b.env['AGE']], ['', '']);
    assert.match(b.stdin, /^Last backup: +none$/m);
    assert.deepEqual(await states(), { alice: 'overdue', bob: 'ok', carol: 'overdue', dave: 'ok' });
    const st = await fsp.stat(stateFile());
    assert.deepEqual([st.uid, st.mode & 0o777], [0, 0o600]);
    const dir = await fsp.stat(join(root, 'state'));
    assert.deepEqual([dir.uid, dir.mode & 0o7777], [0, 0o700]);

    // the metrics files: every user's, from status; the gone user's removed, other files left alone
    assert.deepEqual((await fsp.readdir(metrics)).sort(), ['other.prom', 'snapcrypt_user_Not-A-User.prom', 'snapcrypt_user_alice.prom', 'snapcrypt_user_bob.prom', 'snapcrypt_user_carol.prom', 'snapcrypt_user_dave.prom']);
    const alice = await fsp.readFile(join(metrics, 'snapcrypt_user_alice.prom'), 'utf8');
    assert.deepEqual(Object.fromEntries(parseMetrics(alice)), {
      'snapcrypt_current_bytes{user="alice"}': 7777,
      'snapcrypt_last_backup_timestamp_seconds{user="alice"}': Date.parse(newest['alice']!) / 1000,
      'snapcrypt_overdue{user="alice"}': 1,
      'snapcrypt_overdue_threshold_seconds{user="alice"}': 172_800,
      'snapcrypt_quota_bytes{user="alice"}': 1024 ** 3,
      'snapcrypt_snapshots{user="alice"}': 3,
    });
    assert.match(alice, /^# HELP snapcrypt_snapshots .+\n# TYPE snapcrypt_snapshots gauge\nsnapcrypt_snapshots\{user="alice"\} 3\n$/m);
    const fst = await fsp.stat(join(metrics, 'snapcrypt_user_alice.prom'));
    assert.deepEqual([fst.uid, fst.mode & 0o777], [0, 0o644]);
    assert.deepEqual(await readMetrics(join(metrics, 'snapcrypt_user_carol.prom')), {
      'snapcrypt_current_bytes{user="carol"}': 0,
      'snapcrypt_overdue{user="carol"}': 1,
      'snapcrypt_overdue_threshold_seconds{user="carol"}': 172_800,
      'snapcrypt_snapshots{user="carol"}': 0,
    }, 'no last backup, no quota: those gauges are left out');
    assert.equal((await readMetrics(join(metrics, 'snapcrypt_user_bob.prom')))['snapcrypt_overdue{user="bob"}'], 0);
  });

  it('a second run with no change notifies nobody', async () => {
    const r = await alert();
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['alice: overdue, notified before', 'bob: ok, unchanged', 'carol: overdue, notified before', 'dave: ok, unchanged']);
    assert.equal((await calls()).length, 2);
  });

  it('a user with a new snapshot gets one "ok" notice', async () => {
    await snapshot('alice', Date.now() - 60_000);
    const r = await alert('--json');
    assert.equal(r.code, 0, r.stderr);
    const out = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    const { subject, ...rest } = out[0]!;
    assert.deepEqual(rest, { type: 'user', user: 'alice', state: 'ok', previous: 'overdue', action: 'notified', error: null });
    assert.match(String(subject), /^snapcrypt: alice is backed up again \(last backup 1m(\d+s)? ago\)$/);
    assert.deepEqual(out.at(-1), { type: 'summary', dryRun: false, failed: 0 });
    const c = await calls();
    assert.equal(c.length, 3);
    assert.deepEqual([c[2]!.env['USER'], c[2]!.env['STATE'], c[2]!.env['LAST']], ['alice', 'ok', newest['alice']]);
    assert.equal((await states())['alice'], 'ok');
    assert.equal((await readMetrics(join(metrics, 'snapcrypt_user_alice.prom')))['snapcrypt_overdue{user="alice"}'], 0);
    assert.equal((await alert()).stdout.split('\n')[0], 'alice: ok, unchanged');
    assert.equal((await calls()).length, 3);
  });

  it('a failing command: exit 9, one line, the state is not recorded, and the next run tries again', async () => {
    await writePolicy({ ...basePolicy(), overdue: { users: { dave: '30m' } } });
    await fsp.writeFile(failFlag, '');
    for (let attempt = 1; attempt <= 2; attempt++) {
      const r = await alert();
      assert.equal(r.code, 9, r.stderr);
      assert.equal(r.stderr, 'snapcrypt-server: dave: overdue, the alert command failed: ' + `${hook} exited with status 1: mail server down; not recorded, the next run tries again\n`);
      assert.doesNotMatch(r.stdout, /^dave/m, 'one line per user');
      assert.equal((await states())['dave'], 'ok', `attempt ${attempt}: not recorded`);
      assert.equal((await calls()).filter((x) => x.env['USER'] === 'dave').length, attempt, 'tried again');
    }
    // a command that cannot run at all
    await writePolicy({ ...basePolicy(), overdue: { users: { dave: '30m' } }, alert: { command: [join(top, 'no-such-hook')] } });
    const missing = await alert();
    assert.equal(missing.code, 9, missing.stderr);
    assert.match(missing.stderr, /^snapcrypt-server: dave: overdue, the alert command failed: cannot run \S+no-such-hook: no such file \(ENOENT\); check alert\.command in policy\.json; not recorded/);
    assert.equal(missing.stderr.trim().split('\n').length, 1);
    await writePolicy({ ...basePolicy(), overdue: { users: { dave: '30m' } } });
    await fsp.rm(failFlag);
    const r = await alert();
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^dave: overdue, notified: snapcrypt: dave has had no backup for 1h\d*m? \(threshold 30m\)$/m);
    assert.equal((await states())['dave'], 'overdue');
    assert.equal((await calls()).filter((x) => x.env['USER'] === 'dave').length, 3);
  });

  it('--dry-run shows what would be sent, runs nothing and writes nothing', async () => {
    await writePolicy({ ...basePolicy(), overdue: { users: { dave: '30m', bob: '30m' } } });
    const before = { state: await fsp.readFile(stateFile(), 'utf8'), stateTime: (await fsp.stat(stateFile())).mtimeMs, metrics: (await fsp.stat(join(metrics, 'snapcrypt_user_bob.prom'))).mtimeMs, calls: (await calls()).length };
    await fsp.writeFile(join(metrics, 'snapcrypt_user_ghost.prom'), '# old\n');
    const r = await alert('--dry-run');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^bob: overdue, would send: snapcrypt: bob has had no backup for 1h\d*m? \(threshold 30m\)$/m);
    assert.equal((await calls()).length, before.calls);
    assert.equal(await fsp.readFile(stateFile(), 'utf8'), before.state);
    assert.equal((await fsp.stat(stateFile())).mtimeMs, before.stateTime);
    assert.equal((await fsp.stat(join(metrics, 'snapcrypt_user_bob.prom'))).mtimeMs, before.metrics);
    assert.ok(await fsp.stat(join(metrics, 'snapcrypt_user_ghost.prom')), 'nothing removed either');
    await fsp.rm(join(metrics, 'snapcrypt_user_ghost.prom'));
  });

  it('without alert.command: states are recorded, nothing is sent, exit 0', async () => {
    await writePolicy({ overdue: { users: { dave: '30m', bob: '30m' } } });
    await snapshot('carol', Date.now() - 60_000);
    const r = await alert();
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^bob: overdue, recorded; no alert\.command in policy\.json, so not sent: snapcrypt: bob has had no backup for/m);
    assert.match(r.stdout, /^carol: ok, recorded; no alert\.command in policy\.json, so not sent: snapcrypt: carol is backed up again/m);
    assert.deepEqual(await states(), { alice: 'ok', bob: 'overdue', carol: 'ok', dave: 'overdue' });
    assert.equal((await calls()).length, 6);
    // a user who is gone is forgotten, and so is their metrics file
    await fsp.rm(join(root, 'snapshots', 'dave'), { recursive: true });
    assert.equal((await alert()).code, 0);
    assert.deepEqual(Object.keys((await state()).users), ['alice', 'bob', 'carol']);
    assert.equal(await fsp.stat(join(metrics, 'snapcrypt_user_dave.prom')).catch(() => null), null);
  });

  it('one run at a time: the lock of a live run refuses a second (exit 5, nothing sent); a dead run\'s is taken over', async () => {
    const lock = `${stateFile()}.lock`;
    const before = await fsp.readFile(stateFile(), 'utf8');
    const holder = spawn('sleep', ['30']);
    try {
      await fsp.writeFile(lock, `${holder.pid}\n`);
      const r = await alert();
      assert.equal(r.code, 5, r.stderr);
      assert.match(r.stderr, new RegExp(`Another snapcrypt-server alert is running \\(pid ${holder.pid}, lock \\S+alerts\\.json\\.lock\\); if it is not, remove the lock`));
      assert.equal(await fsp.readFile(stateFile(), 'utf8'), before, 'the state is untouched');
      assert.equal(await fsp.readFile(lock, 'utf8'), `${holder.pid}\n`, 'the other run keeps its lock');
    } finally {
      holder.kill();
    }
    await once(holder, 'exit');
    const r = await alert();
    assert.equal(r.code, 0, r.stderr);
    await assert.rejects(fsp.stat(lock), /ENOENT/, 'the lock is released');
  });

  it('refuses a policy.json that others could change, and a damaged state file, with one line', async () => {
    await fsp.chmod(policyFile(), 0o666);
    const r = await alert();
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /Refusing \S+policy\.json: root acts on it, so it must be a regular file owned by root and writable by root only/);
    await fsp.chmod(policyFile(), 0o644);
    await fsp.writeFile(stateFile(), '{"version": 1, "users": {"alice": {"state": "fine"}}}');
    const bad = await alert();
    assert.equal(bad.code, 9, bad.stderr);
    assert.match(bad.stderr, /The alert state file \S+alerts\.json is damaged \(bad entry "alice"\); move it away to start over/);
    assert.equal(bad.stderr.trim().split('\n').length, 1);
  });
});
