import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, describe, expect, it } from 'vitest';
import type { Agent } from '../agent/agent.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { NO_EXTRA_POLICY } from '../coordinator/eval/eval-options.js';
import { instantiate } from '../coordinator/eval/instantiate.js';
import { startWithAgent } from '../test/support/coordinator-harness.js';
import { testEvalEnvironment } from '../test/support/eval-environment.js';
import { nonce, tempDir } from '../test/support/nix-project.js';
import { Progress } from './progress.js';

/** A stream that says it is (or is not) a terminal, collecting what is written to it. */
function terminal(isTTY: boolean, columns = 60): { out: NodeJS.WriteStream; text: () => string } {
  const stream = new PassThrough();
  let text = '';
  stream.on('data', (b: Buffer) => (text += b.toString('utf8')));
  Object.assign(stream, { isTTY, columns });
  return { out: stream as unknown as NodeJS.WriteStream, text: () => text };
}

async function until(condition: () => boolean): Promise<void> {
  while (!condition()) await new Promise((resolve) => setTimeout(resolve, 20));
}

describe('Progress', () => {
  it('on a terminal, redraws an evaluation count in place, and leaves only the lines that stay', async () => {
    const t = terminal(true);
    const p = new Progress(t.out);
    p.line('evaluating head HEAD…');
    const counter = p.evaluating('head HEAD');
    counter.attr(false);
    counter.attr(true);
    counter.attr(false);
    await until(() => t.text().includes('head HEAD: 3 attributes, 1 evaluation errors'));
    // Each redraw moves up over the block and erases it first.
    expect(t.text()).toContain('\x1b[1F\x1b[J');
    counter.end();
    p.line('  head abc: 3 attributes, 1 evaluation errors (0.1 s)');
    expect(t.text().startsWith('evaluating head HEAD…\n')).toBe(true);
    expect(t.text().endsWith('\x1b[1F\x1b[J  head abc: 3 attributes, 1 evaluation errors (0.1 s)\n')).toBe(true);
  });

  it('without a terminal, writes plain lines and no escape codes', async () => {
    const t = terminal(false);
    const p = new Progress(t.out);
    p.line('evaluating base main…');
    const counter = p.evaluating('base main');
    counter.attr(false);
    await new Promise((resolve) => setTimeout(resolve, 300));
    counter.end();
    p.line('done');
    expect(t.text()).toBe('evaluating base main…\ndone\n');
  });
});

describe('Progress while building', () => {
  let system: { coordinator: Coordinator; agent: Agent } | undefined;
  afterAll(async () => {
    await system?.agent.stopNow();
    await system?.coordinator.stopNow();
  });

  /** A chain `eta-lib-VERSION` ← `eta-app-VERSION` of builds that take a second each; instantiated. */
  async function chain(version: string): Promise<Array<{ attr: string; drvPath: string }>> {
    const dir = tempDir('ekaci-progress-');
    writeFileSync(
      join(dir, 'default.nix'),
      `let
        mk = name: deps: derivation {
          name = "\${name}-${version}";
          system = builtins.currentSystem;
          builder = "/bin/sh";
          args = [ "-c" "/bin/sleep 1; echo \${name} $deps > $out" ];
          nonce = "${nonce()}";
          inherit deps;
        };
      in rec { lib = mk "eta-lib" [ ]; app = mk "eta-app" [ lib ]; }`,
    );
    const roots = await instantiate(join(dir, 'default.nix'), ['app'], await testEvalEnvironment(), NO_EXTRA_POLICY);
    return roots.map((r) => ({ attr: r.attr, drvPath: r.drvPath }));
  }

  it('shows the ETA of what is left from how long the same packages took before, with its critical path', async () => {
    system = await startWithAgent('a-reader-token-for-progress', 'eta-agent');
    const { manager, store } = system.coordinator;
    // Version 1.0 builds once: eta-lib and eta-app each took about a second.
    await manager.waitFor(await manager.submit(await chain('1.0'), 'first'));
    const t = terminal(true, 120);
    const p = new Progress(t.out);
    const roots = await chain('2.0');
    p.watch(manager, store);
    let built = false;
    const done = manager.waitFor(await manager.submit(roots, 'second')).then(() => (built = true));
    // Version 2.0 is new, but its packages are not: the estimate is theirs, with no guess in it.
    const shown = /about \d+ s left\n {2}critical path: eta-lib-2\.0 → eta-app-2\.0\n/;
    await until(() => shown.test(t.text()) || built);
    await done;
    p.stop();
    expect(t.text()).toMatch(shown);
    expect(t.text()).not.toContain('guessed');
    // Once everything is built, the last status line has no ETA.
    expect(t.text()).toMatch(/builds: 0 queued, 0 running, 2 done, 0 failed \(\d+:\d\d\)\n$/);
  });
});
