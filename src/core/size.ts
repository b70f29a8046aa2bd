/** Sizes as people write them in configuration: "500MiB", "20GiB", "2TB", "123456" (bytes). */
import { SnapError } from './errors.js';

const UNITS: Readonly<Record<string, number>> = {
  '': 1,
  B: 1,
  KiB: 1024,
  MiB: 1024 ** 2,
  GiB: 1024 ** 3,
  TiB: 1024 ** 4,
  KB: 1000,
  MB: 1000 ** 2,
  GB: 1000 ** 3,
  TB: 1000 ** 4,
};

/** Bytes of a size such as "20GiB", "1.5TB" or "4096"; a usage error otherwise. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$/.exec(text);
  const unit = m ? UNITS[m[2] ?? ''] : undefined;
  if (!m || unit === undefined) {
    throw new SnapError('usage', `Invalid size ${JSON.stringify(text)}: use a number and a unit B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB), e.g. "50GiB"`);
  }
  const bytes = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(bytes)) throw new SnapError('usage', `Invalid size ${JSON.stringify(text)}: too large`);
  return bytes;
}

/** Bytes in binary units with one decimal: 1536 → "1.5 KiB", 10737418240 → "10.0 GiB". */
export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}
