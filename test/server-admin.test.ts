/**
 * The backup server's administration and layout, for real: `snapcrypt-server install` into a temp root
 * on the btrfs test mount, `adduser` of two throw-away accounts, then as one of them (runuser) a put and
 * two commits through openUserArea, the real sudo and the root seal helper; then the attacks of I5 from
 * that account, which must all fail. Needs root and btrfs: in CI (CI=true) it never skips.
 *
 * Outside the temp directory it touches: two accounts and their groups (sct-alice-XXXX, sct-bob-XXXX),
 * one group (sct-g-XXXX) and one sudoers file (/etc/sudoers.d/snapcrypt-test-XXXX; sudo reads only
 * /etc/sudoers.d), all removed at the end.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { btrfsTempDir, btrfsTestDir } from './env.js';
import { as, removeAccounts, run, server, startLayoutSshd } from './server-fixture.js';
import { isSnapshotName } from '../src/drivers/localdir.js';

const CI = process.env['CI'] === 'true';
const isRoot = process.getuid?.() === 0;
const haveBtrfs = btrfsTestDir() !== null; // throws in CI without btrfs
if (CI && !isRoot) throw new Error('CI must run test/server-admin as root');
const skip = !isRoot || !haveBtrfs ? 'needs root and SNAPCRYPT_TEST_BTRFS' : false;

const areaModule = pathToFileURL(fileURLToPath(new URL('../src/server/area.js', import.meta.url))).href;
const tag = randomBytes(3).toString('hex');
const alice = `sct-alice-${tag}`;
const bob = `sct-bob-${tag}`;
const group = `sct-g-${tag}`;
const sudoersName = `snapcrypt-test-${tag}`;
const sudoersFile = join('/etc/sudoers.d', sudoersName);

function fakeEd25519Key(comment: string): string {
  const type = Buffer.from('ssh-ed25519');
  const len = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  const blob = Buffer.concat([len(type.length), type, len(32), randomBytes(32)]);
  return `ssh-ed25519 ${blob.toString('base64')} ${comment}\n`;
}

const cleanupSystem = (): void => removeAccounts([alice, bob], group, sudoersFile);

describe('snapcrypt-server install, adduser and the sealed user area', { skip }, () => {
  let top = '';
  let root = '';
  let etc = '';
  let lib = '';
  let sshd = '';
  let homeBase = '';
  let configFile = '';
  let seal = '';
  let aliceGid = 0;
  let bobGid = 0;
  let snapName = '';

  before(async () => {
    process.once('exit', cleanupSystem);
    const dir = await btrfsTempDir('server');
    assert.ok(dir);
    top = dir;
    await fsp.chmod(top, 0o755); // the accounts must reach their areas through it
    root = join(top, 'srv');
    etc = join(top, 'etc');
    lib = join(top, 'lib');
    sshd = join(top, 'sshd');
    homeBase = join(top, 'home');
    configFile = join(etc, 'snapcrypt', 'server.json');
    seal = join(lib, 'seal');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'alice@test', '-f', join(top, 'alice')], { stdio: 'ignore' });
    await fsp.writeFile(join(top, 'bob.pub'), fakeEd25519Key('bob@test'));
  });

  after(() => {
    cleanupSystem();
  });

  const installArgs = () => [
    'install', '--root', root, '--etc', etc, '--lib-dir', lib, '--sshd-config-dir', sshd, '--home-base', homeBase,
    '--group', group, '--sudoers-name', sudoersName, '--metrics-dir', join(top, 'metrics', 'textfile'), '--scheduler', 'systemd', '--systemd-dir', join(top, 'systemd'),
  ];

  it('install sets up the layout, configuration, seal wrapper, sudoers rule, sshd drop-in and the expire, alert and scrub timers', async () => {
    const r = await server(...installArgs());
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /wrote .*server\.json/);
    const config = JSON.parse(await fsp.readFile(configFile, 'utf8')) as Record<string, unknown>;
    assert.equal(config['root'], root);
    assert.equal(config['group'], group);
    assert.equal(config['seal'], seal);
    assert.match(String(config['serve']), new RegExp(` serve --config ${configFile}$`), 'a non-default configuration is named in the forced command');
    assert.equal(config['metricsDir'], join(top, 'metrics', 'textfile'));
    for (const [p, mode] of [[root, 0o755], [join(root, 'users'), 0o711], [join(root, 'snapshots'), 0o711], [seal, 0o755], [join(top, 'metrics', 'textfile'), 0o755]] as const) {
      const st = await fsp.stat(p);
      assert.equal(st.uid, 0, p);
      assert.equal(st.mode & 0o7777, mode, p);
    }
    assert.equal(await fsp.readFile(sudoersFile, 'utf8'), `# Written by snapcrypt-server install: members of ${group} may seal their own area, nothing else.\n%${group} ALL=(root) NOPASSWD: ${seal} ""\n`);
    assert.equal((await fsp.stat(sudoersFile)).mode & 0o7777, 0o440);
    const drop = await fsp.readFile(join(sshd, 'snapcrypt.conf'), 'utf8');
    for (const line of [`Match Group ${group}`, `ForceCommand ${String(config['serve'])}`, 'DisableForwarding yes', 'PermitTTY no', 'PermitUserRC no', 'AllowAgentForwarding no', 'X11Forwarding no']) {
      assert.ok(drop.includes(line), line);
    }
    assert.equal((await run('getent', ['group', group])).code, 0);
    // daily expiry, hourly alerts and a monthly scrub, as systemd timers whose services run what they name
    const units = join(top, 'systemd');
    const expireService = await fsp.readFile(join(units, 'snapcrypt-expire.service'), 'utf8');
    const execStart = /^ExecStart=(.+)$/m.exec(expireService)?.[1] ?? '';
    assert.match(execStart, new RegExp(` expire --etc ${etc}$`));
    assert.match(await fsp.readFile(join(units, 'snapcrypt-expire.timer'), 'utf8'), /^OnCalendar=daily$/m);
    const alertStart = /^ExecStart=(.+)$/m.exec(await fsp.readFile(join(units, 'snapcrypt-alert.service'), 'utf8'))?.[1] ?? '';
    assert.equal(alertStart, execStart.replace(/ expire --etc /, ' alert --etc '));
    assert.match(await fsp.readFile(join(units, 'snapcrypt-alert.timer'), 'utf8'), /^OnCalendar=hourly$/m);
    assert.match(await fsp.readFile(join(units, 'snapcrypt-scrub.service'), 'utf8'), new RegExp(`^ExecStart=/usr/bin/btrfs scrub start -B ${root}$`, 'm'));
    assert.match(await fsp.readFile(join(units, 'snapcrypt-scrub.timer'), 'utf8'), /^OnCalendar=monthly$/m);
    assert.match(r.stdout, /enable them with: systemctl daemon-reload && systemctl enable --now snapcrypt-expire\.timer snapcrypt-alert\.timer snapcrypt-scrub\.timer/);
    for (const command of [execStart, alertStart]) {
      const [cmd, ...cmdArgs] = command.split(' ');
      const scheduled = await run(cmd!, cmdArgs);
      assert.equal(scheduled.code, 0, `${command}: ${scheduled.stderr}`);
    }
    // where there is no systemd: a cron.d file with the same three jobs
    const cron = join(top, 'cron.d');
    const withCron = await server(...installArgs().slice(0, -4), '--scheduler', 'cron', '--cron-dir', cron);
    assert.equal(withCron.code, 0, withCron.stderr);
    const cronFile = await fsp.readFile(join(cron, 'snapcrypt'), 'utf8');
    assert.ok(cronFile.includes(`\n17 3 * * * root ${execStart} >/dev/null\n`), cronFile);
    assert.ok(cronFile.includes(`\n7 * * * * root ${alertStart} >/dev/null\n`), cronFile);
    assert.ok(cronFile.includes(`\n47 4 1 * * root /usr/bin/btrfs scrub start -B ${root} >/dev/null\n`), cronFile);
    // --metrics-dir none: no metrics
    const none = await server(...installArgs().slice(0, -4), '--metrics-dir', 'none', '--scheduler', 'none');
    assert.equal(none.code, 0, none.stderr);
    assert.equal((JSON.parse(await fsp.readFile(configFile, 'utf8')) as Record<string, unknown>)['metricsDir'], undefined);
    assert.equal((await server(...installArgs())).code, 0);
    // idempotent: a second run changes nothing
    const again = await server(...installArgs());
    assert.equal(again.code, 0, again.stderr);
    assert.doesNotMatch(again.stdout, /wrote|updated|created|set /);
  });

  it('install refuses a root directory that is not on btrfs', async () => {
    const r = await server('install', '--root', '/dev/snapcrypt-nope', '--etc', etc, '--group', group, '--scheduler', 'none');
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /not on a btrfs/);
  });

  it('adduser validates its name and key', async () => {
    const bad = await server('adduser', 'Root;x', '--key', join(top, 'alice.pub'), '--etc', etc);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /Invalid user name/);
    await fsp.writeFile(join(top, 'bad.pub'), 'command="sh" ssh-ed25519 AAAA x\n');
    const badKey = await server('adduser', alice, '--key', join(top, 'bad.pub'), '--etc', etc);
    assert.equal(badKey.code, 2);
    await fsp.writeFile(join(top, 'two.pub'), fakeEd25519Key('a') + fakeEd25519Key('b'));
    assert.equal((await server('adduser', alice, '--key', join(top, 'two.pub'), '--etc', etc)).code, 2);
    assert.equal((await run('getent', ['passwd', alice])).code, 2, 'no account made by a refused adduser');
  });

  it('adduser creates the accounts and their areas', async () => {
    for (const user of [alice, bob]) {
      const key = join(top, user === alice ? 'alice.pub' : 'bob.pub');
      const r = await server('adduser', user, '--key', key, '--etc', etc);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /created account/);
      const again = await server('adduser', user, '--key', key, '--etc', etc);
      assert.equal(again.code, 0, again.stderr);
      assert.doesNotMatch(again.stdout, /created|wrote|updated|set /);
    }
    const pw = (await run('getent', ['passwd', alice])).stdout.trim().split(':');
    assert.equal(pw[5], join(homeBase, alice));
    assert.equal(pw[6], '/bin/sh');
    aliceGid = Number(pw[3]);
    bobGid = Number((await run('getent', ['passwd', bob])).stdout.split(':')[3]);
    assert.equal((await run('getent', ['shadow', alice])).stdout.split(':')[1], '*');
    assert.ok((await run('id', ['-nG', alice])).stdout.split(/\s+/).includes(group));
    const aliceUid = Number(pw[2]);
    const expect: [string, number, number, number][] = [
      [join(root, 'users', alice), 0, aliceGid, 0o750],
      [join(root, 'users', alice, 'current'), 0, aliceGid, 0o750],
      [join(root, 'users', alice, 'current', 'repo'), aliceUid, aliceGid, 0o700],
      [join(root, 'users', alice, 'run'), aliceUid, aliceGid, 0o700],
      [join(root, 'snapshots', alice), 0, aliceGid, 0o750],
      [join(homeBase, alice, '.ssh', 'authorized_keys'), 0, aliceGid, 0o640],
    ];
    for (const [p, uid, gid, mode] of expect) {
      const st = await fsp.lstat(p);
      assert.deepEqual([st.uid, st.gid, st.mode & 0o7777], [uid, gid, mode], p);
    }
    assert.equal((await fsp.stat(join(root, 'users', alice, 'current'))).ino, 256, 'current is a subvolume');
    const keys = await fsp.readFile(join(homeBase, alice, '.ssh', 'authorized_keys'), 'utf8');
    const config = JSON.parse(await fsp.readFile(configFile, 'utf8')) as { serve: string };
    assert.match(keys, new RegExp(`^restrict,command="${config.serve.replace(/[.+]/g, '\\$&')}" ssh-ed25519 \\S+ alice@test\\n$`));
  });

  it('sshd accepts the drop-in and forces the server on the group\'s accounts only', async () => {
    // a main configuration like Debian's (Include first, then settings that must not leak into the Match)
    const hostKey = join(top, 'hostkey');
    assert.equal((await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', hostKey])).code, 0);
    const main = join(top, 'sshd_config');
    await fsp.writeFile(main, `Include ${sshd}/*.conf\nHostKey ${hostKey}\nPidFile ${join(top, 'sshd.pid')}\nPermitTTY yes\nX11Forwarding yes\nSubsystem sftp /usr/lib/openssh/sftp-server\n`);
    await fsp.mkdir('/run/sshd', { recursive: true, mode: 0o755 }); // sshd -t wants its privilege separation directory
    const serve = (JSON.parse(await fsp.readFile(configFile, 'utf8')) as { serve: string }).serve;
    const t = await run('/usr/sbin/sshd', ['-t', '-f', main]);
    assert.equal(t.code, 0, t.stderr);
    const forAlice = await run('/usr/sbin/sshd', ['-T', '-f', main, '-C', `user=${alice},host=client,addr=127.0.0.1`]);
    assert.equal(forAlice.code, 0, forAlice.stderr);
    for (const line of [`forcecommand ${serve}`, 'permittty no', 'x11forwarding no', 'allowagentforwarding no', 'allowtcpforwarding no', 'permituserrc no']) {
      assert.ok(forAlice.stdout.split('\n').includes(line), `${line} in ${forAlice.stdout}`);
    }
    const forRoot = await run('/usr/sbin/sshd', ['-T', '-f', main, '-C', 'user=root,host=client,addr=127.0.0.1']);
    assert.ok(forRoot.stdout.split('\n').includes('forcecommand none'));
    assert.ok(forRoot.stdout.split('\n').includes('permittty yes'));
  });

  it('over a real sshd, the key logs in and can only run snapcrypt-server serve', async () => {
    const live = join(top, 'live');
    await fsp.mkdir(live);
    const daemon = await startLayoutSshd(live, sshd, [alice]);
    const port = daemon.port;
    const log = () => daemon.log();
    try {
      const ssh = (...args: string[]) =>
        run('ssh', ['-n', '-F', '/dev/null', '-i', join(top, 'alice'), '-p', String(port), '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes',
          '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR', ...args]);
      const r = await ssh(`${alice}@127.0.0.1`, 'echo pwned; id');
      const tty = await ssh('-tt', `${alice}@127.0.0.1`);
      assert.match(log(), new RegExp(`Accepted publickey for ${alice}`), log());
      assert.doesNotMatch(r.stdout, /^pwned$|uid=\d+\(/m, 'the command did not run'); // the refusal quotes it
      // the forced serve ran as alice, found this test's configuration and refused the command as data
      assert.match(r.stderr, /snapcrypt-server: .*only runs "snapcrypt-server serve", not "echo pwned; id"/, r.stderr);
      assert.doesNotMatch(tty.stdout + tty.stderr, /\$ |# /);
      assert.match(tty.stderr, /PTY allocation request failed/);
      assert.match(log(), /Starting session: forced-command/);

      // no other way in: other commands, sftp, scp (both protocols), stdio and remote forwarding
      const common = ['-F', '/dev/null', '-i', join(top, 'alice'), '-o', 'BatchMode=yes', '-o', 'IdentitiesOnly=yes',
        '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'LogLevel=ERROR'];
      const secret = join(top, 'secret.txt');
      await fsp.writeFile(secret, 'not for alice\n', { mode: 0o644 });
      const ls = await ssh(`${alice}@127.0.0.1`, 'ls', '/');
      assert.doesNotMatch(ls.stdout, /^(etc|usr|bin)$/m, 'ls ran');
      const shc = await ssh(`${alice}@127.0.0.1`, 'sh', '-c', `'cat ${secret}'`);
      assert.doesNotMatch(shc.stdout, /not for alice/);
      const batch = join(top, 'sftp-batch');
      await fsp.writeFile(batch, `get ${secret} ${join(top, 'got-sftp')}\n`);
      const sftp = await run('sftp', [...common, '-P', String(port), '-b', batch, `${alice}@127.0.0.1`]);
      assert.notEqual(sftp.code, 0, 'sftp');
      for (const legacy of [[], ['-O']]) {
        const scp = await run('scp', [...common, ...legacy, '-P', String(port), `${alice}@127.0.0.1:${secret}`, join(top, 'got-scp')]);
        assert.notEqual(scp.code, 0, `scp ${legacy.join(' ')}`);
      }
      for (const f of ['got-sftp', 'got-scp']) await assert.rejects(fsp.stat(join(top, f)), `${f} must not exist`);
      const stdioForward = await run('ssh', [...common, '-p', String(port), '-W', `127.0.0.1:${port}`, `${alice}@127.0.0.1`]);
      assert.notEqual(stdioForward.code, 0, 'ssh -W');
      assert.match(stdioForward.stderr, /administratively prohibited|forwarding/i, stdioForward.stderr);
      const remoteForward = await run('ssh', [...common, '-n', '-p', String(port), '-o', 'ExitOnForwardFailure=yes', '-R', '0:127.0.0.1:22', `${alice}@127.0.0.1`]);
      assert.notEqual(remoteForward.code, 0, 'ssh -R');
      assert.match(remoteForward.stderr, /forwarding failed/i, remoteForward.stderr);
    } finally {
      await daemon.stop();
    }
  });

  it('the user commits through openUserArea, sudo and the root seal helper', async () => {
    const script = join(top, 'client.mjs');
    await fsp.writeFile(
      script,
      `import { createHash } from 'node:crypto';
import { openUserArea } from ${JSON.stringify(areaModule)};
const storage = await openUserArea({ configFile: ${JSON.stringify(configFile)} });
if (!(await storage.exists())) await storage.init(Buffer.from('test config\\n'));
const lock = await storage.lock('server-admin test');
const out = [];
for (const text of ['first', 'second']) {
  const data = Buffer.from(text);
  const id = createHash('sha256').update(data).digest('hex');
  await storage.putObject(id, data);
  out.push(await storage.commit(Buffer.from(id + '\\n'), Buffer.from(id, 'hex')));
}
await lock.release();
const snaps = await storage.listSnapshots();
const first = await storage.openSnapshot(snaps[0].name);
const head = (await first.readFile('head')).toString().trim();
console.log(JSON.stringify({ commits: out, snaps, firstObject: (await first.getObject(head)).toString() }));
`,
      { mode: 0o644 },
    );
    const before = Date.now();
    const r = await as(alice, process.execPath, script);
    assert.equal(r.code, 0, r.stderr);
    const res = JSON.parse(r.stdout) as { commits: { name: string; time: number }[]; snaps: { name: string }[]; firstObject: string };
    assert.equal(res.commits.length, 2);
    assert.deepEqual(res.snaps.map((s) => s.name), res.commits.map((c) => c.name));
    assert.equal(res.firstObject, 'first');
    for (const c of res.commits) {
      assert.ok(isSnapshotName(c.name), c.name);
      assert.equal(c.time, Date.parse(c.name));
      assert.ok(c.time >= before - 1000 && c.time <= Date.now() + 1000, 'named by the server clock');
    }
    snapName = res.commits[0]?.name ?? '';
    const snap = join(root, 'snapshots', alice, snapName);
    const st = await fsp.stat(snap);
    assert.deepEqual([st.uid, st.gid, st.mode & 0o7777, st.ino], [0, aliceGid, 0o750, 256]);
    assert.match((await run('btrfs', ['property', 'get', '-ts', snap, 'ro'])).stdout, /ro=true/);
    assert.equal(await fsp.readFile(join(snap, 'repo', 'config'), 'utf8'), 'test config\n');
    // the lock lives outside the subvolume: no snapshot carries it
    await assert.rejects(fsp.lstat(join(snap, 'repo', 'lock')));
    await assert.rejects(fsp.lstat(join(snap, 'lock')));
  });

  it('the user cannot delete, rename, unprotect, change or reach what is not theirs', async () => {
    assert.ok(snapName, 'needs the commit test');
    const snap = join(root, 'snapshots', alice, snapName);
    const attempts: [string, ...string[]][] = [
      ['rm', '-rf', snap],
      ['rmdir', snap],
      ['mv', snap, join(root, 'snapshots', alice, 'moved')],
      ['mv', snap, join(root, 'users', alice, 'current', 'repo', 'moved')],
      ['btrfs', 'subvolume', 'delete', snap],
      ['btrfs', 'property', 'set', '-ts', snap, 'ro', 'false'],
      ['chmod', '0777', snap],
      ['chmod', '0777', join(snap, 'repo')],
      ['chown', alice, snap],
      ['touch', join(snap, 'new')],
      ['touch', join(snap, 'repo', 'new')],
      ['rm', '-f', join(snap, 'repo', 'head')],
      ['sh', '-c', `echo x >> ${join(snap, 'repo', 'config')}`],
      ['mv', join(root, 'users', alice, 'current'), join(root, 'users', alice, 'old')],
      ['btrfs', 'subvolume', 'delete', join(root, 'users', alice, 'current')],
      ['chmod', '0777', join(root, 'users', alice, 'current')],
      ['touch', join(root, 'snapshots', alice, 'new')],
      ['ls', join(root, 'users', bob)],
      ['touch', join(root, 'users', bob, 'current', 'repo', 'x')],
      ['touch', join(root, 'snapshots', bob, 'x')],
      ['ls', join(root, 'snapshots', bob)],
      ['ls', join(root, 'users')],
      ['sudo', '-n', seal, 'x'],
      ['sudo', '-n', seal, ''],
      ['sudo', '-n', seal, '--', 'x'],
      ['sudo', '-n', '-E', seal],
      ['sudo', '-n', '-u', bob, seal],
      ['sudo', '-n', process.execPath, join(lib, 'seal-entry.mjs')],
      [seal], // not through sudo: not root
      ['sh', '-c', `echo x >> ${join(homeBase, alice, '.ssh', 'authorized_keys')}`],
      ['touch', join(homeBase, alice, '.ssh', 'new')],
    ];
    // controls: the same tools work as alice where she may act, so the refusals below are real
    const controls: [string, ...string[]][] = [
      ['ls', join(snap, 'repo', 'objects')],
      ['cat', join(snap, 'repo', 'config')],
      ['touch', join(root, 'users', alice, 'current', 'repo', 'scratch')],
      ['rm', join(root, 'users', alice, 'current', 'repo', 'scratch')],
      ['btrfs', 'property', 'get', '-ts', snap, 'ro'],
    ];
    for (const c of controls) {
      const r = await as(alice, ...c);
      assert.equal(r.code, 0, `${c.join(' ')}: ${r.stderr}`);
    }
    const results = await Promise.all(attempts.map((a) => as(alice, ...a)));
    for (const [i, r] of results.entries()) {
      assert.ok(r.stderr.trim() !== '', `${attempts[i]?.join(' ')} failed silently`);
    }
    const succeeded = attempts.filter((_, i) => results[i]?.code === 0).map((a) => a.join(' '));
    assert.deepEqual(succeeded, [], 'attacks that succeeded');
    const st = await fsp.stat(snap);
    assert.deepEqual([st.uid, st.gid, st.mode & 0o7777], [0, aliceGid, 0o750]);
    assert.match((await run('btrfs', ['property', 'get', '-ts', snap, 'ro'])).stdout, /ro=true/);
    assert.equal(await fsp.readFile(join(snap, 'repo', 'config'), 'utf8'), 'test config\n');
    assert.deepEqual((await fsp.readdir(join(root, 'snapshots', bob))), [], 'bob has no snapshot');
    assert.ok(bobGid > 0);
  });

  it('the seal helper refuses root, strangers and arguments', async () => {
    const env = (uid?: string): NodeJS.ProcessEnv => ({ PATH: '/usr/bin:/bin', ...(uid === undefined ? {} : { SUDO_UID: uid }) });
    const noUid = await run(seal, [], { env: env() });
    assert.equal(noUid.code, 2);
    assert.match(noUid.stderr, /^snapcrypt-seal: SUDO_UID/);
    const asRoot = await run(seal, [], { env: env('0') });
    assert.notEqual(asRoot.code, 0);
    assert.match(asRoot.stderr, /refusing to seal for root/);
    const nobody = await run(seal, [], { env: env('65534') });
    assert.notEqual(nobody.code, 0);
    assert.match(nobody.stderr, /not in group/);
    const args = await run(seal, ['x'], { env: env(String((await fsp.stat(join(root, 'users', alice, 'current', 'repo'))).uid)) });
    assert.equal(args.code, 2);
    assert.match(args.stderr, /takes no arguments/);
    assert.equal(args.stderr.trim().split('\n').length, 1);
  });
});
