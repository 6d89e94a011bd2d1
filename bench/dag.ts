import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * A generated DAG of trivial derivations: `layers` layers of `width`, each derivation depending on two of the
 * layer below. The tag is part of every name, so a new tag means nothing is built yet.
 */
export function writeDag(dir: string, tag: string, total: number, width = 100): string {
  const layers = Math.ceil(total / width);
  const file = join(dir, `dag-${tag}.nix`);
  const lines: string[] = [];
  let n = 0;
  for (let l = 0; l < layers && n < total; l++) {
    for (let i = 0; i < width && n < total; i++, n++) {
      const deps = l === 0 ? [] : [`d${(l - 1) * width + i}`, `d${(l - 1) * width + ((i * 7 + 3) % width)}`];
      lines.push(`  d${n} = mk "d${n}" [ ${deps.join(' ')} ];`);
    }
  }
  writeFileSync(
    file,
    `let
  mk = name: deps: derivation {
    name = "\${name}-${tag}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo $deps > $out" ];
    inherit deps;
  };
in rec {
${lines.join('\n')}
}
`,
  );
  return file;
}
