import type { OutputSizes } from '../../../coordinator/review/model.js';
import { getJson, type Memo, type SizePoint } from '../api.js';
import { svg } from '../dom.js';
import { bytes } from '../format.js';

/** Small inline SVG charts of sizes: base against head for one output, and an attribute's size over its commits. */

const BAR_WIDTH = 120;
const BAR_HEIGHT = 7;
const SPARK_WIDTH = 100;
const SPARK_HEIGHT = 22;

/**
 * Two bars, base over head, on one scale (the larger of the two): how far the closure moved, at a glance. The base is
 * named by its baseline where the job's size_check.base_branch chose one (`main 1a2b3c4d5e`).
 */
export function sizeBars(s: OutputSizes): SVGElement {
  const baseName = s.baseline?.kind === 'branch' ? `${s.baseline.branch} ${s.baseline.commit.slice(0, 10)}` : 'base';
  const base = s.base?.closureSize ?? 0;
  const head = s.head?.closureSize ?? 0;
  const max = Math.max(base, head, 1);
  const width = (n: number): number => Math.max(1, Math.round((n / max) * BAR_WIDTH));
  const grew = head > base;
  return svg(
    'svg',
    {
      class: 'size-bars',
      width: BAR_WIDTH,
      height: BAR_HEIGHT * 2 + 3,
      viewBox: `0 0 ${BAR_WIDTH} ${BAR_HEIGHT * 2 + 3}`,
      role: 'img',
      'aria-label': `closure ${bytes(base)} on ${baseName}, ${bytes(head)} on head`,
    },
    svg('title', null, `closure: ${baseName} ${bytes(base)}, head ${bytes(head)}`),
    svg('rect', { class: 'bar-base', x: 0, y: 0, width: width(base), height: BAR_HEIGHT }),
    svg('rect', {
      class: `bar-head ${s.warning ? 'bar-warning' : grew ? 'bar-grew' : 'bar-shrank'}`,
      x: 0,
      y: BAR_HEIGHT + 3,
      width: width(head),
      height: BAR_HEIGHT,
    }),
  );
}

/**
 * An attribute's closure size in each evaluated commit (GET …/attributes/ATTR/sizes), oldest first, as a line; a
 * placeholder until it is read, empty when there is nothing to draw.
 */
export function sizeHistory(
  attr: string,
  job: string,
  output: string,
  marked: { base: string; head: string },
  o: { repo: string; signal: AbortSignal; memo: Memo },
): HTMLSpanElement {
  const slot = document.createElement('span');
  slot.className = 'size-history';
  const path = `/repos/${o.repo}/attributes/${encodeURIComponent(attr)}/sizes?job=${encodeURIComponent(job)}`;
  void o
    .memo(`sizes:${job}:${attr}`, () => getJson<{ points: SizePoint[] }>(path, o.signal))
    .then(({ points }) => {
      const values = points.flatMap((p) => {
        const size = p.outputs.find((o) => o.name === output)?.closureSize;
        return size === null || size === undefined ? [] : [{ commit: p.commit, size }];
      });
      if (values.length >= 2) slot.append(sparkline(values, marked));
      else slot.append(document.createTextNode(values.length === 1 ? 'one commit' : ''));
    })
    .catch(() => {
      // The chart is a garnish: without it the numbers beside it still say everything.
    });
  return slot;
}

/** The line of sizes; the review's two commits are dots (the head's filled), named in the hover text. */
function sparkline(
  values: ReadonlyArray<{ commit: string; size: number }>,
  marked: { base: string; head: string },
): SVGElement {
  const sizes = values.map((v) => v.size);
  const [min, max] = [Math.min(...sizes), Math.max(...sizes)];
  const x = (i: number): number => 3 + (i / (values.length - 1)) * (SPARK_WIDTH - 6);
  const y = (n: number): number => 3 + (max === min ? 0.5 : 1 - (n - min) / (max - min)) * (SPARK_HEIGHT - 6);
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v.size).toFixed(1)}`).join(' ');
  const role = (commit: string): string =>
    commit === marked.head ? ' (head)' : commit === marked.base ? ' (base)' : '';
  return svg(
    'svg',
    {
      class: 'sparkline',
      width: SPARK_WIDTH,
      height: SPARK_HEIGHT,
      viewBox: `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`,
      role: 'img',
      'aria-label': `closure size over ${values.length} commits, ${bytes(min)} to ${bytes(max)}`,
    },
    svg('title', null, values.map((v) => `${v.commit.slice(0, 10)}${role(v.commit)}: ${bytes(v.size)}`).join('\n')),
    svg('polyline', { points, fill: 'none' }),
    values.map(
      (v, i) =>
        role(v.commit) !== '' &&
        svg('circle', { class: v.commit === marked.head ? 'head' : 'base', cx: x(i), cy: y(v.size), r: 2.5 }),
    ),
  );
}
