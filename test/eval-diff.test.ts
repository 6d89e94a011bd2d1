import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ekaci, git } from './support/cli.js';
import { nonce, tempDir } from './support/nix-project.js';

function packageSet(tag: string, body: string): string {
  return `let mk = name: deps: derivation {
  name = "\${name}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo \${name} $deps > $out" ]; inherit deps;
};
in rec {
${body}
}
`;
}

/** A repository with a base and a head commit of a small package set, its config under `.ekaci/`. */
function makeRepo(): { repo: string; base: string; head: string } {
  const repo = tempDir('ekaci-eval-repo-');
  const tag = nonce();
  git(repo, 'init', '-q');
  mkdirSync(join(repo, '.ekaci'));
  mkdirSync(join(repo, 'ci'));
  // Root-absolute job file: a path inside the repository.
  writeFileSync(join(repo, '.ekaci', 'config.json'), JSON.stringify({ jobs: { main: { file: '/ci/jobs.nix' } } }));
  // On lines of their own, the same in both commits: Nix's messages quote the lines around an error.
  const common = `
  app = mk "app" [ lib ]; tool = mk "tool" [ app ]; same = mk "same" [ ];
  typo = 1 + "a";
  unmaintained = mk "unmaintained" [ lib ] // { meta.maintainers = with { }; [ nobody ]; };
  `;
  writeFileSync(
    join(repo, 'ci', 'jobs.nix'),
    packageSet(tag, `lib = mk "lib" [ ]; gone = mk "gone" [ ]; broken = throw "broken in base"; ${common}`),
  );
  git(repo, 'add', '-A');
  git(repo, 'commit', '-qm', 'base');
  const base = git(repo, 'rev-parse', 'HEAD');
  writeFileSync(
    join(repo, 'ci', 'jobs.nix'),
    packageSet(tag, `lib = mk "lib-2" [ ]; fresh = mk "fresh" [ ]; broken = abort "still broken"; ${common}`),
  );
  git(repo, 'commit', '-qam', 'head');
  return { repo, base, head: git(repo, 'rev-parse', 'HEAD') };
}

interface DiffJson {
  jobs: Array<{
    name: string;
    attrs: Array<{ attr: string; change: string; blastRadius: number; evalError?: Record<string, string> }>;
    rebuildCountBySystem: Record<string, number>;
  }>;
}

describe('ekaci eval and ekaci diff', () => {
  it('evaluates a commit of a git repository, isolating the attribute that fails', async () => {
    const { repo, head } = makeRepo();
    const r = await ekaci(['eval', '--repo', repo, '--rev', head, '--json', '--data-dir', tempDir()]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(1); // an attribute failed and the job does not allow evaluation failures
    const json = JSON.parse(r.stdout) as { jobs: Array<{ name: string; attrs: Array<Record<string, unknown>> }> };
    expect(json.jobs.map((j) => j.name)).toEqual(['main']);
    const attrs: Record<string, Record<string, unknown>> = Object.fromEntries(
      json.jobs[0]!.attrs.map((a) => [String(a.attr), a]),
    );
    expect(Object.keys(attrs).sort()).toEqual([
      'app',
      'broken',
      'fresh',
      'lib',
      'same',
      'tool',
      'typo',
      'unmaintained',
    ]);
    expect(attrs.broken?.error).toMatch(/still broken/);
    // Named as the repository names the file, not by the checkout's path.
    expect(attrs.typo?.error).toMatch(/at ci\/jobs\.nix:\d+:\d+/);
    // A meta field that fails never hides the derivation.
    expect(attrs.unmaintained?.drv).toMatch(/-unmaintained-.*\.drv$/);
    expect(attrs.unmaintained?.metaErrors).toMatchObject({
      maintainers: expect.stringMatching(/undefined variable 'nobody'/) as unknown,
    });
    expect(attrs.tool?.drv).toMatch(/-tool-.*\.drv$/);
    expect(attrs.tool?.outputs).toMatchObject({ out: expect.stringMatching(/-tool-/) as unknown });
  });

  it('classifies every attribute and counts what the change rebuilds, including changes through a dependency', async () => {
    const { repo, base, head } = makeRepo();
    const dataDir = tempDir();
    const r = await ekaci(['diff', '--repo', repo, '--base', base, '--head', head, '--json', '--data-dir', dataDir]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const [job] = (JSON.parse(r.stdout) as DiffJson).jobs;
    const by = Object.fromEntries(job!.attrs.map((a) => [a.attr, a]));
    expect(by.lib).toMatchObject({ change: 'changed', blastRadius: 3 }); // app, tool and unmaintained depend on it
    expect(by.app).toMatchObject({ change: 'changed', blastRadius: 1 }); // changed only through lib
    expect(by.tool).toMatchObject({ change: 'changed', blastRadius: 0 });
    expect(by.same).toMatchObject({ change: 'unchanged' });
    // The same error at the same place in both commits, though each commit is checked out at a path of its own.
    expect(by.typo).toMatchObject({ change: 'unchanged' });
    // Its meta.maintainers throws in both commits, but its derivation changed with lib: it must be rebuilt.
    expect(by.unmaintained).toMatchObject({ change: 'changed' });
    expect(by.fresh).toMatchObject({ change: 'added' });
    expect(by.gone).toMatchObject({ change: 'removed' });
    expect(by.broken?.evalError).toEqual({
      base: expect.stringMatching(/broken in base/) as unknown,
      head: expect.stringMatching(/still broken/) as unknown,
    });
    // lib-2, app, tool, unmaintained and fresh are new derivations
    expect(Object.values(job!.rebuildCountBySystem)).toEqual([5]);

    // The diff is stored: asked again, it is read back instead of evaluating both commits (which would root
    // their derivations under gcroots/ again).
    rmSync(join(dataDir, 'gcroots'), { recursive: true, force: true });
    const again = await ekaci([
      'diff',
      '--repo',
      repo,
      '--base',
      base,
      '--head',
      head,
      '--json',
      '--data-dir',
      dataDir,
    ]);
    expect(again.stderr).toBe('');
    expect(again.code).toBe(0);
    expect(JSON.parse(again.stdout)).toEqual(JSON.parse(r.stdout));
    expect(existsSync(join(dataDir, 'gcroots'))).toBe(false);
  });

  it('evaluates a flake job (config under .eka-ci/) for the local system', async () => {
    const repo = tempDir('ekaci-eval-flake-');
    const tag = nonce();
    git(repo, 'init', '-q');
    mkdirSync(join(repo, '.eka-ci'));
    writeFileSync(
      join(repo, '.eka-ci', 'config.json'),
      JSON.stringify({ jobs: { flake: { flake: { outputs: ['packages', 'checks'] } } } }),
    );
    const pkg = (name: string): string =>
      `derivation { name = "${name}-${tag}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }`;
    writeFileSync(
      join(repo, 'flake.nix'),
      `{ outputs = { self }: { packages.x86_64-linux.hello = ${pkg('hello')}; checks.x86_64-linux.t = ${pkg('t')}; }; }`,
    );
    git(repo, 'add', '-A');
    git(repo, 'commit', '-qm', 'flake');
    const r = await ekaci(['eval', '--repo', repo, '--rev', 'HEAD', '--json', '--data-dir', tempDir()]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const json = JSON.parse(r.stdout) as { jobs: Array<{ attrs: Array<{ attr: string; drv?: string }> }> };
    expect(json.jobs[0]!.attrs.map((a) => a.attr)).toEqual(['checks.x86_64-linux.t', 'packages.x86_64-linux.hello']);
    expect(json.jobs[0]!.attrs.every((a) => a.drv?.endsWith('.drv'))).toBe(true);
  });

  it('refuses a revision without an eka-ci configuration with exit 2', async () => {
    const repo = tempDir('ekaci-eval-empty-');
    git(repo, 'init', '-q');
    writeFileSync(join(repo, 'README'), 'nothing here');
    git(repo, 'add', '-A');
    git(repo, 'commit', '-qm', 'no config');
    const r = await ekaci(['eval', '--repo', repo, '--rev', 'HEAD', '--data-dir', tempDir()]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/no eka-ci configuration/);
  });
});
