import { type DerivationDetail, getJson, OPEN_ATTEMPT_STATES } from '../api.js';
import { h, link, replace } from '../dom.js';
import { buildHref, storeHash, storeName } from '../format.js';
import { LogView } from '../log-view.js';
import { badge } from './widgets.js';

// A chain longer than this is shown cut (with its root): nixpkgs' deepest are a few dozen derivations.
const MAX_DEPTH = 40;
// Inputs read at each step while looking for the one on the way to the root; the first that leads there will do.
const MAX_CANDIDATES = 8;

interface Link {
  drvPath: string;
  state: string | null;
}

/**
 * Why a dependency-failed derivation was not built: the chain of inputs from it down to the failed root (Hydra's
 * dependency explorer, as one list) and the root's log. The walk goes through `dependencies`: at each step the input
 * that is the root, or else an input that is itself dependency-failed because of the same root.
 */
export class DependencyChain {
  readonly element = h('section', { class: 'chain', hidden: true });
  /** The root the chain shown was walked to, and the derivations on it (their events concern the page). */
  private root: string | undefined;
  private links: Link[] = [];
  private walking: AbortController | undefined;

  constructor(private readonly signal: AbortSignal) {}

  /** Takes note of a build's change: true when it concerns the chain, which the next `show` then draws again. */
  notice(drvPath: string): boolean {
    const involved = this.root === drvPath || this.links.some((l) => l.drvPath === drvPath);
    if (involved) this.root = undefined;
    return involved;
  }

  show(detail: DerivationDetail): void {
    const { state, root_cause: root } = detail.derivation;
    if (state !== 'dependency-failed' || !root) {
      this.walking?.abort();
      this.root = undefined;
      this.links = [];
      this.element.hidden = true;
      return;
    }
    if (root === this.root) return;
    this.root = root;
    this.walking?.abort();
    const walking = new AbortController();
    this.walking = walking;
    const signal = AbortSignal.any([this.signal, walking.signal]);
    this.element.hidden = false;
    replace(this.element, h('h2', null, 'Why it was not built'), h('p', { class: 'muted' }, 'Following the chain…'));
    void this.draw(detail, root, signal);
  }

  private async draw(detail: DerivationDetail, root: string, signal: AbortSignal): Promise<void> {
    let rootDetail: DerivationDetail;
    let complete: boolean;
    try {
      ({ links: this.links, complete } = await walk(detail, root, signal));
      rootDetail = await getJson<DerivationDetail>(`/derivations/${storeHash(root)}`, signal);
    } catch (err) {
      if (!signal.aborted) {
        replace(
          this.element,
          h('h2', null, 'Why it was not built'),
          h('p', { class: 'error-text' }, `Cannot follow the chain: ${(err as Error).message}`),
        );
      }
      return;
    }
    if (signal.aborted) return;
    const attempt = rootDetail.attempts.at(-1);
    const chain = complete ? this.links : [...this.links, { drvPath: '', state: null }, { drvPath: root, state: null }];
    replace(
      this.element,
      h('h2', null, 'Why it was not built'),
      h(
        'p',
        null,
        link(buildHref(root), storeName(root)),
        ` failed, and this needs it${this.links.length > 2 ? ` through ${this.links.length - 2} more` : ''}:`,
      ),
      h(
        'ol',
        { class: 'chain-links' },
        chain.map((l) =>
          l.drvPath === ''
            ? h('li', { class: 'muted' }, '… (the rest of the chain was not followed)')
            : h('li', null, link(buildHref(l.drvPath), storeName(l.drvPath)), ' ', l.state && badge(l.state)),
        ),
      ),
      h('h3', null, 'Log of ', storeName(root), attempt ? ` (attempt ${attempt.attempt})` : ''),
      attempt ? this.rootLog(root, attempt, signal) : h('p', { class: 'muted' }, 'It has no log.'),
    );
  }

  private rootLog(root: string, attempt: DerivationDetail['attempts'][number], signal: AbortSignal): HTMLElement {
    const view = new LogView({
      hash: storeHash(root),
      attempt: attempt.attempt,
      live: OPEN_ATTEMPT_STATES.has(attempt.state),
      truncated: attempt.log_truncated === 1,
      signal,
      onEnd: () => {},
    });
    view.element.classList.add('root-log');
    void view.start();
    return view.element;
  }
}

/** From `start` down to `root`; `complete` is false when the walk lost the way or went too deep. */
async function walk(
  start: DerivationDetail,
  root: string,
  signal: AbortSignal,
): Promise<{ links: Link[]; complete: boolean }> {
  const links: Link[] = [{ drvPath: start.derivation.drv_path, state: start.derivation.state }];
  let current = start;
  for (let depth = 0; depth < MAX_DEPTH; depth++) {
    const inputs = current.dependencies.derivations;
    const direct = inputs.find((d) => d.drvPath === root);
    if (direct) return { links: [...links, direct], complete: true };
    let next: DerivationDetail | undefined;
    for (const candidate of inputs.filter((d) => d.state === 'dependency-failed').slice(0, MAX_CANDIDATES)) {
      const detail = await getJson<DerivationDetail>(`/derivations/${storeHash(candidate.drvPath)}`, signal);
      if (detail.derivation.root_cause === root) {
        next = detail;
        break;
      }
    }
    if (!next) break;
    links.push({ drvPath: next.derivation.drv_path, state: next.derivation.state });
    current = next;
  }
  return { links, complete: false };
}
