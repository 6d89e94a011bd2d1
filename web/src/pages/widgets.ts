import type { Agent, Lane, Queues } from '../api.js';
import { type Child, h, link } from '../dom.js';
import { ago, buildHref, storeName } from '../format.js';

/** Pieces more than one page shows: state badges, the agents and the queues. */

/** A state as a coloured label; its class is `state-<state>` (style.css gives each family a colour). */
export function badge(state: string, id?: string): HTMLElement {
  return h('span', { class: `badge state-${state}`, id }, state);
}

export interface AgentsTableOptions {
  /** Fewer columns, for the overview. */
  compact?: boolean;
  /** What an operator can do with each agent (drain, resume). */
  controls?: (agent: Agent) => HTMLElement;
}

export function agentsTable(agents: readonly Agent[], options: AgentsTableOptions = {}): HTMLElement {
  if (agents.length === 0) return h('p', { class: 'muted' }, 'No agent has connected yet.');
  const full = !options.compact;
  return h(
    'table',
    { class: 'agents' },
    h(
      'thead',
      null,
      h(
        'tr',
        null,
        h('th', null, 'Agent'),
        h('th', null, 'Status'),
        h('th', null, 'Systems'),
        full && h('th', null, 'Features'),
        h('th', { class: 'num' }, 'Slots'),
        full && h('th', null, 'Nix'),
        full && h('th', null, 'Last seen'),
        h('th', null, 'Running'),
        options.controls && h('th', null, 'Operate'),
      ),
    ),
    h(
      'tbody',
      null,
      agents.map((a) =>
        h(
          'tr',
          { 'data-agent': a.id, class: a.connected ? 'connected' : 'disconnected' },
          h('td', null, h('strong', null, a.id), full && h('div', { class: 'muted small' }, `${a.hostname} · ${a.os}`)),
          h('td', null, agentStatus(a)),
          h('td', null, a.systems.join(', ')),
          full && h('td', null, features(a)),
          h('td', { class: 'num' }, a.connected ? `${a.leases.length} of ${a.maxJobs} busy` : '—'),
          full &&
            h('td', null, a.nixVersion, a.sandboxed ? ', sandboxed' : h('span', { class: 'warn' }, ', no sandbox')),
          full && h('td', { title: new Date(a.lastSeen).toISOString() }, ago(a.lastSeen)),
          h(
            'td',
            { class: 'leases' },
            a.leases.length === 0
              ? h('span', { class: 'muted' }, 'nothing')
              : h(
                  'ul',
                  null,
                  a.leases.map((l) =>
                    h(
                      'li',
                      null,
                      link(buildHref(l.drvPath), storeName(l.drvPath)),
                      l.attempt > 1 && ` (#${l.attempt})`,
                    ),
                  ),
                ),
          ),
          options.controls && h('td', { class: 'controls' }, options.controls(a)),
        ),
      ),
    ),
  );
}

function agentStatus(a: Agent): Child {
  const drained =
    a.drained &&
    h(
      'div',
      { class: 'drained small' },
      badge('drained'),
      ` by ${a.drained.by ?? 'an operator'}`,
      a.drained.reason && `: ${a.drained.reason}`,
    );
  if (!a.connected) return [badge('disconnected'), drained];
  return [a.draining ? badge('draining') : badge('connected'), drained];
}

function features(a: Agent): HTMLElement | string {
  if (a.supportedFeatures.length === 0) return h('span', { class: 'muted' }, 'none');
  return h(
    'span',
    null,
    a.supportedFeatures.map((f, i) => [
      i > 0 && ', ',
      a.mandatoryFeatures.includes(f) ? h('strong', { title: 'mandatory: it builds only what asks for it' }, f) : f,
    ]),
  );
}

export function queuesTable(queues: Queues): HTMLElement {
  if (queues.lanes.length === 0) {
    return h(
      'p',
      { class: 'muted' },
      queues.pending === 0
        ? 'Nothing waits to be built.'
        : `Nothing waits for an agent (${queues.pending} not finished: building, or waiting for dependencies).`,
    );
  }
  return h(
    'table',
    { class: 'queues' },
    h(
      'thead',
      null,
      h(
        'tr',
        null,
        h('th', null, 'Lane'),
        h('th', { class: 'num' }, 'Buildable'),
        h('th', null, 'Waiting since'),
        h('th', null, 'Served by'),
      ),
    ),
    h('tbody', null, queues.lanes.map(laneRow)),
  );
}

function laneRow(lane: Lane): HTMLElement {
  return h(
    'tr',
    { class: lane.why ? 'stuck' : undefined },
    h(
      'td',
      null,
      h('strong', null, lane.system),
      lane.features.length > 0 && ` with ${lane.features.join(', ')}`,
      lane.kind === 'fixed-output' && h('span', { class: 'tag' }, 'fixed-output'),
      lane.untrusted && h('span', { class: 'tag' }, 'untrusted'),
    ),
    h('td', { class: 'num' }, lane.buildable),
    h('td', { title: new Date(lane.waitingSince).toISOString() }, ago(lane.waitingSince)),
    h('td', null, lane.why ? h('span', { class: 'why' }, lane.why) : lane.agents.join(', ')),
  );
}
