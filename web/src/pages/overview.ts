import { type Agent, getJson, type PullRequest, type PullSort, type Queues, type Repository } from '../api.js';
import { type Child, h, link, replace } from '../dom.js';
import { ago } from '../format.js';
import { live } from '../live.js';
import { problem } from '../problem.js';
import { debounced } from '../timing.js';
import { FleetView } from './fleet.js';
import { agentsTable, badge, queuesTable } from './widgets.js';

// A run's state changes a handful of times; its pull request's row is read again at most this often.
const PULLS_REFRESH_MS = 500;

const SORTS: ReadonlyArray<{ sort: PullSort; label: string }> = [
  { sort: 'updated', label: 'Last update' },
  { sort: 'rebuilds', label: 'Rebuilds' },
  { sort: 'failing', label: 'Newly failing' },
];

/**
 * `/`: every repository's open pull requests (rebuilds per system, newly failing, run status, age), sorted as the
 * reader picks (`?sort=`, ordered by the API), and the queues and agents at a glance. A run's event reads its
 * repository's pull requests again; a build's or an agent's, the queues and agents.
 */
export function overviewPage(main: HTMLElement, signal: AbortSignal, query: URLSearchParams): void {
  document.title = 'eka-ci';
  let sort: PullSort = SORTS.find((s) => s.sort === query.get('sort'))?.sort ?? 'updated';
  const repos = h('div', { class: 'repos' }, h('p', { class: 'muted' }, 'Loading…'));
  const sortBar = h('div', { class: 'sort', role: 'group', 'aria-label': 'Sort pull requests by' });
  const fleet = new FleetView(signal, fleetGlance);
  /** Each repository's pull requests, read again on their own when a run of that repository changes. */
  const sections = new Map<string, { repo: Repository; element: HTMLElement; refresh: () => void }>();

  const drawSortBar = (): void =>
    replace(
      sortBar,
      h('span', { class: 'muted' }, 'Sort by '),
      SORTS.map((s) =>
        h(
          'button',
          {
            type: 'button',
            'data-sort': s.sort,
            'aria-pressed': s.sort === sort ? 'true' : 'false',
            onclick: () => {
              sort = s.sort;
              history.replaceState(null, '', s.sort === 'updated' ? '/' : `/?sort=${s.sort}`);
              drawSortBar();
              for (const section of sections.values()) void loadPulls(section.element, section.repo, sort, signal);
            },
          },
          s.label,
        ),
      ),
    );

  const loadRepos = async (): Promise<void> => {
    try {
      const { repositories } = await getJson<{ repositories: Repository[] }>('/repos', signal);
      if (signal.aborted) return;
      sections.clear();
      const github = repositories.filter((r) => r.github);
      const local = repositories.filter((r) => !r.github);
      replace(
        repos,
        github.length === 0 && h('p', { class: 'muted' }, 'No repository is served by a GitHub App yet.'),
        github.map((r) => {
          const section = h('section', { class: 'repo', 'data-repo': r.name });
          const refresh = debounced(PULLS_REFRESH_MS, signal, () => loadPulls(section, r, sort, signal));
          sections.set(r.name, { repo: r, element: section, refresh });
          void loadPulls(section, r, sort, signal);
          return section;
        }),
        local.length > 0 &&
          h(
            'p',
            { class: 'muted' },
            'Reviewed locally (ekaci review): ',
            local.map((r, i) => [i > 0 && ', ', r.name]),
          ),
      );
    } catch (err) {
      if (!signal.aborted)
        replace(
          repos,
          problem(err, () => void loadRepos()),
        );
    }
  };
  const reloadRepos = debounced(PULLS_REFRESH_MS, signal, loadRepos);

  drawSortBar();
  replace(
    main,
    h('h1', null, 'Overview'),
    h('div', { class: 'heading-row' }, h('h2', null, 'Open pull requests'), sortBar),
    repos,
    h('h2', null, 'Builds and agents'),
    fleet.element,
  );
  void live(signal, {
    event: (e) => {
      if (e.type === 'run') (sections.get(e.repo)?.refresh ?? reloadRepos)();
      if (FleetView.concerns(e)) fleet.refresh();
    },
    reload: () => {
      reloadRepos();
      fleet.refresh();
    },
  }).then(() => {
    void loadRepos();
    void fleet.load();
  });
}

async function loadPulls(section: HTMLElement, repo: Repository, sort: PullSort, signal: AbortSignal): Promise<void> {
  const path = `/repos/${repo.name}/pulls?sort=${sort}`;
  let pulls: PullRequest[];
  try {
    pulls = (await getJson<{ pullRequests: PullRequest[] }>(path, signal)).pullRequests;
  } catch (err) {
    if (signal.aborted) return;
    replace(
      section,
      h('h3', null, repo.name),
      problem(err, () => void loadPulls(section, repo, sort, signal)),
    );
    return;
  }
  if (signal.aborted) return;
  replace(
    section,
    h('h3', null, repo.name, repo.private && h('span', { class: 'tag' }, 'private')),
    pulls.length === 0 ? h('p', { class: 'muted' }, 'No open pull requests.') : pullsTable(repo.name, pulls),
  );
}

function pullsTable(repo: string, pulls: readonly PullRequest[]): HTMLElement {
  return h(
    'table',
    { class: 'pulls' },
    h(
      'thead',
      null,
      h(
        'tr',
        null,
        h('th', null, 'Pull request'),
        h('th', null, 'Author'),
        h('th', null, 'Rebuilds'),
        h('th', { class: 'num' }, 'Newly failing'),
        h('th', null, 'Run'),
        h('th', null, 'Updated'),
      ),
    ),
    h(
      'tbody',
      null,
      pulls.map((p) =>
        h(
          'tr',
          { 'data-pull': p.number },
          h(
            'td',
            null,
            link(`/repos/${repo}/pulls/${p.number}`, h('span', { class: 'muted' }, `#${p.number} `), p.title),
            p.draft && h('span', { class: 'tag' }, 'draft'),
          ),
          h('td', null, p.author),
          h('td', { class: 'rebuilds' }, rebuilds(p)),
          h(
            'td',
            { class: `num newly-failing${(p.newlyFailing ?? 0) > 0 ? ' bad' : ''}` },
            p.newlyFailing === null ? '—' : p.newlyFailing,
          ),
          h('td', null, p.run ? badge(p.run.state) : h('span', { class: 'muted' }, 'no run')),
          h('td', { title: new Date(p.updatedAt).toISOString() }, ago(p.updatedAt)),
        ),
      ),
    ),
  );
}

function rebuilds(p: PullRequest): Child {
  const bySystem = p.run?.rebuildCountBySystem;
  if (!bySystem) return h('span', { class: 'muted' }, 'not diffed yet');
  const systems = Object.entries(bySystem).sort(([a], [b]) => a.localeCompare(b));
  if (systems.length === 0) return '0';
  return systems.map(([system, n]) =>
    h('div', { 'data-system': system }, h('strong', null, n), ' ', h('span', { class: 'muted' }, system)),
  );
}

function fleetGlance(agents: Agent[], queues: Queues): Child[] {
  const connected = agents.filter((a) => a.connected);
  const slots = connected.reduce((n, a) => n + a.maxJobs, 0);
  // What runs, not what is free: a drained agent has no free slot and may run nothing.
  const busy = connected.reduce((n, a) => n + a.leases.length, 0);
  const waiting = queues.lanes.reduce((n, l) => n + l.buildable, 0);
  return [
    h(
      'div',
      { class: 'stats' },
      stat('Unfinished builds', queues.pending),
      stat('Waiting for an agent', waiting),
      stat('Agents connected', `${connected.length} of ${agents.length}`),
      stat('Build slots busy', `${busy} of ${slots}`),
    ),
    h('h3', null, 'Queues'),
    queuesTable(queues),
    h('h3', null, 'Agents'),
    agentsTable(agents, { compact: true }),
  ];
}

function stat(label: string, value: string | number): HTMLElement {
  return h(
    'div',
    { class: 'stat' },
    h('div', { class: 'stat-value' }, value),
    h('div', { class: 'stat-label' }, label),
  );
}
