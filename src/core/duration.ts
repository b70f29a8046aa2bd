/** Durations as people write them in configuration: "30d", "12h", "2w", "1y", "30m", "10s", or sums such as "1y6w". */
import { SnapError } from './errors.js';

const UNITS: ReadonlyArray<readonly [string, number]> = [
  ['y', 365 * 86_400_000],
  ['w', 7 * 86_400_000],
  ['d', 86_400_000],
  ['h', 3_600_000],
  ['m', 60_000],
  ['s', 1000],
];

/** Milliseconds of a duration such as "30d" or "1y6w"; a usage error otherwise. */
export function parseDuration(text: string): number {
  const t = text.trim();
  if (!/^(\d+[ywdhms])+$/.test(t)) throw new SnapError('usage', `Invalid duration ${JSON.stringify(text)}: use a number and a unit y, w, d, h, m or s, e.g. "30d"`);
  let ms = 0;
  for (const m of t.matchAll(/(\d+)([ywdhms])/g)) ms += Number(m[1]) * UNITS.find(([u]) => u === m[2])![1];
  return ms;
}

/** The whole units of a duration, in y, d, h, m and s: 2592000000 → "30d". */
export function formatDuration(ms: number): string {
  let rest = Math.max(0, Math.floor(ms));
  let out = '';
  for (const [u, size] of UNITS.filter(([unit]) => unit !== 'w')) {
    const n = Math.floor(rest / size);
    if (n > 0) {
      out += `${n}${u}`;
      rest -= n * size;
    }
  }
  return out === '' ? '0s' : out;
}

/** A duration in its largest whole unit and the next one, for people: 273900000 → "3d4h", 259500000 → "3d", 330000 → "5m30s". */
export function formatDurationShort(ms: number): string {
  const units = UNITS.filter(([unit]) => unit !== 'w');
  const rest = Math.max(0, Math.floor(ms));
  const i = units.findIndex(([, size]) => rest >= size);
  if (i < 0) return '0s';
  const [unit, size] = units[i]!;
  const n = Math.floor(rest / size);
  const next = units[i + 1];
  const m = next === undefined ? 0 : Math.floor((rest - n * size) / next[1]);
  return m > 0 ? `${n}${unit}${m}${next![0]}` : `${n}${unit}`;
}
