#!/usr/bin/env bash
# `npm run demo`: makes the demo repository (examples/review) in a temporary directory and reviews its change
# with `ekaci review` on the embedded system — a coordinator and a local agent over loopback gRPC.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/ekaci-demo-XXXXXX")
trap 'rm -rf "$work"' EXIT
bash "$here/make-repo.sh" "$here/review" "$work/repo" >/dev/null
node "$here/../bin/ekaci.js" review --repo "$work/repo" --base HEAD~1 --head HEAD "$@"
