#!/usr/bin/env bash
# The main job. PLACEHOLDER until backup and restore exist (issues 3 and 4):
# for now it builds pgcairn, creates an encrypted repository in a throwaway
# directory, shows it, proves a wrong passphrase is refused, and cleans up.
# The full demo (back up a throwaway PostgreSQL cluster, restore it to a point
# in time, show the data is back) replaces this script.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/pgcairn
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PGCAIRN_REPO="$WORK/repo" PGCAIRN_CACHE_DIR="$WORK/cache"
echo "demo: this is a placeholder; PostgreSQL backup and restore are not built yet."
PGCAIRN_NEW_PASSPHRASE=demo-passphrase "$BIN" init
PGCAIRN_PASSPHRASE=demo-passphrase "$BIN" info
if PGCAIRN_PASSPHRASE=wrong "$BIN" info 2>/dev/null; then
  echo "demo: FAILED (a wrong passphrase was accepted)"; exit 1
fi
echo "demo: OK (repository created and unlocked; wrong passphrase refused)"
