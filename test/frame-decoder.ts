/**
 * A second, independent frame decoder for the tests: it keeps views of the chunks it is given (no
 * copy), where src/core/protocol.ts FrameReader copies every byte; the tests parse frames with it and
 * compare FrameReader's frames against its.
 */
import { FRAME_HEAD, MAX_FRAME_LENGTH, protocolError } from '../src/core/protocol.js';
import type { Frame } from '../src/core/protocol.js';

/**
 * Incremental frame decoder: push() the bytes as they arrive, get the complete frames back. A length
 * outside [FRAME_HEAD, maxLength] throws SnapError('protocol') as soon as its 4 bytes are in, before
 * anything is allocated for it; the decoder then refuses further input. It holds at most one partial
 * frame, never allocates more than that frame's (checked) length.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private have = 0;
  private failed = false;
  private readonly maxLength: number;
  constructor(maxLength = MAX_FRAME_LENGTH) {
    this.maxLength = maxLength;
  }

  /** Bytes held for a frame not yet complete. */
  get buffered(): number {
    return this.have;
  }

  push(bytes: Buffer): Frame[] {
    const frames: Frame[] = [];
    if (this.failed) throw protocolError('input after a framing error');
    if (bytes.length > 0) {
      this.chunks.push(bytes);
      this.have += bytes.length;
    }
    for (;;) {
      if (this.have < 4) break;
      const len = this.peekLength();
      if (len < FRAME_HEAD || len > this.maxLength) {
        this.failed = true;
        this.chunks = [];
        this.have = 0;
        throw protocolError(
          len < FRAME_HEAD ? `frame length ${len} is too small` : `frame length ${len} exceeds the limit of ${this.maxLength}`,
        );
      }
      if (this.have < 4 + len) break;
      const frame = this.take(4 + len);
      frames.push({ type: frame[4]!, id: frame.readUInt32BE(5), payload: frame.subarray(4 + FRAME_HEAD) });
    }
    return frames;
  }

  /** Whether the input so far ended on a frame boundary. */
  get atBoundary(): boolean {
    return this.have === 0;
  }

  private peekLength(): number {
    const first = this.chunks[0]!;
    if (first.length >= 4) return first.readUInt32BE(0);
    const four = Buffer.alloc(4);
    let off = 0;
    for (const c of this.chunks) {
      off += c.copy(four, off, 0, Math.min(c.length, 4 - off));
      if (off === 4) break;
    }
    return four.readUInt32BE(0);
  }

  /** Removes and returns the next n bytes (n <= have, checked by the caller against the limit). */
  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.have -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.have -= n;
    return out;
  }
}
