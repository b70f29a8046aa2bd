/**
 * The retention policy (src/server/retention.ts) on calendars of synthetic snapshots: which snapshots
 * each rule keeps, and why; then properties that must hold on every calendar and policy.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isSnapError } from '../src/core/errors.js';
import { applyRetention, checkPolicy, formatDuration, parseDuration, type RetentionPolicy, type Snapshot } from '../src/server/retention.js';

const H = 3_600_000;
const D = 24 * H;

/** Snapshots every `step` ms from `start` (an ISO time), `count` of them, named as the server names them. */
function calendar(start: string, step: number, count: number): Snapshot[] {
  const t0 = Date.parse(start);
  return Array.from({ length: count }, (_, i) => ({ name: new Date(t0 + i * step).toISOString(), time: t0 + i * step }));
}

function kept(snaps: readonly Snapshot[], policy: RetentionPolicy): string[] {
  return applyRetention(snaps, policy).filter((d) => d.keep).map((d) => d.name);
}

const table: Array<{ what: string; snaps: Snapshot[]; policy: RetentionPolicy; keep: string[] }> = [
  {
    what: 'last 3: the three newest',
    snaps: calendar('2026-03-01T10:00:00.000Z', H, 10),
    policy: { last: 3 },
    keep: ['2026-03-01T19:00:00.000Z', '2026-03-01T18:00:00.000Z', '2026-03-01T17:00:00.000Z'],
  },
  {
    what: 'daily 2 over hourly snapshots: the newest of today and of yesterday',
    snaps: calendar('2026-01-01T00:30:00.000Z', H, 72),
    policy: { daily: 2 },
    keep: ['2026-01-03T23:30:00.000Z', '2026-01-02T23:30:00.000Z'],
  },
  {
    what: 'hourly 3 over snapshots every 20 minutes',
    snaps: calendar('2026-05-05T08:00:00.000Z', H / 3, 9),
    policy: { hourly: 3 },
    keep: ['2026-05-05T10:40:00.000Z', '2026-05-05T09:40:00.000Z', '2026-05-05T08:40:00.000Z'],
  },
  {
    what: 'weekly 2 across the ISO year boundary (2026 has a week 53 that ends on Sunday 2027-01-03)',
    snaps: [
      { name: '2026-12-28T12:00:00.000Z', time: Date.parse('2026-12-28T12:00:00.000Z') },
      { name: '2027-01-03T12:00:00.000Z', time: Date.parse('2027-01-03T12:00:00.000Z') },
      { name: '2027-01-04T12:00:00.000Z', time: Date.parse('2027-01-04T12:00:00.000Z') },
    ],
    policy: { weekly: 2 },
    keep: ['2027-01-04T12:00:00.000Z', '2027-01-03T12:00:00.000Z'],
  },
  {
    what: 'monthly 3 over daily snapshots: the last day of each month',
    snaps: calendar('2026-01-15T06:00:00.000Z', D, 100),
    policy: { monthly: 3 },
    keep: ['2026-04-24T06:00:00.000Z', '2026-03-31T06:00:00.000Z', '2026-02-28T06:00:00.000Z'],
  },
  {
    what: 'yearly 5 over three years of weekly snapshots: one per year that has any',
    snaps: calendar('2025-01-01T00:00:00.000Z', 7 * D, 150),
    policy: { yearly: 5 },
    keep: ['2027-11-10T00:00:00.000Z', '2026-12-30T00:00:00.000Z', '2025-12-31T00:00:00.000Z'],
  },
  {
    what: 'within 3d: counted back from the newest snapshot, not from now',
    snaps: calendar('2020-06-01T00:00:00.000Z', D, 10),
    policy: { withinMs: 3 * D },
    keep: ['2020-06-10T00:00:00.000Z', '2020-06-09T00:00:00.000Z', '2020-06-08T00:00:00.000Z'],
  },
  {
    what: 'a policy of zeros keeps the newest alone',
    snaps: calendar('2026-01-01T00:00:00.000Z', D, 5),
    policy: { last: 0, daily: 0 },
    keep: ['2026-01-05T00:00:00.000Z'],
  },
  {
    what: 'no policy keeps everything',
    snaps: calendar('2026-01-01T00:00:00.000Z', D, 4),
    policy: {},
    keep: ['2026-01-04T00:00:00.000Z', '2026-01-03T00:00:00.000Z', '2026-01-02T00:00:00.000Z', '2026-01-01T00:00:00.000Z'],
  },
];

for (const row of table) {
  test(`retention: ${row.what}`, () => {
    assert.deepEqual(kept(row.snaps, row.policy), row.keep);
  });
}

test('retention: the rules add up, and each kept snapshot says why', () => {
  const snaps = calendar('2026-01-30T12:00:00.000Z', 12 * H, 10); // two a day, into February
  const decisions = applyRetention(snaps, { last: 2, daily: 3, monthly: 2 });
  const why = Object.fromEntries(decisions.filter((d) => d.keep).map((d) => [d.name, d.reasons.join(', ')]));
  assert.deepEqual(why, {
    '2026-02-04T00:00:00.000Z': 'newest, last 1/2, daily 1/3, monthly 1/2',
    '2026-02-03T12:00:00.000Z': 'last 2/2, daily 2/3',
    '2026-02-02T12:00:00.000Z': 'daily 3/3',
    '2026-01-31T12:00:00.000Z': 'monthly 2/2',
  });
  assert.equal(decisions.filter((d) => !d.keep).every((d) => d.reasons.length === 0), true);
  // input order does not matter
  assert.deepEqual(applyRetention([...snaps].reverse(), { last: 2, daily: 3, monthly: 2 }), decisions);
});

test('retention: on every calendar and policy, the newest is kept, and more of a rule never keeps less', () => {
  const calendars = [
    calendar('2024-02-28T23:59:00.000Z', 17 * 60_000, 400),
    calendar('2025-12-31T20:00:00.000Z', 5 * H, 300),
    calendar('2023-01-01T00:00:00.000Z', D + 3 * H, 500),
    calendar('2020-01-01T00:00:00.000Z', 9 * D, 300),
  ];
  const policies: RetentionPolicy[] = [
    { last: 5 },
    { hourly: 24, daily: 7 },
    { daily: 7, weekly: 4, monthly: 12, yearly: 3 },
    { withinMs: 10 * D, monthly: 6 },
    { weekly: 0 },
  ];
  for (const snaps of calendars) {
    for (const policy of policies) {
      const decisions = applyRetention(snaps, policy);
      assert.equal(decisions.length, snaps.length);
      assert.equal(decisions[0]?.time, Math.max(...snaps.map((s) => s.time)));
      assert.equal(decisions[0]?.keep, true, 'the newest is always kept');
      const keptNow = new Set(decisions.filter((d) => d.keep).map((d) => d.name));
      // a count rule keeps at most that many; all rules at most their sum, plus the newest and "within"
      const within = policy.withinMs === undefined ? 0 : snaps.filter((s) => decisions[0]!.time - s.time < policy.withinMs!).length;
      const counts = (['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const).reduce((n, k) => n + (policy[k] ?? 0), 0);
      assert.ok(keptNow.size <= counts + within + 1, `${keptNow.size} kept for ${JSON.stringify(policy)}`);
      for (const k of ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) {
        const more = { ...policy, [k]: (policy[k] ?? 0) + 3 };
        const keptMore = new Set(kept(snaps, more));
        for (const name of keptNow) assert.ok(keptMore.has(name), `${k}+3 dropped ${name} (${JSON.stringify(policy)})`);
      }
    }
  }
});

test('retention: durations and policy checks', () => {
  assert.equal(parseDuration('30d'), 30 * D);
  assert.equal(parseDuration('1y6w'), 365 * D + 42 * D);
  assert.equal(parseDuration('12h'), 12 * H);
  assert.equal(parseDuration('90m'), 90 * 60_000);
  for (const bad of ['30', '-1d', '1.5d', 'd', '', '3 days']) {
    assert.throws(() => parseDuration(bad), (e: unknown) => isSnapError(e, 'usage'), bad);
  }
  assert.equal(formatDuration(30 * D), '30d');
  assert.equal(formatDuration(365 * D + 2 * H), '1y2h');
  checkPolicy({ last: 3, daily: 7, withinMs: D }, 'test');
  assert.throws(() => checkPolicy({ daily: -1 }, 'policy of alice'), /policy of alice: "daily" must be a whole number/);
  assert.throws(() => checkPolicy({ last: 2.5 }, 'x'), (e: unknown) => isSnapError(e, 'usage'));
  assert.throws(() => checkPolicy({ withinMs: Number.NaN }, 'x'), /"within"/);
});
