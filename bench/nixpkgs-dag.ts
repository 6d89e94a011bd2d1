import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { seededRandom } from '../common/prng.js';

/**
 * A generated package set shaped like nixpkgs, of exactly `total` trivial derivations (`/bin/sh` builders, no
 * nixpkgs), numbered `n0…`:
 *
 * - a bootstrap chain (stdenv's stages): each stage needs the one before; everything else needs its last stage;
 * - sources: fixed-output derivations (flat sha256 of a known string) that need only an early bootstrap stage (the
 *   one that builds curl), so they all become buildable at once while stdenv is still bootstrapping;
 * - packages in layers by depth: each needs stdenv, one package of the layer below (which puts it at that depth),
 *   its own source (most packages have one), and a heavy-tailed number of packages from the few layers below,
 *   biased towards each layer's first packages — a few libraries everything needs (glibc, zlib, openssl);
 *   layers widen quickly to a peak of ≈ total/30 and thin out to a single package at the top, which makes the
 *   critical path long;
 * - aggregate jobs (`tested`, channel blockers) that need a thousand packages each.
 */
export interface NixpkgsDag {
  total: number;
  /** Input derivations of each node, by index. */
  deps: number[][];
  kind: Array<'bootstrap' | 'source' | 'package' | 'aggregate'>;
  /** Nodes on the longest dependency chain, the aggregate job at its end included. */
  criticalPath: number;
  edges: number;
  maxInputs: number;
  /** The most dependents any one node has (stdenv's last stage). */
  maxDependents: number;
  layers: number;
  widestLayer: number;
}

// Stages of the stdenv bootstrap, and the stage that builds what fetchers need (curl).
const BOOTSTRAP_STAGES = 30;
const FETCHER_STAGE = 10;
// Package depth layers above stdenv; widths follow d^1.5·e^(-d/10), a rise to depth ≈ 15 and a long thin tail.
const LAYERS = 100;
const LAYER_SHAPE = (d: number): number => d ** 1.5 * Math.exp(-d / 10);
// Sources per package: most nixpkgs packages fetch one; wrappers, meta-packages and aliases do not.
const SOURCE_SHARE = 0.6;
// Extra package inputs: 1 + ⌊24·u⁴⌋ (mean ≈ 5.8, up to 24), from the layers this far below.
const EXTRA_INPUTS_MAX = 24;
const EXTRA_INPUTS_REACH = 8;
// Within a layer, input choices favour its first packages: index ⌊width·u^2.5⌋.
const POPULARITY_EXPONENT = 2.5;
// One aggregate job per 10,000 derivations, each needing this many packages.
const DERIVATIONS_PER_AGGREGATE = 10_000;
const AGGREGATE_INPUTS = 1_000;

export function nixpkgsDag(total: number, seed = 1): NixpkgsDag {
  const random = seededRandom(seed);
  const aggregates = Math.max(1, Math.round(total / DERIVATIONS_PER_AGGREGATE));
  const rest = total - BOOTSTRAP_STAGES - aggregates;
  if (rest < LAYERS * 2) throw new RangeError(`a nixpkgs-shaped DAG needs at least ${minimumSize()} derivations`);
  const packages = Math.round(rest / (1 + SOURCE_SHARE));
  const sources = rest - packages;

  const deps: number[][] = [];
  const kind: NixpkgsDag['kind'] = [];
  const add = (k: NixpkgsDag['kind'][number], inputs: number[]): number => {
    deps.push([...new Set(inputs)]);
    kind.push(k);
    return deps.length - 1;
  };
  for (let i = 0; i < BOOTSTRAP_STAGES; i++) add('bootstrap', i === 0 ? [] : i === 1 ? [0] : [i - 1, i - 2]);
  const stdenv = BOOTSTRAP_STAGES - 1;

  const widths = layerWidths(packages);
  const withSource = new Set(
    shuffle(
      Array.from({ length: packages }, (_, i) => i),
      random,
    ).slice(0, sources),
  );
  const layers: number[][] = [];
  let p = 0;
  for (let d = 0; d < widths.length; d++) {
    const layer: number[] = [];
    for (let i = 0; i < widths[d]!; i++, p++) {
      const inputs = [stdenv];
      if (withSource.has(p)) inputs.push(add('source', [FETCHER_STAGE]));
      if (d > 0) {
        inputs.push(pick(layers[d - 1]!, random));
        const extra = 1 + Math.floor(EXTRA_INPUTS_MAX * random() ** 4);
        for (let e = 0; e < extra; e++) {
          const below = d - 1 - Math.floor(random() * Math.min(d, EXTRA_INPUTS_REACH));
          inputs.push(pick(layers[below]!, random));
        }
      }
      layer.push(add('package', inputs));
    }
    layers.push(layer);
  }
  const allPackages = layers.flat();
  for (let a = 0; a < aggregates; a++) {
    const chosen = shuffle([...allPackages], random).slice(0, Math.min(AGGREGATE_INPUTS, allPackages.length));
    // The last package (the top of the tail) goes into every aggregate: the longest chain ends in one.
    add('aggregate', [stdenv, allPackages.at(-1)!, ...chosen]);
  }

  const depth: number[] = [];
  const dependents = new Array<number>(deps.length).fill(0);
  for (let i = 0; i < deps.length; i++) {
    depth.push(1 + Math.max(0, ...deps[i]!.map((j) => depth[j]!)));
    for (const j of deps[i]!) dependents[j]!++;
  }
  return {
    total: deps.length,
    deps,
    kind,
    criticalPath: Math.max(...depth),
    edges: deps.reduce((n, d) => n + d.length, 0),
    maxInputs: Math.max(...deps.map((d) => d.length)),
    maxDependents: Math.max(...dependents),
    layers: widths.length,
    widestLayer: Math.max(...widths),
  };
}

function minimumSize(): number {
  return BOOTSTRAP_STAGES + 1 + Math.ceil(LAYERS * 2);
}

/** Layer widths summing to `packages`, each at least 1 (the tail is the critical path). */
function layerWidths(packages: number): number[] {
  const shape = Array.from({ length: LAYERS }, (_, d) => LAYER_SHAPE(d + 1));
  const sum = shape.reduce((a, b) => a + b, 0);
  const widths = shape.map((s) => Math.max(1, Math.round((packages * s) / sum)));
  const widest = widths.indexOf(Math.max(...widths));
  widths[widest]! += packages - widths.reduce((a, b) => a + b, 0);
  return widths;
}

/** What a fixed-output source's builder writes: the agent reads it from the `.drv`, the hash is declared. */
export function sourceContent(index: number, tag: string): string {
  return `source-of-n${index}-${tag}`;
}

/** The node index in a derivation's name (`n<index>-…`). */
export const NODE_NAME = /-n(\d+)-[^/]*\.drv$/;

/** Writes the DAG as a Nix file whose attributes `n0…` are its derivations; `tag` makes every name new. */
export function writeNixpkgsDag(dir: string, dag: NixpkgsDag, tag: string): string {
  const file = join(dir, `nixpkgs-dag-${tag}.nix`);
  const lines = dag.deps.map((inputs, i) => {
    const list = inputs.map((j) => `n${j}`).join(' ');
    if (dag.kind[i] !== 'source') return `  n${i} = mk "n${i}-${dag.kind[i]}" [ ${list} ];`;
    const content = sourceContent(i, tag);
    const hash = createHash('sha256').update(content).digest('hex');
    return `  n${i} = src "n${i}-source" "${content}" "${hash}" [ ${list} ];`;
  });
  writeFileSync(
    file,
    `let
  base = name: deps: {
    name = "\${name}-${tag}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    inherit deps;
  };
  mk = name: deps: derivation (base name deps // { args = [ "-c" "echo $deps > $out" ]; });
  src = name: content: hash: deps: derivation (base name deps // {
    args = [ "-c" "printf %s \\"$content\\" > $out" ];
    inherit content;
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = hash;
  });
in rec {
${lines.join('\n')}
}
`,
  );
  return file;
}

function pick(xs: readonly number[], random: () => number): number {
  return xs[Math.floor(xs.length * random() ** POPULARITY_EXPONENT)]!;
}

function shuffle<T>(xs: T[], random: () => number): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}
