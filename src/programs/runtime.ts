/**
 * Process-level settings shared by the programs: V8 flags for memory-heavy commands, output to a pipe
 * whose reader has gone, and how a program ends.
 *
 * optimizeForSize: a backup allocates many short-lived objects per file; with V8's defaults on a large
 * machine the heap grew to ~150 MB around ~15-30 MB of live data, and peak RSS for 100,000 small files
 * reached ~290 MB. --optimize-for-size keeps the heap close to its live size (measured: 175 MiB peak for
 * 100,000 files, same speed). V8 flags are process-wide, so the seal worker threads get it too.
 *
 * finish: a program ends by letting its event loop drain, not by process.exit(). process.exit() shuts
 * Node's platform threads down without tearing the V8 heap down first; a background compile job
 * (concurrent Sparkplug) that is waiting for the main thread to collect garbage then waits forever, and
 * process.exit() waits for it: the process hangs after it has done all its work (seen in tests, mostly
 * with --optimize-for-size, whose small heap makes such waits likely; native stacks in DESIGN.md). A
 * natural exit disposes of the isolate, which releases such waits.
 */
import v8 from 'node:v8';

let applied = false;
export function optimizeForSize(): void {
  if (applied) return;
  applied = true;
  v8.setFlagsFromString('--optimize-for-size');
}

/**
 * A reader that went away (`snapcrypt snapshots | head -1`) is not an error of the command: further
 * output to stdout and stderr is dropped and the command finishes (a backup still commits), instead of
 * dying of an unhandled EPIPE with a stack trace. `serve` notices a closed stdout through its own
 * handlers on the stream.
 */
export function dropOutputToClosedPipes(): void {
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code !== 'EPIPE' && err.code !== 'ERR_STREAM_DESTROYED') throw err;
    });
  }
}

/** How long finish() waits for the event loop to drain before it gives up and calls process.exit(). */
const DRAIN_GRACE_MS = 10_000;

/**
 * Ends the program with `code` once nothing is left to do. Should something still hold the event loop
 * (a leaked handle: a bug), the program says so on stderr and exits anyway after DRAIN_GRACE_MS.
 */
export function finish(code: number, name: string): void {
  process.exitCode = code;
  setTimeout(() => {
    process.stderr.write(`${name}: still running ${DRAIN_GRACE_MS / 1000} s after finishing; exiting\n`);
    process.exit(code);
  }, DRAIN_GRACE_MS).unref();
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
 *   produces objects several times slower than the server stores them;
 * - boundedHeapGrowth: a commit of 1,000,000 ids reads 256 prefix directories of about 4,000 names,
 *   which outlive a few scavenges each; with V8's growth of the old generation the server's peak
 *   was 82-83 MiB, with this 70-71 MiB, for the same CPU (8.1-8.5 against 8.3-8.4 s).
 */
export function lowMemoryServer(): void {
  smallYoungGeneration();
  boundedHeapGrowth();
  v8.setFlagsFromString('--no-maglev');
  v8.setFlagsFromString('--no-turbofan');
}

/**
 * The young generation keeps its starting size instead of growing to 32 MiB per semi-space. For a
 * restore, which allocates a few short-lived objects per file (crypto, zstd, paths): peak RSS of a
 * restore of the benchmark corpus's tree 152 MB instead of 227 MB, for about 1 s more CPU in 17 s.
 */
export function smallYoungGeneration(): void {
  v8.setFlagsFromString('--semi-space-growth-factor=1');
}

/**
 * The old generation grows by a quarter of its live size after a full collection, instead of V8's
 * factor of up to 4 on a large machine. A restore promotes the tree entries and promises of the files
 * in flight, which die soon after: with V8's growth the heap of a restore of the benchmark corpus over
 * SSH grew to 58 MB around 12 MB of live data (peak RSS 165-175 MiB); with this, 134-135 MiB for about
 * 1 CPU-s more in 30. `--optimize-for-size` kept it lower still (126-127 MiB) but cost 2.6-3.0 CPU-s.
 */
export function boundedHeapGrowth(): void {
  v8.setFlagsFromString('--heap-growing-percent=25');
}
