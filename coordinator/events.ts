import type { Visibility } from './access/access-control.js';

/**
 * What changed, for pages that update without reloading (`GET /api/v1/events`). An event names the thing and its new
 * state; a page that shows more of it reads the resource again. Events are kept in memory only: a client that was
 * away longer than the last `RECENT_EVENTS` events, or across a restart, is told to reload (`reset`).
 */
export type CoordinatorEvent =
  | { type: 'build'; drvPath: string; state: string; attempt: number; agentId: string | null }
  | {
      type: 'run';
      id: number;
      repo: string;
      kind: string;
      prNumber: number | null;
      headSha: string;
      state: string;
    }
  | { type: 'agent'; id: string; connected: boolean; drained: boolean }
  | { type: 'check'; repo: string; commit: string; name: string; system: string; state: string };

export interface PublishedEvent {
  /** Increases by one per event from the coordinator's start; what a client sends back as `Last-Event-ID`. */
  id: number;
  event: CoordinatorEvent;
  visibility: Visibility;
}

type Listener = (e: PublishedEvent) => void;

// Enough for a client that lost its connection for a few seconds during a busy build to resume without reloading.
const RECENT_EVENTS = 10_000;

export class EventBus {
  private readonly listeners = new Set<Listener>();
  private readonly recent: PublishedEvent[] = [];
  private next = 1;
  /** A number that differs between starts, so that an id from a previous run is never taken for one of this. */
  readonly epoch = Date.now().toString(36);

  constructor(private readonly visibilityOf: (e: CoordinatorEvent) => Visibility) {}

  /**
   * Nothing is kept while nobody listens (a fleet's transitions cost nothing then): a client that comes back after
   * such a gap is told to reload, which it would have to do anyway.
   */
  publish(event: CoordinatorEvent): void {
    if (this.listeners.size === 0) {
      this.next += 1;
      this.recent.length = 0;
      return;
    }
    const published = { id: this.next++, event, visibility: this.visibilityOf(event) };
    this.recent.push(published);
    if (this.recent.length > RECENT_EVENTS * 1.5) this.recent.splice(0, this.recent.length - RECENT_EVENTS);
    for (const l of this.listeners) l(published);
  }

  /**
   * Subscribes from after `lastId` (`epoch:n` as sent in event ids): the events since then are replayed at once.
   * `replayed` is false when those are no longer all known (another start, or too long ago): the client must reload.
   */
  subscribe(lastId: string | undefined, listener: Listener): { replayed: boolean; unsubscribe: () => void } {
    let replayed = lastId === undefined;
    if (lastId !== undefined) {
      const [epoch, n] = lastId.split(':');
      const after = Number(n);
      const first = this.recent[0]?.id ?? this.next;
      if (epoch === this.epoch && Number.isSafeInteger(after) && after >= first - 1 && after < this.next) {
        replayed = true;
        for (const e of this.recent) if (e.id > after) listener(e);
      }
    }
    this.listeners.add(listener);
    return { replayed, unsubscribe: () => this.listeners.delete(listener) };
  }

  idOf(e: PublishedEvent): string {
    return `${this.epoch}:${e.id}`;
  }
}
