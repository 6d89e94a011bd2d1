/**
 * A revision as the caller wrote it, and where its fetched commit is kept in the mirror. Every fetch writes a local
 * ref: negotiation only offers the server what refs reach, so a mirror without refs would download the whole
 * history again on every fetch. Each kind has its own subtree, so that no name can collide with another's directory.
 */
export type Revision =
  { kind: 'commit'; text: string; sha: string; localRef: string } | { kind: 'ref'; text: string; localRef: string };

/** Full object names: SHA-1 (40 hex digits) and SHA-256 (64) repositories. */
const FULL_SHA = /^(?:[0-9a-f]{40}|[0-9a-f]{64})$/i;

/** What git could take for an abbreviated object name; those cannot be fetched, which the error message explains. */
export const ABBREVIATED_SHA = /^[0-9a-f]{4,39}$/i;

/** Parses `rev`, or returns why it is not a revision git can fetch. */
export function parseRevision(text: string): Revision | string {
  if (FULL_SHA.test(text)) {
    const sha = text.toLowerCase();
    return { kind: 'commit', text, sha, localRef: `refs/ekaci/commits/${sha}` };
  }
  const invalid = refNameProblem(text);
  if (invalid !== undefined) return invalid;
  const localRef = text.startsWith('refs/')
    ? `refs/ekaci/refs/${text.slice('refs/'.length)}`
    : `refs/ekaci/short/${text}`;
  return { kind: 'ref', text, localRef };
}

/** The refspec that fetches `revision` into its local ref; `+` because branches and pull refs are force-pushed. */
export function refspec(revision: Revision): string {
  return `+${revision.kind === 'commit' ? revision.sha : revision.text}:${revision.localRef}`;
}

/**
 * git's own `check-ref-format --allow-onelevel` rules, checked here rather than by a process per call, plus a ban on a
 * leading '-' so that no revision can ever be read as an option.
 */
function refNameProblem(name: string): string | undefined {
  if (name === '' || name === '@') return 'it is empty';
  if (name.startsWith('-')) return "it starts with '-'";
  if (name.startsWith('/') || name.endsWith('/') || name.includes('//')) return 'it has an empty path component';
  if (name.endsWith('.')) return "it ends with '.'";
  if (name.includes('..')) return "it contains '..'";
  if (name.includes('@{')) return "it contains '@{'";
  if (/[\x00-\x20\x7f~^:?*[\\]/.test(name)) return 'it contains a space, a control character or one of ~^:?*[\\';
  for (const part of name.split('/')) {
    if (part.startsWith('.')) return "a component starts with '.'";
    if (part.endsWith('.lock')) return "a component ends with '.lock'";
  }
  return undefined;
}
