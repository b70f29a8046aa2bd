/** core/lanes.ts: results in order, at most `lanes` calls in flight, and a failure thrown only once the calls in flight have ended. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { mapInLanes } from '../src/core/lanes.js';

describe('mapInLanes', () => {
  it('keeps the items\' order and never has more than `lanes` calls in flight', async () => {
    let inFlight = 0;
    let most = 0;
    const out = await mapInLanes([5, 1, 4, 2, 3, 0, 6], 3, async (n) => {
      most = Math.max(most, ++inFlight);
      await sleep(n);
      inFlight--;
      return n * 10;
    });
    assert.deepEqual(out, [50, 10, 40, 20, 30, 0, 60]);
    assert.equal(most, 3);
    assert.deepEqual(await mapInLanes([], 4, async () => 1), []);
  });

  it('starts nothing after a failure and throws the first one once the calls in flight have ended', async () => {
    const started: number[] = [];
    const ended: number[] = [];
    await assert.rejects(
      mapInLanes([0, 1, 2, 3, 4, 5], 2, async (n) => {
        started.push(n);
        if (n === 1) throw new Error('item 1 failed');
        await sleep(20);
        ended.push(n);
      }),
      /item 1 failed/,
    );
    assert.deepEqual(started, [0, 1], 'no item after the failure was started');
    assert.deepEqual(ended, [0], 'the call in flight had ended before the error was thrown');
  });
});
