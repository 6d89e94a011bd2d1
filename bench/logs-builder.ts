/**
 * The builder of bench/logs: a plain `/bin/sh` derivation (no nixpkgs) that prints a long build log fast, with
 * marker lines that carry the builder's clock, and records what it printed so that every reader can be checked
 * against it.
 *
 * A shell loop that starts a process per line or per marker is far too slow here (a fork and exec costs 5–20 ms on
 * this machine under load), so the script starts only two helper processes and prints everything itself:
 *
 * - the filler is one block of numbered compiler-style lines, built once in a shell variable by appending
 *   `PERIOD_LINES` lines and then doubling, and printed with the `printf` builtin (one `write` per block);
 * - a marker's time comes from one `date -f FIFO +%s%N` co-process that stamps every `now` the script writes to it
 *   (`stdbuf -oL` so that it answers each line at once): no process per marker;
 * - everything goes through `tee` into a file of the build directory; once the log is written, its SHA-256 and
 *   length go to `$out`, the builder's own account of the bytes it wrote.
 *
 * The log: `START`, then `blocks` × (block, `MARK i`), `END`, a pause for the pipeline to drain, then `trickle` lines
 * `TRICKLE j` 50 ms apart (a quiet build that prints now and then). Every marker line is `@@EKACI-BENCH KIND I NS`,
 * NS the builder's CLOCK_REALTIME in nanoseconds when it printed the line.
 *
 * With `gate` set the builder waits for that file before it prints anything (the followers attach first), and for
 * `$gate.quiet` before its quiet lines.
 * Builders have no PATH: every program is called by its full path; without Nix's sandbox (this machine's
 * `sandbox = false`) they are the host's coreutils.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

export const MARKER = '@@EKACI-BENCH ';
export type MarkerKind = 'START' | 'MARK' | 'END' | 'TRICKLE';

// Distinct lines before the block repeats: varied enough that nothing downstream (Nix's bzip2 of the log) sees a
// degenerate input, few enough that building the block costs the shell a few milliseconds.
const PERIOD_LINES = 64;
// Without a gate (the pipe baseline), the pause between the last flood marker and the first quiet line, for the
// pipe to drain; with one, the builder waits for `$gate.quiet` instead, which the bench creates once every follower
// has seen the end of the flood: the quiet lines then measure the idle path, not the flood's backlog.
const DRAIN_PAUSE_S = 1;
const TRICKLE_INTERVAL_S = 0.05;

/** One filler line: what a C compiler's quiet build prints, about 110 bytes. */
function fillerLine(index: string): string {
  return `  CC       src/module-${index}.o  -O2 -pipe -Wall -Wextra -fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIC -c`;
}

export interface LogShape {
  /** Filler bytes between two markers. */
  blockBytes: number;
  /** Copies of the period per block. */
  copies: number;
  blocks: number;
  trickle: number;
}

/** The shape of a log of about `totalBytes` with a marker every `markBytes`. */
export function logShape(totalBytes: number, markBytes: number, trickle: number): LogShape {
  let periodBytes = 0;
  for (let i = 0; i < PERIOD_LINES; i++) periodBytes += fillerLine(String(i)).length + 1;
  const copies = Math.max(1, Math.round(markBytes / periodBytes));
  const blockBytes = copies * periodBytes;
  return { blockBytes, copies, blocks: Math.max(1, Math.round(totalBytes / blockBytes)), trickle };
}

/** The builder's script; its parameters come from the environment (the derivation's attributes). */
export const BUILDER_SCRIPT = `
nl='
'
p=''
i=0
while [ $i -lt ${PERIOD_LINES} ]; do p="$p${fillerLine('$i')}$nl"; i=$((i+1)); done
s=''
n=$copies
while [ $n -gt 0 ]; do
  if [ $((n % 2)) -eq 1 ]; then s="$s$p"; fi
  p="$p$p"
  n=$((n / 2))
done
/bin/mkfifo ask tell
/usr/bin/stdbuf -oL /bin/date -f ask +%s%N > tell &
exec 4<tell 3>ask
if [ -n "$gate" ]; then while [ ! -e "$gate" ]; do /bin/sleep 0.01; done; fi
{
  echo now >&3; read t <&4; echo "${MARKER}START 0 $t"; echo "start $t" > stamps
  i=0
  while [ $i -lt $blocks ]; do
    printf '%s' "$s"
    echo now >&3; read t <&4; echo "${MARKER}MARK $i $t"
    i=$((i+1))
  done
  echo now >&3; read t <&4; echo "${MARKER}END 0 $t"; echo "end $t" >> stamps
  if [ $trickle -gt 0 ]; then
    if [ -n "$gate" ]; then while [ ! -e "$gate.quiet" ]; do /bin/sleep 0.01; done; else /bin/sleep ${DRAIN_PAUSE_S}; fi
  fi
  j=0
  while [ $j -lt $trickle ]; do
    /bin/sleep ${TRICKLE_INTERVAL_S}
    echo now >&3; read t <&4; echo "${MARKER}TRICKLE $j $t"
    j=$((j+1))
  done
} | /bin/tee log.copy
exec 3>&-
wait
sum=$(/bin/sha256sum < log.copy)
echo "sha256 $sum" > "$out"
echo "bytes $(/bin/stat -c %s log.copy)" >> "$out"
/bin/cat stamps >> "$out"
/bin/rm log.copy
`;

/** The environment the script reads. */
export function builderEnv(shape: LogShape, gate: string): Record<string, string> {
  return { copies: String(shape.copies), blocks: String(shape.blocks), trickle: String(shape.trickle), gate };
}

/** A Nix string literal of `s` (JSON's escapes are Nix's, but for `${`, which starts an interpolation in Nix). */
function nixString(s: string): string {
  return JSON.stringify(s).replaceAll('${', '\\${');
}

/** Writes `default.nix` with one attribute per build; each name carries `tag`, so every run really builds. */
export function writeBuilderNix(
  dir: string,
  tag: string,
  builds: Record<string, { shape: LogShape; gate: string }>,
): string {
  const attrs = Object.entries(builds).map(([attr, { shape, gate }]) => {
    const env = Object.entries(builderEnv(shape, gate))
      .map(([k, v]) => `${k} = ${nixString(v)};`)
      .join(' ');
    return `  ${attr} = mk "${attr}" { ${env} };`;
  });
  const file = join(dir, 'default.nix');
  writeFileSync(
    file,
    `let
  mk = name: env: derivation (env // {
    name = "ekaci-bench-logs-\${name}-${tag}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ${nixString(BUILDER_SCRIPT)} ];
  });
in {
${attrs.join('\n')}
}
`,
  );
  return file;
}

export interface BuilderAccount {
  sha256: string;
  bytes: number;
  /** The builder's clock (ms) when it printed `START` and `END`. */
  startedAt: number;
  endedAt: number;
}

/** What the builder recorded in `$out`: the SHA-256 and length of everything it printed, and when it printed. */
export function parseBuilderOutput(text: string): BuilderAccount {
  const field = (name: string, pattern: string): string => {
    const m = new RegExp(`^${name} (${pattern})`, 'm').exec(text);
    if (!m) throw new Error(`the builder's output has no ${name}: ${JSON.stringify(text)}`);
    return m[1]!;
  };
  return {
    sha256: field('sha256', '[0-9a-f]{64}'),
    bytes: Number(field('bytes', '\\d+')),
    startedAt: nsToMs(field('start', '\\d+')),
    endedAt: nsToMs(field('end', '\\d+')),
  };
}

/** The builder's clock in nanoseconds (`date +%s%N`) as milliseconds; a double keeps microseconds at today's epoch. */
export function nsToMs(ns: string): number {
  return ns.length > 6 ? Number(ns.slice(0, -3)) / 1000 : Number(ns) / 1e6;
}

/** Bytes from the first byte of `START` to the newline of `END`: what the throughput figures divide by. */
export function floodBytes(shape: LogShape): number {
  const stamp = 19; // nanoseconds since 1970, until 2286
  const marker = (kind: MarkerKind, index: number): number => `${MARKER}${kind} ${index} `.length + stamp + 1;
  let bytes = marker('START', 0) + marker('END', 0) + shape.blocks * shape.blockBytes;
  for (let i = 0; i < shape.blocks; i++) bytes += marker('MARK', i);
  return bytes;
}
