import { me } from './api.js';
import { h, replace } from './dom.js';
import { buildPage } from './pages/build.js';
import { agentsPage } from './pages/fleet.js';
import { overviewPage } from './pages/overview.js';
import { pullPage, reviewsPage } from './pages/pull.js';
import { timelinePage } from './pages/timeline.js';

/**
 * The web UI's entry: routes on the client, so every page is one index.html (the coordinator serves it for each path
 * in coordinator/http/web-routes.ts WEB_PAGES — keep the two lists together). Leaving a page aborts its signal, which
 * ends its share of the live events and its live logs.
 */

interface Route {
  pattern: RegExp;
  nav?: string;
  render: (main: HTMLElement, match: RegExpExecArray, signal: AbortSignal, query: URLSearchParams) => void;
}

const ROUTES: readonly Route[] = [
  { pattern: /^\/$/, nav: '/', render: (main, _m, signal, query) => overviewPage(main, signal, query) },
  { pattern: /^\/agents$/, nav: '/agents', render: (main, _m, signal) => agentsPage(main, signal) },
  {
    pattern: /^\/builds\/([0-9a-z]{32}(?:-[A-Za-z0-9+\-._?=]+)?)$/,
    render: (main, m, signal) => buildPage(main, m[1]!, signal),
  },
  {
    pattern: /^\/repos\/([A-Za-z0-9_.-]+)\/([A-Za-z0-9_.-]+)\/pulls\/([0-9]+)$/,
    render: (main, m, signal) => pullPage(main, `${m[1]!}/${m[2]!}`, Number(m[3]), signal),
  },
  { pattern: /^\/reviews$/, render: (main, _m, signal, query) => reviewsPage(main, query, signal) },
  { pattern: /^\/runs\/([0-9]+)$/, render: (main, m, signal) => timelinePage(main, Number(m[1]), signal) },
];

let page: AbortController | undefined;

function show(): void {
  page?.abort();
  page = new AbortController();
  const main = document.getElementById('page')!;
  const path = location.pathname;
  for (const route of ROUTES) {
    const match = route.pattern.exec(path);
    if (!match) continue;
    for (const a of document.querySelectorAll<HTMLAnchorElement>('nav a')) {
      a.classList.toggle('active', a.getAttribute('href') === route.nav);
    }
    route.render(main, match, page.signal, new URLSearchParams(location.search));
    return;
  }
  document.title = 'Not found · eka-ci';
  replace(main, h('h1', null, 'Not found'), h('p', null, 'There is no page at ', h('code', null, path), '.'));
}

/** The page a link leads to when it is one of the UI's own (followed without reloading); SVG links included. */
function ownPage(a: Element): URL | undefined {
  const href = a.getAttribute('href');
  if (href === null || (a.getAttribute('target') ?? '') !== '') return undefined;
  const url = new URL(href, location.href);
  const own = url.origin === location.origin && ROUTES.some((r) => r.pattern.test(url.pathname));
  return own ? url : undefined;
}

document.addEventListener('click', (event) => {
  if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  const a = (event.target as Element | null)?.closest('a');
  const url = a ? ownPage(a) : undefined;
  if (!url) return;
  const samePage = url.pathname + url.search === location.pathname + location.search;
  if (samePage && url.hash !== '') return;
  event.preventDefault();
  if (!samePage) history.pushState(null, '', url.pathname + url.search);
  show();
  window.scrollTo(0, 0);
});
window.addEventListener('popstate', show);
show();
void showWho();

/** The header's corner: who is logged in (and a way out), or a way to log in with GitHub when the coordinator has one. */
async function showWho(): Promise<void> {
  const who = await me();
  const place = document.getElementById('who');
  if (!place) return;
  if (who.kind === 'user') {
    const out = h('button', { type: 'button', class: 'link', 'data-action': 'logout' }, 'Log out');
    out.addEventListener('click', () => {
      const headers = { 'X-CSRF-Token': who.csrfToken ?? '' };
      void fetch('/auth/logout', { method: 'POST', headers })
        .catch(() => undefined)
        .finally(() => location.reload());
    });
    replace(place, h('span', { class: 'who' }, who.name ?? '', who.admin ? ' (admin)' : ''), ' ', out);
  } else if (who.login && who.kind === 'anonymous') {
    const back = encodeURIComponent(location.pathname + location.search);
    replace(place, h('a', { href: `${who.login}?return=${back}`, 'data-action': 'login' }, 'Log in with GitHub'));
  }
}
