import { readFileSync, rmSync } from 'node:fs';
import { basename } from 'node:path';
import type Database from 'better-sqlite3';
import { NO_SUBSTITUTERS, runNixChecked } from '../../../common/nix/cli.js';
import { nonce, tempDir, writeNixFile } from '../../support/nix-project.js';

/**
 * What the faulted builds build: plain `/bin/sh` derivations whose builders print a known log (every line tagged,
 * so the stored log can be checked line by line for loss and duplication) before writing their output.
 */

/** Prefix of every line a builder of the suite prints: Nix's own lines in the log are told apart by it. */
export const MARK = 'EKFL';

/** The lines a derivation's builder prints, `\n` included. */
export function builderLines(name: string, lines: number): string[] {
  return Array.from({ length: lines }, (_, i) => `${MARK} ${name} ${i + 1}/${lines} ${'.'.repeat(60)}\n`);
}

/**
 * A builder that prints `lines` tagged lines, half of them, a pause (so kills and partitions find logs in flight),
 * the rest, reads its inputs and writes its output. `extra` runs before the output is written.
 */
export function loggingScript(
  name: string,
  lines: number,
  opts: { pause?: string; extra?: string; output?: string } = {},
): string {
  const half = Math.floor(lines / 2);
  const dots = '.'.repeat(60);
  const print = (from: number, to: number): string =>
    `i=${from}; while [ $i -le ${to} ]; do echo "${MARK} ${name} $i/${lines} ${dots}"; i=$((i+1)); done`;
  return [
    print(1, half),
    opts.pause ?? '/bin/sleep 0.1',
    print(half + 1, lines),
    'for d in $deps; do /bin/cat $d > /dev/null; done',
    opts.extra ?? '',
    opts.output ?? `echo ${name} > $out`,
  ].join('\n');
}

/**
 * A builder the test steers through files in `gate` (a directory of the test's; builders run outside a sandbox
 * and see the machine's /tmp): it appends its pid to `pids-NAME`, prints half its lines, touches `started-NAME`,
 * waits for `release-NAME`, prints the rest, touches `printed-NAME`, waits for `finish-NAME` when `finishGate`,
 * and writes its output (`output`, a command, replaces the default one-line output). With `ignoreTerm` the builder and everything it runs ignore SIGTERM.
 */
export function gatedScript(
  name: string,
  lines: number,
  gate: string,
  opts: { finishGate?: boolean; ignoreTerm?: boolean; output?: string } = {},
): string {
  const wait = (file: string): string => `while [ ! -e ${gate}/${file}-${name} ]; do /bin/sleep 0.05; done`;
  return [
    opts.ignoreTerm ? 'trap "" TERM' : '',
    `echo $$ >> ${gate}/pids-${name}`,
    loggingScript(name, lines, {
      pause: [`: > ${gate}/started-${name}`, wait('release')].join('\n'),
      extra: [`: > ${gate}/printed-${name}`, opts.finishGate ? wait('finish') : ''].join('\n'),
      ...(opts.output ? { output: opts.output } : {}),
    }),
  ].join('\n');
}

/** One derivation per name, each with `script(name)`. */
export function flatBody(names: readonly string[], script: (name: string) => string, attrs = ''): NixBody {
  return `{\n${names.map((n) => `  ${n} = mk "${n}" { ${attrs} script = ''\n${script(n)}\n''; };`).join('\n')}\n}`;
}

/** A Nix attribute set body whose attributes are `mk` calls; see test/support/nix-project.ts. */
export type NixBody = string;

/** A layered DAG: `count` derivations in layers of `width`, each needing two of the layer before. */
export function dagBody(count: number, width: number, lines: number): { body: NixBody; names: string[] } {
  const names = Array.from({ length: count }, (_, i) => `d${i}`);
  const attrs = names.map((name, i) => {
    const layer = Math.floor(i / width);
    const deps =
      layer === 0
        ? []
        : [...new Set([(layer - 1) * width + (i % width), (layer - 1) * width + ((i * 7 + 3) % width)])].map(
            (j) => names[j]!,
          );
    return `  ${name} = mk "${name}" { deps = [ ${deps.join(' ')} ]; script = ''\n${loggingScript(name, lines)}\n''; };`;
  });
  return { body: `rec {\n${attrs.join('\n')}\n}`, names };
}

/** Writes the body with a fresh tag (no two runs share a store path) and instantiates `attrs` in the machine's store. */
export async function instantiate(body: NixBody, attrs: readonly string[]): Promise<Map<string, string>> {
  const dir = tempDir('ekaci-faults-nix-');
  const file = writeNixFile(dir, nonce(), body);
  let out: string;
  try {
    out = await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, ...attrs.flatMap((a) => ['-A', a])]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const paths = out.trim().split('\n');
  if (paths.length !== attrs.length)
    throw new Error(`nix-instantiate printed ${paths.length} paths for ${attrs.length}`);
  return new Map(attrs.map((a, i) => [a, paths[i]!]));
}

/** The derivation's name as Nix built it (`d7-<tag>`): the attribute name is the first part. */
export function attrOfDrv(drvPath: string): string {
  return basename(drvPath)
    .slice(33)
    .replace(/-[0-9a-f]{12}\.drv$/, '');
}

export interface LogAudit {
  /** Builder bytes missing from the stored log (lines absent). */
  missingBytes: number;
  /** Builder lines stored more than once. */
  duplicatedLines: number;
  /** Builder lines out of order. */
  disorderedLines: number;
}

/** Compares a stored log with what the builder printed: Nix's own lines may surround the builder's. */
export function auditLog(stored: string, expected: readonly string[]): LogAudit {
  const found = stored
    .split('\n')
    .filter((l) => l.startsWith(`${MARK} `))
    .map((l) => `${l}\n`);
  const wanted = new Map(expected.map((l, i) => [l, i]));
  const seen = new Map<string, number>();
  let disordered = 0;
  let last = -1;
  for (const l of found) {
    seen.set(l, (seen.get(l) ?? 0) + 1);
    const index = wanted.get(l) ?? -1;
    if (index < last) disordered++;
    last = Math.max(last, index);
  }
  let missingBytes = 0;
  for (const l of expected) if (!seen.has(l)) missingBytes += Buffer.byteLength(l);
  const duplicatedLines = [...seen.values()].reduce((n, c) => n + Math.max(0, c - 1), 0);
  return { missingBytes, duplicatedLines, disorderedLines: disordered };
}

interface AttemptRow {
  lease_id: string;
  drv_path: string;
  attempt: number;
  agent_id: string;
  state: string;
  log_path: string;
  log_bytes: number;
  error: string | null;
}

export interface BuildAudit {
  derivations: number;
  /** Derivations that did not end `succeeded`. */
  lost: Array<{ drvPath: string; state: string; error: string | null }>;
  /** Derivations with more than one succeeded attempt or more than one `succeeded` event. */
  duplicated: Array<{ drvPath: string; succeededAttempts: number; succeededEvents: number }>;
  /** Succeeded attempts whose stored log misses, repeats or reorders builder lines, or whose byte count is off. */
  badLogs: Array<{ drvPath: string; attempt: number; audit: LogAudit; fileBytes: number; recordedBytes: number }>;
  logBytesLost: number;
  attempts: Record<string, number>;
  /** Attempts that did not succeed, with why: what the faults cost. */
  retried: Array<{ drvPath: string; attempt: number; agent: string; state: string; error: string | null }>;
}

/**
 * Reads the coordinator's database: each derivation must have ended `succeeded` once — one succeeded attempt, one
 * `succeeded` event — and the log of that attempt must hold every line its builder printed, once and in order.
 * `logFile` maps a recorded log path to where the test can read it.
 */
export function auditBuilds(
  db: Database.Database,
  drvs: ReadonlyMap<string, string>,
  lines: number,
  logFile: (recorded: string) => string = (p) => p,
): BuildAudit {
  const audit: BuildAudit = {
    derivations: drvs.size,
    lost: [],
    duplicated: [],
    badLogs: [],
    logBytesLost: 0,
    attempts: {},
    retried: [],
  };
  const derivation = db.prepare('SELECT state, error FROM derivations WHERE drv_path = ?');
  const attempts = db.prepare('SELECT * FROM attempts WHERE drv_path = ? ORDER BY attempt');
  const events = db.prepare("SELECT COUNT(*) AS n FROM events WHERE drv_path = ? AND state = 'succeeded'");
  for (const [name, drvPath] of drvs) {
    const row = derivation.get(drvPath) as { state: string; error: string | null } | undefined;
    if (row?.state !== 'succeeded')
      audit.lost.push({ drvPath, state: row?.state ?? 'unknown', error: row?.error ?? null });
    const all = attempts.all(drvPath) as AttemptRow[];
    for (const a of all) {
      audit.attempts[a.state] = (audit.attempts[a.state] ?? 0) + 1;
      if (a.state !== 'succeeded') {
        audit.retried.push({ drvPath, attempt: a.attempt, agent: a.agent_id, state: a.state, error: a.error });
      }
    }
    const succeeded = all.filter((a) => a.state === 'succeeded');
    const succeededEvents = (events.get(drvPath) as { n: number }).n;
    if (succeeded.length > 1 || succeededEvents > 1) {
      audit.duplicated.push({ drvPath, succeededAttempts: succeeded.length, succeededEvents });
    }
    const expected = builderLines(name, lines);
    for (const a of succeeded) {
      let stored = Buffer.alloc(0);
      try {
        stored = readFileSync(logFile(a.log_path));
      } catch {
        // an absent log is an empty one
      }
      const log = auditLog(stored.toString('utf8'), expected);
      audit.logBytesLost += log.missingBytes;
      if (log.missingBytes > 0 || log.duplicatedLines > 0 || log.disorderedLines > 0 || stored.length !== a.log_bytes) {
        audit.badLogs.push({
          drvPath,
          attempt: a.attempt,
          audit: log,
          fileBytes: stored.length,
          recordedBytes: a.log_bytes,
        });
      }
    }
  }
  return audit;
}
