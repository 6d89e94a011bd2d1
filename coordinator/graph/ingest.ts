import {
  detached,
  isFixedOutput,
  loadDerivationClosure,
  outputPaths,
  preferLocalBuild,
  requiredSystemFeatures,
} from '../../common/nix/derivation.js';
import type { NewDerivation } from '../scheduler/build-store.js';

/**
 * Reads the closure of `roots` by parsing `.drv` files in-process, skipping derivations the caller already
 * knows. Returns them inputs-first (every derivation after all of its inputs that are in the result).
 */
export async function readClosure(roots: string[], known: (drvPath: string) => boolean): Promise<NewDerivation[]> {
  const nodes = await loadDerivationClosure(roots, known, (d, drvPath): NewDerivation => {
    // Kept for the whole build: copies, not slices of the .drv texts (see `detached`).
    const outputs = outputPaths(d);
    for (const name of Object.keys(outputs)) outputs[name] = detached(outputs[name]!);
    return {
      drvPath,
      system: detached(d.system),
      requiredFeatures: requiredSystemFeatures(d).map(detached),
      fixedOutput: isFixedOutput(d),
      preferLocal: preferLocalBuild(d),
      inputs: Object.keys(d.inputDrvs),
      outputs,
    };
  });
  return topologicalOrder(nodes);
}

/** Inputs before dependents; iterative, since real dependency chains run thousands deep. */
export function topologicalOrder(nodes: ReadonlyMap<string, NewDerivation>): NewDerivation[] {
  const order: NewDerivation[] = [];
  const done = new Set<string>();
  for (const start of nodes.values()) {
    if (done.has(start.drvPath)) continue;
    const stack: Array<{ node: NewDerivation; next: number }> = [{ node: start, next: 0 }];
    done.add(start.drvPath);
    while (stack.length > 0) {
      const top = stack[stack.length - 1]!;
      const input = top.node.inputs[top.next++];
      if (input === undefined) {
        stack.pop();
        order.push(top.node);
        continue;
      }
      const child = nodes.get(input);
      if (child && !done.has(input)) {
        done.add(input);
        stack.push({ node: child, next: 0 });
      }
    }
  }
  return order;
}
