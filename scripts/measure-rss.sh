#!/bin/bash
# Peak RSS (and time) of pgcairn backup, a second backup after churn,
# restore and verify --read-data on one throwaway pgbench cluster, for the
# "flat memory" target. Default scale 700 (about 10 GiB of data; needs
# about 30 GB free under BENCH_TMP).
#
#   bash scripts/measure-rss.sh                # scale 700
#   SCALE=70 bash scripts/measure-rss.sh       # about 1 GiB
#
# env: SCALE, PGBIN (default /usr/lib/postgresql/15/bin), BENCH_TARGET_DIR
#      (release build, default /tmp/pgcairn-bench-target), BENCH_TMP (/tmp),
#      KEEP=1 keeps the work directory (repo, cache, pass) for profiling
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
SCALE=${SCALE:-700}
TARGET=${BENCH_TARGET_DIR:-/tmp/pgcairn-bench-target}
(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --quiet)
B=$TARGET/release/pgcairn
W=$(mktemp -d "${BENCH_TMP:-/tmp}/pgcairn-rss.XXXXXX")
PORT=$((50000 + RANDOM % 10000))
RUN=()
if [ "$(id -u)" = 0 ]; then
  # PostgreSQL refuses to run as root.
  id pgcairn-test >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin pgcairn-test
  RUN=(runuser -u pgcairn-test --)
  chown pgcairn-test: "$W"
fi
as() { "${RUN[@]}" "$@"; }
cleanup() {
  as "$PGBIN/pg_ctl" -D "$W/pg" -m immediate stop >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
log() { echo "[rss $(date +%T)] $*"; }

as "$PGBIN/initdb" -k -A trust -U postgres -D "$W/pg" >/dev/null
as "$PGBIN/pg_ctl" -D "$W/pg" -l "$W/pg.log" -w start \
  -o "-p $PORT -k $W -c max_wal_size=4GB -c checkpoint_timeout=30min" >/dev/null
log "loading pgbench scale $SCALE"
as "$PGBIN/pgbench" -i -q -s "$SCALE" -h "$W" -p "$PORT" -U postgres postgres 2>&1 | tail -1
as "$PGBIN/psql" -h "$W" -p "$PORT" -U postgres -qAtc "checkpoint" postgres
as bash -c "umask 077; head -c 32 /dev/urandom | base64 > '$W/pass'"
C=("$B" --repo "$W/repo" --cache-dir "$W/cache" --passphrase-file "$W/pass")
as env PGCAIRN_NEW_PASSPHRASE_FILE="$W/pass" "$B" --repo "$W/repo" init >/dev/null
backup() {
  as /usr/bin/time -f "$1: %e s wall, %M KB peak RSS" "${C[@]}" backup --server s --pgdata "$W/pg" \
    --conninfo "host=$W port=$PORT user=postgres dbname=postgres" --include-wal --fast-checkpoint --jobs 2
}
log "full backup";   backup "full backup"
log "churn (pgbench -c2 -T20)"
as "$PGBIN/pgbench" -h "$W" -p "$PORT" -U postgres -c 2 -T 20 postgres 2>&1 | grep '^tps' || true
log "second backup"; backup "second backup"
as "$PGBIN/pg_ctl" -D "$W/pg" -m fast stop >/dev/null
rm -rf "$W/pg"
log "restore"
as /usr/bin/time -f "restore: %e s wall, %M KB peak RSS" "${C[@]}" restore --server s latest "$W/restore" --jobs 2 >/dev/null
du -sb "$W/restore" | awk '{print "restored bytes", $1}'
rm -rf "$W/restore"
log "verify --read-data 100"
as /usr/bin/time -f "verify: %e s wall, %M KB peak RSS" "${C[@]}" verify --read-data 100 >/dev/null || echo "verify exit $?"
