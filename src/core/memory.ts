/**
 * Freeing memory now instead of when the garbage collector gets to it. V8 collects an ArrayBuffer's
 * memory only after about 64 MB of such (external) memory has piled up in a thread since its last
 * collection; a backup that drops a 1 MiB buffer per chunk in each thread held that much garbage
 * per thread, and malloc kept the pages long after.
 */

/**
 * Frees the memory of a buffer that nobody uses any more, at once: its ArrayBuffer is detached
 * (ArrayBuffer.prototype.transfer), so every view of it reads as empty from then on. Only a buffer
 * that is all of its ArrayBuffer is freed; a view into a larger one (such as Node's shared pool of
 * small Buffers) is left to the garbage collector.
 */
export function release(b: ArrayBufferView): void {
  const ab = b.buffer;
  if (ab instanceof ArrayBuffer && !ab.detached && b.byteOffset === 0 && b.byteLength === ab.byteLength && ab.byteLength > 0) ab.transfer(0);
}
