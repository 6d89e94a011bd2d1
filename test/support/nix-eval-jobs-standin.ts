/**
 * A stand-in for `nix-eval-jobs` (not installed here), for the tests of eka-ci's adapter. It takes the same command
 * line (`--expr E`, `--meta`, `--gc-roots-dir D`; other options and their values are ignored) and prints the same
 * JSON lines, evaluating with the real Nix: each attribute of E's value (a flat set of derivations: no recursion)
 * is instantiated, then its meta evaluated when `--meta` is given. Like the real tool, a meta that fails turns the
 * whole attribute into an error line without its derivation.
 *
 * `EKACI_STANDIN_FAULT` makes it die half-way, after N lines: `exit-after:N` (exit 1), `kill-after:N` (SIGKILL),
 * `cut-after:N` (half of the next line, no newline, exit 0). `EKACI_STANDIN_ARGS` names a file to write its
 * arguments to, one JSON array per run.
 *
 * Run as `node --import tsx nix-eval-jobs-standin.ts ARGS…`.
 */
import { spawnSync } from 'node:child_process';
import { appendFileSync, realpathSync } from 'node:fs';
import { join } from 'node:path';

const args = process.argv.slice(2);
const option = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const expr = option('--expr');
const rootsDir = option('--gc-roots-dir');
const withMeta = args.includes('--meta');
if (process.env.EKACI_STANDIN_ARGS) appendFileSync(process.env.EKACI_STANDIN_ARGS, `${JSON.stringify(args)}\n`);
if (expr === undefined) {
  process.stderr.write('nix-eval-jobs stand-in: --expr is required\n');
  process.exit(2);
}

const [fault, after] = (process.env.EKACI_STANDIN_FAULT ?? ':').split(':');
const faultAfter = after === undefined || after === '' ? Infinity : Number(after);

function nix(program: string, nixArgs: string[]): { ok: boolean; out: string; err: string } {
  const r = spawnSync(program, ['--option', 'substituters', '', ...nixArgs], { encoding: 'utf8' });
  const err = r.stderr
    .split('\n')
    .filter((l) => !/^warning:/.test(l))
    .join('\n')
    .trim();
  return { ok: r.status === 0, out: r.stdout.trim(), err };
}

const value = `(${expr})`;
const nixName = (n: string): string => JSON.stringify(n).replace(/\$/g, '\\$');

function evalJson(e: string): { ok: true; value: unknown } | { ok: false; error: string } {
  const r = nix('nix-instantiate', ['--eval', '--strict', '--json', '-E', e]);
  return r.ok ? { ok: true, value: JSON.parse(r.out) as unknown } : { ok: false, error: r.err };
}

function job(name: string): Record<string, unknown> {
  const head = { attr: name, attrPath: [name] };
  const at = `${value}.${nixName(name)}`;
  const rootArgs = rootsDir === undefined ? [] : ['--add-root', join(rootsDir, name)];
  const drv = nix('nix-instantiate', [...rootArgs, '-E', at]);
  if (!drv.ok) return { ...head, error: drv.err };
  const info = evalJson(
    `let v = ${at}; in { name = v.name; system = v.system; ` +
      `outputs = builtins.listToAttrs (map (o: { name = o; value = v.\${o}.outPath; }) (v.outputs or [ "out" ])); }`,
  );
  if (!info.ok) return { ...head, error: info.error };
  // With --add-root, nix-instantiate prints the root, a link to the derivation.
  const drvPath = rootsDir === undefined ? drv.out : realpathSync(drv.out);
  const line: Record<string, unknown> = { ...head, drvPath, ...(info.value as object) };
  if (!withMeta) return line;
  const meta = evalJson(`${at}.meta or { }`);
  return meta.ok ? { ...line, meta: meta.value } : { ...head, error: meta.error };
}

const names = evalJson(`builtins.attrNames ${value}`);
if (!names.ok) {
  process.stderr.write(`${names.error}\n`);
  process.exit(1);
}
let printed = 0;
for (const name of names.value as string[]) {
  const line = JSON.stringify(job(name));
  if (printed >= faultAfter) {
    if (fault === 'exit-after') {
      process.stderr.write('error: worker died unexpectedly\n');
      process.exit(1);
    }
    if (fault === 'kill-after') process.kill(process.pid, 'SIGKILL');
    if (fault === 'cut-after') {
      process.stdout.write(line.slice(0, Math.floor(line.length / 2)), () => process.exit(0));
      break;
    }
  }
  process.stdout.write(`${line}\n`);
  printed++;
}
