import { ApiError, getJson, type Run, type Timeline, type TimelineBuild } from '../api.js';
import { type Child, h, link, replace, svg } from '../dom.js';
import { ago, buildHref, clock, duration, storeName } from '../format.js';
import { live } from '../live.js';
import { problem } from '../problem.js';
import { debounced } from '../timing.js';
import { badge } from './widgets.js';

/**
 * `/runs/<id>`: the builds of a run per agent over time (GET /runs/{id}/timeline), one bar per attempt from its start
 * (its wait since assignment drawn faint before it), the critical path — the chain of builds that decided how long
 * the run took — drawn bold and listed below. It is read again when one of its builds changes, or a build starts (it
 * may be this run's).
 */

// Builds of a run start and end in bursts: the timeline is read at most every two seconds.
const REFRESH_MS = 2000;
// The drawing's user units: a label column, then the time axis.
const LABEL_WIDTH = 150;
const CHART_WIDTH = 850;
const ROW_HEIGHT = 18;
const ROW_GAP = 4;
const AXIS_HEIGHT = 22;
const TICKS = 6;
// In the drawing's user units (CHART_WIDTH is 850).
const MIN_WAIT_WIDTH = 0.5;

export function timelinePage(main: HTMLElement, id: number, signal: AbortSignal): void {
  document.title = `Run ${id} · eka-ci`;
  const body = h('div', { class: 'timeline' }, h('p', { class: 'muted' }, 'Loading…'));
  let drvs = new Set<string>();
  let shown = false;
  let stopped = false;
  const load = async (): Promise<void> => {
    if (stopped) return;
    let timeline: Timeline;
    try {
      timeline = await getJson<Timeline>(`/runs/${id}/timeline`, signal);
    } catch (err) {
      if (signal.aborted || (shown && !(err instanceof ApiError && err.status < 500))) return;
      stopped = true;
      replace(
        body,
        problem(err, () => {
          stopped = false;
          void load();
        }),
      );
      return;
    }
    if (signal.aborted) return;
    drvs = new Set(timeline.builds.map((b) => b.drvPath));
    replace(body, runFacts(timeline.run), timelineView(timeline));
    shown = true;
  };
  const refresh = debounced(REFRESH_MS, signal, load);
  replace(main, h('h1', null, `Build timeline of run #${id}`), body);
  void live(signal, {
    event: (e) => {
      if (e.type === 'run' && e.id === id) refresh();
      if (e.type === 'build' && (drvs.has(e.drvPath) || e.state === 'building')) refresh();
    },
    reload: refresh,
  }).then(load);
}

/** A building run's ETA (the API's `Run.eta`): the critical path of what is left, from earlier builds' durations. */
interface RunEta {
  seconds: number;
  criticalPath: string[];
  basis: { estimated: number; guessed: number };
}

function runFacts(run: Run & { eta?: RunEta | null }): HTMLElement {
  const what = run.kind === 'pull_request' ? `pull request #${run.prNumber ?? '?'}` : run.kind.replace('_', ' ');
  const eta = run.eta;
  return h(
    'p',
    { class: 'run-facts' },
    badge(run.state, 'run-state'),
    ` ${what}, head `,
    h('code', null, run.headSha.slice(0, 12)),
    run.baseSha && [' onto ', h('code', null, run.baseSha.slice(0, 12))],
    `, started ${ago(run.createdAt)}`,
    eta && [
      `; about ${duration(eta.seconds * 1000)} left`,
      h(
        'span',
        { class: 'muted eta' },
        ` (critical path: ${eta.criticalPath.map(storeName).join(' → ')}`,
        eta.basis.guessed > 0 ? `; ${eta.basis.guessed} never built before, guessed)` : ')',
      ),
    ],
  );
}

function timelineView(t: Timeline): Child[] {
  if (t.builds.length === 0) return [h('p', { class: 'muted' }, 'Nothing of this run has been built (yet).')];
  const now = Date.now();
  // Not Math.min(...): a spread of over some 120,000 values overflows the stack, and a timeline may hold 250,000.
  let start = Infinity;
  let end = -Infinity;
  for (const b of t.builds) {
    start = Math.min(start, b.assignedAt);
    end = Math.max(end, b.finishedAt ?? now);
  }
  end = Math.max(end, start + 1000);
  const byDrv = new Map(t.builds.map((b) => [b.drvPath, b]));
  const critical = t.criticalPath.flatMap((d) => byDrv.get(d) ?? []);
  const criticalTime = critical.reduce((n, b) => n + (b.finishedAt ?? now) - (b.startedAt ?? b.assignedAt), 0);
  return [
    h(
      'p',
      { class: 'timeline-summary' },
      `${t.builds.length} build${t.builds.length === 1 ? '' : 's'} of a closure of ${t.closure} over `,
      duration(end - start),
      `; the critical path is ${critical.length} build${critical.length === 1 ? '' : 's'}, `,
      duration(criticalTime),
      ' of building.',
      t.truncated && h('span', { class: 'warn' }, ' Only the first builds are shown.'),
    ),
    chart(t.builds, start, end, now),
    h('h2', null, 'Critical path'),
    critical.length === 0
      ? h('p', { class: 'muted' }, 'None yet.')
      : h(
          'ol',
          { class: 'critical-path' },
          critical.map((b) =>
            h(
              'li',
              null,
              link(buildHref(b.drvPath), b.attr ?? storeName(b.drvPath)),
              ` ${duration((b.finishedAt ?? now) - (b.startedAt ?? b.assignedAt))} on ${b.agentId}`,
            ),
          ),
        ),
  ];
}

/** One lane per agent, as many rows in it as it ran builds at once. */
function lanes(builds: readonly TimelineBuild[], now: number): Array<{ agent: string; rows: TimelineBuild[][] }> {
  const agents = [...new Set(builds.map((b) => b.agentId))].sort();
  return agents.map((agent) => {
    const rows: TimelineBuild[][] = [];
    const sorted = builds.filter((b) => b.agentId === agent).sort((a, b) => a.assignedAt - b.assignedAt);
    for (const b of sorted) {
      const row = rows.find((r) => (r.at(-1)!.finishedAt ?? now) <= b.assignedAt);
      if (row) row.push(b);
      else rows.push([b]);
    }
    return { agent, rows };
  });
}

function chart(builds: readonly TimelineBuild[], start: number, end: number, now: number): SVGElement {
  const x = (t: number): number => LABEL_WIDTH + ((t - start) / (end - start)) * CHART_WIDTH;
  const all = lanes(builds, now);
  const rowCount = all.reduce((n, l) => n + l.rows.length, 0);
  const height = AXIS_HEIGHT + rowCount * (ROW_HEIGHT + ROW_GAP) + ROW_GAP;
  const width = LABEL_WIDTH + CHART_WIDTH + 10;
  const parts: Child[] = [];
  for (let i = 0; i <= TICKS; i++) {
    const t = start + ((end - start) * i) / TICKS;
    parts.push(
      svg('line', { class: 'tick', x1: x(t), x2: x(t), y1: AXIS_HEIGHT - 4, y2: height }),
      svg(
        'text',
        { class: 'tick-label', x: x(t), y: AXIS_HEIGHT - 8, 'text-anchor': i === TICKS ? 'end' : 'middle' },
        i === 0 ? '0s' : `+${duration(t - start)}`,
      ),
    );
  }
  let row = 0;
  for (const lane of all) {
    const top = AXIS_HEIGHT + row * (ROW_HEIGHT + ROW_GAP) + ROW_GAP;
    parts.push(svg('text', { class: 'lane-label', x: 4, y: top + ROW_HEIGHT - 5 }, lane.agent));
    for (const r of lane.rows) {
      const y = AXIS_HEIGHT + row * (ROW_HEIGHT + ROW_GAP) + ROW_GAP;
      parts.push(...r.map((b) => bar(b, x, y, now)));
      row++;
    }
  }
  const drawn = svg(
    'svg',
    {
      class: 'timeline-chart',
      viewBox: `0 0 ${width} ${height}`,
      width: '100%',
      role: 'img',
      'aria-label': `${builds.length} builds per agent over time`,
    },
    parts,
  );
  // A bar's tooltip is written when the pointer first reaches it: a nixpkgs run draws some 30,000 bars, and their
  // texts made up most of the drawing's cost.
  const byDrv = new Map(builds.map((b) => [`${b.drvPath}#${b.attempt}`, b]));
  drawn.addEventListener('pointerover', (e) => {
    const link = (e.target as Element).closest('a.bar-link');
    const b = link && byDrv.get(link.getAttribute('data-build') ?? '');
    if (link && b && !link.querySelector('title')) link.prepend(svg('title', null, barTitle(b)));
  });
  return drawn;
}

function barTitle(b: TimelineBuild): string {
  const started = b.startedAt ?? undefined;
  return [
    `${b.attr ?? storeName(b.drvPath)} (attempt ${b.attempt}): ${b.state}${b.critical ? ', on the critical path' : ''}`,
    b.drvPath,
    `agent ${b.agentId}`,
    `assigned ${clock(b.assignedAt)}`,
    `started ${clock(started)}`,
    `finished ${b.finishedAt === null ? '— (still running)' : clock(b.finishedAt)}`,
    started !== undefined ? `took ${duration((b.finishedAt ?? Date.now()) - started)}` : 'not started',
  ].join('\n');
}

function bar(b: TimelineBuild, x: (t: number) => number, y: number, now: number): SVGElement {
  const started = b.startedAt ?? undefined;
  const finished = b.finishedAt ?? now;
  const from = x(started ?? b.assignedAt);
  const wait = from - x(b.assignedAt);
  return svg(
    'a',
    { href: buildHref(b.drvPath), class: 'bar-link', 'data-build': `${b.drvPath}#${b.attempt}` },
    // A wait too short to see is not drawn.
    started !== undefined &&
      wait >= MIN_WAIT_WIDTH &&
      svg('rect', { class: 'wait', x: x(b.assignedAt), y: y + ROW_HEIGHT / 3, width: wait, height: ROW_HEIGHT / 3 }),
    svg('rect', {
      class: `bar state-${b.state}${b.critical ? ' critical' : ''}`,
      'data-drv': b.drvPath,
      x: from,
      y,
      width: Math.max(2, x(finished) - from),
      height: ROW_HEIGHT,
      rx: 2,
    }),
  );
}
