import { createHash, randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { DerivationParseError } from '../errors.js';
import { runNixChecked, NO_SUBSTITUTERS } from './cli.js';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import {
  type Derivation,
  addDerivationStore,
  isFixedOutput,
  loadDerivationClosure,
  outputPaths,
  parseDerivation,
  preferLocalBuild,
  requiredSystemFeatures,
  storeFileExists,
} from './derivation.js';
import { isStorePath, storePathName } from './store-path.js';

const EXPERIMENTAL = ['--extra-experimental-features', 'nix-command ca-derivations impure-derivations'];
const FOD_CONTENT = 'eka-ci fixed output\n';
const FOD_HASH = createHash('sha256').update(FOD_CONTENT).digest('hex');
const WIDE_LEAVES = 150;

// Nix escapes are written as Nix source; NONCE keeps our store paths apart from every other test run.
const DRVS_NIX = String.raw`
let
  mk = n: attrs: derivation ({
    name = "NONCE-" + n;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
  } // attrs);
in rec {
  bottom = mk "bottom" { outputs = [ "out" "dev" "lib" ]; args = [ "-c" "echo > $out; echo > $dev; echo > $lib" ]; };
  left = mk "left" { b = bottom; };
  right = mk "right" { bdev = bottom.dev; blib = bottom.lib; };
  top = mk "top" { l = left; r = right; b = bottom; };
  wide = mk "wide" { leaves = builtins.genList (i: mk ("leaf-" + toString i) { }) WIDE_LEAVES; };
  fod = mk "fod" {
    args = [ "-c" "echo eka-ci fixed output > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "FOD_HASH";
  };
  ca = mk "ca" { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  impure = mk "impure" { __impure = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  structured = mk "structured" { __structuredAttrs = true; requiredSystemFeatures = [ "kvm" "big-parallel" ]; preferLocalBuild = true; };
  features = mk "features" { requiredSystemFeatures = [ "kvm" "big-parallel" ]; preferLocalBuild = true; src = ./drvs.nix; };
  escapes = mk "escapes" {
    args = [ "-c" "echo ünïcødé ✓ > $out" ];
    weird = "quote \" backslash \\ newline \n tab \t cr \r end";
    literalBackslashN = "\\n";
    trailingBackslash = "ends with \\";
    "__proto__" = "kept";
  };
}
`;

type Name =
  'bottom' | 'left' | 'right' | 'top' | 'wide' | 'fod' | 'ca' | 'impure' | 'structured' | 'features' | 'escapes';

let dir: string;
let drv: Record<Name, string>;
/** `nix show-derivation -r` of every derivation above: the reference the parser must agree with. */
let shown: Record<string, unknown>;
const text = (n: Name): Promise<string> => readFile(drv[n], 'utf8');
const parsed = async (n: Name): Promise<Derivation> => parseDerivation(await text(n), drv[n]);

function showDerivation(paths: string[]): Promise<string> {
  return runNixChecked('nix', ['show-derivation', ...EXPERIMENTAL, ...NO_SUBSTITUTERS, '-r', ...paths]);
}

/** Our Derivation in the shape `nix show-derivation` prints, which leaves out empty output fields and marks impurity. */
function asShown(d: Derivation): unknown {
  const outputs = Object.fromEntries(
    Object.entries(d.outputs).map(([n, { path, hashAlgo, hash }]) => [
      n,
      {
        ...(path && { path }),
        ...(hashAlgo && { hashAlgo }),
        ...(hash === 'impure' ? { impure: true } : hash && { hash }),
      },
    ]),
  );
  return { ...d, outputs, inputDrvs: { ...d.inputDrvs }, env: { ...d.env } };
}

function parseError(f: () => unknown): DerivationParseError {
  try {
    f();
  } catch (e) {
    if (e instanceof DerivationParseError) return e;
    throw e;
  }
  throw new Error('expected a DerivationParseError, but parsing succeeded');
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-drv-test-'));
  const nonce = `ekaci-drv-${randomUUID().slice(0, 8)}`;
  const source = DRVS_NIX.replaceAll('NONCE', nonce)
    .replace('FOD_HASH', FOD_HASH)
    .replace('WIDE_LEAVES', String(WIDE_LEAVES));
  await writeFile(join(dir, 'drvs.nix'), source);
  const expr = `builtins.mapAttrs (_: d: d.drvPath) (import ${join(dir, 'drvs.nix')})`;
  const args = [...EXPERIMENTAL, ...NO_SUBSTITUTERS, '--eval', '--strict', '--json', '--read-write-mode', '-E', expr];
  drv = JSON.parse(await runNixChecked('nix-instantiate', args)) as Record<Name, string>;
  shown = JSON.parse(await showDerivation(Object.values(drv))) as Record<string, unknown>;
});

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('parseDerivation', () => {
  it('parses every derivation exactly as `nix show-derivation` shows it', async () => {
    expect(Object.keys(shown).length).toBeGreaterThan(WIDE_LEAVES + 10);
    for (const [path, reference] of Object.entries(shown)) {
      expect(asShown(parseDerivation(await readFile(path, 'utf8'), path)), path).toEqual(reference);
    }
  });

  it('reads every output of a multi-output derivation with its store path', async () => {
    const d = await parsed('bottom');
    expect(Object.keys(d.outputs).sort()).toEqual(['dev', 'lib', 'out']);
    const paths = outputPaths(d);
    expect(Object.values(paths).every(isStorePath)).toBe(true);
    expect(paths.dev).toBe(d.env.dev);
    expect(storePathName(paths.lib ?? '')).toMatch(/-bottom-lib$/);
  });

  it('records which outputs of each input derivation are used', async () => {
    expect((await parsed('right')).inputDrvs).toEqual({ [drv.bottom]: ['dev', 'lib'] });
    expect((await parsed('top')).inputDrvs).toEqual({
      [drv.bottom]: ['out'],
      [drv.left]: ['out'],
      [drv.right]: ['out'],
    });
  });

  it('lists sources copied into the store as input sources', async () => {
    const srcs = (await parsed('features')).inputSrcs;
    expect(srcs).toHaveLength(1);
    expect(storePathName(srcs[0] ?? '')).toBe('drvs.nix');
  });

  it('decodes the escapes Nix writes for quotes, backslashes, newlines, tabs and carriage returns', async () => {
    expect(await text('escapes')).toContain(String.raw`quote \" backslash \\ newline \n tab \t cr \r end`);
    const { env, args } = await parsed('escapes');
    expect(env.weird).toBe('quote " backslash \\ newline \n tab \t cr \r end');
    expect(env.literalBackslashN).toBe('\\n');
    expect(env.trailingBackslash).toBe('ends with \\');
    expect(args[1]).toBe('echo ünïcødé ✓ > $out');
  });

  it('keeps an environment variable named __proto__ as ordinary data', async () => {
    const { env } = await parsed('escapes');
    expect(Object.keys(env)).toContain('__proto__');
    expect(env.__proto__).toBe('kept');
  });

  it('accepts a trailing newline after the derivation', async () => {
    expect(parseDerivation((await text('top')) + '\n')).toEqual(await parsed('top'));
  });
});

describe('derivation properties', () => {
  it('recognises a flat sha256 fixed-output derivation and keeps its hash', async () => {
    const d = await parsed('fod');
    expect(isFixedOutput(d)).toBe(true);
    expect(d.outputs.out).toMatchObject({ hashAlgo: 'sha256', hash: FOD_HASH });
  });

  it('does not count input-addressed, multi-output, floating content-addressed or impure derivations as fixed-output', async () => {
    for (const n of ['top', 'bottom', 'ca', 'impure'] as const) expect(isFixedOutput(await parsed(n)), n).toBe(false);
  });

  it('reads requiredSystemFeatures and preferLocalBuild from the environment', async () => {
    const d = await parsed('features');
    expect(d.env.requiredSystemFeatures).toBe('kvm big-parallel');
    expect(requiredSystemFeatures(d)).toEqual(['kvm', 'big-parallel']);
    expect(preferLocalBuild(d)).toBe(true);
  });

  it('reads requiredSystemFeatures and preferLocalBuild from structured attributes', async () => {
    const d = await parsed('structured');
    expect(Object.keys(d.env)).toContain('__json');
    expect(d.env.requiredSystemFeatures).toBeUndefined();
    expect(requiredSystemFeatures(d)).toEqual(['kvm', 'big-parallel']);
    expect(preferLocalBuild(d)).toBe(true);
  });

  it('needs no features and prefers no local build when the derivation asks for neither', async () => {
    const d = await parsed('top');
    expect(requiredSystemFeatures(d)).toEqual([]);
    expect(preferLocalBuild(d)).toBe(false);
  });

  it('requires the ca-derivations feature, as Nix does, for outputs whose paths are only known after building', async () => {
    for (const n of ['ca', 'impure'] as const) {
      const d = await parsed(n);
      expect(requiredSystemFeatures(d), n).toEqual(['ca-derivations']);
      expect(outputPaths(d), n).toEqual({});
    }
  });

  it('reports structured attributes that are not valid JSON as a DerivationParseError', async () => {
    const d = await parsed('structured');
    d.env.__json = '{"requiredSystemFeatures": [';
    expect(() => requiredSystemFeatures(d)).toThrow(DerivationParseError);
  });
});

describe('parse errors', () => {
  it('reports a file truncated at any point as ending early, at the byte where it ends', async () => {
    const full = await text('escapes');
    for (let len = 0; len < full.length; len++) {
      const prefix = full.slice(0, len);
      const e = parseError(() => parseDerivation(prefix, drv.escapes));
      expect(e.code).toBe('EKACI_ERR_DRV_PARSE');
      expect(e.message.startsWith(`${drv.escapes}: malformed derivation at byte ${Buffer.byteLength(prefix)}: `)).toBe(
        true,
      );
      expect(e.message.endsWith('found the end of the file (is it truncated?)'), e.message).toBe(true);
    }
  });

  it('names the file, the byte offset (not the character index) and the text found at a corrupt token', async () => {
    const full = await text('escapes');
    const at = full.indexOf('("name",') + '("name"'.length;
    const corrupt = `${full.slice(0, at)};${full.slice(at + 1)}`;
    const byte = Buffer.byteLength(full.slice(0, at));
    expect(byte).toBeGreaterThan(at);
    expect(parseError(() => parseDerivation(corrupt, drv.escapes)).message).toBe(
      `${drv.escapes}: malformed derivation at byte ${byte}: expected ',', found ${JSON.stringify(corrupt.slice(at, at + 24))}…`,
    );
  });

  it('rejects garbage, an empty file and JSON, pointing at byte 0', async () => {
    expect(parseError(() => parseDerivation('hello world')).message).toBe(
      '<derivation>: malformed derivation at byte 0: expected "Derive(", found "hello world"',
    );
    expect(parseError(() => parseDerivation('')).message).toMatch(/at byte 0: .*the end of the file/);
    const json = await showDerivation([drv.top]);
    expect(parseError(() => parseDerivation(json, 'x.drv')).message).toMatch(/^x\.drv: .* byte 0:/);
  });

  it('rejects anything after the closing parenthesis', async () => {
    const full = await text('top');
    expect(parseError(() => parseDerivation(`${full})`)).message).toContain(
      `at byte ${full.length}: expected end of file after the closing parenthesis, found ")"`,
    );
  });

  it('refuses the experimental versioned format by name rather than misreading it', () => {
    const versioned = 'DrvWithVersion("xp-dyn-drv",[("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[])';
    expect(parseError(() => parseDerivation(versioned)).message).toContain('experimental versioned format');
  });
});

describe('loadDerivationClosure', () => {
  it('loads the .drv closure of a diamond-shaped DAG exactly as `nix show-derivation -r` finds it', async () => {
    const closure = await loadDerivationClosure([drv.top]);
    const reference = JSON.parse(await showDerivation([drv.top])) as Record<string, unknown>;
    expect([...closure.keys()].sort()).toEqual(Object.keys(reference).sort());
    expect([...closure.keys()].sort()).toEqual([drv.bottom, drv.left, drv.right, drv.top].sort());
    for (const [path, d] of closure) expect(asShown(d)).toEqual(reference[path]);
  });

  it('neither reads nor descends into derivations the caller already knows, and asks about each path once', async () => {
    const asked: string[] = [];
    const closure = await loadDerivationClosure([drv.top], (p) => {
      asked.push(p);
      return p === drv.left || p === drv.right;
    });
    expect([...closure.keys()].sort()).toEqual([drv.bottom, drv.top].sort());
    expect(asked.sort()).toEqual([drv.bottom, drv.left, drv.right, drv.top].sort());

    const withoutBottom = await loadDerivationClosure([drv.top], (p) => p === drv.bottom);
    expect([...withoutBottom.keys()].sort()).toEqual([drv.left, drv.right, drv.top].sort());
  });

  it('merges the closures of several overlapping roots', async () => {
    const closure = await loadDerivationClosure([drv.left, drv.right, drv.left]);
    expect([...closure.keys()].sort()).toEqual([drv.bottom, drv.left, drv.right].sort());
  });

  it('loads a closure wider than the number of concurrent reads', async () => {
    const closure = await loadDerivationClosure([drv.wide]);
    expect(closure.size).toBe(WIDE_LEAVES + 1);
    expect(Object.keys(closure.get(drv.wide)?.inputDrvs ?? {})).toHaveLength(WIDE_LEAVES);
  });

  it('keeps what `keep` makes of each derivation, and walks the inputs of the whole derivation', async () => {
    const seen: string[] = [];
    const closure = await loadDerivationClosure(
      [drv.top],
      () => false,
      (d, path) => {
        seen.push(path);
        return { system: d.system, inputs: Object.keys(d.inputDrvs).length };
      },
    );
    expect(seen.sort()).toEqual([drv.bottom, drv.left, drv.right, drv.top].sort());
    const system = (await parsed('top')).system;
    expect(closure.get(drv.top)).toEqual({ system, inputs: 3 });
    expect(closure.get(drv.bottom)).toEqual({ system, inputs: 0 });
  });

  it('returns an empty map for no roots', async () => {
    expect((await loadDerivationClosure([])).size).toBe(0);
  });

  it('rejects a root that is not a derivation path', async () => {
    await expect(loadDerivationClosure(['/nix/store/not-a-drv'])).rejects.toThrow(RangeError);
  });

  it('rejects with the missing file named when a derivation is not in the store', async () => {
    const missing = `/nix/store/${'0'.repeat(32)}-ekaci-drv-test-missing.drv`;
    await expect(loadDerivationClosure([missing])).rejects.toMatchObject({ code: 'ENOENT', path: missing });
  });
});

describe('addDerivationStore', () => {
  it('keeps a store added by two owners until both removed it', () => {
    const root = mkdtempSync(join(tmpdir(), 'ekaci-drv-store-'));
    const path = `/nix/store/${'a'.repeat(32)}-only-here.drv`;
    mkdirSync(join(root, 'nix', 'store'), { recursive: true });
    writeFileSync(join(root, path), 'Derive([],[],[],"x","/bin/sh",[],[])');
    const first = addDerivationStore(root);
    const second = addDerivationStore(root);
    expect(storeFileExists(path)).toBe(true);
    first();
    first(); // a second call of the same remover changes nothing
    expect(storeFileExists(path)).toBe(true);
    second();
    expect(storeFileExists(path)).toBe(false);
  });
});
