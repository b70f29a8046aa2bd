/**
 * The office, end to end, as the administrator and the users see it. On a btrfs loop filesystem of its
 * own (small, so that it can be filled): `snapcrypt-server install` and `adduser`, a real sshd with the
 * drop-in that install writes, and workstations (this process, with their own config and cache
 * directories) that run `snapcrypt setup`, then init, backup, snapshots, restore and verify over
 * ssh://, sealed by the real sudo rule and root helper, which writes the user's metrics file. Then the failures: the connection cut in the
 * middle of an upload (client side and server side), two clients at once, a killed client's lock, the
 * recovery drill on a new machine, and a full disk. Needs root, btrfs and sshd: in CI it never skips.
 *
 * Outside its temp directories it touches: two accounts (sct-oa-XXXX, sct-ob-XXXX), one group and one
 * sudoers file (/etc/sudoers.d/snapcrypt-office-XXXX), all removed at the end, and one loop device.
 */
import assert from 'node:assert/strict';
import { execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { assertSameTree, expectExit, jsonLines, runCli, startCli as startCliProcess, treeSnapshot } from './cli-helpers.js';
import { btrfsTempDir, btrfsTestDir } from './env.js';
import { readMetrics } from './metrics-format.js';
import { type LayoutSshd, removeAccounts, run, server, startLayoutSshd } from './server-fixture.js';
import { sshdAvailable } from './sshd.js';
import { isSnapshotName, objectBytesOf, readUsageLedger } from '../src/drivers/localdir.js';

const CI = process.env['CI'] === 'true';
const isRoot = process.getuid?.() === 0;
const haveBtrfs = btrfsTestDir() !== null; // throws in CI without btrfs
if (CI && (!isRoot || !sshdAvailable())) throw new Error('CI must run test/office as root with /usr/sbin/sshd');
const skip = !isRoot || !haveBtrfs || !sshdAvailable() ? 'needs root, SNAPCRYPT_TEST_BTRFS and sshd' : false;

const tag = randomBytes(3).toString('hex');
const alice = `sct-oa-${tag}`;
const bob = `sct-ob-${tag}`;
const group = `sct-og-${tag}`;
const sudoersFile = join('/etc/sudoers.d', `snapcrypt-office-${tag}`);
const DISK_MB = 320;
const MiB = 1024 * 1024;
/** Every run here takes seconds: a run that takes minutes hangs (runCli then reports its threads). */
const RUN_TIMEOUT = 120_000;

const cleanupSystem = (): void => removeAccounts([alice, bob], group, sudoersFile);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Files of random (incompressible) content: count × size bytes under dir. */
async function randomFiles(dir: string, count: number, size: number): Promise<void> {
  await fsp.mkdir(dir, { recursive: true });
  for (let i = 0; i < count; i++) await fsp.writeFile(join(dir, `r${String(i).padStart(4, '0')}.bin`), randomBytes(size));
}

const background = new Set<ChildProcess>();

/** The CLI started in the background, for tests that stop or kill it mid-run (killed at the end). */
function startCli(args: readonly string[], env: Record<string, string>): ReturnType<typeof startCliProcess> {
  const started = startCliProcess(args, { env, timeoutMs: RUN_TIMEOUT });
  background.add(started.child);
  return started;
}

/** Waits until cond() holds (checked every 50 ms), failing after ms. */
async function waitFor(what: string, cond: () => Promise<boolean>, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

describe('the office: workstations back up over SSH into their accounts on a btrfs server', { skip, timeout: 15 * 60_000 }, () => {
  let top = '';
  let mnt = '';
  let img = '';
  let root = '';
  let etc = '';
  let sshdDir = '';
  let sshd: LayoutSshd | null = null;
  let repo = '';
  let aliceEnv: Record<string, string> = {};
  let aliceUid = 0;
  const PASS = 'office passphrase, long enough';
  const src = () => join(top, 'alice-files');
  const objectsDir = () => join(root, 'users', alice, 'current', 'repo', 'objects');
  const snapshotsDir = () => join(root, 'snapshots', alice);
  const lockFile = () => join(root, 'users', alice, 'run', 'lock');
  const metricsDir = () => join(top, 'metrics');
  /** Alice's metrics file, parsed; and what it should say of her snapshots and her usage ledger. */
  const aliceMetrics = () => readMetrics(join(metricsDir(), `snapcrypt_user_${alice}.prom`));
  async function expectedMetrics(): Promise<Record<string, number>> {
    const names = await sealed();
    const bytes = await readUsageLedger(join(root, 'users', alice, 'run'), join(root, 'users', alice, 'current', 'repo'));
    assert.ok(bytes !== null && bytes > 0, 'a usage ledger for the head just sealed');
    const l = `{user="${alice}"}`;
    return {
      [`snapcrypt_current_bytes${l}`]: bytes,
      [`snapcrypt_last_backup_timestamp_seconds${l}`]: Date.parse(names.at(-1)!) / 1000,
      [`snapcrypt_snapshots${l}`]: names.length,
    };
  }

  /** Object files in alice's current (temp files excluded). */
  async function objectCount(): Promise<number> {
    let n = 0;
    for (const d of await fsp.readdir(objectsDir()).catch(() => [] as string[])) {
      for (const f of await fsp.readdir(join(objectsDir(), d)).catch(() => [] as string[])) if (/^[0-9a-f]{64}$/.test(f)) n++;
    }
    return n;
  }
  /** Alice's serve processes on the server: node, not the shell through which sshd starts it. */
  async function servePids(): Promise<number[]> {
    const r = await run('pgrep', ['-u', String(aliceUid), '-f', 'snapcrypt-server.js serve']);
    const pids: number[] = [];
    for (const pid of r.stdout.split('\n').filter((l) => l !== '').map(Number)) {
      const argv0 = (await fsp.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0')[0] ?? '';
      if (argv0.endsWith('/node')) pids.push(pid);
    }
    return pids;
  }
  const sealed = async () => (await fsp.readdir(snapshotsDir())).sort();
  const workstation = (name: string, pass = PASS): Record<string, string> => ({
    SNAPCRYPT_PASSWORD: pass,
    SNAPCRYPT_TEST_WEAK_KDF: '1',
    SNAPCRYPT_CONFIG_DIR: join(top, name, 'config'),
    SNAPCRYPT_CACHE_DIR: join(top, name, 'cache'),
  });
  /** `snapcrypt setup` on a workstation, then adduser with the public key it printed. */
  async function admit(env: Record<string, string>, user: string): Promise<Record<string, unknown>> {
    const setup = await runCli(['setup', `${user}@127.0.0.1:${sshd!.port}`, '--json'], { env });
    expectExit(setup, `setup for ${user}`);
    const out = jsonLines(setup.stdout).find((o) => o['type'] === 'setup')!;
    assert.equal(out['adminCommand'], `snapcrypt-server adduser ${user} --key ${user}.pub`);
    const keyFile = join(top, `${user}-${String(out['keyCreated'])}-${Date.now()}.pub`);
    await fsp.copyFile(String(out['publicKeyFile']), keyFile);
    const add = await server('adduser', user, '--key', keyFile, '--etc', etc);
    assert.equal(add.code, 0, add.stderr);
    return out;
  }

  before(async () => {
    process.once('exit', cleanupSystem);
    const dir = await btrfsTempDir('office');
    assert.ok(dir);
    top = dir;
    await fsp.chmod(top, 0o755); // the accounts reach their homes through it
    // the server's own small filesystem
    img = join(await fsp.mkdtemp('/var/tmp/snapcrypt-office-'), 'disk.img');
    mnt = join(top, 'disk');
    await fsp.mkdir(mnt);
    execFileSync('truncate', ['-s', `${DISK_MB}M`, img]);
    execFileSync('mkfs.btrfs', ['-q', '-f', img], { stdio: 'ignore' });
    execFileSync('mount', ['-o', 'loop', img, mnt]);
    await fsp.chmod(mnt, 0o755);
    root = join(mnt, 'srv');
    etc = join(top, 'etc');
    sshdDir = join(top, 'sshd');
    const inst = await server('install', '--root', root, '--etc', etc, '--lib-dir', join(top, 'lib'), '--sshd-config-dir', sshdDir,
      '--home-base', join(top, 'home'), '--group', group, '--sudoers-name', `snapcrypt-office-${tag}`, '--metrics-dir', join(top, 'metrics'), '--scheduler', 'none');
    assert.equal(inst.code, 0, inst.stderr);
    const live = join(top, 'sshd-live');
    await fsp.mkdir(live);
    // the accounts exist before sshd's AllowUsers matters; they are made by adduser below
    sshd = await startLayoutSshd(live, sshdDir, [alice, bob]);
    repo = `ssh://${alice}@127.0.0.1:${sshd.port}/`;
  });

  after(async () => {
    for (const c of background) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await sshd?.stop();
    await run('pkill', ['-KILL', '-u', alice]);
    await run('pkill', ['-KILL', '-u', bob]);
    if (mnt !== '') {
      const u = await run('umount', [mnt]);
      if (u.code !== 0) await run('umount', ['-l', mnt]);
    }
    if (img !== '') await fsp.rm(join(img, '..'), { recursive: true, force: true });
    cleanupSystem();
  });

  it('setup, adduser, then init, backup, snapshots, restore and verify over SSH, sealed by root', async () => {
    aliceEnv = workstation('alice-ws');
    const out = await admit(aliceEnv, alice);
    assert.equal(out['keyCreated'], true);
    assert.equal(out['repo'], repo);
    aliceUid = Number((await run('id', ['-u', alice])).stdout.trim());

    await fsp.mkdir(join(src(), 'docs', 'deep'), { recursive: true });
    await fsp.writeFile(join(src(), 'docs', 'letter.txt'), 'Dear Bob,\n');
    await fsp.writeFile(join(src(), 'docs', 'deep', 'table.csv'), 'a,b\n1,2\n'.repeat(10_000));
    await fsp.writeFile(join(src(), 'photo.raw'), randomBytes(3 * MiB + 5));
    await fsp.symlink('docs/letter.txt', join(src(), 'link'));
    await fsp.writeFile(join(src(), 'empty'), '');

    expectExit(await runCli(['init', '--repo', repo], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'init');
    expectExit(await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'first backup');
    const firstTree = await treeSnapshot(src());
    await fsp.writeFile(join(src(), 'docs', 'letter.txt'), 'Dear Bob, the second version.\n');
    const t0 = Date.now();
    const second = await runCli(['backup', '--repo', repo, src(), '--json'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    expectExit(second, 'second backup');
    const summary = jsonLines(second.stdout).find((o) => o['type'] === 'summary')!;
    assert.ok(Number(summary['bytesAdded']) < 64 * 1024, `only the change travels: ${summary['bytesAdded']} bytes`);

    // the server sealed two read-only snapshots, root's, named by its own clock
    const names = await sealed();
    assert.equal(names.length, 2);
    for (const name of names) {
      assert.ok(isSnapshotName(name), name);
      const st = await fsp.stat(join(snapshotsDir(), name));
      assert.deepEqual([st.uid, st.mode & 0o7777, st.ino], [0, 0o750, 256]);
      assert.match((await run('btrfs', ['property', 'get', '-ts', join(snapshotsDir(), name), 'ro'])).stdout, /ro=true/);
    }
    assert.ok(Math.abs(Date.parse(names[1]!) - t0) < 60_000, `${names[1]} is the server's time of the second backup`);
    // the seal helper wrote alice's metrics file: root's, 0644, from her snapshots and usage ledger
    assert.deepEqual(await aliceMetrics(), await expectedMetrics());
    const mst = await fsp.stat(join(metricsDir(), `snapcrypt_user_${alice}.prom`));
    assert.deepEqual([mst.uid, mst.mode & 0o777], [0, 0o644]);

    const snaps = await runCli(['snapshots', '--repo', repo, '--json'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    expectExit(snaps, 'snapshots');
    const listed = jsonLines(snaps.stdout).filter((l) => l['type'] === 'snapshot');
    assert.deepEqual(listed.map((l) => l['time']).sort(), names);

    // one file from the first snapshot, and everything from the latest
    const one = join(top, 'restore-one');
    expectExit(await runCli(['restore', '--repo', repo, `${names[0]}:${join(src(), 'docs', 'letter.txt')}`, '--target', one], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'restore one file');
    assert.equal(await fsp.readFile(join(one, 'letter.txt'), 'utf8'), 'Dear Bob,\n');
    const all = join(top, 'restore-all');
    expectExit(await runCli(['restore', '--repo', repo, 'latest', '--target', all], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'restore everything');
    assertSameTree(await treeSnapshot(join(all, src())), await treeSnapshot(src()), 'latest snapshot restored');
    const old = join(top, 'restore-first');
    expectExit(await runCli(['restore', '--repo', repo, names[0]!, '--target', old], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'restore the first');
    assertSameTree(await treeSnapshot(join(old, src())), firstTree, 'first snapshot restored');
    expectExit(await runCli(['verify', '--repo', repo, '--read-data'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'verify --read-data');

    // the server holds no plaintext: no file name, no content
    const grep = await run('grep', ['-rlaF', '-e', 'Dear Bob', '-e', 'letter.txt', '-e', 'table.csv', join(root, 'users', alice), snapshotsDir()]);
    assert.equal(grep.stdout, '', 'plaintext on the server');
  });

  it("alice's key cannot reach bob's account, and bob's area stays his", async () => {
    const bobEnv = workstation('bob-ws', 'bob has his own passphrase');
    await admit(bobEnv, bob);
    const bobRepo = `ssh://${bob}@127.0.0.1:${sshd!.port}/`;
    expectExit(await runCli(['init', '--repo', bobRepo], { env: bobEnv, timeoutMs: RUN_TIMEOUT }), 'bob init');
    const bobSrc = join(top, 'bob-files');
    await fsp.mkdir(bobSrc);
    await fsp.writeFile(join(bobSrc, 'b.txt'), 'bob\n');
    expectExit(await runCli(['backup', '--repo', bobRepo, bobSrc], { env: bobEnv, timeoutMs: RUN_TIMEOUT }), 'bob backup');
    // alice's workstation (her key, her passphrase) against bob's account: ssh refuses the key
    const r = await runCli(['snapshots', '--repo', bobRepo], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    assert.equal(r.code, 9, r.stderr);
    assert.match(r.stderr, /Permission denied/);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.equal((await fsp.readdir(join(root, 'snapshots', bob))).length, 1);
  });

  it('a cut connection mid-upload leaves no snapshot, and the next run sends only what is missing', async () => {
    const big = join(src(), 'big');
    await randomFiles(big, 40, MiB);
    for (const victim of ['ssh client', 'server process'] as const) {
      const before = await sealed();
      const objectsBefore = await objectCount();
      const run1 = startCli(['backup', '--repo', repo, src(), '--json'], aliceEnv);
      await waitFor('objects arriving on the server', async () => (await objectCount()) >= objectsBefore + 8 || run1.child.exitCode !== null);
      assert.equal(run1.child.exitCode, null, 'the backup was still running');
      if (victim === 'ssh client') {
        const ssh = (await run('pgrep', ['-P', String(run1.child.pid), '-x', 'ssh'])).stdout.trim();
        assert.match(ssh, /^\d+$/, 'the CLI runs one ssh');
        process.kill(Number(ssh), 'SIGKILL');
      } else {
        const pids = await servePids();
        assert.equal(pids.length, 1, `one serve process: ${pids.join(' ')}`);
        process.kill(pids[0]!, 'SIGKILL');
      }
      const cut = await run1.done;
      assert.equal(cut.code, 9, `${victim}: ${cut.stderr}`);
      const lines = cut.stderr.trim().split('\n');
      assert.equal(lines.length, 1, cut.stderr);
      assert.match(lines[0]!, /^snapcrypt: Connection to ssh:\/\/\S+ failed: the connection was lost \(ssh ended with /, cut.stderr);
      assert.deepEqual(await sealed(), before, 'no snapshot from the cut run');
      await waitFor('the serve process to end', async () => (await servePids()).length === 0, 20_000);
      const arrived = (await objectCount()) - objectsBefore;
      assert.ok(arrived >= 8, `${arrived} objects arrived`);
      if (victim === 'server process') {
        // killed while holding the lock: the lock file stays, naming a process that no longer exists
        assert.ok(await fsp.stat(lockFile()).catch(() => null), 'the killed server left its lock');
      }
      const resumed = await runCli(['backup', '--repo', repo, src(), '--json'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
      expectExit(resumed, `backup after the ${victim} was killed`);
      const s = jsonLines(resumed.stdout).find((o) => o['type'] === 'summary')!;
      // 40 one-chunk files, and a few trees (the commit prunes the trees the snapshot no longer needs)
      assert.ok(Number(s['objectsAdded']) <= 40 - arrived + 8, `${victim}: the resumed run added ${s['objectsAdded']} objects, ${arrived} of 40 chunks had arrived`);
      console.log(`# ${victim} killed: "${lines[0]}"; ${arrived} objects had arrived, the resumed run added ${s['objectsAdded']}`);
      assert.equal((await sealed()).length, before.length + 1);
      await randomFiles(big, 40, MiB); // new content for the next round
    }
    const target = join(top, 'restore-after-cuts');
    await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }).then((r) => expectExit(r, 'backup after the cuts'));
    expectExit(await runCli(['restore', '--repo', repo, 'latest', '--target', target], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'restore after the cuts');
    assertSameTree(await treeSnapshot(join(target, src())), await treeSnapshot(src()));
    await fsp.rm(target, { recursive: true });
  });

  it('two clients of one user: the second is told the repository is locked; a killed client does not block the next', async () => {
    await randomFiles(join(src(), 'big'), 40, MiB); // new content, so the first client has work to do
    const first = startCli(['backup', '--repo', repo, src()], aliceEnv);
    // held: the lock file names a live process (not a stale lock left by an earlier test)
    const held = async () => {
      const pid = Number((JSON.parse((await fsp.readFile(lockFile(), 'utf8').catch(() => null)) ?? '{}') as { pid?: unknown }).pid);
      return Number.isInteger(pid) && pid > 0 && (await servePids()).includes(pid);
    };
    await waitFor('the first client to hold the lock', async () => (await held()) || first.child.exitCode !== null);
    assert.equal(first.child.exitCode, null);
    first.child.kill('SIGSTOP'); // it holds the lock as long as it is stopped
    try {
      const second = await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
      assert.equal(second.code, 5, second.stderr);
      assert.match(second.stderr, /locked by/);
      assert.equal(second.stderr.trim().split('\n').length, 1, second.stderr);
    } finally {
      first.child.kill('SIGCONT');
    }
    // the first client is killed outright while it holds the lock
    first.child.kill('SIGKILL');
    await first.done;
    const before = await sealed();
    const third = await runCli(['backup', '--repo', repo, src(), '--json'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    expectExit(third, 'backup after the killed client');
    assert.equal((await sealed()).length, before.length + 1);
  });

  it('recovery drill: the workstation is lost; a new key, the passphrase alone, and everything comes back', async () => {
    const last = await treeSnapshot(src());
    const lost = join(top, 'alice-ws');
    await fsp.rm(lost, { recursive: true }); // its config (SSH key, key copies) and cache are gone
    const fresh = workstation('alice-new');
    const out = await admit(fresh, alice); // the administrator authorises the new machine's key
    assert.equal(out['keyCreated'], true);
    const keys = (await fsp.readFile(join(top, 'home', alice, '.ssh', 'authorized_keys'), 'utf8')).trim().split('\n');
    assert.equal(keys.length, 2, 'the new key is added beside the old one');
    const snaps = await runCli(['snapshots', '--repo', repo, '--json'], { env: fresh, timeoutMs: RUN_TIMEOUT });
    expectExit(snaps, 'snapshots on the new machine');
    assert.equal(jsonLines(snaps.stdout).filter((l) => l['type'] === 'snapshot').length, (await sealed()).length);
    const target = join(top, 'recovered');
    expectExit(await runCli(['restore', '--repo', repo, 'latest', '--target', target], { env: fresh, timeoutMs: RUN_TIMEOUT }), 'restore on the new machine');
    assertSameTree(await treeSnapshot(join(target, src())), last, 'everything recovered');
    aliceEnv = fresh;
    await fsp.rm(target, { recursive: true });
  });

  it('a full disk on the server: a clear error, no snapshot, earlier snapshots intact, and the next smaller backup works', async () => {
    const before = await sealed();
    const last = await treeSnapshot(src());
    const fill = join(src(), 'too-big');
    await randomFiles(fill, 8, (DISK_MB / 8 + 8) * MiB);
    const full = await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    assert.equal(full.code, 9, full.stderr);
    assert.equal(full.stderr.trim().split('\n').length, 1, full.stderr);
    assert.match(full.stderr, /no space left on the disk \(ENOSPC\); nothing was committed, earlier snapshots are intact \(free space on that disk/);
    console.log(`# full disk: "${full.stderr.trim()}"`);
    assert.deepEqual(await sealed(), before, 'no snapshot from the failed run');
    await fsp.rm(fill, { recursive: true });
    const restored = join(top, 'restore-after-full');
    expectExit(await runCli(['restore', '--repo', repo, 'latest', '--target', restored], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'restore after the full disk');
    assertSameTree(await treeSnapshot(join(restored, src())), last, 'the last snapshot is intact');
    await fsp.rm(restored, { recursive: true });
    const next = await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    expectExit(next, 'backup after the full disk');
    assert.equal((await sealed()).length, before.length + 1);
    expectExit(await runCli(['verify', '--repo', repo, '--read-data'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'verify after the full disk');
  });

  it('a quota and a free-space floor in policy.json stop an upload before the disk fills; lifted, the next run resumes', async () => {
    const policy = join(etc, 'snapcrypt', 'policy.json');
    const statusOf = async () => {
      const r = await server('status', '--etc', etc, '--json', '--user', alice);
      assert.ok(r.code === 0 || r.code === 3, r.stderr);
      return jsonLines(r.stdout)[0]!;
    };
    const used = (await statusOf())['currentBytes'] as number;
    assert.ok(used > 0);
    const before = await sealed();
    await randomFiles(join(src(), 'quota'), 10, 4 * MiB); // 40 MiB more than the quota leaves room for
    for (const [settings, message] of [
      [{ quota: { users: { [alice]: `${used + 16 * MiB}` } } }, /: The backup area of \S+ is full: .* of its quota of .* are used; nothing was committed, earlier snapshots are intact \(ask the backup server's administrator to raise the quota/],
      [{ freeSpaceFloor: '99%' }, /: The backup server's disk is too full to accept uploads: .* free, and the administrator keeps at least 99% \(.*\) free; nothing was committed/],
    ] as const) {
      await fsp.writeFile(policy, JSON.stringify(settings), { mode: 0o644 });
      const r = await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
      assert.equal(r.code, 9, r.stderr);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.match(r.stderr, message);
      console.log(`# limit: "${r.stderr.trim()}"`);
      assert.deepEqual(await sealed(), before, 'no snapshot from a refused run');
    }
    await fsp.writeFile(policy, JSON.stringify({ quota: { users: { [alice]: `${used + 80 * MiB}` } } }), { mode: 0o644 });
    // alert writes the gauges of policy.json too; the seal helper keeps them, and alice is not overdue
    const alerted = await server('alert', '--etc', etc);
    assert.equal(alerted.code, 0, alerted.stderr);
    expectExit(await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'backup within the raised quota');
    assert.equal((await sealed()).length, before.length + 1);
    assert.deepEqual(await aliceMetrics(), {
      ...(await expectedMetrics()),
      [`snapcrypt_overdue{user="${alice}"}`]: 0,
      [`snapcrypt_overdue_threshold_seconds{user="${alice}"}`]: 2 * 86_400,
      [`snapcrypt_quota_bytes{user="${alice}"}`]: used + 80 * MiB,
    });

    // the documented backstop (SERVER.md): btrfs quota groups with a hard limit on current give EDQUOT, in words
    const subvolume = join(root, 'users', alice, 'current');
    execFileSync('btrfs', ['quota', 'enable', root]);
    execFileSync('btrfs', ['quota', 'rescan', '-w', root], { stdio: 'ignore' });
    const currentGroup = `0/${execFileSync('btrfs', ['inspect-internal', 'rootid', subvolume], { encoding: 'utf8' }).trim()}`;
    const show = execFileSync('btrfs', ['qgroup', 'show', '--raw', '--sync', root], { encoding: 'utf8' });
    const referenced = Number(new RegExp(`^${currentGroup}\\s+(\\d+)`, 'm').exec(show)![1]);
    execFileSync('btrfs', ['qgroup', 'limit', String(referenced + 8 * MiB), subvolume]);
    await randomFiles(join(src(), 'over-qgroup'), 5, 4 * MiB);
    const hard = await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    execFileSync('btrfs', ['qgroup', 'limit', 'none', subvolume]);
    execFileSync('btrfs', ['quota', 'disable', root]);
    await fsp.rm(join(src(), 'over-qgroup'), { recursive: true });
    assert.equal(hard.code, 9, hard.stderr);
    assert.match(hard.stderr, /the disk quota is used up \(EDQUOT\); nothing was committed/);
    console.log(`# qgroup limit: "${hard.stderr.trim()}"`);
    assert.equal((await sealed()).length, before.length + 1, 'no snapshot');

    // bytes only the snapshots hold: the 40 MiB removed from the files are then only in the last snapshot
    const held = (await statusOf())['historyBytes'] as number;
    await fsp.rm(join(src(), 'quota'), { recursive: true });
    expectExit(await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'backup without the 40 MiB');
    const grown = ((await statusOf())['historyBytes'] as number) - held;
    console.log(`# only in snapshots: ${held} bytes, then ${held + grown}`);
    assert.ok(grown >= 40 * MiB && grown < 44 * MiB, `the snapshots alone hold ${grown} more bytes, not about 40 MiB`);
    const after = await statusOf();
    assert.equal(after['quotaBytes'], used + 80 * MiB);
    const area = join(root, 'users', alice, 'current', 'repo');
    const ledger = await readUsageLedger(join(root, 'users', alice, 'run'), area);
    assert.equal(ledger, await objectBytesOf(area), 'the usage ledger serve keeps equals a walk of the objects');
    assert.equal(after['currentBytes'], ledger);
    await fsp.rm(policy);
  });

  it('expire deletes real snapshots by the policy as root; the kept ones still restore and verify', async () => {
    const names = await sealed();
    assert.ok(names.length >= 6, `${names.length} snapshots`);
    const keep = names.slice(-2);
    const older = keep[0]!;
    const restore = async (name: string, target: string) => {
      expectExit(await runCli(['restore', '--repo', repo, name, '--target', target], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), `restore ${name} into ${target}`);
      return treeSnapshot(join(target, src()));
    };
    const before = await restore(older, join(top, 'before-expire'));
    const heldOnly = async () => {
      const r = await server('status', '--etc', etc, '--json', '--user', alice);
      return jsonLines(r.stdout)[0]!['historyBytes'] as number;
    };
    const held = await heldOnly();
    await fsp.writeFile(join(etc, 'snapcrypt', 'policy.json'), JSON.stringify({ retention: { users: { [alice]: { last: 2 } } } }), { mode: 0o644 });
    try {
      const r = await server('expire', '--etc', etc, '--json');
      assert.equal(r.code, 0, r.stderr);
      const rows = jsonLines(r.stdout);
      assert.deepEqual(rows.filter((x) => x['type'] === 'snapshot' && x['deleted']).map((x) => x['name']).sort(), names.slice(0, -2));
    } finally {
      await fsp.rm(join(etc, 'snapcrypt', 'policy.json'));
    }
    assert.deepEqual(await sealed(), keep, 'only the two newest are left');
    const heldAfter = await heldOnly();
    console.log(`# only in snapshots before expire: ${held} bytes, after: ${heldAfter}`);
    assert.ok(heldAfter < held / 2, `expire gave back what only the deleted snapshots held (${held} → ${heldAfter})`);
    const snaps = await runCli(['snapshots', '--repo', repo, '--json'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT });
    expectExit(snaps, 'snapshots after expire');
    assert.deepEqual(jsonLines(snaps.stdout).filter((l) => l['type'] === 'snapshot').map((l) => l['time']), keep);
    assertSameTree(await restore(older, join(top, 'after-expire')), before, 'a kept snapshot restores as before');
    expectExit(await runCli(['verify', '--repo', repo, '--read-data'], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'verify --read-data after expire');
    expectExit(await runCli(['backup', '--repo', repo, src()], { env: aliceEnv, timeoutMs: RUN_TIMEOUT }), 'backup after expire');
    assert.equal((await sealed()).length, 3);
  });
});
