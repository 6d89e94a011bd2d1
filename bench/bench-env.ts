/** A whole number ≥ 1 from the environment (a benchmark's size), or `fallback`; `fail` reports a bad value. */
export function envInt(name: string, fallback: number, fail: (message: string) => never): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) fail(`${name} must be a whole number ≥ 1, got "${raw}"`);
  return n;
}
