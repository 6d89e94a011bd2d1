/** How numbers, times and store paths read on the pages. */

const STORE = '/nix/store/';

/** The 32-character hash of a store path: what /builds/<hash> and the API take. */
export function storeHash(path: string): string {
  return path.startsWith(STORE) ? path.slice(STORE.length, STORE.length + 32) : path;
}

/** The name part of a store path, without `.drv`: `hello-2.12`. */
export function storeName(path: string): string {
  const base = path.startsWith(STORE) ? path.slice(STORE.length + 33) : path;
  return base.endsWith('.drv') ? base.slice(0, -'.drv'.length) : base;
}

export function buildHref(drvPath: string): string {
  return `/builds/${storeHash(drvPath)}`;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return '—';
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

/** `1h 02m`, `3m 07s`, `12.4s`. */
export function duration(ms: number): string {
  if (ms < 0) ms = 0;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)}s`;
  const s = Math.floor(ms / 1000);
  const [hours, minutes, seconds] = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
  const pad = (v: number): string => String(v).padStart(2, '0');
  return hours > 0 ? `${hours}h ${pad(minutes)}m` : `${minutes}m ${pad(seconds)}s`;
}

/** How long ago, from the browser's clock: `5s ago`, `3m 07s ago`. */
export function ago(at: number): string {
  return `${duration(Date.now() - at)} ago`;
}

export function clock(at: number | null | undefined): string {
  if (at === null || at === undefined) return '—';
  return new Date(at).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
}
