import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runNixChecked } from '../../common/nix/cli.js';

/**
 * Instantiates a plain `derivation` whose builder is `/bin/sh -c SCRIPT`, named uniquely so every test really
 * builds (the store is shared with every other test on this machine). Returns the `.drv` path.
 */
export async function shellDerivation(script: string, extra = ''): Promise<string> {
  const name = `ekaci-agent-test-${randomBytes(6).toString('hex')}`;
  const dir = mkdtempSync(join(tmpdir(), 'ekaci-drv-'));
  const file = join(dir, 'default.nix');
  writeFileSync(
    file,
    `derivation { name = "${name}"; system = builtins.currentSystem; builder = "/bin/sh";` +
      ` args = [ "-c" ${nixString(script)} ]; ${extra} }\n`,
  );
  const out = await runNixChecked('nix-instantiate', ['--option', 'substituters', '', file]);
  return out.trim();
}

function nixString(text: string): string {
  return `"${text.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\$\{/g, '\\${')}"`;
}
