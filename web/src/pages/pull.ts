import type { Review } from '../../../coordinator/review/model.js';
import { ApiError, type CoordinatorEvent, getJson, type Memo, postAction, type PullRequest } from '../api.js';
import { type Child, h, link, replace } from '../dom.js';
import { ago, clock } from '../format.js';
import { live } from '../live.js';
import { problem } from '../problem.js';
import { debounced } from '../timing.js';
import { reviewDerivations, reviewView } from './review.js';
import { badge } from './widgets.js';
import { actionButton } from './actions.js';

// A run settles hundreds of builds in a burst: the review (the largest answer the API gives) is read once per second.
const REVIEW_REFRESH_MS = 1000;
const PULL_REFRESH_MS = 300;

/** `/reviews?repo=&base=&head=`: the recorded review of two commits (where a check run's "Details" lead). */
export function reviewsPage(main: HTMLElement, query: URLSearchParams, signal: AbortSignal): void {
  const [repo, base, head] = [query.get('repo'), query.get('base'), query.get('head')];
  if (!repo || !base || !head) {
    document.title = 'Review · eka-ci';
    replace(main, h('h1', null, 'Review'), h('p', { class: 'problem' }, 'The address needs repo, base and head.'));
    return;
  }
  document.title = `Review of ${repo} ${base.slice(0, 7)}..${head.slice(0, 7)} · eka-ci`;
  const panel = new ReviewPanel(repo, base, head, signal);
  replace(main, h('h1', null, 'Review of ', repo), panel.element);
  void live(signal, { event: (e) => panel.notice(e), reload: panel.refresh }).then(() => panel.load());
}

/**
 * `/repos/<owner>/<repo>/pulls/<n>`: the pull request (title, author, commits, its run's state and timeline) above the
 * review of its latest run. Its run's events read both again; a build's, the review when it shows that build.
 */
export function pullPage(main: HTMLElement, repo: string, number: number, signal: AbortSignal): void {
  document.title = `${repo}#${number} · eka-ci`;
  const header = h('div', { class: 'pull-header' }, h('p', { class: 'muted' }, 'Loading…'));
  const reviewSlot = h('div', { class: 'review-slot' });
  let panel: ReviewPanel | undefined;
  let panelSignal: AbortController | undefined;
  let stopped = false;
  // The action buttons outlive the header's redraws (every event of the run redraws it): an action in flight, such
  // as "Rebuild failed", whose own run event arrives before its answer, must still show that answer.
  let actions: { head: string; nodes: Child[] } | undefined;
  const actionsOf = (p: PullRequest): Child[] => {
    if (actions?.head !== p.headSha) actions = { head: p.headSha, nodes: pullActions(repo, p) };
    return actions.nodes;
  };

  const load = async (): Promise<void> => {
    if (stopped) return;
    let pull: PullRequest | undefined;
    try {
      pull = await findPull(repo, number, signal);
    } catch (err) {
      if (signal.aborted) return;
      stopped = true;
      replace(
        header,
        problem(err, () => {
          stopped = false;
          void load();
        }),
      );
      return;
    }
    if (signal.aborted) return;
    if (!pull) {
      replace(header, h('h1', null, `${repo}#${number}`), h('p', { class: 'problem' }, 'No such pull request.'));
      return;
    }
    document.title = `${pull.title} · ${repo}#${number} · eka-ci`;
    replace(header, pullHeader(repo, pull, actionsOf));
    const run = pull.run;
    if (!run?.baseSha) {
      panelSignal?.abort();
      panel = undefined;
      replace(reviewSlot, h('p', { class: 'muted' }, run ? `The run is ${run.state}.` : 'Not run yet.'));
      return;
    }
    if (panel?.base === run.baseSha && panel.head === run.headSha) return panel.refresh();
    panelSignal?.abort();
    panelSignal = new AbortController();
    panel = new ReviewPanel(repo, run.baseSha, run.headSha, AbortSignal.any([signal, panelSignal.signal]));
    replace(reviewSlot, panel.element);
    await panel.load();
  };
  const refresh = debounced(PULL_REFRESH_MS, signal, load);

  replace(main, header, reviewSlot);
  void live(signal, {
    event: (e) => {
      if (e.type === 'run' && e.repo === repo && e.prNumber === number) refresh();
      else panel?.notice(e);
    },
    reload: refresh,
  }).then(load);
}

/** The pull request, or undefined when the coordinator has not seen it. */
async function findPull(repo: string, number: number, signal: AbortSignal): Promise<PullRequest | undefined> {
  try {
    return await getJson<PullRequest>(`/repos/${repo}/pulls/${number}`, signal);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) return undefined;
    throw err;
  }
}

function pullHeader(repo: string, p: PullRequest, actionsOf: (p: PullRequest) => Child[]): Child {
  const run = p.run;
  const systems = Object.entries(run?.rebuildCountBySystem ?? {});
  return [
    h(
      'h1',
      null,
      p.title,
      ' ',
      h('span', { class: 'muted' }, `#${p.number}`),
      ' ',
      p.state === 'closed' ? badge('closed') : p.draft ? badge('draft') : null,
    ),
    h(
      'dl',
      { class: 'facts' },
      fact('Repository', repo),
      fact('Author', p.author),
      fact(
        'Commits',
        h('code', null, p.headSha.slice(0, 12)),
        ' onto ',
        p.baseRef,
        ' at ',
        h('code', null, p.baseSha.slice(0, 12)),
      ),
      fact('Updated', h('span', { title: clock(p.updatedAt) }, ago(p.updatedAt))),
      fact(
        'Run',
        run
          ? [
              badge(run.state, 'run-state'),
              ` #${run.id}`,
              run.untrusted && h('span', { class: 'tag' }, 'untrusted: sandboxed agents only'),
              ' · ',
              link(`/runs/${run.id}`, 'build timeline'),
            ]
          : h('span', { class: 'muted' }, 'not run yet'),
      ),
      run?.error && fact('Error', h('span', { class: 'error-text' }, run.error)),
      systems.length > 0 &&
        fact(
          'Rebuilds',
          systems.map(([s, n], i) => [i > 0 && ', ', h('strong', null, n), ` on ${s}`]),
        ),
      p.state === 'open' && fact('Actions', ...actionsOf(p)),
    ),
  ];
}

/**
 * What a writer does from the comment box, as buttons: the coordinator decides (the same rules as `@eka-ci approve`,
 * `@eka-ci merge`, the check run's "Rebuild failed") and its refusal is shown beside the button.
 */
function pullActions(repo: string, p: PullRequest): Child[] {
  const command = (line: string) => () => postAction(`/repos/${repo}/pulls/${p.number}/commands`, { command: line });
  return [
    actionButton('Rebuild failed', () => postAction(`/repos/${repo}/commits/${p.headSha}/rebuild-failed`), {
      name: 'rebuild-failed',
    }),
    ' ',
    actionButton(`Approve ${p.headSha.slice(0, 7)}`, command(`approve ${p.headSha}`), { name: 'approve' }),
    ' ',
    actionButton('Merge when green', command('merge'), { name: 'merge' }),
  ];
}

function fact(name: string, ...value: Child[]): Child {
  return [h('dt', null, name), h('dd', null, ...value)];
}

/** One recorded review, read again when a build it shows changes or its run moves. */
class ReviewPanel {
  readonly element = h('div', { class: 'review-panel' }, h('p', { class: 'muted' }, 'Loading the review…'));
  readonly refresh: () => void;
  private drvs = new Set<string>();
  private shown = false;
  private stopped = false;
  /** What the review page reads besides the review (failure logs, size histories), once per panel. */
  private readonly cache = new Map<string, Promise<unknown>>();
  private readonly memo: Memo = <T>(key: string, load: () => Promise<T>): Promise<T> => {
    let p = this.cache.get(key) as Promise<T> | undefined;
    if (!p) {
      p = load();
      this.cache.set(key, p);
      p.catch(() => this.cache.delete(key));
    }
    return p;
  };

  constructor(
    readonly repo: string,
    readonly base: string,
    readonly head: string,
    private readonly signal: AbortSignal,
  ) {
    this.refresh = debounced(REVIEW_REFRESH_MS, signal, () => this.load());
  }

  /** Reads the review again when the event concerns it: a build it shows (whose log may be new), its run, a check. */
  notice(e: CoordinatorEvent): void {
    if (e.type === 'build' && this.drvs.has(e.drvPath)) {
      this.cache.delete(`log:${e.drvPath}`);
      this.refresh();
    } else if (e.type === 'run' && e.repo === this.repo && e.headSha.startsWith(this.head)) this.refresh();
    else if (e.type === 'check' && e.repo === this.repo && e.commit.startsWith(this.head)) this.refresh();
  }

  async load(): Promise<void> {
    if (this.stopped || this.signal.aborted) return;
    const path = `/reviews?repo=${encodeURIComponent(this.repo)}&base=${this.base}&head=${this.head}`;
    let review: Review;
    try {
      review = await getJson<Review>(path, this.signal);
    } catch (err) {
      if (this.signal.aborted) return;
      if (err instanceof ApiError && err.status === 404) {
        replace(this.element, h('p', { class: 'muted' }, 'No review of these commits yet: ', err.message, '.'));
        return;
      }
      if (this.shown && !(err instanceof ApiError && err.status < 500)) return;
      this.stopped = true;
      replace(
        this.element,
        problem(err, () => {
          this.stopped = false;
          void this.load();
        }),
      );
      return;
    }
    if (this.signal.aborted) return;
    this.drvs = reviewDerivations(review);
    // Keep the reader's place: the new review replaces the old one where it stood.
    const y = window.scrollY;
    replace(this.element, reviewView(review, { repo: this.repo, signal: this.signal, memo: this.memo }));
    window.scrollTo(0, y);
    this.shown = true;
  }
}
