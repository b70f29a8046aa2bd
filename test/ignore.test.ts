import assert from 'node:assert/strict';
import { test } from 'node:test';
import { IgnoreRules, Matcher } from '../src/core/ignore.js';

/**
 * Cases from gitignore(5) and git's wildmatch behaviour. `rules` is the text of a root-level ignore
 * file; `path` is checked like git does for a tree walk (ancestors first, see isPathExcluded), or,
 * with `entry: true`, as a single entry whose parents are not excluded (isExcluded).
 */
interface Case {
  rules: string;
  path: string;
  dir?: boolean;
  entry?: boolean;
  excluded: boolean;
}

const CASES: Case[] = [
  // gitignore(5): "hello.*" / "/hello.*"
  { rules: 'hello.*', path: 'hello.txt', excluded: true },
  { rules: 'hello.*', path: 'a/hello.java', excluded: true },
  { rules: '/hello.*', path: 'hello.c', excluded: true },
  { rules: '/hello.*', path: 'a/hello.java', excluded: false },
  // trailing slash: directories only, at any depth when there is no other slash
  { rules: 'foo/', path: 'foo', dir: true, excluded: true },
  { rules: 'foo/', path: 'foo', excluded: false },
  { rules: 'foo/', path: 'a/foo', dir: true, excluded: true },
  { rules: 'foo/', path: 'foo/x.c', excluded: true },
  { rules: '/build/', path: 'build', dir: true, excluded: true },
  { rules: '/build/', path: 'src/build', dir: true, excluded: false },
  { rules: '*.d/', path: 'x.d', dir: true, excluded: true },
  { rules: '*.d/', path: 'x.d', excluded: false },
  // a middle slash anchors, a leading slash then changes nothing
  { rules: 'doc/frotz', path: 'doc/frotz', excluded: true },
  { rules: '/doc/frotz', path: 'doc/frotz', excluded: true },
  { rules: 'doc/frotz', path: 'a/doc/frotz', excluded: false },
  { rules: 'doc/frotz/', path: 'doc/frotz', dir: true, excluded: true },
  { rules: 'doc/frotz/', path: 'a/doc/frotz', dir: true, excluded: false },
  // "foo/*" matches foo/test.json and foo/bar, not (as an entry) foo/bar/hello.c
  { rules: 'foo/*', path: 'foo/test.json', excluded: true },
  { rules: 'foo/*', path: 'foo/bar', dir: true, excluded: true },
  { rules: 'foo/*', path: 'foo/bar/hello.c', entry: true, excluded: false },
  { rules: 'foo/*', path: 'foo', dir: true, excluded: false },
  { rules: 'a/*.c', path: 'a/b/c.c', entry: true, excluded: false },
  // **
  { rules: '**/foo', path: 'foo', excluded: true },
  { rules: '**/foo', path: 'a/b/foo', dir: true, excluded: true },
  { rules: '**/foo/bar', path: 'x/foo/bar', excluded: true },
  { rules: '**/foo/bar', path: 'foo/bar', excluded: true },
  { rules: '**/foo/bar', path: 'x/foo/y/bar', entry: true, excluded: false },
  { rules: 'abc/**', path: 'abc/x', excluded: true },
  { rules: 'abc/**', path: 'abc/x/y', entry: true, excluded: true },
  { rules: 'abc/**', path: 'abc', dir: true, excluded: false },
  { rules: 'a/**/b', path: 'a/b', excluded: true },
  { rules: 'a/**/b', path: 'a/x/b', excluded: true },
  { rules: 'a/**/b', path: 'a/x/y/b', entry: true, excluded: true },
  { rules: 'a/**/b', path: 'a/xb', excluded: false },
  { rules: '**', path: 'any/thing', excluded: true },
  { rules: 'foo**bar', path: 'fooxbar', excluded: true }, // not at a slash: a plain *
  { rules: 'x/foo**bar', path: 'x/foo/bar', entry: true, excluded: false },
  { rules: '**/a/**/b', path: 'p/a/q/r/b', entry: true, excluded: true },
  // negation: the last matching rule wins; nothing below an excluded directory comes back
  { rules: '*.log\n!important.log', path: 'important.log', excluded: false },
  { rules: '*.log\n!important.log', path: 'debug.log', excluded: true },
  { rules: '!important.log\n*.log', path: 'important.log', excluded: true },
  { rules: 'build/\n!build/keep.txt', path: 'build/keep.txt', excluded: true },
  { rules: 'build/\n!build/keep.txt', path: 'build/keep.txt', entry: true, excluded: false },
  { rules: '/*\n!/foo\n/foo/*\n!/foo/bar', path: 'foo/bar/x', excluded: false }, // gitignore(5) example
  { rules: '/*\n!/foo\n/foo/*\n!/foo/bar', path: 'foo/baz', excluded: true },
  { rules: '/*\n!/foo\n/foo/*\n!/foo/bar', path: 'other', excluded: true },
  { rules: '/*\n!/foo\n/foo/*\n!/foo/bar', path: 'foo', dir: true, excluded: false },
  { rules: '*\n!*/', path: 'a', dir: true, excluded: false },
  { rules: '*\n!*/', path: 'a/file', excluded: true },
  { rules: '!', path: '!', excluded: false },
  // comments, blank lines, escapes, trailing spaces, CRLF
  { rules: '# comment\nfoo', path: '# comment', excluded: false },
  { rules: '# comment\nfoo', path: 'foo', excluded: true },
  { rules: '\\#foo', path: '#foo', excluded: true },
  { rules: '\\!important!.txt', path: '!important!.txt', excluded: true },
  { rules: '\n\n   \n', path: 'a', excluded: false },
  { rules: 'foo   ', path: 'foo', excluded: true },
  { rules: 'foo   ', path: 'foo ', excluded: false },
  { rules: 'foo\\ ', path: 'foo ', excluded: true },
  { rules: 'foo\\ ', path: 'foo', excluded: false },
  { rules: 'foo\t', path: 'foo\t', excluded: true }, // only spaces are trimmed
  { rules: 'foo\r\nbar\r\n', path: 'bar', excluded: true },
  { rules: '\\*', path: '*', excluded: true },
  { rules: '\\*', path: 'a', excluded: false },
  { rules: 'a\\', path: 'a', excluded: false }, // trailing backslash: matches nothing
  // ? and character classes
  { rules: 'a?c', path: 'abc', excluded: true },
  { rules: 'x/a?c', path: 'x/a/c', entry: true, excluded: false },
  { rules: '*.[oa]', path: 'x.o', excluded: true },
  { rules: '*.[oa]', path: 'x.a', excluded: true },
  { rules: '*.[oa]', path: 'x.c', excluded: false },
  { rules: '[!a]*', path: 'abc', excluded: false },
  { rules: '[!a]*', path: 'bcd', excluded: true },
  { rules: '[^a]*', path: 'bcd', excluded: true },
  { rules: '[a-c]x', path: 'bx', excluded: true },
  { rules: '[a-c]x', path: 'dx', excluded: false },
  { rules: '[z-a]x', path: 'mx', excluded: false },
  { rules: 'x[a-]', path: 'x-', excluded: true },
  { rules: '[[:digit:]]*', path: '1abc', excluded: true },
  { rules: '[[:digit:]]*', path: 'abc', excluded: false },
  { rules: '[[:upper:][:punct:]]', path: '%', excluded: true },
  { rules: '[[:bogus:]]', path: 'b', excluded: false },
  { rules: '[]]x', path: ']x', excluded: true },
  { rules: '[!]]x', path: 'ax', excluded: true },
  { rules: '[!]]x', path: ']x', excluded: false },
  { rules: '[\\]]', path: ']', excluded: true },
  { rules: '[abc', path: '[abc', excluded: false }, // unterminated: matches nothing
  { rules: 'a[/]b', path: 'a/b', entry: true, excluded: false }, // a class never matches '/'
  { rules: 'a[!x]b', path: 'a/b', entry: true, excluded: false },
  { rules: 'a*', path: 'a\nb', excluded: true }, // newlines in names are ordinary characters
];

test(`gitignore semantics (${CASES.length} cases)`, () => {
  assert.ok(CASES.length >= 40);
  const failures: string[] = [];
  for (const c of CASES) {
    const m = new Matcher(IgnoreRules.parse(c.rules, '.snapcryptignore'));
    const got = c.entry ? m.isExcluded(c.path, c.dir ?? false) : m.isPathExcluded(c.path, c.dir ?? false);
    if (got !== c.excluded) failures.push(`${JSON.stringify(c.rules)} ${JSON.stringify(c.path)}${c.dir ? '/' : ''}: got ${got}`);
  }
  assert.deepEqual(failures, []);
});

test('non-UTF-8 names match bytewise when rules and paths are decoded as latin1', () => {
  const rules = Buffer.from([0xff, 0x2a, 0x2e, 0x74, 0x78, 0x74]).toString('latin1'); // "\xff*.txt"
  const m = new Matcher(IgnoreRules.parse(rules, 't'));
  assert.equal(m.isExcluded(Buffer.from([0xff, 0xfe, 0x2e, 0x74, 0x78, 0x74]).toString('latin1'), false), true);
  assert.equal(m.isExcluded(Buffer.from([0xfe, 0x2e, 0x74, 0x78, 0x74]).toString('latin1'), false), false);
  // '?' is one byte, as in git: "café" is 5 bytes in UTF-8.
  const cafe = Buffer.from('café').toString('latin1');
  assert.equal(new Matcher(IgnoreRules.parse('caf?', 't')).isExcluded(cafe, false), false);
  assert.equal(new Matcher(IgnoreRules.parse('caf??', 't')).isExcluded(cafe, false), true);
  // With UTF-8 strings, '?' is one character.
  assert.equal(new Matcher(IgnoreRules.parse('caf?', 't')).isExcluded('café', false), true);
  assert.equal(new Matcher(IgnoreRules.parse('[é]x', 't')).isExcluded('éx', false), true);
  assert.equal(new Matcher(IgnoreRules.parse('?', 't')).isExcluded('😀', false), true);
});

test('per-directory rules apply below their directory; deeper rules win', () => {
  const m = new Matcher();
  m.push(IgnoreRules.parse('*.log\n/only-root\n', '.snapcryptignore'));
  assert.equal(m.isExcluded('x.log', false), true);
  assert.equal(m.isExcluded('only-root', false), true);
  m.push(IgnoreRules.parse('!keep.log\n/anchored\nx/y\n', 'sub/.snapcryptignore', 'sub'));
  assert.equal(m.depth, 2);
  assert.equal(m.isExcluded('sub/keep.log', false), false);
  assert.equal(m.isExcluded('sub/other.log', false), true);
  assert.equal(m.isExcluded('sub/only-root', false), false);
  assert.equal(m.isExcluded('sub/anchored', false), true);
  assert.equal(m.isExcluded('sub/deeper/anchored', false), false);
  assert.equal(m.isExcluded('sub/x/y', false), true);
  assert.equal(m.isExcluded('sub/z/x/y', false), false);
  assert.equal(m.isExcluded('sub', true), false); // a directory's own rules do not apply to itself
  const rule = m.explain('sub/keep.log', false);
  assert.deepEqual([rule?.source, rule?.line, rule?.text, rule?.negated], ['sub/.snapcryptignore', 1, '!keep.log', true]);
  m.pop();
  assert.equal(m.isExcluded('sub/keep.log', false), true);
  m.pop();
  assert.equal(m.isExcluded('sub/keep.log', false), false);
  assert.throws(() => m.pop());
});

test('global --exclude patterns: anchored at the root, basename anywhere, highest precedence', () => {
  const global = IgnoreRules.fromPatterns(['*.tmp', '!keep.tmp', 'sub/cache', 'node_modules/', '#literal', 'sp ']);
  const m = new Matcher(global);
  assert.equal(m.isExcluded('a.tmp', false), true);
  assert.equal(m.isExcluded('deep/er/a.tmp', false), true);
  assert.equal(m.isExcluded('sub/cache', true), true);
  assert.equal(m.isExcluded('x/sub/cache', true), false);
  assert.equal(m.isExcluded('x/node_modules', true), true);
  assert.equal(m.isExcluded('x/node_modules', false), false);
  assert.equal(m.isExcluded('#literal', false), true);
  assert.equal(m.isExcluded('sp ', false), true);
  // A per-directory negation cannot override --exclude, nor a per-directory exclude a --exclude negation.
  m.push(IgnoreRules.parse('!a.tmp\n*.tmp\n', 'sub/.snapcryptignore', 'sub'));
  assert.equal(m.isExcluded('sub/b.tmp', false), true);
  assert.equal(m.isExcluded('sub/keep.tmp', false), false);
  assert.equal(m.explain('sub/keep.tmp', false)?.source, '--exclude');
  // Several global sets: later ones take precedence.
  const m2 = new Matcher([IgnoreRules.fromPatterns(['*.x']), IgnoreRules.fromPatterns(['!a.x'], '--include')]);
  assert.equal(m2.isExcluded('a.x', false), false);
  assert.equal(m2.isExcluded('b.x', false), true);
});

test('a simulated walk never visits the inside of an excluded directory', () => {
  const tree: Record<string, Record<string, string | null> | undefined> = {
    '': { '.snapcryptignore': '/build/\n*.o\n!keep.o\n', build: null, src: null, 'a.o': '', 'keep.o': '' },
    build: { 'out.bin': '', 'keep.o': '' },
    src: { '.snapcryptignore': '!*.o\ncache/\n', 'b.o': '', 'c.c': '', cache: null, build: null },
    'src/cache': { x: '' },
    'src/build': { 'y': '' },
  };
  const m = new Matcher(IgnoreRules.fromPatterns(['*.c']));
  const seen: string[] = [];
  const walk = (dir: string): void => {
    const entries = tree[dir]!;
    const own = entries['.snapcryptignore'];
    if (typeof own === 'string') m.push(IgnoreRules.parse(own, `${dir}/.snapcryptignore`, dir));
    for (const [name, content] of Object.entries(entries).sort(([a], [b]) => (a < b ? -1 : 1))) {
      const rel = dir === '' ? name : `${dir}/${name}`;
      const isDir = content === null;
      if (m.isExcluded(rel, isDir)) continue;
      seen.push(isDir ? `${rel}/` : rel);
      if (isDir) walk(rel);
    }
    if (typeof own === 'string') m.pop();
  };
  walk('');
  assert.equal(m.depth, 0);
  assert.deepEqual(seen, ['.snapcryptignore', 'keep.o', 'src/', 'src/.snapcryptignore', 'src/b.o', 'src/build/', 'src/build/y']);
});

test('base and path normalisation', () => {
  const rules = IgnoreRules.parse('x', 't', './sub/');
  assert.equal(rules.base, 'sub');
  assert.equal(IgnoreRules.parse('x', 't', '.').base, '');
  assert.equal(IgnoreRules.parse('\ufeffx\n', 't').rules[0]?.text, 'x');
  assert.equal(new Matcher(rules).isExcluded('/sub/x/', true), true);
  assert.equal(rules.match('subx/x', false), undefined);
  assert.equal(IgnoreRules.parse('# only a comment\n\n', 't').isEmpty, true);
});
