import type { SandboxSpec } from './spec.js';

/**
 * A `sandbox-exec` profile (SBPL) with the intent of the Linux sandbox: read the system, the Nix store and the
 * spec's mounts; write only the spec's writable mounts and the temporary directory; no network unless allowed.
 *
 * UNTESTED: CI has no macOS. The profile is kept to these few rules so it can be reviewed line by line. Known
 * differences from Linux: there are no namespaces, so a sandboxed process still sees the host's process list and
 * shares its loopback (network rules deny sockets instead); mounts cannot be moved, so `target` must equal
 * `source`; `/tmp` is the host's `/private/tmp`, so writes there are allowed only under `TMPDIR` of the spec.
 */
export function darwinProfile(spec: SandboxSpec): string {
  const q = (p: string): string => JSON.stringify(p);
  const readOnly = spec.mounts.filter((m) => !m.writable).map((m) => m.source);
  const writable = spec.mounts.filter((m) => m.writable).map((m) => m.source);
  const tmp = spec.env.TMPDIR;
  if (tmp !== undefined) writable.push(tmp);
  const lines = [
    '(version 1)',
    '(deny default)',
    // Run programs and their children; signal only processes of this sandbox.
    '(allow process-exec process-fork)',
    '(allow signal (target same-sandbox))',
    '(allow sysctl-read)',
    '(allow mach-lookup (global-name "com.apple.system.opendirectoryd.libinfo"))',
    '(allow file-read-metadata)',
    `(allow file-read* ${['/usr', '/bin', '/sbin', '/System', '/Library', '/nix/store', '/dev', '/private/var/db/dyld'].map((p) => `(subpath ${q(p)})`).join(' ')})`,
    '(allow file-write* (literal "/dev/null") (literal "/dev/tty"))',
  ];
  if (readOnly.length > 0) lines.push(`(allow file-read* ${readOnly.map((p) => `(subpath ${q(p)})`).join(' ')})`);
  if (writable.length > 0) {
    lines.push(`(allow file-read* file-write* ${writable.map((p) => `(subpath ${q(p)})`).join(' ')})`);
  }
  // A read-only mount inside a writable one (a check's ro_bind in its checkout) stays read-only: the later rule
  // wins in SBPL, as the later mount hides the earlier one with bubblewrap.
  if (readOnly.length > 0) lines.push(`(deny file-write* ${readOnly.map((p) => `(subpath ${q(p)})`).join(' ')})`);
  if (spec.network) lines.push('(allow network*)', '(allow file-read* (subpath "/private/etc"))');
  return lines.join('\n');
}
