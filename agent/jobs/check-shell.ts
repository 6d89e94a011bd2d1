/**
 * The environment a check's command runs in, decided by `Assign.drv_path`:
 *
 * - No shell derivation (''): the host's programs. PATH=/usr/bin:/bin (the host's /usr and /bin are read-only in
 *   the sandbox), HOME, TMPDIR, TERM=xterm-256color, LANG=C.UTF-8. Such a check depends on the builder host.
 * - A shell derivation (`shell` of the check): like `nix-shell --pure`, the derivation is not built; its inputs
 *   make the environment. Its `.drv` is read from the agent's store or the coordinator's cache (checked against
 *   its path), the outputs of its input derivations (`Assign.input_outputs`, built by the coordinator first) and
 *   its input sources are substituted from the cache into the agent's store and kept as GC roots of the lease. The
 *   environment is then the derivation's own `env` attributes, with PATH = the `bin` directory of each input
 *   output that has one (in the derivation's order of inputs) and nothing else; HOME, TMPDIR, TERM as above;
 *   TMP, TEMP, TEMPDIR and NIX_BUILD_TOP = TMPDIR and IN_NIX_SHELL=pure as nix-shell sets them. A derivation with a
 *   `stdenv` attribute (a nixpkgs `mkShell` or `mkDerivation`) gets what nix-shell does for it: the command is
 *   preceded by `source "$stdenv/setup"`, which builds PATH and the rest from the inputs, then `set +e`.
 *
 * The command runs under the shell's own `bash` when an input's `bin` has one, the host's otherwise.
 */
import { existsSync } from 'node:fs';
import { readFile, rm, symlink } from 'node:fs/promises';
import type { NixDaemonConnection } from '../../common/nix/daemon-client.js';
import { type Derivation, parseDerivation } from '../../common/nix/derivation.js';
import type { Assign } from '../../common/proto/ekaci/agent/v1/agent.js';
import type { LogSpool } from '../logs/spool.js';
import { readCachedDerivation } from '../nix/cached-derivation.js';

const HOST_PATH = '/usr/bin:/bin';

// Where a host's bash lives: Debian-likes and macOS, merged-/usr systems, NixOS. All are inside the sandbox's
// read-only system paths.
const HOST_BASH_CANDIDATES = ['/bin/bash', '/usr/bin/bash', '/run/current-system/sw/bin/bash'];

export interface CheckShell {
  /** The whole environment of the command. */
  env: Record<string, string>;
  /** Bash lines run in the command's shell before the command. */
  prelude: string;
  /** The bash that runs the command. */
  bash: string;
  /** What the log's header says about the environment. */
  description: string;
}

/** The sandbox's private directories, as the command sees them. */
export interface ShellDirs {
  home: string;
  tmp: string;
}

/** What `derivationShell` needs from the agent. */
export interface ShellSource {
  conn: NixDaemonConnection;
  cacheUrl: string;
  cachePublicKey: string;
  netrcPath: string;
  /** Where the lease's GC roots go. */
  spool: LogSpool;
}

export function hostShell(dirs: ShellDirs): CheckShell {
  return {
    env: { PATH: HOST_PATH, HOME: dirs.home, TMPDIR: dirs.tmp, TERM: 'xterm-256color', LANG: 'C.UTF-8' },
    prelude: '',
    bash: hostBash(),
    description: "the host's /usr/bin and /bin (no shell derivation)",
  };
}

/** The environment of `assign.drvPath` (see the header); throws with a message when it cannot be made. */
export async function derivationShell(assign: Assign, source: ShellSource, dirs: ShellDirs): Promise<CheckShell> {
  const d = await readShellDerivation(assign.drvPath, source);
  const known = new Map(assign.inputOutputs.map((o) => [`${o.drvPath}!${o.name}`, o.path]));
  const inputs: string[] = [];
  for (const [drv, names] of Object.entries(d.inputDrvs)) {
    for (const name of names) {
      const path = known.get(`${drv}!${name}`);
      if (path === undefined || path === '') {
        throw new Error(`the coordinator sent no output path for ${drv}!${name}, an input of ${assign.drvPath}`);
      }
      inputs.push(path);
    }
  }
  await substitute([...inputs, ...d.inputSrcs], assign.leaseId, source);
  const bins = inputs.map((p) => `${p}/bin`).filter((dir) => existsSync(dir));
  const env: Record<string, string> = {
    ...d.env,
    PATH: bins.join(':'),
    HOME: dirs.home,
    TMPDIR: dirs.tmp,
    TMP: dirs.tmp,
    TEMP: dirs.tmp,
    TEMPDIR: dirs.tmp,
    NIX_BUILD_TOP: dirs.tmp,
    TERM: 'xterm-256color',
    IN_NIX_SHELL: 'pure',
  };
  const ownBash = bins.map((dir) => `${dir}/bash`).find((p) => existsSync(p));
  return {
    env,
    prelude: 'stdenv' in d.env ? 'dontAddDisableDepTrack=1\nsource "$stdenv/setup"\nset +e\n' : '',
    bash: ownBash ?? hostBash(),
    description: `the environment of ${assign.drvPath}`,
  };
}

async function readShellDerivation(drvPath: string, source: ShellSource): Promise<Derivation> {
  if ((await source.conn.queryValidPaths([drvPath])).has(drvPath)) {
    return parseDerivation(await readFile(drvPath, 'utf8'), drvPath);
  }
  if (source.cacheUrl === '') throw new Error(`${drvPath} is not in this agent's store and there is no cache`);
  try {
    return await readCachedDerivation(source.cacheUrl, source.netrcPath, drvPath);
  } catch (err) {
    throw new Error(`cannot read ${drvPath} from ${source.cacheUrl}: ${(err as Error).message}`);
  }
}

/**
 * Makes `paths` valid in the agent's store, from the cache, and roots them for the lease: the daemon's own
 * temporary roots end with its connection, which goes back to the pool before the command runs.
 */
async function substitute(paths: string[], leaseId: string, source: ShellSource): Promise<void> {
  if (paths.length === 0) return;
  const { conn, spool } = source;
  await conn.setOptions({
    useSubstitutes: true,
    overrides: {
      substituters: source.cacheUrl,
      'trusted-public-keys': source.cachePublicKey,
      'netrc-file': source.netrcPath,
      builders: '',
    },
  });
  const messages: string[] = [];
  const done = await conn.buildPaths(paths, (line) => messages.push(line));
  if (!done.ok) {
    const from = source.cacheUrl === '' ? 'no cache' : source.cacheUrl;
    throw new Error(`cannot substitute the shell's inputs from ${from}: ${[done.message, ...messages].join('\n')}`);
  }
  for (const [i, path] of paths.entries()) {
    const link = spool.gcRoot(leaseId, `shell-input-${i}`);
    await rm(link, { force: true });
    await symlink(path, link);
    await conn.addIndirectRoot(link);
  }
}

function hostBash(): string {
  return HOST_BASH_CANDIDATES.find((p) => existsSync(p)) ?? 'bash';
}
