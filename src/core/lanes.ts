/** A bounded number of asynchronous calls in flight at once. Pure: no I/O of its own. */

/**
 * fn over items with at most `lanes` calls in flight, results in the items' order. After a failure no
 * further item is started; the first failure is thrown once the calls in flight have ended (so that
 * nothing the caller started is still running when it sees the error).
 */
export async function mapInLanes<T, R>(items: readonly T[], lanes: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  let failure = null as { err: unknown } | null;
  const lane = async (): Promise<void> => {
    while (failure === null && next < items.length) {
      const i = next++;
      try {
        out[i] = await fn(items[i]!);
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(lanes, items.length) }, lane));
  if (failure !== null) throw failure.err;
  return out;
}
