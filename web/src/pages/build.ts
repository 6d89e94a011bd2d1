import {
  ApiError,
  type Attempt,
  type DerivationDetail,
  getJson,
  OPEN_ATTEMPT_STATES,
  type Output,
  postAction,
  SETTLED_STATES,
} from '../api.js';
import { type Child, h, link, replace } from '../dom.js';
import { buildHref, bytes, clock, duration, storeHash, storeName } from '../format.js';
import { live } from '../live.js';
import { LogView } from '../log-view.js';
import { problem } from '../problem.js';
import { debounced } from '../timing.js';
import { actionButton } from './actions.js';
import { DependencyChain } from './dependency-chain.js';
import { badge } from './widgets.js';

// Events of one build come in bursts (queued, buildable, building within milliseconds): one read for each burst.
const REFRESH_MS = 250;
// States a failure can be rebuilt from; a success has nothing to build again.
const REBUILDABLE = new Set(['failed', 'dependency-failed', 'timed-out', 'cancelled', 'unbuildable']);

/**
 * `/builds/<hash>`: a derivation's state, outputs and attempts, the chosen attempt's log (live while it runs), cancel
 * and rebuild, and for a dependency failure the chain down to the failed root with its log. It is read again when an
 * event names it or a derivation of that chain.
 */
export function buildPage(main: HTMLElement, hash: string, signal: AbortSignal): void {
  new BuildPage(main, hash, signal).start();
}

class BuildPage {
  private detail: DerivationDetail | undefined;
  /** The attempt the reader picked; without one the page shows the latest. */
  private pinned: number | undefined;
  private shown: { attempt: number; controller: AbortController } | undefined;
  /** A problem is shown instead of the page (a token to give): nothing redraws until the reader acts. */
  private stopped = false;
  private readonly summary = h('div', { class: 'summary' });
  private readonly chain: DependencyChain;
  private readonly attempts = h('section', { class: 'attempts' });
  private readonly logSlot = h('div', { class: 'log-slot' });

  constructor(
    private readonly main: HTMLElement,
    private readonly hash: string,
    private readonly signal: AbortSignal,
  ) {
    this.chain = new DependencyChain(signal);
  }

  start(): void {
    replace(this.main, h('p', { class: 'muted' }, 'Loading…'));
    const refresh = debounced(REFRESH_MS, this.signal, () => this.refresh());
    const concerns = (drvPath: string): boolean =>
      storeHash(drvPath) === this.hash.slice(0, 32) || this.chain.notice(drvPath);
    void live(this.signal, {
      event: (e) => {
        if (e.type === 'build' && concerns(e.drvPath)) refresh();
      },
      reload: refresh,
    }).then(() => this.refresh());
  }

  /** Reads the derivation and redraws. */
  private async refresh(): Promise<void> {
    if (this.stopped || this.signal.aborted) return;
    try {
      this.detail = await getJson<DerivationDetail>(`/derivations/${this.hash}`, this.signal);
    } catch (err) {
      if (this.signal.aborted) return;
      // A coordinator restarting, a network blip: keep what is shown; the next event or reload tries again.
      if (this.detail && !(err instanceof ApiError && err.status < 500)) return;
      this.stopped = true;
      replace(
        this.main,
        problem(err, () => {
          this.stopped = false;
          replace(this.main, h('p', { class: 'muted' }, 'Loading…'));
          void this.refresh();
        }),
      );
      return;
    }
    if (this.signal.aborted) return;
    if (!this.main.contains(this.summary)) {
      replace(this.main, this.summary, this.chain.element, this.attempts, h('h2', null, 'Log'), this.logSlot);
    }
    this.draw();
    this.chain.show(this.detail);
  }

  private draw(): void {
    const { derivation: d, outputs, attempts } = this.detail!;
    document.title = `${storeName(d.drv_path)} · eka-ci`;
    const features = JSON.parse(d.required_features ?? '[]') as string[];
    replace(
      this.summary,
      h('h1', null, storeName(d.drv_path), ' ', badge(d.state, 'build-state')),
      this.actions(),
      h(
        'dl',
        { class: 'facts' },
        fact('Derivation', h('code', null, d.drv_path)),
        fact('System', d.system),
        features.length > 0 && fact('Features', features.join(', ')),
        d.is_fod === 1 && fact('Fixed-output', 'yes: may use the network, its hash is checked'),
        d.untrusted === 1 && fact('Untrusted', 'code of someone without write access: sandboxed agents only'),
        d.agent_id && fact('Agent', d.agent_id),
        d.root_cause &&
          fact('Root cause', link(buildHref(d.root_cause), storeName(d.root_cause)), ' failed, and this needs it'),
        d.error && fact('Error', h('span', { class: 'error-text' }, d.error)),
      ),
      outputs.length > 0 && outputTable(outputs),
    );
    const latest = attempts.at(-1);
    const chosen = attempts.find((a) => a.attempt === this.pinned) ?? latest;
    replace(
      this.attempts,
      h('h2', null, attempts.length > 1 ? `Attempts (${attempts.length})` : 'Attempt'),
      attempts.length > 1 &&
        h(
          'div',
          { class: 'tabs', role: 'tablist' },
          attempts.map((a) =>
            h(
              'button',
              {
                type: 'button',
                class: 'attempt-tab',
                role: 'tab',
                'aria-selected': a === chosen ? 'true' : 'false',
                onclick: () => {
                  this.pinned = a.attempt;
                  this.draw();
                },
              },
              `#${a.attempt} `,
              badge(a.state),
              ` ${a.agent_id}`,
            ),
          ),
        ),
      chosen ? attemptFacts(chosen) : h('p', { class: 'muted' }, waitingText(d.state)),
    );
    if (chosen && this.shown?.attempt !== chosen.attempt) this.showLog(chosen);
    if (!chosen) replace(this.logSlot, h('p', { class: 'muted' }, 'No log yet.'));
  }

  /** Cancel while it may still build, rebuild once it failed; the answer comes back as events. */
  private actions(): Child {
    const { state } = this.detail!.derivation;
    const path = `/derivations/${this.hash}`;
    const buttons = [
      !SETTLED_STATES.has(state) &&
        actionButton('Cancel', () => postAction(`${path}/cancel`), { name: 'cancel', done: () => void this.refresh() }),
      REBUILDABLE.has(state) &&
        actionButton('Rebuild', () => postAction(`${path}/rebuild`), {
          name: 'rebuild',
          done: () => void this.refresh(),
        }),
    ].filter(Boolean);
    return buttons.length > 0 && h('div', { class: 'actions' }, buttons);
  }

  private showLog(attempt: Attempt): void {
    this.shown?.controller.abort();
    const controller = new AbortController();
    this.signal.addEventListener('abort', () => controller.abort(), { once: true });
    this.shown = { attempt: attempt.attempt, controller };
    const view = new LogView({
      hash: this.hash,
      attempt: attempt.attempt,
      live: OPEN_ATTEMPT_STATES.has(attempt.state),
      truncated: attempt.log_truncated === 1,
      signal: controller.signal,
      // The attempt's end changes the derivation: its events say so too, but this is sooner.
      onEnd: () => void this.refresh(),
    });
    replace(this.logSlot, view.element);
    void view.start();
  }
}

function fact(name: string, ...value: Child[]): Child {
  return [h('dt', null, name), h('dd', null, ...value)];
}

function outputTable(outputs: readonly Output[]): HTMLElement {
  return h(
    'table',
    { class: 'outputs' },
    h('thead', null, h('tr', null, h('th', null, 'Output'), h('th', null, 'Path'), num('NAR size'), num('Closure'))),
    h(
      'tbody',
      null,
      outputs.map((o) =>
        h(
          'tr',
          null,
          h('td', null, o.name),
          h('td', null, h('code', null, o.path)),
          num(bytes(o.nar_size), 'td'),
          num(bytes(o.closure_size), 'td'),
        ),
      ),
    ),
  );
}

function num(text: string, tag: 'th' | 'td' = 'th'): HTMLElement {
  return h(tag, { class: 'num' }, text);
}

function attemptFacts(a: Attempt): HTMLElement {
  const running = OPEN_ATTEMPT_STATES.has(a.state);
  const started = a.started_at ?? undefined;
  const finished = a.finished_at ?? undefined;
  return h(
    'dl',
    { class: 'facts attempt' },
    fact('Attempt', `#${a.attempt} `, badge(a.state, 'attempt-state')),
    fact('Agent', a.agent_id),
    fact('Assigned', clock(a.assigned_at)),
    fact('Started', clock(started), started !== undefined && ` (waited ${duration(started - a.assigned_at)})`),
    finished !== undefined && fact('Finished', clock(finished)),
    started !== undefined &&
      fact(
        running ? 'Running for' : 'Took',
        duration((finished ?? Date.now()) - started),
        finished !== undefined && ` (${duration(finished - a.assigned_at)} since assigned)`,
      ),
    a.error && fact('Error', h('span', { class: 'error-text' }, a.error)),
    a.cancel_reason && fact('Cancelled', a.cancel_reason),
  );
}

function waitingText(state: string): string {
  if (state === 'queued') return 'Not built yet: waiting for its dependencies.';
  if (state === 'buildable') return 'Not built yet: waiting for a free agent.';
  if (state === 'substituted') return 'Not built: its outputs were already in a cache.';
  if (state === 'dependency-failed') return 'Not built: a dependency failed.';
  if (state === 'unbuildable') return 'Not built: no connected agent can build it.';
  return 'Never attempted.';
}
