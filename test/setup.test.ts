/**
 * `snapcrypt setup` and the SSH identity (src/drivers/sshkeys.ts), with the real OpenSSH tools and a
 * throwaway sshd (test/sshd.ts): key generation and its passphrase, the askpass route, host key
 * recording on first contact, refusal after the host key changed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { isSnapError } from '../src/core/errors.js';
import { KEY_KDF_ROUNDS, askpassEnv, checkPassphrase, ensureKeyPair, kexPreference, parseSshTarget, recordHostKeys, sshIdentity, sshInvocation, sshUrl, type SshIdentity } from '../src/drivers/sshkeys.js';
import { expectExit, jsonLines, runCli } from './cli-helpers.js';
import { tempDir } from './env.js';
import { startSshd } from './sshd.js';

const PASS = Buffer.from("pä%s 'x\\\"$HOME` ok"); // UTF-8, quotes, printf and shell metacharacters

function sh(cmd: string, args: readonly string[], env?: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: env ?? process.env, timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : null;
      resolve({ code, stdout, stderr });
    });
  });
}

/** ssh with snapcrypt's options and askpass (sshInvocation, as the driver runs it); stdin closed. */
async function sshRun(url: string, pass: Buffer, id: SshIdentity, remote: string, extra: readonly string[] = []): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const inv = await sshInvocation(parseSshTarget(url), remote, { identity: id, passphrase: async () => pass, extraOptions: extra });
  assert.equal(inv.snapcryptKey, true);
  const { args, env } = inv;
  return new Promise((resolve, reject) => {
    const child = spawn('ssh', args, { ...(env ? { env } : {}), stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdin.end();
    const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

test('parseSshTarget reads user@host[:port] and ssh:// URLs, and refuses option-like hosts', () => {
  assert.deepEqual(parseSshTarget('alice@backup.example.org'), { user: 'alice', host: 'backup.example.org', port: undefined });
  assert.deepEqual(parseSshTarget('alice@10.0.0.1:2222'), { user: 'alice', host: '10.0.0.1', port: 2222 });
  assert.deepEqual(parseSshTarget('ssh://bob@[::1]:2200/'), { user: 'bob', host: '::1', port: 2200 });
  assert.deepEqual(parseSshTarget('ssh://bob@[fe80::1%eth0]'), { user: 'bob', host: 'fe80::1%eth0', port: undefined });
  assert.deepEqual(parseSshTarget('ssh://backup_1.example/'), { user: undefined, host: 'backup_1.example', port: undefined });
  assert.equal(sshUrl(parseSshTarget('bob@[::1]:2200')), 'ssh://bob@[::1]:2200/');
  assert.equal(sshUrl(parseSshTarget('ssh://h')), 'ssh://h/');
  for (const bad of ['host', 'alice@-oProxyCommand=x', '-l@host', 'alice@host:0', 'alice@host:99999', 'alice@', 'ssh://alice@host/path', 'alice@[1.2.3.4]', 'alice@[::1', 'alice@host:22/']) {
    assert.throws(() => parseSshTarget(bad), (e: unknown) => isSnapError(e, 'usage'), bad);
  }
});

/** Cipher, KDF and bcrypt rounds of an openssh-key-v1 private key file. */
function keyFileKdf(file: string): { cipher: string; kdf: string; rounds: number } {
  const b64 = fs.readFileSync(file, 'utf8').split('\n').filter((l) => l !== '' && !l.startsWith('-----')).join('');
  const b = Buffer.from(b64, 'base64');
  assert.equal(b.subarray(0, 15).toString('latin1'), 'openssh-key-v1\0');
  let o = 15;
  const str = (): Buffer => {
    const n = b.readUInt32BE(o);
    const v = b.subarray(o + 4, o + 4 + n);
    o += 4 + n;
    return v;
  };
  const cipher = str().toString();
  const kdf = str().toString();
  const opts = str();
  const saltLen = opts.readUInt32BE(0);
  return { cipher, kdf, rounds: opts.readUInt32BE(4 + saltLen) };
}

test('kexPreference puts curve25519 first, and leaves ML-KEM lists, lists without curve25519 and lists that start with it', () => {
  const line = (list: string): string[] => ['user alice', `kexalgorithms ${list}`, 'ciphers aes128-gcm@openssh.com'];
  const openssh92 = 'sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,diffie-hellman-group14-sha256';
  assert.equal(kexPreference(line(openssh92)), 'curve25519-sha256,curve25519-sha256@libssh.org,sntrup761x25519-sha512@openssh.com,ecdh-sha2-nistp256,diffie-hellman-group14-sha256');
  // only the order changes: what the configuration leaves out stays out
  assert.equal(kexPreference(line('sntrup761x25519-sha512@openssh.com,ecdh-sha2-nistp256,curve25519-sha256')), 'curve25519-sha256,sntrup761x25519-sha512@openssh.com,ecdh-sha2-nistp256');
  assert.equal(kexPreference(line('mlkem768x25519-sha256,sntrup761x25519-sha512,curve25519-sha256')), null);
  assert.equal(kexPreference(line('sntrup761x25519-sha512@openssh.com,ecdh-sha2-nistp256')), null);
  assert.equal(kexPreference(line('curve25519-sha256@libssh.org,curve25519-sha256,sntrup761x25519-sha512@openssh.com')), null);
  assert.equal(kexPreference(['user alice']), null);
});

test('a new SSH key is encrypted with bcrypt-pbkdf at KEY_KDF_ROUNDS rounds', async () => {
  const saved = process.env['SNAPCRYPT_TEST_WEAK_KDF'];
  delete process.env['SNAPCRYPT_TEST_WEAK_KDF'];
  try {
    const id = sshIdentity(await tempDir('sshkeys-kdf'));
    await ensureKeyPair(PASS, id);
    assert.deepEqual(keyFileKdf(id.keyFile), { cipher: 'aes256-ctr', kdf: 'bcrypt', rounds: KEY_KDF_ROUNDS });
  } finally {
    if (saved !== undefined) process.env['SNAPCRYPT_TEST_WEAK_KDF'] = saved;
  }
});

test('the SSH key pair: modes, comment, protected by the passphrase, never overwritten', async () => {
  const id = sshIdentity(await tempDir('sshkeys'));
  const pair = await ensureKeyPair(PASS, id, { rounds: 4 });
  assert.equal(keyFileKdf(id.keyFile).rounds, 4);
  assert.equal(pair.created, true);
  assert.equal(fs.statSync(id.keyFile).mode & 0o777, 0o600);
  assert.equal(fs.statSync(id.pubFile).mode & 0o777, 0o644);
  assert.equal(fs.statSync(id.dir).mode & 0o777, 0o700);
  assert.match(pair.publicKey, /^ssh-ed25519 \S+ snapcrypt@\S+$/);
  assert.equal(fs.readFileSync(id.pubFile, 'utf8').trim(), pair.publicKey);
  assert.deepEqual(fs.readdirSync(id.dir).sort(), ['askpass', 'id_ed25519', 'id_ed25519.pub'], 'no temporary files left');
  // the passphrase really protects it (checked with plain ssh-keygen -P)
  const wrong = await sh('ssh-keygen', ['-y', '-P', 'wrong', '-f', id.keyFile]);
  assert.notEqual(wrong.code, 0);
  const right = await sh('ssh-keygen', ['-y', '-P', PASS.toString(), '-f', id.keyFile]);
  assert.equal(right.code, 0, right.stderr);
  assert.equal(right.stdout.split(' ').slice(0, 2).join(' '), pair.publicKey.split(' ').slice(0, 2).join(' '));
  const empty = await sh('ssh-keygen', ['-y', '-P', '', '-f', id.keyFile]);
  assert.notEqual(empty.code, 0, 'the key is not stored unencrypted');

  // checkPassphrase: right and wrong
  assert.equal((await checkPassphrase(PASS, id)).split(' ')[1], pair.publicKey.split(' ')[1]);
  await assert.rejects(checkPassphrase(Buffer.from('wrong'), id), (e: unknown) => isSnapError(e, 'wrong-password'));
  // an existing key is kept (and its passphrase checked), even when asked with another passphrase
  const before = fs.readFileSync(id.keyFile);
  await assert.rejects(ensureKeyPair(Buffer.from('another one'), id), (e: unknown) => isSnapError(e, 'wrong-password'));
  const again = await ensureKeyPair(PASS, id);
  assert.equal(again.created, false);
  assert.deepEqual(fs.readFileSync(id.keyFile), before);
  // a lost .pub is rebuilt from the private key
  fs.rmSync(id.pubFile);
  assert.equal((await ensureKeyPair(PASS, id)).publicKey.split(' ')[1], pair.publicKey.split(' ')[1]);
  // passphrases askpass cannot carry are refused, not truncated
  assert.throws(() => askpassEnv(Buffer.from('two\nlines'), id), (e: unknown) => isSnapError(e, 'usage'));
  // the secret is not in snapcrypt's own environment
  assert.equal(process.env['SNAPCRYPT_ASKPASS_SECRET'], undefined);
});

test('askpass answers only passphrase prompts', async () => {
  const id = sshIdentity(await tempDir('askpass'));
  const env = askpassEnv(Buffer.from('s3cret %d \\n'), id);
  const ok = await sh(id.askpassFile, ["Enter passphrase for key '/x/id_ed25519': "], env);
  assert.equal(ok.stdout, 's3cret %d \\n\n');
  for (const prompt of ["alice@host's password: ", 'Password: ', '']) {
    const r = await sh(id.askpassFile, [prompt], env);
    assert.notEqual(r.code, 0, prompt);
    assert.equal(r.stdout, '', prompt);
  }
  const confirm = await sh(id.askpassFile, ['Enter passphrase: '], { ...env, SSH_ASKPASS_PROMPT: 'confirm' });
  assert.equal(confirm.stdout, '');
});

test('ssh logs in non-interactively through askpass; setup records the host key; a changed host key is refused', async () => {
  const config = await tempDir('setup-config');
  const id = sshIdentity(config);
  const env = { SNAPCRYPT_CONFIG_DIR: config, SNAPCRYPT_PASSWORD: PASS.toString(), SNAPCRYPT_TEST_WEAK_KDF: '1' };

  // no server yet: setup makes the key, then cannot reach the host
  const first0 = await startSshd({ authorizedKeys: [] });
  const port = first0.port;
  await first0.stop();
  const unreachable = await runCli(['setup', `someone@127.0.0.1:${port}`], { env });
  assert.equal(unreachable.code, 9, unreachable.stderr);
  assert.match(unreachable.stderr, /Cannot get the host key of \[127\.0\.0\.1\]:\d+/);
  assert.ok(fs.existsSync(id.keyFile), 'the key was made before contacting the server');
  const pub = fs.readFileSync(id.pubFile, 'utf8').trim();

  let sshd = await startSshd({ authorizedKeys: [pub], forcedCommand: 'echo ok', port });
  try {
    const target = `${sshd.user}@127.0.0.1:${sshd.port}`;
    const url = `ssh://${target}/`;

    // before setup the host is unknown: strict checking refuses it
    const unknown = await sshRun(url, PASS, id, 'anything');
    assert.notEqual(unknown.code, 0);
    assert.match(unknown.stderr, /Host key verification failed|No .* host key is known/);

    // setup: first contact records the host key
    const first = await runCli(['setup', target, '--json'], { env });
    expectExit(first, 'setup');
    const out = jsonLines(first.stdout).find((o) => o['type'] === 'setup')!;
    assert.equal(out['keyCreated'], false);
    assert.equal(out['hostKeysRecorded'], true);
    assert.equal(out['publicKey'], pub);
    assert.equal(out['repo'], `ssh://${sshd.user}@127.0.0.1:${sshd.port}/`);
    assert.equal(out['adminCommand'], `snapcrypt-server adduser ${sshd.user} --key ${sshd.user}.pub`);
    const fingerprints = out['hostKeyFingerprints'] as string[];
    const hostFp = (await sh('ssh-keygen', ['-lf', `${sshd.hostKeyFile}.pub`])).stdout.split(' ')[1]!;
    assert.ok(fingerprints.some((f) => f.includes(hostFp)), `${JSON.stringify(fingerprints)} has ${hostFp}`);
    const known = fs.readFileSync(id.knownHostsFile, 'utf8');
    assert.ok(known.includes(`[127.0.0.1]:${sshd.port} ${sshd.hostPublicKey.split(' ').slice(0, 2).join(' ')}`), known);

    // the askpass route decrypts the key for ssh: the forced command answers
    const r = await sshRun(url, PASS, id, 'whatever');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'ok\n');
    // the key exchange: curve25519 ahead of sntrup761x25519 (or ML-KEM where ssh offers it), never the costly one
    const v = await sshRun(url, PASS, id, 'whatever', ['-v']);
    assert.equal(v.code, 0, v.stderr);
    const kex = /kex: algorithm: (\S+)/.exec(v.stderr)?.[1];
    assert.ok(kex === 'curve25519-sha256' || kex?.startsWith('mlkem'), `negotiated ${kex}`);
    // ... unless the user's own options name the exchanges: theirs are kept
    const own = await sshRun(url, PASS, id, 'whatever', ['-v', '-o', 'KexAlgorithms=ecdh-sha2-nistp256']);
    assert.equal(own.code, 0, own.stderr);
    assert.match(own.stderr, /kex: algorithm: ecdh-sha2-nistp256/);
    // with a wrong passphrase the key does not load and nothing else is tried
    const w = await sshRun(url, Buffer.from('wrong'), id, 'whatever');
    assert.notEqual(w.code, 0);
    assert.equal(w.stdout, '');

    // a configuration that would send the secret to the server is refused before connecting
    await assert.rejects(sshRun(url, PASS, id, 'whatever', ['-o', 'SendEnv=SNAPCRYPT_*']), (e: unknown) => isSnapError(e, 'usage') && /SendEnv/.test(e.message));
    // a user's "BatchMode yes" would make ssh skip the encrypted key: the options override it
    const batch = await sshRun(url, PASS, id, 'whatever', ['-o', 'BatchMode=yes']);
    assert.equal(batch.stdout, 'ok\n', batch.stderr);

    // setup again: unchanged, human output names the admin command and the repository
    const second = await runCli(['setup', target], { env });
    expectExit(second, 'setup again');
    assert.match(second.stdout, /already recorded and unchanged/);
    assert.ok(second.stdout.includes(`snapcrypt-server adduser ${sshd.user} --key ${sshd.user}.pub`));
    assert.ok(second.stdout.includes(`--repo ssh://${sshd.user}@127.0.0.1:${sshd.port}/`));
    assert.ok(second.stdout.includes(pub));
    // wrong passphrase for the existing key: exit status 4
    const wrongPass = await runCli(['setup', target], { env: { ...env, SNAPCRYPT_PASSWORD: 'wrong' } });
    assert.equal(wrongPass.code, 4, wrongPass.stderr);

    // the server gets a new host key (same address and port)
    await sshd.stop();
    sshd = await startSshd({ authorizedKeys: [pub], forcedCommand: 'echo ok', port });
    const refused = await sshRun(url, PASS, id, 'whatever');
    assert.notEqual(refused.code, 0);
    assert.equal(refused.stdout, '');
    assert.match(refused.stderr, /REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed/);
    const changed = await runCli(['setup', target, '--json'], { env });
    assert.equal(changed.code, 6, changed.stderr);
    assert.match(changed.stderr, new RegExp(`host key of \\[127\\.0\\.0\\.1\\]:${sshd.port} changed`));
    assert.equal(jsonLines(changed.stdout).find((o) => o['type'] === 'error')?.['code'], 'integrity');
    assert.equal(fs.readFileSync(id.knownHostsFile, 'utf8'), known, 'known_hosts is left alone');
  } finally {
    await sshd.stop();
  }
});

test('recordHostKeys alone: first contact adds, a second contact with the same key adds nothing', async () => {
  const id = sshIdentity(await tempDir('hostkeys'));
  const sshd = await startSshd({ authorizedKeys: [] });
  try {
    const t = { host: '127.0.0.1', port: sshd.port };
    assert.equal((await recordHostKeys(t, id)).added, true);
    const once = fs.readFileSync(id.knownHostsFile, 'utf8');
    assert.equal((await recordHostKeys(t, id)).added, false);
    assert.equal(fs.readFileSync(id.knownHostsFile, 'utf8'), once);
    assert.equal(fs.statSync(id.knownHostsFile).mode & 0o777, 0o600);
    assert.ok(path.isAbsolute(id.knownHostsFile));
  } finally {
    await sshd.stop();
  }
});
