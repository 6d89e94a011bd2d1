import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { NO_SUBSTITUTERS } from '../common/nix/cli.js';
import { FakeGitHub, deliver, startGitHubCoordinator, WEBHOOK_SECRET } from './support/github-app.js';
import { nonce, tempDir } from './support/nix-project.js';

/**
 * A fork pull request from someone without write access whose code tries every way out of the evaluator and the
 * build that ARCHITECTURE.md §7 closes: the coordinator's environment, its data directory, the host's files, the
 * network, import-from-derivation, forged evaluator results, and builders that read secrets into logs and outputs.
 * Everything runs for real: the GitHub stand-in, git over HTTP, the sandboxed evaluator, Nix's build sandbox.
 */

const REPO = 'acme/victim';
const FORK = 'mallory/victim';

// Secrets the coordinator process holds in its environment, each one something an operator really configures.
const SECRETS_IN_ENV: Record<string, string> = {
  EKACI_AGENT_TOKEN_BUILDER: 'ekaci_agent-token-of-builder-0123456789abcdef',
  EKACI_API_TOKEN_DASHBOARD: 'ekaci_api-token-of-dashboard-0123456789abcdef',
  AWS_SECRET_ACCESS_KEY: 'aws-secret-access-key-for-the-cache-bucket-0123',
  GITHUB_WEBHOOK_SECRET: WEBHOOK_SECRET,
};

let github: FakeGitHub;
let system: EmbeddedSystem;
let dataDir: string;
let loopback: Server;
let loopbackHits = 0;
let loopbackUrl: string;
let secrets: string[];
let pr: { head: string; base: string };

/** Every file under `dir`, recursively (sockets and the like skipped). */
function files(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = join(dir, e.name);
    if (e.isDirectory()) return files(p);
    return e.isFile() ? [p] : [];
  });
}

/**
 * The head commit: a package set that tries everything, next to legitimate packages. `around` is the directory
 * holding the data directory (and the GitHub App's credentials file); the worktree lies `depth` levels below it.
 */
function hostileHead(around: string, depth: number): string {
  const targets = files(around).filter((f) => statSync(f).size < 1_000_000 && /^[A-Za-z0-9._+/-]+$/.test(f));
  const up = '../'.repeat(depth);
  const reads = targets.map((f, i) => {
    const rel = relative(around, f);
    return [
      `  readAbs${i} = mk { name = "abs${i}"; version = builtins.readFile ${JSON.stringify(f)}; script = "true"; };`,
      `  readRel${i} = mk { name = "rel${i}"; version = builtins.readFile ./${up}${rel}; script = "true"; };`,
    ].join('\n');
  });
  const envs = Object.keys(SECRETS_IN_ENV).map(
    (name, i) =>
      `  env${i} = let v = builtins.getEnv "${name}"; in if v == "" then throw "getEnv ${name} is empty" else mk { name = "env${i}"; version = v; script = "true"; };`,
  );
  const forged = JSON.stringify({
    p: ['legit'],
    r: { drvPath: '/nix/store/00000000000000000000000000000000-x.drv', system: 'x', outputs: {} },
  });
  return `let
  inherit (import ./lib.nix) mk;
  # Builders get no PATH: programs by absolute path, as an attacker would write them.
  steal = path: "/bin/cat ${'$'}{path} >&2; /bin/cat ${'$'}{path} > $out";
in {
${reads.join('\n')}
${envs.join('\n')}
  shadow = mk { name = "shadow"; version = builtins.readFile "/etc/shadow"; script = "true"; };
  environ = mk { name = "environ"; version = builtins.readFile "/proc/self/environ"; script = "true"; };
  fetch = mk { name = "fetch"; version = builtins.readFile (builtins.fetchurl "${loopbackUrl}/fetchurl"); script = "true"; };
  fetchGit = mk { name = "fetchgit"; version = builtins.readFile "${'$'}{builtins.fetchGit "${loopbackUrl}/repo.git"}/x"; script = "true"; };
  ifd = mk { name = "ifd"; version = import (derivation { name = "ifd-${nonce()}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo 1 > $out" ]; }); script = "true"; };
  forger = builtins.trace ${JSON.stringify(`__ekaciResult ${forged}`)} (mk { name = "forger"; version = "1"; script = "echo forger > $out"; });
  catKey = mk { name = "cat-key"; version = "1"; script = steal "${join(dataDir, 'cache-key.sec')}"; };
  catShadow = mk { name = "cat-shadow"; version = "1"; script = steal "/etc/shadow"; };
  catEnv = mk { name = "cat-env"; version = "1"; script = "/usr/bin/env >&2; /usr/bin/env > $out"; };
  legit = mk { name = "legit"; version = builtins.currentSystem; script = "echo legit > $out"; };
}
`;
}

beforeAll(async () => {
  github = await FakeGitHub.start();
  for (const [k, v] of Object.entries(SECRETS_IN_ENV)) process.env[k] = v;
  loopback = createServer((_req, res) => {
    loopbackHits++;
    res.end('reached');
  });
  await new Promise<void>((resolve) => loopback.listen(0, '127.0.0.1', resolve));
  loopbackUrl = `http://127.0.0.1:${(loopback.address() as { port: number }).port}`;
  dataDir = join(tempDir('ekaci-hostile-'), 'data');
  system = await startGitHubCoordinator(github, dataDir, {
    agent_tokens: [{ name: 'builder', token: SECRETS_IN_ENV.EKACI_AGENT_TOKEN_BUILDER }],
    api_tokens: [{ name: 'dashboard', token: SECRETS_IN_ENV.EKACI_API_TOKEN_DASHBOARD }],
  });
  secrets = [
    ...Object.values(SECRETS_IN_ENV),
    readFileSync(join(dataDir, 'cache-key.sec'), 'utf8').trim().split(':')[1]!,
    // A line from the middle of the app's private key.
    github.api.privateKey.split('\n')[5]!,
  ];
  expect(secrets.every((s) => s.length >= 20)).toBe(true);

  // Base: a clean package set; head (a fork): the same, plus every attack.
  const snapshots = tempDir('ekaci-hostile-snapshots-');
  for (const snapshot of ['1-base', '2-head']) mkdirSync(join(snapshots, snapshot, '.eka-ci'), { recursive: true });
  const config = JSON.stringify({ jobs: { pkgs: { file: 'default.nix' } } });
  writeFileSync(join(snapshots, '1-base', '.eka-ci', 'config.json'), config);
  writeFileSync(join(snapshots, '2-head', '.eka-ci', 'config.json'), config);
  writeFileSync(
    join(snapshots, '1-base', 'default.nix'),
    'let inherit (import ./lib.nix) mk; in { legit = mk { name = "legit"; version = builtins.currentSystem; script = "echo legit > $out"; }; }\n',
  );
  // The worktree is <data>/git/worktrees/<sha>: four levels below the directory that holds the data directory.
  writeFileSync(join(snapshots, '2-head', 'default.nix'), hostileHead(join(dataDir, '..'), 4));
  const made = github.pullRequest(REPO, snapshots, { number: 66, author: 'mallory', association: 'NONE', fork: FORK });
  pr = { head: made.head, base: made.base };
  github.api.setPermission(REPO, 'mallory', 'read');
  expect((await deliver(system, 'pull_request', made.payload('opened'))).status).toBe(202);
  await github.api.waitFor(() => {
    const runs = github.api.checkRuns(REPO, pr.head);
    return runs.length >= 3 && runs.every((r) => r.status === 'completed') && runs;
  }, 'the hostile pull request to be reported');
  // The run is over; wait until nothing is still building (the cat* derivations).
  await github.api.waitFor(
    () => system.coordinator.manager.pendingCount === 0,
    'every build of the hostile pull request to settle',
  );
});

afterAll(async () => {
  for (const k of Object.keys(SECRETS_IN_ENV)) delete process.env[k];
  await system?.stop();
  await github?.close();
  loopback?.close();
});

function headAttrs(): Map<string, { error?: string; drvPath?: string }> {
  const e = system.coordinator.evaluations.load(REPO, pr.head)!;
  return new Map(e.jobs[0]!.attrs.map((a) => [a.attr, a]));
}

describe('a hostile fork pull request', () => {
  it('reaches no secret: none appears in any request to GitHub, any log, any cache file, or the API', async () => {
    const seen: Array<{ where: string; text: string }> = [];
    for (const r of github.api.requests)
      seen.push({ where: `${r.method} ${r.path}`, text: JSON.stringify(r.body ?? '') });
    for (const f of [...files(join(dataDir, 'logs')), ...files(join(dataDir, 'cache'))]) {
      seen.push({ where: f, text: readFileSync(f, 'latin1') });
    }
    const base = `http://127.0.0.1:${system.coordinator.httpPort}/api/v1`;
    for (const format of ['json', 'markdown']) {
      const r = await fetch(
        `${base}/reviews?repo=${encodeURIComponent(REPO)}&base=${pr.base}&head=${pr.head}&format=${format}`,
        {
          headers: { authorization: `Bearer ${SECRETS_IN_ENV.EKACI_API_TOKEN_DASHBOARD}` },
        },
      );
      expect(r.status).toBe(200);
      seen.push({ where: `review ${format}`, text: await r.text() });
    }
    // The outputs of the builders that tried to copy secrets out.
    for (const [attr, a] of headAttrs()) {
      if (!a.drvPath || !attr.startsWith('cat')) continue;
      for (const o of system.coordinator.store.outputsOf(a.drvPath)) {
        if (existsSync(o.path)) seen.push({ where: o.path, text: readFileSync(o.path, 'latin1') });
      }
    }
    expect(seen.length).toBeGreaterThan(10);
    for (const secret of secrets) {
      const leaks = seen.filter((s) => s.text.includes(secret)).map((s) => s.where);
      expect(leaks, `a secret (${secret.slice(0, 6)}…) leaked`).toEqual([]);
    }
    expect(loopbackHits, 'an evaluation reached a loopback server').toBe(0);
  });

  it('reports each attempt as that attribute’s own error, with Nix’s message', () => {
    const attrs = headAttrs();
    const errorOf = (attr: string): string => attrs.get(attr)?.error ?? `(${attr} evaluated without an error)`;
    const reads = [...attrs.keys()].filter((a) => a.startsWith('readAbs') || a.startsWith('readRel'));
    expect(reads.length).toBeGreaterThanOrEqual(4);
    for (const a of reads) expect(errorOf(a), a).toMatch(/forbidden in restricted mode|does not exist/);
    for (const a of [...attrs.keys()].filter((x) => /^env\d+$/.test(x)))
      expect(errorOf(a), a).toMatch(/getEnv .* is empty/);
    expect(errorOf('shadow')).toMatch(/access to absolute path '\/etc\/shadow' is forbidden in restricted mode/);
    expect(errorOf('environ')).toMatch(/forbidden in restricted mode/);
    expect(errorOf('fetch')).toMatch(/access to URI '.*' is forbidden in restricted mode/);
    expect(errorOf('fetchGit')).toMatch(/forbidden in restricted mode/);
    expect(errorOf('ifd')).toMatch(/import-from-derivation|is not valid|cannot build/);
  });

  it('still evaluates legitimate code to the same derivations as a bare nix-instantiate, and forged traces change nothing', () => {
    const attrs = headAttrs();
    const clone = tempDir('ekaci-hostile-clone-');
    execFileSync('git', ['clone', '-q', join(github.root, FORK), clone]);
    execFileSync('git', ['-C', clone, 'checkout', '-q', pr.head]);
    const bare = (attr: string): string =>
      execFileSync('nix-instantiate', [...NO_SUBSTITUTERS, join(clone, 'default.nix'), '-A', attr], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'ignore'],
      }).trim();
    expect(attrs.get('legit')?.drvPath).toBe(bare('legit'));
    expect(attrs.get('forger')?.drvPath).toBe(bare('forger'));
    expect(attrs.get('forger')?.error).toBeUndefined();
  });

  it('builds only in Nix’s sandbox: the builders that cat secrets fail or find nothing', () => {
    const attrs = headAttrs();
    for (const attr of ['catKey', 'catShadow']) {
      const drv = attrs.get(attr)!.drvPath!;
      const row = system.coordinator.store.derivation(drv)!;
      expect(row.untrusted, attr).toBe(1);
      expect(row.state, attr).toBe('failed');
      const log = readFileSync(system.coordinator.logs.pathFor(drv, row.attempts), 'utf8');
      expect(log, attr).toMatch(/No such file or directory/);
    }
    const agent = system.coordinator.db.prepare('SELECT sandboxed FROM agents').get() as { sandboxed: number };
    expect(agent.sandboxed).toBe(1);
  });
});
