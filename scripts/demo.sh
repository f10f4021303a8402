#!/usr/bin/env bash
# The main job: back up a throwaway PostgreSQL cluster into an encrypted
# pgcairn repository with WAL archiving, then restore it to a point in time
# in a new directory, start it, and show the deleted table is back.
# Cleans up after itself; the last line is the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
if [ ! -x "$PGBIN/initdb" ]; then
  echo "demo: installing PostgreSQL 15"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
fi
echo "demo: building pgcairn (release)"
cargo build --release --quiet
BIN=$ROOT/target/release/pgcairn

# PostgreSQL refuses to run as root: use an unprivileged user then.
RUN=()
if [ "$(id -u)" = 0 ]; then
  id pgcairn-test >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin pgcairn-test
  RUN=(runuser -u pgcairn-test --)
fi
WORK=$(mktemp -d /tmp/pgcairn-demo.XXXXXX)
chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown pgcairn-test: "$WORK"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PORT2=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/restored" -m immediate stop >/dev/null 2>&1 || true
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

as() { "${RUN[@]}" env HOME="$WORK" "$@"; }
psql_src() { as "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres -d postgres -c "$1"; }
psql_dst() { as "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT2" -U postgres -d postgres -c "$1"; }

PASSFILE=$WORK/passphrase
echo "demo passphrase $(date +%s%N)" > "$PASSFILE"
chmod 600 "$PASSFILE"
[ "$(id -u)" = 0 ] && chown pgcairn-test: "$PASSFILE"
export PGCAIRN_REPO="$WORK/repo" PGCAIRN_CACHE_DIR="$WORK/cache"
CAIRN=(as "$BIN" --passphrase-file "$PASSFILE")

echo "demo: creating an encrypted repository in $PGCAIRN_REPO"
as env PGCAIRN_NEW_PASSPHRASE_FILE="$PASSFILE" "$BIN" init >/dev/null

echo "demo: starting a throwaway cluster (data checksums, archive_command = pgcairn archive-push)"
as "$PGBIN/initdb" -k -A trust -U postgres -D "$WORK/data" >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
archive_mode = on
archive_command = '$BIN --repo $PGCAIRN_REPO --cache-dir $PGCAIRN_CACHE_DIR --passphrase-file $PASSFILE archive-push --server demo %p'
listen_addresses = ''
CONF
as "$PGBIN/pg_ctl" -D "$WORK/data" -w -l "$WORK/data.log" -o "-p $PORT -k $WORK" start >/dev/null

echo "demo: loading data (pgbench scale 5 and a customers table)"
as "$PGBIN/pgbench" -i -s 5 -q -h "$WORK" -p "$PORT" -U postgres postgres >/dev/null 2>&1
psql_src "CREATE TABLE customers AS SELECT g AS id, md5(g::text) AS name FROM generate_series(1, 50000) g"

echo "demo: pgcairn backup"
"${CAIRN[@]}" backup --server demo --pgdata "$WORK/data" --conninfo "host=$WORK port=$PORT user=postgres dbname=postgres" --fast-checkpoint

echo "demo: more writes after the backup, then the accident"
as "$PGBIN/pgbench" -n -t 500 -h "$WORK" -p "$PORT" -U postgres postgres >/dev/null 2>&1
psql_src "INSERT INTO customers SELECT g, md5(g::text) FROM generate_series(50001, 50100) g"
TARGET=$(psql_src "SELECT clock_timestamp()")
echo "demo: remembered time $TARGET; now: DROP TABLE customers"
psql_src "DROP TABLE customers"
SEG=$(psql_src "SELECT pg_walfile_name(pg_current_wal_lsn())")
psql_src "SELECT pg_switch_wal()" >/dev/null
for _ in $(seq 1 600); do
  LAST=$(psql_src "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
  [[ "$LAST" > "$SEG" || "$LAST" == "$SEG" ]] && break
  sleep 0.1
done
"${CAIRN[@]}" list --server demo

echo "demo: pgcairn restore latest --target-time '$TARGET' into a new directory"
"${CAIRN[@]}" restore --server demo latest "$WORK/restored" --target-time "$TARGET" --target-action promote
as "$PGBIN/pg_ctl" -D "$WORK/restored" -w -t 300 -l "$WORK/restored.log" -o "-p $PORT2 -k $WORK" start >/dev/null
for _ in $(seq 1 600); do
  [ "$(psql_dst "SELECT pg_is_in_recovery()")" = "f" ] && break
  sleep 0.1
done
COUNT=$(psql_dst "SELECT count(*) FROM customers" 2>/dev/null || echo 0)
echo "demo: restored cluster has customers: $COUNT rows (expected 50100)"
if [ "$COUNT" = "50100" ]; then
  echo "demo: OK: backed up, archived WAL, restored to $TARGET, and the dropped table is back with all 50100 rows"
else
  echo "demo: FAILED: expected 50100 rows in customers, found $COUNT"; tail -20 "$WORK/restored.log"; exit 1
fi
