import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EvaluationError } from '../../common/errors.js';
import { nonce, tempDir } from '../../test/support/nix-project.js';
import { maintainersOf } from './maintainers.js';

/**
 * A checkout with `pkgs.nix` whose body can use `mk name { meta = …; }`: a plain derivation. Evaluating a
 * package's drvPath is never needed, so these are never built.
 */
function checkout(body: string): string {
  const dir = tempDir('ekaci-maintainers-');
  writeFileSync(
    join(dir, 'pkgs.nix'),
    `let
  mk = name: extra: derivation ({
    name = "\${name}-${nonce()}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo > $out" ];
  } // extra);
in
${body}
`,
  );
  return dir;
}

const PACKAGES = `{
  hello = mk "hello" { meta.maintainers = [ { github = "alice"; name = "Alice"; } { name = "No Handle"; } { github = "bob"; } ]; };
  nometa = mk "nometa" {};
  thrower = mk "thrower" { meta.maintainers = throw "no maintainers for you"; };
  "hel\\\${\\"lo\\"}" = mk "literal" { meta.maintainers = [ { github = "literal"; } ]; };
  "quo\\"te" = mk "quote" { meta.maintainers = [ { github = "carol"; } ]; };
  python3Packages = { requests = mk "requests" { meta.maintainers = [ { github = "dave"; } { github = "dave"; } ]; }; };
  odd = mk "odd" { meta.maintainers = "not a list"; };
}`;

describe('maintainersOf', () => {
  it("returns each attribute's GitHub handles, [] for no meta, a throw or a missing attribute", async () => {
    const dir = checkout(PACKAGES);
    const attrs = ['hello', 'nometa', 'thrower', 'quo"te', 'python3Packages.requests', 'odd', 'missing', 'hello.x'];
    const result = await maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrs });
    expect([...result]).toEqual([
      ['hello', ['alice', 'bob']],
      ['nometa', []],
      ['thrower', []],
      ['quo"te', ['carol']],
      ['python3Packages.requests', ['dave']],
      ['odd', []],
      ['missing', []],
      ['hello.x', []],
    ]);
  });

  it('passes attribute names to Nix as data, so a name cannot run Nix code', async () => {
    const dir = checkout(PACKAGES);
    // Spliced into an expression, the first would read `hello`; the others would abort the evaluation.
    const evil = ['hel${"lo"}', 'hello"; x = builtins.abort "injected"; y = "', "hello'' + abort \"injected\" + ''"];
    const result = await maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrs: evil });
    expect([...result]).toEqual([
      [evil[0], ['literal']],
      [evil[1], []],
      [evil[2], []],
    ]);
  });

  it('evaluates all attributes in one nix-instantiate call', async () => {
    const dir = checkout(PACKAGES);
    const calls = join(dir, 'calls');
    const bin = join(dir, 'bin');
    mkdirSync(bin);
    const real = execFileSync('/bin/sh', ['-c', 'command -v nix-instantiate'], { encoding: 'utf8' }).trim();
    writeFileSync(join(bin, 'nix-instantiate'), `#!/bin/sh\necho call >> '${calls}'\nexec '${real}' "$@"\n`, {
      mode: 0o755,
    });
    const path = process.env.PATH;
    process.env.PATH = `${bin}:${path}`;
    try {
      const attrs = ['hello', 'nometa', 'thrower', 'python3Packages.requests', 'odd', 'missing'];
      const result = await maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrs });
      expect(result.get('hello')).toEqual(['alice', 'bob']);
    } finally {
      process.env.PATH = path;
    }
    expect(readFileSync(calls, 'utf8')).toBe('call\n');
  });

  it('looks attributes up under the job attribute path', async () => {
    const dir = checkout(
      `{ pkgs.nested = { hello = mk "hello" { meta.maintainers = [ { github = "alice"; } ]; }; }; }`,
    );
    const result = await maintainersOf({
      checkoutDir: dir,
      file: 'pkgs.nix',
      attrPath: 'pkgs.nested',
      attrs: ['hello'],
    });
    expect([...result]).toEqual([['hello', ['alice']]]);
  });

  it('calls a file that is a function with no arguments, and reads a directory as its default.nix', async () => {
    const dir = tempDir('ekaci-maintainers-');
    mkdirSync(join(dir, 'sub'));
    writeFileSync(
      join(dir, 'sub', 'default.nix'),
      '{ ... }: { hello = { type = "derivation"; meta.maintainers = [ { github = "alice"; } ]; }; }',
    );
    const result = await maintainersOf({ checkoutDir: dir, file: 'sub', attrs: ['hello'] });
    expect([...result]).toEqual([['hello', ['alice']]]);
  });

  it('maps only the attributes that abort to [] and answers for the rest', async () => {
    const good = Array.from({ length: 9 }, (_, i) => `p${i}`);
    const dir = checkout(`{
      ${good.map((n) => `${n} = mk "${n}" { meta.maintainers = [ { github = "m-${n}"; } ]; };`).join('\n      ')}
      aborter = mk "aborter" { meta.maintainers = abort "aborted on purpose"; };
      mistyped = mk "mistyped" { meta.maintainers = [ ({ github = "x"; } + 1) ]; };
    }`);
    const attrs = ['p0', 'aborter', ...good.slice(1, 5), 'mistyped', ...good.slice(5)];
    const result = await maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrs });
    expect(result.get('aborter')).toEqual([]);
    expect(result.get('mistyped')).toEqual([]);
    for (const n of good) expect(result.get(n), n).toEqual([`m-${n}`]);
    expect([...result.keys()]).toEqual(attrs);
  });

  it('rejects when the file itself does not evaluate', async () => {
    const dir = checkout('{ hello = mk "hello" {}; ');
    await expect(maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrs: ['hello'] })).rejects.toThrow(
      EvaluationError,
    );
    const aborting = checkout('abort "the whole set is broken"');
    await expect(maintainersOf({ checkoutDir: aborting, file: 'pkgs.nix', attrs: ['a', 'b'] })).rejects.toThrow(
      /the whole set is broken/,
    );
    const throwing = checkout('throw "thrown at the top"');
    await expect(maintainersOf({ checkoutDir: throwing, file: 'pkgs.nix', attrs: ['a'] })).rejects.toThrow(
      /thrown at the top/,
    );
  });

  it('rejects a job attribute path that does not exist, naming it', async () => {
    const dir = checkout(PACKAGES);
    await expect(
      maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrPath: 'pkgs.x', attrs: ['hello'] }),
    ).rejects.toThrow(/attribute path 'pkgs.x' does not exist/);
  });

  it('rejects a file that is missing or lies outside the checkout', async () => {
    const dir = checkout(PACKAGES);
    const outside = checkout(PACKAGES);
    symlinkSync(join(outside, 'pkgs.nix'), join(dir, 'link.nix'));
    await expect(maintainersOf({ checkoutDir: dir, file: 'nope.nix', attrs: ['hello'] })).rejects.toThrow(
      'nope.nix: does not exist',
    );
    await expect(maintainersOf({ checkoutDir: dir, file: '../x/pkgs.nix', attrs: ['hello'] })).rejects.toThrow(
      'lies outside the checkout',
    );
    await expect(maintainersOf({ checkoutDir: dir, file: 'link.nix', attrs: ['hello'] })).rejects.toThrow(
      'lies outside the checkout',
    );
  });

  it('answers an empty list of attributes without evaluating anything', async () => {
    const dir = checkout('abort "never evaluated"');
    expect(await maintainersOf({ checkoutDir: dir, file: 'pkgs.nix', attrs: [] })).toEqual(new Map());
  });
});
