/**
 * Lets the event loop turn once (timers, sockets, other requests) before going on: long synchronous work — a
 * nixpkgs-sized review, an evaluation stored or read — awaits it every so often so that agents and webhooks are
 * still answered meanwhile.
 */
export function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
