import { availableParallelism } from 'node:os';
import { NixCommandError } from '../../common/errors.js';
import { lastLines, runNix } from '../../common/nix/cli.js';
import { PLATFORM } from '../../common/platform.js';

/** What this builder offers, as announced in `Hello`. */
export interface NixCapabilities {
  nixVersion: string;
  /** `linux` or `darwin`. */
  os: string;
  /** `system` first, then `extra-platforms`. */
  systems: string[];
  features: string[];
  mandatoryFeatures: string[];
  maxJobs: number;
}

/** Values from the agent's own configuration; `null` means "ask Nix". Mandatory features never come from Nix. */
export interface CapabilityOverrides {
  systems: string[] | null;
  features: string[] | null;
  mandatoryFeatures: string[];
  maxJobs: number | null;
}

/** The subset of Nix's settings the agent cares about, however Nix printed them. */
export interface NixSettings {
  system?: string;
  extraPlatforms?: string[];
  systemFeatures?: string[];
  maxJobs?: number;
}

// `show-config` needs nix-command on Nix ≥ 2.4 and does not know the flag before; JSON exists since 2.4. Tried in
// order: the first that exits 0 wins.
const SHOW_CONFIG_ATTEMPTS: { args: string[]; format: 'json' | 'text' }[] = [
  { args: ['show-config', '--json', '--extra-experimental-features', 'nix-command'], format: 'json' },
  { args: ['show-config', '--extra-experimental-features', 'nix-command'], format: 'text' },
  { args: ['show-config'], format: 'text' },
];

/** Asks the local Nix what it can build, then applies the agent's overrides. */
export async function detectNix(overrides: CapabilityOverrides, nixBin = 'nix'): Promise<NixCapabilities> {
  const version = await runNix(nixBin, ['--version']);
  if (version.code !== 0) {
    throw new NixCommandError(
      `'${nixBin} --version' failed: ${lastLines(version.stderr, 3)}`,
      version.code,
      version.stderr,
    );
  }
  const needSettings = overrides.systems === null || overrides.features === null || overrides.maxJobs === null;
  const settings = needSettings ? await readSettings(nixBin) : {};
  const system = settings.system;
  if (overrides.systems === null && system === undefined) {
    throw new NixCommandError(`'${nixBin} show-config' did not report 'system'; pass --system explicitly`, 0, '');
  }
  const detectedSystems = system === undefined ? [] : [system, ...(settings.extraPlatforms ?? [])];
  return {
    nixVersion: parseNixVersion(version.stdout),
    os: PLATFORM,
    systems: unique(overrides.systems ?? detectedSystems),
    features: unique(overrides.features ?? settings.systemFeatures ?? []),
    mandatoryFeatures: unique(overrides.mandatoryFeatures),
    // max-jobs 0 means "only remote builders" to Nix; an agent that takes no work is useless, so it builds one.
    maxJobs: Math.max(1, overrides.maxJobs ?? settings.maxJobs ?? 1),
  };
}

async function readSettings(nixBin: string): Promise<NixSettings> {
  let lastError = '';
  for (const attempt of SHOW_CONFIG_ATTEMPTS) {
    const r = await runNix(nixBin, [...attempt.args, '--option', 'substituters', '']);
    if (r.code !== 0) {
      lastError = r.stderr;
      continue;
    }
    return attempt.format === 'json' ? parseShowConfigJson(r.stdout) : parseShowConfigText(r.stdout);
  }
  throw new NixCommandError(`'${nixBin} show-config' failed: ${lastLines(lastError, 3)}`, null, lastError);
}

/** Parses `nix show-config --json`: `{ "system": { "value": "x86_64-linux", … }, … }` (or bare values). */
export function parseShowConfigJson(text: string): NixSettings {
  const raw = JSON.parse(text) as Record<string, unknown>;
  const value = (key: string): unknown => {
    const entry = raw[key];
    return entry !== null && typeof entry === 'object' && 'value' in entry ? entry.value : entry;
  };
  return settingsFrom(value);
}

/** Parses the `key = value` lines of plain `nix show-config`; lists are space-separated. */
export function parseShowConfigText(text: string): NixSettings {
  const raw = new Map<string, string>();
  for (const line of text.split('\n')) {
    const eq = line.indexOf(' = ');
    if (eq > 0) raw.set(line.slice(0, eq).trim(), line.slice(eq + 3).trim());
  }
  return settingsFrom((key) => raw.get(key));
}

function settingsFrom(value: (key: string) => unknown): NixSettings {
  const settings: NixSettings = {};
  const system = value('system');
  if (typeof system === 'string' && system !== '') settings.system = system;
  const platforms = asList(value('extra-platforms'));
  if (platforms) settings.extraPlatforms = platforms;
  const features = asList(value('system-features'));
  if (features) settings.systemFeatures = features;
  const maxJobs = asJobs(value('max-jobs'));
  if (maxJobs !== undefined) settings.maxJobs = maxJobs;
  return settings;
}

function asList(v: unknown): string[] | undefined {
  if (Array.isArray(v)) return v.filter((x): x is string => typeof x === 'string' && x !== '');
  if (typeof v === 'string') return v.split(/\s+/).filter((x) => x !== '');
  return undefined;
}

function asJobs(v: unknown): number | undefined {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0) return v;
  if (v === 'auto') return availableParallelism();
  if (typeof v === 'string' && /^\d+$/.test(v)) return Number(v);
  return undefined;
}

/** `nix (Nix) 2.8.0` → `2.8.0`; anything unexpected is passed on whole rather than guessed at. */
export function parseNixVersion(text: string): string {
  const trimmed = text.trim();
  const match = /(\d+\.\d+(?:\.\d+)?\S*)\s*$/.exec(trimmed.split('\n')[0] ?? '');
  return match?.[1] ?? trimmed;
}

function unique(xs: string[]): string[] {
  return [...new Set(xs)];
}
