import { randomUUID } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NO_SUBSTITUTERS, runNixChecked } from '../../common/nix/cli.js';
import { readClosure } from './ingest.js';

// A full collection on demand, so that what stays reachable can be measured.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const DERIVATIONS = 40;
// Each .drv carries this much text in one variable, as package sets' long phases and patches do.
const BLOB_BYTES = 256 * 1024;
const MiB = 2 ** 20;

let dir: string;
let roots: string[];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-ingest-test-'));
  const nonce = randomUUID().slice(0, 8);
  // A chain, so that inputs are read through `inputDrvs` as well as from the roots.
  const file = join(dir, 'chain.nix');
  await writeFile(
    file,
    `let blob = i: builtins.concatStringsSep "" (builtins.genList (j: "\${toString i}-\${toString j};") ${BLOB_BYTES / 8});
       mk = i: prev: derivation {
         name = "ingest-${nonce}-\${toString i}"; system = builtins.currentSystem; builder = "/bin/sh";
         args = [ "-c" "echo > $out" ]; blob = blob i; inherit prev;
       };
       chain = builtins.foldl' (acc: i: [ (mk i (if acc == [] then "" else builtins.head acc)) ] ++ acc) []
         (builtins.genList (i: i) ${DERIVATIONS});
     in chain`,
  );
  const out = await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file]);
  roots = out.split('\n').filter(Boolean);
  expect(roots).toHaveLength(DERIVATIONS);
});

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('readClosure', () => {
  it('keeps none of the .drv texts it read: what it answers is held for a whole build', async () => {
    gc();
    const before = process.memoryUsage().heapUsed;
    const nodes = await readClosure(roots, () => false);
    gc();
    const kept = process.memoryUsage().heapUsed - before;
    expect(nodes).toHaveLength(DERIVATIONS);
    expect(nodes.every((n) => n.system !== '' && Object.keys(n.outputs).length === 1)).toBe(true);
    // The texts are ≥ 10 MiB; a node sliced from its text keeps all of it.
    expect(DERIVATIONS * BLOB_BYTES).toBeGreaterThanOrEqual(10 * MiB);
    expect(kept).toBeLessThan(1 * MiB);
  });

  it('answers the closure inputs first', async () => {
    const nodes = await readClosure([roots[0]!], () => false);
    expect(nodes).toHaveLength(DERIVATIONS);
    const position = new Map(nodes.map((n, i) => [n.drvPath, i]));
    for (const n of nodes)
      for (const input of n.inputs) expect(position.get(input)).toBeLessThan(position.get(n.drvPath)!);
  });
});
