/**
 * V8 settings for memory-heavy commands. A backup allocates many short-lived objects per file; with
 * V8's defaults on a large machine the heap grew to ~150 MB around ~15-30 MB of live data, and peak RSS
 * for 100,000 small files reached ~290 MB. --optimize-for-size keeps the heap close to its live size
 * (measured: 175 MiB peak for 100,000 files, same speed). V8 flags are process-wide, so the seal
 * worker threads get it too.
 *
 * Only `backup` sets it, at its start: restores run with it set process-wide hung at exit in 3 of 4
 * CI runs (after all output was written), and never without it; the cause is not known yet.
 */
import v8 from 'node:v8';

let applied = false;
export function optimizeForSize(): void {
  if (applied) return;
  applied = true;
  v8.setFlagsFromString('--optimize-for-size');
}

/**
 * V8 settings for `snapcrypt-server serve`, set as it starts (flags that V8 reads only at startup,
 * such as --max-semi-space-size, have no effect from here; these are read as they are used). Measured
 * with bench/server-rss.sh (docs/SERVER.md, "Resources"):
 * - --semi-space-growth-factor=1: the young generation keeps its starting size (2 MiB) instead of
 *   growing to 32 MiB while a listing or a commit allocates many short-lived strings;
 * - --no-maglev --no-turbofan: only the interpreter and the baseline compiler run. The optimizing
 *   compilers' own machine code (about 7 MB of the node binary, counted in RSS once run) and their
 *   working memory stay out of the process (9-10 MiB of peak RSS in all). It costs about 25 µs of CPU
 *   per request: 19-20 s instead of 16-17 s for the first backup of the benchmark corpus, whose client
 *   produces objects several times slower than the server stores them.
 */
export function lowMemoryServer(): void {
  v8.setFlagsFromString('--semi-space-growth-factor=1');
  v8.setFlagsFromString('--no-maglev');
  v8.setFlagsFromString('--no-turbofan');
}
