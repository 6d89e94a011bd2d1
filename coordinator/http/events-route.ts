import type { RouterContext } from '@koa/router';
import type { AccessControl } from '../access/access-control.js';
import type { EventBus, PublishedEvent } from '../events.js';
import { eventStream } from './log-routes.js';
import type { RequestState } from './server.js';

// A client this far behind (bytes written but not yet taken by its socket) is dropped: it reconnects with
// Last-Event-ID and is replayed, or told to reload, instead of making the coordinator hold an unbounded backlog.
const MAX_BACKLOG_BYTES = 1024 * 1024;

/**
 * `GET /api/v1/events`: state changes of builds, runs and agents as Server-Sent Events (`build`, `run`, `agent`;
 * data: the event as JSON; id: what to send back as `Last-Event-ID`). A client resuming after a gap the coordinator
 * no longer covers first gets a `reset` event: reload what the page shows. Each caller sees only what it may read:
 * a private build's events reach a user who may read a repository it is built for (`buildRepos`, the rule of the
 * build's page and log), a private run's or check's a user who may read its repository.
 */
export function eventsRoute(
  ctx: RouterContext,
  bus: EventBus,
  access: AccessControl,
  buildRepos: (drvPath: string) => readonly string[],
): void {
  const principal = (ctx.state as RequestState).principal;
  const out = eventStream(ctx);
  let closed = false;
  const write = (e: PublishedEvent): void => {
    if (closed) return;
    out.write(`id: ${bus.idOf(e)}\nevent: ${e.event.type}\ndata: ${JSON.stringify(e.event)}\n\n`);
    if (out.writableLength > MAX_BACKLOG_BYTES) stop();
  };
  // A private event reaches a logged-in user who may read one of its repositories (asked once per repository and
  // connection); events wait in order behind the answer, so the stream never reorders.
  const readable = new Map<string, Promise<boolean>>();
  const mayReadRepo = (repo: string, visibility: PublishedEvent['visibility']): Promise<boolean> => {
    let answer = readable.get(repo);
    if (!answer) readable.set(repo, (answer = access.mayReadRepo(principal, repo, visibility).catch(() => false)));
    return answer;
  };
  let queue: Promise<void> = Promise.resolve();
  const send = (e: PublishedEvent): void => {
    if (closed) return;
    const mayRead = access.mayRead(principal, e.visibility);
    if (mayRead && readable.size === 0) return write(e);
    let allowed: Promise<boolean> = Promise.resolve(true);
    if (!mayRead) {
      if (principal.kind !== 'user') return;
      const repos = e.event.type === 'build' ? buildRepos(e.event.drvPath) : 'repo' in e.event ? [e.event.repo] : [];
      if (repos.length === 0) return;
      const answers = repos.map((r) => mayReadRepo(r, e.visibility));
      allowed = Promise.all(answers).then((a) => a.includes(true));
    }
    queue = queue.then(async () => {
      if (await allowed) write(e);
    });
  };
  let unsubscribe = (): void => {};
  function stop(): void {
    if (closed) return;
    closed = true;
    unsubscribe();
    out.end();
  }
  ctx.req.on('close', stop);
  const subscription = bus.subscribe(ctx.get('Last-Event-ID') || undefined, send);
  unsubscribe = subscription.unsubscribe;
  if (closed) unsubscribe();
  else if (!subscription.replayed) {
    out.write(`event: reset\ndata: ${JSON.stringify({ reason: 'events were missed: reload' })}\n\n`);
  }
}
