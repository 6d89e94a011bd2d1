/** Waiting on the page: every wait ends early when the page it belongs to is left (its signal aborts). */

export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
  });
}

/**
 * A refresh that many events may ask for at once (a run settling hundreds of builds): the first request starts a
 * window of `ms`, at whose end `run` runs once for all the requests in it; never two runs at the same time (a request
 * during a run is served after it). Errors are `run`'s own to show.
 */
export function debounced(ms: number, signal: AbortSignal, run: () => Promise<void>): () => void {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let running = false;
  let again = false;
  const fire = async (): Promise<void> => {
    timer = undefined;
    if (signal.aborted) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await run();
    } catch {
      // run shows its own errors; the next event may succeed.
    } finally {
      running = false;
      if (again) {
        again = false;
        schedule();
      }
    }
  };
  const schedule = (): void => {
    if (timer === undefined && !signal.aborted) timer = setTimeout(() => void fire(), ms);
  };
  signal.addEventListener('abort', () => clearTimeout(timer), { once: true });
  return schedule;
}

/** `ms` ± a fifth, so that many pages reconnecting after a coordinator restart do not come back at once. */
export function jitter(ms: number): number {
  return ms * (0.8 + Math.random() * 0.4);
}
