/**
 * Lets the event loop turn once (timers, sockets, other requests) before going on: long synchronous work — a
 * nixpkgs-sized review, an evaluation stored or read — awaits it every so often so that agents and webhooks are
 * still answered meanwhile.
 */
export function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * Runs a computation written as steps — a generator that yields wherever a long run may pause — to its end at once,
 * for callers that are not on a busy event loop (tests, one-off commands).
 */
export function runSteps<T>(steps: Generator<void, T>): T {
  for (;;) {
    const step = steps.next();
    if (step.done) return step.value;
  }
}

/** Runs a computation written as steps (see `runSteps`) with a turn of the event loop at every step. */
export async function runStepsTurning<T>(steps: Generator<void, T>): Promise<T> {
  for (;;) {
    const step = steps.next();
    if (step.done) return step.value;
    await turn();
  }
}
