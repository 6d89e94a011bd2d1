import { createHash } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { argBatches, runNixChecked } from '../common/nix/cli.js';
import { ekaci } from './support/cli.js';
import { nonce, tempDir } from './support/nix-project.js';

/**
 * The shape of nearly every nixpkgs pull request: a closure of tens of thousands of derivations of which almost all
 * are built already, and one new derivation on top, built with `ekaci build` as a user would. Here 29,700 leaves and
 * 300 derivations above them (99 leaves each) whose outputs are valid in the store — fixed-output derivations
 * whose content was added beforehand, so nothing builds them — and `top` above those. Every command that takes
 * their paths must cope with their number: one command line cannot hold 30,000 store paths (E2BIG).
 *
 * One agent, on the machine's store, as on a builder that has the closure already: the coordinator's side is what
 * is tested here.
 */

const MIDS = 300;
const LEAVES_PER_MID = 99;

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

describe('a closure of 30,001 derivations, 30,000 of them built already', () => {
  it('builds the one that is not, and finds the others built', async () => {
    const dir = tempDir('ekaci-closure-');
    const contents = join(dir, 'contents');
    mkdirSync(contents);
    // The same leaves in every run (the store keeps them); `top` is new each time.
    const leaves = Array.from({ length: MIDS * LEAVES_PER_MID }, (_, i) =>
      fixed(contents, `ekaci-closure-scale-leaf-${pad(i)}`, `ekaci closure-scale leaf ${i}\n`),
    );
    const mids = Array.from({ length: MIDS }, (_, m) =>
      fixed(contents, `ekaci-closure-scale-mid-${pad(m)}`, `ekaci closure-scale mid ${m}\n`),
    );
    // Their outputs become valid paths: a fixed-output derivation's output is its content's path, whoever added it.
    for (const batch of argBatches([...leaves, ...mids].map((f) => join(contents, f.name)))) {
      await runNixChecked('nix-store', ['--add-fixed', 'sha256', ...batch]);
    }
    const quoted = (fs: Fixed[]): string => fs.map((f) => `"${f.hash}"`).join('\n');
    const file = join(dir, 'default.nix');
    writeFileSync(
      file,
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
          (builtins.genList (j: leaf (m * ${LEAVES_PER_MID} + j)) ${LEAVES_PER_MID});
      in {
        top = derivation {
          name = "closure-top-${nonce()}";
          system = builtins.currentSystem;
          builder = "/bin/sh";
          args = [ "-c" "echo built > $out" ];
          mids = builtins.genList mid ${MIDS};
          passAsFile = [ "mids" ];
        };
      }`,
    );

    const r = await ekaci(['build', file, '-A', 'top', '--agents', '1', '--json', '--data-dir', join(dir, 'data')]);

    expect(r.stderr).not.toMatch(/E2BIG/);
    expect(r.code, r.stderr).toBe(0);
    const { builds } = JSON.parse(r.stdout) as { builds: Array<{ attr: string; state: string }> };
    expect(builds).toEqual([expect.objectContaining({ attr: 'top', state: 'succeeded' })]);
  }, 900_000);
});
