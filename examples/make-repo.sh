#!/usr/bin/env bash
# Creates a git repository with one commit per snapshot directory of SNAPSHOTS (in name order: 1-base, 2-head,
# …), each commit holding exactly that snapshot's files plus examples/lib.nix (plain derivations built by
# /bin/sh), and prints the commit ids, one per line. A `nonce.nix` holding NONCE is written into every commit: a
# fresh nonce makes every derivation new, so nothing is found already built.
#
#   examples/make-repo.sh SNAPSHOTS DEST [NONCE]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 SNAPSHOTS DEST [NONCE]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
snapshots=$(cd "$1" && pwd)
dest=$2
nonce=${3:-demo}
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
  echo "$0: $dest exists and is not empty" >&2
  exit 2
fi
mkdir -p "$dest"
git() { command git -C "$dest" -c user.name=eka-ci -c user.email=eka-ci@example.invalid -c commit.gpgsign=false "$@"; }
git init -q -b main
for snapshot in "$snapshots"/[0-9]*/; do
  git rm -rq --ignore-unmatch .
  cp -a "$snapshot". "$dest"/
  cp "$here/lib.nix" "$dest/lib.nix"
  printf '"%s"\n' "$nonce" >"$dest/nonce.nix"
  git add -A
  git commit -qm "$(basename "$snapshot" | sed 's/^[0-9]*-//')"
  git rev-parse HEAD
done
