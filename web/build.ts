import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { build } from 'esbuild';

/**
 * Builds the web UI into `dist/web` (part of `npm run build`): one bundle of web/src/main.ts and one stylesheet, each
 * named by its content's hash (so the coordinator serves them as immutable), and index.html naming both. Everything the
 * page needs is in these files: no CDN, it works offline.
 */

const WEB = dirname(fileURLToPath(import.meta.url));
export const WEB_OUT = join(WEB, '..', 'dist', 'web');

export async function buildWeb(target = WEB_OUT): Promise<void> {
  // Built beside the target and swapped in at the end: a coordinator serving the UI meanwhile (another test file
  // rebuilding it) never finds it half-written or gone.
  const outDir = `${target}.building-${process.pid}`;
  rmSync(outDir, { recursive: true, force: true });
  mkdirSync(outDir, { recursive: true });
  const result = await build({
    absWorkingDir: WEB,
    entryPoints: { main: 'src/main.ts', style: 'style.css' },
    bundle: true,
    format: 'esm',
    target: 'es2022',
    minify: true,
    sourcemap: 'linked',
    entryNames: '[name]-[hash]',
    outdir: join(outDir, 'assets'),
    metafile: true,
    logLevel: 'warning',
  });
  const outputOf = (entry: string): string => {
    const found = Object.entries(result.metafile.outputs).find(([, o]) => o.entryPoint === entry);
    if (!found) throw new Error(`esbuild wrote nothing for ${entry}`);
    return `/assets/${basename(found[0])}`;
  };
  const html = readFileSync(join(WEB, 'index.html'), 'utf8')
    .replace('%SCRIPT%', outputOf('src/main.ts'))
    .replace('%STYLE%', outputOf('style.css'));
  writeFileSync(join(outDir, 'index.html'), html);
  const old = `${target}.old-${process.pid}`;
  if (existsSync(target)) renameSync(target, old);
  renameSync(outDir, target);
  rmSync(old, { recursive: true, force: true });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await buildWeb();
