import { type Agent, ApiError, type CoordinatorEvent, getJson, postAction, type Queues } from '../api.js';
import { type Child, h, replace } from '../dom.js';
import { live } from '../live.js';
import { problem } from '../problem.js';
import { debounced } from '../timing.js';
import { actionButton } from './actions.js';
import { agentsTable, queuesTable } from './widgets.js';

// Builds start and end by the hundred on a busy coordinator: the agents and queues are read at most once a second.
const REFRESH_MS = 1000;

/** `/agents`: who is connected, what runs where, what waits and why; drain and resume for operators. */
export function agentsPage(main: HTMLElement, signal: AbortSignal): void {
  document.title = 'Agents · eka-ci';
  // Each agent keeps its controls across redraws while its drain does not change: a reason being typed and the
  // API's answer stay where they are.
  const controls = new Map<string, { drained: boolean; element: HTMLElement }>();
  const controlsOf = (a: Agent, refresh: () => void): HTMLElement => {
    const kept = controls.get(a.id);
    if (kept && kept.drained === (a.drained !== null)) return kept.element;
    const element = agentControls(a, refresh);
    controls.set(a.id, { drained: a.drained !== null, element });
    return element;
  };
  const fleet = new FleetView(signal, (agents, queues, refresh) => [
    h('h1', null, 'Agents'),
    agentsTable(agents, { controls: (a) => controlsOf(a, refresh) }),
    h('h2', null, 'Queues'),
    queuesTable(queues),
  ]);
  replace(main, fleet.element);
  fleet.follow();
}

/**
 * The agents and the queues, read again whenever a build or an agent changes (both need a credential: without one the
 * view asks for a token). `follow` subscribes it to the page's events; a page that has its own subscription calls
 * `concerns` and `refresh` itself.
 */
export class FleetView {
  readonly element = h('div', { class: 'fleet' }, h('p', { class: 'muted' }, 'Loading…'));
  readonly refresh: () => void;
  private shown = false;
  private stopped = false;

  constructor(
    private readonly signal: AbortSignal,
    private readonly render: (agents: Agent[], queues: Queues, refresh: () => void) => Child[],
  ) {
    this.refresh = debounced(REFRESH_MS, signal, () => this.load());
  }

  follow(): void {
    void live(this.signal, {
      event: (e) => {
        if (FleetView.concerns(e)) this.refresh();
      },
      reload: this.refresh,
    }).then(() => this.load());
  }

  static concerns(e: CoordinatorEvent): boolean {
    return e.type === 'agent' || e.type === 'build';
  }

  async load(): Promise<void> {
    if (this.stopped || this.signal.aborted) return;
    try {
      const [{ agents }, queues] = await Promise.all([
        getJson<{ agents: Agent[] }>('/agents', this.signal),
        getJson<Queues>('/queues', this.signal),
      ]);
      if (this.signal.aborted) return;
      // Not while the reader types in it (a drain's reason): redrawing would take the focus away.
      if (this.element.contains(document.activeElement) && document.activeElement instanceof HTMLInputElement) {
        this.refresh();
        return;
      }
      replace(this.element, this.render(agents, queues, this.refresh));
      this.shown = true;
    } catch (err) {
      if (this.signal.aborted) return;
      // A coordinator restarting, a network blip: keep what is shown; the next event or reload tries again.
      if (this.shown && !(err instanceof ApiError && err.status < 500)) return;
      this.stopped = true;
      replace(
        this.element,
        problem(err, () => {
          this.stopped = false;
          void this.load();
        }),
      );
    }
  }
}

/** Drain (with an optional reason) or resume: for the tokens `[web] admins` names; others are told so by the API. */
function agentControls(a: Agent, refresh: () => void): HTMLElement {
  const path = `/agents/${encodeURIComponent(a.id)}`;
  if (a.drained) {
    return h(
      'div',
      { class: 'agent-controls' },
      actionButton('Resume', () => postAction(`${path}/resume`), { name: 'resume', done: refresh }),
    );
  }
  const reason = h('input', {
    type: 'text',
    class: 'reason',
    name: 'reason',
    maxlength: 500,
    placeholder: 'reason (optional)',
    'aria-label': `Why ${a.id} is drained`,
  });
  const drain = (): Promise<unknown> => {
    const text = reason.value.trim();
    return postAction(`${path}/drain`, text === '' ? undefined : { reason: text });
  };
  return h('div', { class: 'agent-controls' }, reason, actionButton('Drain', drain, { name: 'drain', done: refresh }));
}
