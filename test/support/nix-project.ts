import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A fresh temporary directory for one test. */
export function tempDir(prefix = 'ekaci-test-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** A random tag put into derivation names so that no two test runs share a store path. */
export function nonce(): string {
  return randomBytes(6).toString('hex');
}

/**
 * Writes a Nix file whose body can use `mk name { deps = [ … ]; script = "…"; … }`: a plain derivation with
 * `/bin/sh` as builder (no nixpkgs). Scripts run without PATH: use shell builtins or absolute paths
 * (`/bin/sleep`). `$deps` holds the dependencies' output paths.
 */
export function writeNixFile(dir: string, tag: string, body: string): string {
  const file = join(dir, 'default.nix');
  writeFileSync(
    file,
    `let
  tag = "${tag}";
  mk = name: { deps ? [], script ? "echo built > $out", ... }@args:
    derivation ((builtins.removeAttrs args [ "script" ]) // {
      name = "\${name}-\${tag}";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" script ];
      inherit deps;
    });
in
${body}
`,
  );
  return file;
}
