import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify as toToml } from 'smol-toml';
import { runNix } from '../../common/nix/cli.js';
import { tempDir } from './nix-project.js';

/**
 * The eka-ci NixOS and nix-darwin modules evaluated by nixpkgs' own module system (see eval-module.nix), and what a
 * test needs to run the units they render: ExecStart split as systemd splits it, credentials as LoadCredential=
 * hands them over.
 */

export const REPO = join(import.meta.dirname, '..', '..');

/** Where `.ci/run` (and the flake's dev shell) put nixpkgs' lib; the module tests skip without it. */
export const NIXPKGS_LIB_VAR = 'EKACI_NIXPKGS_LIB';
export const NIXPKGS_LIB = process.env[NIXPKGS_LIB_VAR];

export interface Service {
  description: string;
  wantedBy?: string[];
  after?: string[];
  path: string[];
  environment: Record<string, string>;
  serviceConfig: Record<string, unknown>;
}

export interface Evaluated {
  failedAssertions: string[];
  services: Record<string, Service>;
  launchd: Record<string, Record<string, unknown>>;
  users: {
    users: Record<string, Record<string, unknown>>;
    groups: Record<string, Record<string, unknown>>;
    knownUsers: string[];
    knownGroups: string[];
  };
  firewall: { allowedTCPPorts: number[] };
  nixSettings: Record<string, unknown>;
}

export interface EvalOptions {
  /** The eka-ci package's directory (`${cfg.package}`); the default names a directory that does not exist. */
  package?: string;
  /** Where nix, git and bubblewrap stand-ins live (`${pkgs.nix}/bin/nix`…). */
  tools?: string;
}

/** Evaluates `module` (a path under nixos-module/) with `configuration` (JSON data); throws with Nix's message. */
export async function evalModule(module: string, configuration: unknown, o: EvalOptions = {}): Promise<Evaluated> {
  if (!NIXPKGS_LIB) throw new Error(`${NIXPKGS_LIB_VAR} is not set`);
  const dir = tempDir('ekaci-module-');
  const config = join(dir, 'configuration.json');
  writeFileSync(config, JSON.stringify(configuration));
  const r = await runNix('nix-instantiate', [
    '--eval',
    '--strict',
    '--json',
    // toFile writes the rendered configuration to the store, as building the system would.
    '--read-write-mode',
    join(REPO, 'test', 'support', 'eval-module.nix'),
    '--arg',
    'libPath',
    NIXPKGS_LIB,
    '--arg',
    'module',
    join(REPO, module),
    '--arg',
    'configuration',
    `builtins.fromJSON (builtins.readFile ${config})`,
    '--argstr',
    'package',
    o.package ?? '/standin/eka-ci',
    '--argstr',
    'tools',
    o.tools ?? '/usr',
  ]);
  if (r.code !== 0) throw new Error(r.stderr.trim());
  return JSON.parse(r.stdout) as Evaluated;
}

/** The value of a Nix expression (JSON), e.g. nixos-module/hardening.nix applied to its argument. */
export async function evalJson(expression: string): Promise<unknown> {
  const r = await runNix('nix-instantiate', ['--eval', '--strict', '--json', '--expr', expression]);
  if (r.code !== 0) throw new Error(r.stderr.trim());
  return JSON.parse(r.stdout) as unknown;
}

/**
 * The TOML that nixpkgs' `formats.toml` would have written for `file`: the stand-in wrote its value as JSON, which
 * nixpkgs converts with remarshal; smol-toml does the same conversion here.
 */
export function renderedToml(file: string): string {
  return toToml(JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>);
}

/**
 * An ExecStart= line split into words the way systemd does (quotes, backslash escapes) with the specifiers it
 * expands: `%d` (the credentials directory) and `%%`. Any other specifier is an error: nothing here expands it.
 */
export function execStartWords(line: string, specifiers: { d: string }): string[] {
  const words: string[] = [];
  let word: string | undefined;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (c === ' ' || c === '\t') {
      if (word !== undefined) words.push(word);
      word = undefined;
    } else if (c === "'" || c === '"') {
      const end = line.indexOf(c, i + 1);
      if (end < 0) throw new Error(`unterminated quote in ${line}`);
      word = (word ?? '') + line.slice(i + 1, end);
      i = end;
    } else if (c === '\\') {
      word = (word ?? '') + (line[++i] ?? '');
    } else word = (word ?? '') + c;
  }
  if (word !== undefined) words.push(word);
  return words.map((w) =>
    w.replace(/%(.)/g, (_, s: string) => {
      if (s === '%') return '%';
      if (s === 'd') return specifiers.d;
      throw new Error(`specifier %${s} in ${line} is not expanded by the test`);
    }),
  );
}

/** `LoadCredential=NAME:PATH` entries as [name, source path]. */
export function loadCredentials(service: Service): Array<[string, string]> {
  const entries = service.serviceConfig.LoadCredential ?? [];
  return (entries as string[]).map((e) => {
    const colon = e.indexOf(':');
    return [e.slice(0, colon), e.slice(colon + 1)];
  });
}

/** A credentials directory as systemd makes it for `service`: one file per LoadCredential=, read from its source. */
export function populateCredentials(service: Service, dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const [name, source] of loadCredentials(service)) {
    writeFileSync(join(dir, name), readFileSync(source), { mode: 0o400 });
  }
}
