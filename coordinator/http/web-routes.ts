import { createReadStream, existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, extname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Router, { type RouterContext } from '@koa/router';

/**
 * The web UI: `index.html` for every page (the client routes) and the bundle's assets, as `npm run build` writes them
 * to `dist/web` (web/build.ts). Nothing here carries data — that comes from /api/v1 with the reader's credential — so
 * anyone may fetch these, even from a coordinator that is not public.
 */

/** The UI's pages, as router paths: each answers index.html. Add a page here and in web/src/main.ts. */
export const WEB_PAGES: readonly string[] = [
  '/',
  '/agents',
  '/builds/:hash',
  '/repos/:owner/:repo/pulls/:number',
  '/reviews',
  '/runs/:id',
];

const ASSETS = '/assets/';
const PAGE_PATTERNS = WEB_PAGES.map((p) => new RegExp(`^${p.replace(/:[a-z]+/g, '[^/]+')}$`));

/** Whether a request is for the UI's pages or assets, which need no credential. */
export function isWebUiRequest(method: string, path: string): boolean {
  if (method !== 'GET' && method !== 'HEAD') return false;
  return path.startsWith(ASSETS) || PAGE_PATTERNS.some((p) => p.test(path));
}

// Assets are named `NAME-HASH.EXT` by the build (esbuild's 8-character hash): a name never changes content.
const HASHED_ASSET = /-[A-Z0-9]{8}\.[a-z0-9.]+$/;
const IMMUTABLE = 'public, max-age=31536000, immutable';
// One file of the flat assets folder: no separators, no leading dot (so no `..`).
const ASSET_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]*$/;

const CONTENT_TYPES: Readonly<Record<string, string>> = {
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.woff2': 'font/woff2',
};

// The page runs only its own bundle and talks only to its own origin: no CDN, no inline script, no framing.
const PAGE_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "connect-src 'self'",
  "img-src 'self' data:",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

/** Where `npm run build` puts the UI: `dist/web` of the package this file belongs to (from source or from dist). */
export function defaultWebDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json')) && dirname(dir) !== dir) dir = dirname(dir);
  return join(dir, 'dist', 'web');
}

export function webRouter(dir: string): Router {
  const router = new Router();
  const page = (ctx: RouterContext): void => {
    const index = join(dir, 'index.html');
    if (!existsSync(index)) return notFound(ctx, `the web UI is not built (no ${index}): run npm run build`);
    ctx.type = 'text/html; charset=utf-8';
    ctx.set('Cache-Control', 'no-cache');
    ctx.set('Content-Security-Policy', PAGE_POLICY);
    ctx.set('X-Content-Type-Options', 'nosniff');
    ctx.body = readFileSync(index);
  };
  for (const path of WEB_PAGES) router.get(path, page);
  router.get(`${ASSETS}{*path}`, (ctx) => {
    const name = ctx.params.path ?? '';
    const type = CONTENT_TYPES[extname(name)];
    const file = join(dir, 'assets', name);
    if (!ASSET_NAME.test(name) || type === undefined || !isFile(file)) return notFound(ctx, `no asset ${name}`);
    ctx.type = type;
    ctx.set('Cache-Control', HASHED_ASSET.test(name) ? IMMUTABLE : 'no-cache');
    ctx.set('X-Content-Type-Options', 'nosniff');
    ctx.length = statSync(file).size;
    ctx.body = createReadStream(file);
  });
  return router;
}

function isFile(path: string): boolean {
  try {
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

function notFound(ctx: RouterContext, message: string): void {
  ctx.status = 404;
  ctx.body = { error: { code: 'EKACI_ERR_NOT_FOUND', message } };
}
