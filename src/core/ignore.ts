/**
 * gitignore-style exclude rules (pure: no file system access).
 *
 * Semantics follow git (gitignore(5) and wildmatch.c):
 * - blank lines match nothing; a line starting with `#` is a comment (`\#` for a literal `#`);
 *   trailing spaces are trimmed unless escaped with a backslash; a trailing CR and a UTF-8 BOM are dropped;
 * - a leading `!` negates (re-includes; `\!` for a literal `!`); the last matching rule decides;
 * - a trailing `/` matches directories only;
 * - a pattern with a `/` at the start or in the middle is anchored: it is matched against the path
 *   relative to the rules' base directory; otherwise it is matched against the basename at any depth
 *   below the base;
 * - `*` matches anything but `/`, `?` one character but `/`, `[...]` a class (`!` or `^` negates,
 *   ranges, `[:alpha:]` etc. over ASCII; never `/`), `\x` the character x;
 * - `**` at the start (`**\/x`), the end (`x/**`) or between slashes (`a/**\/b`) matches any number of
 *   directories (zero included, except at the end); any other `**` is a plain `*`;
 * - a malformed pattern (unterminated `[`, unknown `[:class:]`, trailing backslash) matches nothing.
 *
 * Paths are '/'-separated and relative to the backup root, without leading `./` or `/`. Strings are
 * matched character by character: if the caller decodes both the rules and the paths as latin1, every
 * byte is one character and non-UTF-8 names match bytewise exactly as in git; with UTF-8 decoding
 * `?` and `[...]` match a whole (multi-byte) character.
 *
 * A directory that is excluded is not descended into by the walker, so nothing below it can be
 * re-included (as in git). Matcher.isExcluded() judges one entry, assuming its parents were not
 * excluded (the walk guarantees it); Matcher.isPathExcluded() also checks every ancestor directory.
 */

export interface IgnoreRule {
  /** The line as written (after trailing-space trimming). */
  readonly text: string;
  readonly source: string;
  /** 1-based line number in the source (for --exclude patterns: the pattern's index + 1). */
  readonly line: number;
  readonly negated: boolean;
  readonly dirOnly: boolean;
  /** True if matched against the basename, false if against the path relative to the base. */
  readonly basename: boolean;
  /** Literal string to compare with, or a compiled pattern; null if the pattern can never match. */
  readonly matcher: string | RegExp | null;
}

export class IgnoreRules {
  /** Directory the rules apply to, relative to the backup root ('' = the root). */
  readonly base: string;
  readonly source: string;
  readonly rules: readonly IgnoreRule[];

  private constructor(base: string, source: string, rules: IgnoreRule[]) {
    this.base = base;
    this.source = source;
    this.rules = rules;
  }

  /** Rules from the text of an ignore file found in directory `base` ('' = backup root). */
  static parse(text: string, source: string, base = ''): IgnoreRules {
    const rules: IgnoreRule[] = [];
    const lines = (text.startsWith('\ufeff') ? text.slice(1) : text).split('\n');
    lines.forEach((raw, i) => {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (line === '' || line.startsWith('#')) return;
      const rule = compileRule(trimTrailingSpaces(line), source, i + 1);
      if (rule !== undefined) rules.push(rule);
    });
    return new IgnoreRules(normalize(base), source, rules);
  }

  /** Rules from command-line patterns (--exclude): like ignore-file lines, except that `#` starts no
   * comment and trailing spaces are kept (the shell already delimits each pattern). */
  static fromPatterns(patterns: readonly string[], source = '--exclude', base = ''): IgnoreRules {
    const rules: IgnoreRule[] = [];
    patterns.forEach((p, i) => {
      const rule = compileRule(p, source, i + 1);
      if (rule !== undefined) rules.push(rule);
    });
    return new IgnoreRules(normalize(base), source, rules);
  }

  get isEmpty(): boolean {
    return this.rules.length === 0;
  }

  /** The last rule matching `relPath` (relative to the backup root), or undefined. */
  match(relPath: string, isDir: boolean): IgnoreRule | undefined {
    let rel = relPath;
    if (this.base !== '') {
      if (relPath.length <= this.base.length || relPath[this.base.length] !== '/' || !relPath.startsWith(this.base)) {
        return undefined;
      }
      rel = relPath.slice(this.base.length + 1);
    }
    const name = rel.slice(rel.lastIndexOf('/') + 1);
    for (let i = this.rules.length - 1; i >= 0; i--) {
      const rule = this.rules[i]!;
      if (rule.dirOnly && !isDir) continue;
      const subject = rule.basename ? name : rel;
      const m = rule.matcher;
      if (m === null) continue;
      if (typeof m === 'string' ? m === subject : m.test(subject)) return rule;
    }
    return undefined;
  }
}

/**
 * Combines global rules (--exclude, highest precedence, as command-line patterns in git) with the
 * per-directory rule files of the directories being walked (deeper files take precedence over
 * shallower ones). The walker push()es a directory's rules when it enters it and pop()s them when it
 * leaves.
 */
export class Matcher {
  private readonly global: readonly IgnoreRules[];
  private readonly stack: IgnoreRules[] = [];

  /** `global`: rule sets that apply everywhere, in increasing precedence. */
  constructor(global: IgnoreRules | readonly IgnoreRules[] = []) {
    this.global = global instanceof IgnoreRules ? [global] : global;
  }

  push(rules: IgnoreRules): void {
    this.stack.push(rules);
  }

  pop(): IgnoreRules {
    const top = this.stack.pop();
    if (top === undefined) throw new Error('Matcher.pop() without push()');
    return top;
  }

  get depth(): number {
    return this.stack.length;
  }

  /** Whether any rule set in effect has a rule. */
  get hasRules(): boolean {
    return this.global.some((r) => !r.isEmpty) || this.stack.some((r) => !r.isEmpty);
  }

  /** The rule deciding about `relPath` (a negated rule means: included), or undefined if none matches. */
  explain(relPath: string, isDir: boolean): IgnoreRule | undefined {
    const path = stripSlashes(relPath);
    for (let i = this.global.length - 1; i >= 0; i--) {
      const rule = this.global[i]!.match(path, isDir);
      if (rule !== undefined) return rule;
    }
    for (let i = this.stack.length - 1; i >= 0; i--) {
      const rule = this.stack[i]!.match(path, isDir);
      if (rule !== undefined) return rule;
    }
    return undefined;
  }

  /** Whether the entry `relPath` is excluded, its parent directories being known not to be. */
  isExcluded(relPath: string, isDir: boolean): boolean {
    const rule = this.explain(relPath, isDir);
    return rule !== undefined && !rule.negated;
  }

  /** Whether `relPath` or any of its ancestor directories is excluded (for callers that do not walk). */
  isPathExcluded(relPath: string, isDir: boolean): boolean {
    const path = stripSlashes(relPath);
    for (let i = path.indexOf('/'); i >= 0; i = path.indexOf('/', i + 1)) {
      if (this.isExcluded(path.slice(0, i), true)) return true;
    }
    return this.isExcluded(path, isDir);
  }
}

function stripSlashes(p: string): string {
  let s = 0;
  let e = p.length;
  while (s < e && p[s] === '/') s++;
  while (e > s && p[e - 1] === '/') e--;
  return p.slice(s, e);
}

function normalize(base: string): string {
  const b = stripSlashes(base);
  return b === '.' ? '' : b.startsWith('./') ? b.slice(2) : b;
}

/** git's trim_trailing_spaces(): drop unescaped trailing spaces (not tabs). */
function trimTrailingSpaces(line: string): string {
  let lastSpace = -1;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (c === ' ') {
      if (lastSpace < 0) lastSpace = i;
    } else {
      if (c === '\\') {
        i++;
        if (i >= line.length) return line;
      }
      lastSpace = -1;
    }
  }
  return lastSpace < 0 ? line : line.slice(0, lastSpace);
}

function compileRule(text: string, source: string, line: number): IgnoreRule | undefined {
  let p = text;
  const negated = p.startsWith('!');
  if (negated) p = p.slice(1);
  const dirOnly = p.endsWith('/');
  if (dirOnly) p = p.slice(0, -1);
  if (p === '') return undefined;
  const basename = !p.includes('/');
  if (p.startsWith('/')) p = p.slice(1);
  const matcher = /[*?[\\]/.test(p) ? compileGlob(p) : p;
  return { text, source, line, negated, dirOnly, basename, matcher };
}

/** Character classes as git's (ASCII-only) ctype defines them. */
const CLASSES: Record<string, string> = {
  alnum: '0-9A-Za-z',
  alpha: 'A-Za-z',
  blank: '\\u{20}\\u{9}',
  cntrl: '\\u{0}-\\u{1f}\\u{7f}',
  digit: '0-9',
  graph: '\\u{21}-\\u{7e}',
  lower: 'a-z',
  print: '\\u{20}-\\u{7e}',
  punct: '\\u{21}-\\u{2f}\\u{3a}-\\u{40}\\u{5b}-\\u{60}\\u{7b}-\\u{7e}',
  space: '\\u{20}\\u{9}\\u{a}\\u{d}',
  upper: 'A-Z',
  xdigit: '0-9A-Fa-f',
};

function esc(ch: string): string {
  return /^[A-Za-z0-9_]$/.test(ch) ? ch : `\\u{${ch.codePointAt(0)!.toString(16)}}`;
}

/** Translates a wildmatch pattern (WM_PATHNAME) into a RegExp; null if malformed (never matches). */
function compileGlob(glob: string): RegExp | null {
  const cs = Array.from(glob); // by code point
  let re = '';
  let i = 0;
  while (i < cs.length) {
    const c = cs[i]!;
    if (c === '*') {
      let j = i;
      while (cs[j] === '*') j++;
      if (j - i >= 2 && (i === 0 || cs[i - 1] === '/')) {
        if (j === cs.length) {
          re += '.*';
          i = j;
          continue;
        }
        const slash = cs[j] === '/' ? 1 : cs[j] === '\\' && cs[j + 1] === '/' ? 2 : 0;
        if (slash > 0) {
          re += '(?:.*/)?';
          i = j + slash;
          continue;
        }
      }
      re += '[^/]*';
      i = j;
    } else if (c === '?') {
      re += '[^/]';
      i++;
    } else if (c === '\\') {
      const next = cs[i + 1];
      if (next === undefined) return null;
      re += esc(next);
      i += 2;
    } else if (c === '[') {
      const cls = compileBracket(cs, i);
      if (cls === null) return null;
      re += cls.re;
      i = cls.end;
    } else {
      re += esc(c);
      i++;
    }
  }
  return new RegExp(`^${re}$`, 'su');
}

/** A `[...]` expression starting at cs[start], following wildmatch.c's parsing exactly. */
function compileBracket(cs: string[], start: number): { re: string; end: number } | null {
  let p = start + 1;
  let ch = cs[p];
  const negated = ch === '!' || ch === '^';
  if (negated) ch = cs[++p];
  const parts: string[] = [];
  let prev: string | undefined;
  do {
    if (ch === undefined) return null;
    if (ch === '\\') {
      ch = cs[++p];
      if (ch === undefined) return null;
      parts.push(esc(ch));
    } else if (ch === '-' && prev !== undefined && cs[p + 1] !== undefined && cs[p + 1] !== ']') {
      let hi = cs[++p]!;
      if (hi === '\\') {
        const e = cs[++p];
        if (e === undefined) return null;
        hi = e;
      }
      if (prev.codePointAt(0)! <= hi.codePointAt(0)!) parts.push(`${esc(prev)}-${esc(hi)}`);
      ch = undefined; // a range cannot start another range
    } else if (ch === '[' && cs[p + 1] === ':') {
      const s = p + 2;
      let q = s;
      while (cs[q] !== undefined && cs[q] !== ']') q++;
      if (cs[q] === undefined) return null;
      if (q - s - 1 < 0 || cs[q - 1] !== ':') {
        parts.push(esc('[')); // no ":]": a plain '['
      } else {
        const cls = CLASSES[cs.slice(s, q - 1).join('')];
        if (cls === undefined) return null;
        parts.push(cls);
        p = q;
        ch = undefined;
      }
    } else {
      parts.push(esc(ch));
    }
    prev = ch;
    ch = cs[++p];
  } while (ch !== ']');
  const body = parts.join('');
  const re = negated ? `[^/${body}]` : body === '' ? '(?!)' : `(?!/)[${body}]`;
  return { re, end: p + 1 };
}
