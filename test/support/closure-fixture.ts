import { createHash } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { argBatches, runNixChecked } from '../../common/nix/cli.js';

/**
 * The shape of nearly every nixpkgs pull request: a closure of tens of thousands of derivations of which almost all
 * are built already, and one new derivation on top. Here `mids × leavesPerMid` leaves and `mids` derivations above
 * them (each referring to its leaves) whose outputs are valid in the store — fixed-output derivations whose content
 * was added beforehand, so nothing builds them — and `top` above those, new for every tag.
 */
export interface ClosureShape {
  mids: number;
  leavesPerMid: number;
}

/** The nixpkgs pull request's shape: 29,700 leaves, 300 above them, `top`: 30,001 derivations. */
export const PULL_REQUEST_CLOSURE: ClosureShape = { mids: 300, leavesPerMid: 99 };

interface Fixed {
  name: string;
  content: string;
  hash: string;
}

// Names as long as nixpkgs' on average (python3.12-setuptools-75.1.0): 30,000 such paths are more than the 2 MiB
// a command line may hold.
const pad = (i: number): string => String(i).padStart(5, '0');

function fixed(dir: string, name: string, content: string): Fixed {
  writeFileSync(join(dir, name), content);
  return { name, content, hash: createHash('sha256').update(content).digest('hex') };
}

/**
 * Adds the leaves' and mids' outputs to the store (the same in every run: the store keeps them) and writes
 * `<dir>/<file>`, whose attribute `top` is `closure-top-<tag>` above them all; returns the file's path.
 */
export async function writeClosure(
  dir: string,
  shape: ClosureShape,
  tag: string,
  file = 'default.nix',
): Promise<string> {
  const { mids: midCount, leavesPerMid } = shape;
  const contents = join(dir, 'contents');
  mkdirSync(contents, { recursive: true });
  const leaves = Array.from({ length: midCount * leavesPerMid }, (_, i) =>
    fixed(contents, `ekaci-closure-scale-leaf-${pad(i)}`, `ekaci closure-scale leaf ${i}\n`),
  );
  const mids = Array.from({ length: midCount }, (_, m) =>
    fixed(contents, `ekaci-closure-scale-mid-${pad(m)}`, `ekaci closure-scale mid ${m}\n`),
  );
  // Their outputs become valid paths: a fixed-output derivation's output is its content's path, whoever added it.
  for (const batch of argBatches([...leaves, ...mids].map((f) => join(contents, f.name)))) {
    await runNixChecked('nix-store', ['--add-fixed', 'sha256', ...batch]);
  }
  const quoted = (fs: Fixed[]): string => fs.map((f) => `"${f.hash}"`).join('\n');
  const path = join(dir, file);
  writeFileSync(
    path,
    `let
      fixed = name: hash: inputs: derivation {
        inherit name inputs;
        passAsFile = [ "inputs" ];
        system = builtins.currentSystem;
        builder = "/bin/sh";
        args = [ "-c" "exit 1" ];
        outputHashMode = "flat";
        outputHashAlgo = "sha256";
        outputHash = hash;
      };
      leafHashes = [
${quoted(leaves)}
      ];
      midHashes = [
${quoted(mids)}
      ];
      pad = i: let s = toString i; in builtins.substring 0 (5 - builtins.stringLength s) "00000" + s;
      leaf = i: fixed "ekaci-closure-scale-leaf-\${pad i}" (builtins.elemAt leafHashes i) [ ];
      mid = m: fixed "ekaci-closure-scale-mid-\${pad m}" (builtins.elemAt midHashes m)
        (builtins.genList (j: leaf (m * ${leavesPerMid} + j)) ${leavesPerMid});
    in {
      top = derivation {
        name = "closure-top-${tag}";
        system = builtins.currentSystem;
        builder = "/bin/sh";
        args = [ "-c" "echo built > $out" ];
        mids = builtins.genList mid ${midCount};
        passAsFile = [ "mids" ];
      };
    }`,
  );
  return path;
}
