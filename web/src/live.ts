import { sseEvents } from '../../common/sse.js';
import { API, authHeaders, type CoordinatorEvent } from './api.js';
import { jitter, sleep } from './timing.js';

/**
 * What the coordinator changes, as it changes: one connection to GET /api/v1/events for the whole page, shared by
 * whatever the current page shows. It is read with fetch() (EventSource cannot send the credential), resumed with
 * `Last-Event-ID` after a break, and a `reset` (events were missed) makes every page read its data again. Only while
 * the stream cannot be had do pages poll, slowly.
 *
 * The stream's state is shown on `#live` in the header and as `data-live` on <html>: `connecting`, `open`, `failed`.
 */

// The first wait after the stream broke (the server's `retry:` says the same); doubled per failure up to the cap.
const RECONNECT_MS = 2000;
const MAX_RECONNECT_MS = 30_000;
// While the stream cannot be had, pages read everything again this often: slow, a fallback only.
const FALLBACK_POLL_MS = 20_000;
// How long a page waits for the stream before its first load (it loads after the stream is open, so that nothing
// changes unseen between its load and the first event).
const READY_TIMEOUT_MS = 1500;
// Between two pages nobody listens for a moment: the connection stays that long, so a page change does not reconnect.
const LINGER_MS = 10_000;

export interface LiveHandlers {
  /** A change the page may show; it decides whether this one concerns it. */
  event(e: CoordinatorEvent): void;
  /** Changes may have been missed (a `reset`, the fallback poll): read everything again. */
  reload(): void;
}

type StreamState = 'idle' | 'connecting' | 'open' | 'failed';

const STATE_TEXT: Record<StreamState, string> = {
  idle: '',
  connecting: 'connecting…',
  open: 'live',
  failed: 'not live: reading again every 20 s',
};

class EventStream {
  private readonly handlers = new Set<LiveHandlers>();
  private state: StreamState = 'idle';
  private lastId: string | undefined;
  private connection: AbortController | undefined;
  /** Aborting it ends a wait before reconnecting (a new page, perhaps with a new token, wants the stream now). */
  private nap: AbortController | undefined;
  private readonly waiting = new Set<() => void>();
  private linger: ReturnType<typeof setTimeout> | undefined;
  private fallback: ReturnType<typeof setInterval> | undefined;

  /** Follows the events until `signal` aborts; resolves once the stream is open (or has failed, or after a moment). */
  subscribe(signal: AbortSignal, handlers: LiveHandlers): Promise<void> {
    if (signal.aborted) return Promise.resolve();
    this.handlers.add(handlers);
    signal.addEventListener('abort', () => this.unsubscribe(handlers), { once: true });
    clearTimeout(this.linger);
    if (this.state === 'idle') this.start();
    else if (this.state === 'failed') this.nap?.abort();
    if (this.state === 'open') return Promise.resolve();
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.waiting.delete(done);
        resolve();
      };
      const timer = setTimeout(done, READY_TIMEOUT_MS);
      this.waiting.add(done);
      signal.addEventListener('abort', done, { once: true });
    });
  }

  private unsubscribe(handlers: LiveHandlers): void {
    this.handlers.delete(handlers);
    if (this.handlers.size > 0) return;
    clearTimeout(this.linger);
    this.linger = setTimeout(() => this.stop(), LINGER_MS);
  }

  private start(): void {
    this.connection = new AbortController();
    void this.run(this.connection.signal);
  }

  /** Connects again at once, with the credential the browser holds now. */
  restart(): void {
    if (this.state === 'idle') return;
    this.connection?.abort();
    this.setState('connecting');
    this.start();
  }

  private stop(): void {
    this.connection?.abort();
    this.connection = undefined;
    this.setState('idle');
  }

  private async run(signal: AbortSignal): Promise<void> {
    let failures = 0;
    while (!signal.aborted) {
      if (this.state !== 'failed') this.setState('connecting');
      try {
        const headers: Record<string, string> = { ...authHeaders(), Accept: 'text/event-stream' };
        if (this.lastId !== undefined) headers['Last-Event-ID'] = this.lastId;
        const response = await fetch(`${API}/events`, { headers, signal });
        if (response.ok) {
          const recovering = this.state === 'failed';
          failures = 0;
          this.setState('open');
          // Resumed streams replay what was missed (or say reset); a first stream after failing cannot.
          if (recovering && this.lastId === undefined) this.reloadAll();
          for await (const e of sseEvents(response)) {
            if (e.id !== undefined) this.lastId = e.id;
            if (e.event === 'reset') this.reloadAll();
            else if (e.event === 'build' || e.event === 'run' || e.event === 'agent' || e.event === 'check') {
              this.dispatch(JSON.parse(e.data) as CoordinatorEvent);
            }
          }
          // The coordinator ended the stream (a restart): reconnect at once, then fail if that does not work.
          if (!signal.aborted) this.setState('connecting');
          continue;
        }
        // Refused (no credential on a coordinator that is not public) or broken: the pages say why themselves.
        await response.body?.cancel();
      } catch {
        if (signal.aborted) return;
      }
      failures++;
      this.setState('failed');
      this.nap = new AbortController();
      const wait = Math.min(MAX_RECONNECT_MS, RECONNECT_MS * 2 ** Math.min(failures - 1, 4));
      await sleep(jitter(wait), AbortSignal.any([signal, this.nap.signal]));
    }
  }

  private dispatch(e: CoordinatorEvent): void {
    for (const h of [...this.handlers]) {
      try {
        h.event(e);
      } catch (err) {
        console.error('a page failed to take an event', err);
      }
    }
  }

  private reloadAll(): void {
    for (const h of [...this.handlers]) h.reload();
  }

  private setState(state: StreamState): void {
    if (state === this.state) return;
    this.state = state;
    document.documentElement.dataset.live = state;
    const badge = document.getElementById('live');
    if (badge) {
      badge.dataset.state = state;
      badge.textContent = STATE_TEXT[state];
    }
    if (state === 'open' || state === 'failed') for (const done of [...this.waiting]) done();
    if (state === 'failed' && this.fallback === undefined) {
      this.fallback = setInterval(() => this.reloadAll(), FALLBACK_POLL_MS);
    } else if (state !== 'failed' && this.fallback !== undefined) {
      clearInterval(this.fallback);
      this.fallback = undefined;
    }
  }
}

const stream = new EventStream();

/**
 * Follows the coordinator's events for as long as the page's `signal` lives. Resolves when the page should load its
 * data: the stream is open (so no change goes unseen), has failed (then the slow poll calls `reload`), or is slow.
 */
export function live(signal: AbortSignal, handlers: LiveHandlers): Promise<void> {
  return stream.subscribe(signal, handlers);
}

/** The reader gave another credential: follow the events with it (it may see more). */
export function reconnectLive(): void {
  stream.restart();
}
