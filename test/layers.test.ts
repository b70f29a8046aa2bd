/**
 * Layer rules checked on the compiled code: the server program's import graph never reaches the
 * crypto code or the engines (I1, I6), and the pure core touches no file system, network or processes.
 */
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const SRC = fileURLToPath(new URL('../src/', import.meta.url));

/** Module specifiers of static imports/exports and (unless dynamic is false) of import('literal') calls. */
function specifiers(code: string, dynamic = true): string[] {
  const out: string[] = [];
  const patterns = [
    /\b(?:import|export)\s+(?:type\s+)?(?:[\w*${}\s,]+?\s+from\s+)?['"]([^'"]+)['"]/g,
    ...(dynamic ? [/\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/g] : []),
  ];
  for (const re of patterns) for (const m of code.matchAll(re)) out.push(m[1]!);
  return out;
}

/** Every local module reachable from entry (through static imports only, if dynamic is false), as paths relative to dist/src. */
function reachable(entry: string, dynamic = true): Set<string> {
  const seen = new Set<string>();
  const todo = [resolve(entry)];
  while (todo.length > 0) {
    const file = todo.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    for (const spec of specifiers(readFileSync(file, 'utf8'), dynamic)) {
      if (spec.startsWith('.')) todo.push(resolve(dirname(file), spec));
    }
  }
  return new Set([...seen].map((f) => relative(SRC, f)));
}

describe('layers', () => {
  it('specifiers finds static, re-export, type-free and dynamic imports', () => {
    const code = `import { a } from './a.js';\nimport * as b from "./b.js";\nexport { c } from './c.js';\nimport './d.js';\nconst e = await import('./e.js');\nimport {\n  f,\n  g,\n} from './f.js';`;
    assert.deepEqual(specifiers(code).sort(), ['./a.js', './b.js', './c.js', './d.js', './e.js', './f.js']);
  });

  it('the server program cannot reach the crypto code or the engines', () => {
    const files = reachable(join(SRC, 'programs', 'snapcrypt-server.js'));
    assert.ok(files.has(join('server', 'serve.js')), 'the walk follows imports');
    assert.ok(files.has(join('core', 'protocol.js')));
    const forbidden = [...files].filter((f) => f === join('core', 'crypto.js') || f.startsWith(`engine/`) || f.startsWith('cli/'));
    assert.deepEqual(forbidden, [], `the server's import graph reaches ${forbidden.join(', ')}`);
  });

  it('the server program does not load node:crypto (OpenSSL adds about 1.5 MB to its RSS)', () => {
    const files = reachable(join(SRC, 'programs', 'snapcrypt-server.js'));
    const bad = [...files].filter((f) => specifiers(readFileSync(join(SRC, f), 'utf8')).some((spec) => /^(node:)?crypto$/.test(spec)));
    assert.deepEqual(bad, []);
  });

  it('serve opens its area without node:child_process and the ssh driver (a restore never needs them: 0.6 MiB of RSS)', () => {
    // what the program loads, and what openStorage loads for a local path
    const entries = [join('programs', 'snapcrypt-server.js'), join('drivers', 'localdir.js'), join('drivers', 'btrfs.js')];
    const files = new Set(entries.flatMap((e) => [...reachable(join(SRC, e), false)]));
    assert.ok(files.has(join('server', 'serve.js')) && files.has(join('drivers', 'dirwriter.js')), 'the walk follows static imports');
    assert.ok(!files.has(join('drivers', 'ssh.js')), 'the ssh driver is loaded at start');
    const bad = [...files].filter((f) => specifiers(readFileSync(join(SRC, f), 'utf8'), false).some((spec) => /^(node:)?child_process$/.test(spec)));
    assert.deepEqual(bad, []);
  });

  it('a client of an ssh:// repository loads no directory driver (nor node:fs/promises: 1.1 MiB of RSS)', () => {
    const files = new Set([join('cli', 'backup.js'), join('drivers', 'ssh.js')].flatMap((e) => [...reachable(join(SRC, e), false)]));
    assert.ok(files.has(join('engine', 'backup.js')) && files.has(join('drivers', 'sshkeys.js')), 'the walk follows static imports');
    const bad = [...files].filter((f) => f.endsWith('localdir.js') || f.endsWith('btrfs.js') || specifiers(readFileSync(join(SRC, f), 'utf8'), false).some((spec) => /^(node:)?fs\/promises$/.test(spec)));
    assert.deepEqual(bad, []);
  });

  it('the root seal helper imports nothing but Node\'s built-ins (install copies that one module)', () => {
    const specs = specifiers(readFileSync(join(SRC, 'server', 'seal-helper.js'), 'utf8'));
    assert.ok(specs.length > 0);
    assert.deepEqual(specs.filter((spec) => !spec.startsWith('node:')), []);
  });

  it('the pure core imports no fs, child_process or net', () => {
    const core = join(SRC, 'core');
    const bad: string[] = [];
    for (const name of readdirSync(core).filter((n) => n.endsWith('.js'))) {
      for (const spec of specifiers(readFileSync(join(core, name), 'utf8'))) {
        if (/^(node:)?(fs|fs\/promises|child_process|net|tls|http|https|dgram)$/.test(spec)) bad.push(`${name} imports ${spec}`);
      }
    }
    assert.deepEqual(bad, []);
  });
});
