/**
 * Excludes for the backup walker: global patterns (--exclude, --exclude-file) plus the gitignore-style
 * .snapcryptignore file of each directory the walk enters. Paths are relative to "/" (an absolute path
 * without its leading slash), decoded as latin1 so that non-UTF-8 names match byte by byte.
 */
import { IgnoreRules, Matcher } from './ignore.js';

export interface Excluder {
  /** Called when entering a directory; ignoreFile is the content of its .snapcryptignore, if any. */
  enter(dirRel: string, ignoreFile: string | null): void;
  leave(): void;
  isExcluded(rel: string, isDir: boolean): boolean;
  /** Whether any rule applies in the directory entered last (if not, nothing in it is excluded). */
  readonly active: boolean;
}

export interface ExcludeSources {
  /** --exclude patterns, taken literally (no comments). */
  readonly patterns?: readonly string[];
  /** --exclude-file contents, parsed like a gitignore file. */
  readonly files?: ReadonlyArray<{ readonly name: string; readonly text: string }>;
}

const EMPTY = IgnoreRules.parse('', 'none');

export function makeExcluder(src: ExcludeSources = {}): Excluder {
  const global: IgnoreRules[] = [];
  if (src.patterns && src.patterns.length > 0) global.push(IgnoreRules.fromPatterns(src.patterns));
  for (const f of src.files ?? []) global.push(IgnoreRules.parse(f.text, f.name));
  const m = new Matcher(global);
  return {
    enter(dirRel, text) {
      m.push(text === null ? EMPTY : IgnoreRules.parse(text, `/${dirRel}/.snapcryptignore`, dirRel));
    },
    leave() {
      m.pop();
    },
    isExcluded(rel, isDir) {
      return m.isExcluded(rel, isDir);
    },
    get active() {
      return m.hasRules;
    },
  };
}
