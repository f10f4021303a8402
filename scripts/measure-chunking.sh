#!/bin/bash
# Measure which FastCDC chunk sizes and which zstd level pgcairn should default to, on real
# PostgreSQL 15 data files.
#
#   bash scripts/measure-chunking.sh [--scale N] [--txns N] [--no-speed] [--out FILE] [--keep]
#
# Creates a throwaway cluster (data checksums on, full_page_writes on) in a mktemp directory,
# loads pgbench plus two tables with realistic entropy, freezes and checkpoints it, and runs
# scripts/measure-chunking (a standalone Rust crate) over the data directory without pg_wal
# ("day 0"). Then one "day" of churn: pgbench transactions, appended rows, updates to the
# newest 1% of a table; CHECKPOINT; the tool runs again ("day 1"). The WAL segments written
# during the churn (complete 16 MiB files, byte-identical to what archive_command would ship)
# go through the compression measurements separately. Prints markdown tables and writes them
# to --out (default /tmp/measure-results.md). Everything is removed on exit unless --keep.
# --txns sets the pgbench transactions per client (2 clients) of the churn day (default 2500);
# --no-speed skips the throughput/compression-level part (dedup tables only).
#
# Run as root (a system user "pgcairn-test" is created to own the cluster) or as any non-root
# user (who then owns the cluster). Needs PostgreSQL 15 server binaries, pgbench, psql, cargo.
set -euo pipefail
export LC_ALL=C

SCALE=20
TXNS_PER_CLIENT=2500
SPEED=1
OUT=/tmp/measure-results.md
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) SCALE=$2; shift 2 ;;
    --txns) TXNS_PER_CLIENT=$2; shift 2 ;;
    --no-speed) SPEED=0; shift ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/measure-target}
TOOL=$CARGO_TARGET_DIR/release/measure-chunking
PGUSER_OS=pgcairn-test

log() { echo "[$(date +%T)] $*" >&2; }

# --- the OS user owning the cluster -------------------------------------------------------------
if [ "$(id -u)" = 0 ]; then
  if ! id "$PGUSER_OS" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$PGUSER_OS"
  fi
  as_pg() { runuser -u "$PGUSER_OS" -- "$@"; }
else
  as_pg() { "$@"; }
fi

# --- build the measuring tool (its own crate, its own target dir) -------------------------------
log "building measure-chunking (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --quiet --release --locked --manifest-path "$HERE/measure-chunking/Cargo.toml" \
  || cargo build --quiet --release --manifest-path "$HERE/measure-chunking/Cargo.toml"

# --- throwaway cluster ---------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/measure-chunking.XXXXXX)
chmod 755 "$WORK"
PGDATA=$WORK/pg
SOCK=$WORK/sock
STATE=$WORK/state
mkdir -p "$SOCK" "$STATE" "$PGDATA"
chmod 700 "$PGDATA"
[ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$WORK" "$SOCK" "$PGDATA"
STARTED=0
cleanup() {
  local rc=$?
  if [ "$STARTED" = 1 ]; then
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" stop -m immediate >/dev/null 2>&1 || true
  fi
  if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free TCP port (the server listens only on its private Unix socket, but the port number also
# names the socket and the shared-memory key, so keep it clear of anything else).
PORT=
for _ in $(seq 1 100); do
  p=$((20000 + RANDOM % 30000))
  if [ -z "$(ss -Htln "sport = :$p" 2>/dev/null)" ] && [ ! -e "/tmp/.s.PGSQL.$p" ]; then PORT=$p; break; fi
done
[ -n "$PORT" ] || { echo "no free port found" >&2; exit 1; }

log "initdb in $PGDATA (port $PORT)"
as_pg "$PGBIN/initdb" -D "$PGDATA" --data-checksums -U postgres -A trust >/dev/null
cat >> "$PGDATA/postgresql.conf" <<CONF
# measure-chunking
port = $PORT
listen_addresses = ''
unix_socket_directories = '$SOCK'
wal_level = replica
full_page_writes = on
max_wal_size = 4GB
wal_keep_size = 4GB          # keep every segment written during the run readable in pg_wal
checkpoint_timeout = 1h      # checkpoints only where this script asks for them
fsync = off                  # throwaway cluster: file contents are unaffected
synchronous_commit = off
shared_buffers = 256MB
CONF
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg.log" -w start >/dev/null
STARTED=1
"$PGBIN/pg_isready" -q -h "$SOCK" -p "$PORT"

sql() { as_pg psql -X -q -A -t -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres -c "$1"; }
PGBENCH=(as_pg pgbench -h "$SOCK" -p "$PORT" -U postgres)

# --- load ----------------------------------------------------------------------------------------
log "pgbench -i -s $SCALE"
"${PGBENCH[@]}" -i -s "$SCALE" -q postgres >/dev/null 2>&1
ROWS=$((SCALE * 100000))
log "loading entropy tables ($ROWS rows each)"
# pgbench_accounts is mostly blank padding; these tables look more like real rows: hex text,
# spread-out timestamps, numerics and floats, a primary key each.
sql "CREATE TABLE customer_orders (
       id bigint PRIMARY KEY, ref text, placed_at timestamptz, amount numeric(12,2),
       weight double precision, note text)"
sql "INSERT INTO customer_orders
       SELECT g, md5(g::text || 'ref'), timestamptz '2023-01-01' + random() * interval '700 days',
              round((random() * 100000)::numeric, 2), random() * 50,
              substr(md5(random()::text) || md5(random()::text), 1, 16 + (g % 40))
       FROM generate_series(1, $ROWS) g"
sql "CREATE TABLE audit_log (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
       actor int, payload text)"
sql "INSERT INTO audit_log (at, actor, payload)
       SELECT now() - (($ROWS - g) || ' s')::interval, (random() * 5000)::int, md5(random()::text)
       FROM generate_series(1, $ROWS / 2) g"
log "VACUUM (FREEZE, ANALYZE); CHECKPOINT"
sql "VACUUM (FREEZE, ANALYZE)"
sql "CHECKPOINT"
DATA_MB=$(du -sm --exclude=pg_wal "$PGDATA" | cut -f1)

# --- day 0 ---------------------------------------------------------------------------------------
log "day 0: chunking $DATA_MB MB with every chunker"
"$TOOL" day --dir "$PGDATA" --exclude pg_wal --state "$STATE" --day 0

# --- one day of churn ----------------------------------------------------------------------------
WAL_FIRST=$(sql "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
log "day 1 churn: pgbench 2 clients x $TXNS_PER_CLIENT transactions, appends, hot 1% updates"
"${PGBENCH[@]}" -n -c 2 -j 2 -t "$TXNS_PER_CLIENT" postgres >/dev/null 2>&1
sql "INSERT INTO audit_log (actor, payload)
       SELECT (random() * 5000)::int, md5(random()::text) FROM generate_series(1, $ROWS / 20)"
sql "INSERT INTO customer_orders
       SELECT g, md5(g::text || 'ref'), now() - random() * interval '1 day',
              round((random() * 100000)::numeric, 2), random() * 50, md5(random()::text)
       FROM generate_series($ROWS + 1, $ROWS + $ROWS / 50) g"
sql "UPDATE customer_orders SET amount = amount + 1, placed_at = placed_at + interval '1 hour'
       WHERE id > (SELECT max(id) FROM customer_orders) * 0.99"
sql "CHECKPOINT"
# Close the current segment so that every churn segment is complete (as archived).
sql "SELECT pg_switch_wal()" >/dev/null
WAL_NEXT=$(sql "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
DATA1_MB=$(du -sm --exclude=pg_wal "$PGDATA" | cut -f1)

log "day 1: chunking $DATA1_MB MB"
"$TOOL" day --dir "$PGDATA" --exclude pg_wal --state "$STATE" --day 1

# --- WAL segments written by the churn -----------------------------------------------------------
WAL_SEGS=()
CHURN_SEGS=0
while read -r f; do
  if [[ "$f" > "$WAL_FIRST" || "$f" == "$WAL_FIRST" ]] && [[ "$f" < "$WAL_NEXT" ]]; then
    CHURN_SEGS=$((CHURN_SEGS + 1))
    WAL_SEGS+=("$PGDATA/pg_wal/$f")
  fi
done < <(ls "$PGDATA/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort)
# A handful is enough: keep the last 6 (those without the tail of the load before day 0).
if [ ${#WAL_SEGS[@]} -gt 6 ]; then WAL_SEGS=("${WAL_SEGS[@]: -6}"); fi
[ ${#WAL_SEGS[@]} -gt 0 ] || { echo "no complete WAL segment from the churn" >&2; exit 1; }
log "WAL: $CHURN_SEGS segments written by the churn ($WAL_FIRST .. before $WAL_NEXT), measuring ${#WAL_SEGS[@]}"

# --- speed and compression -----------------------------------------------------------------------
SPEED_OUT="(speed measurements skipped: --no-speed)"
if [ "$SPEED" = 1 ]; then
  log "speed: chunking, BLAKE3, zstd levels (single thread)"
  SPEED_OUT=$("$TOOL" speed --dir "$PGDATA" --exclude pg_wal --wal "${WAL_SEGS[@]}" \
                --avg 1048576 --sample-mib 256 --reps 3)
fi
sql "SELECT pg_relation_filepath(c.oid) || ' ' || c.relname FROM pg_class c
       WHERE pg_relation_filepath(c.oid) IS NOT NULL" > "$WORK/relnames.txt"
REPORT=$("$TOOL" report --state "$STATE" --names "$WORK/relnames.txt" \
           --breakdown cdc-256K,cdc-1M,fixed-8K,fixed-16K,fixed-32K,fixed-64K)

PGVER=$(sql "SHOW server_version")
{
  echo "# pgcairn chunking / compression measurements"
  echo
  echo "- Date: $(date -Is)"
  echo "- Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB RAM, load average at end $(cut -d' ' -f1-3 /proc/loadavg) (other builds may share the cores)"
  echo "- PostgreSQL $PGVER, data checksums on, full_page_writes on; pgbench scale $SCALE + customer_orders ($ROWS rows) + audit_log ($((ROWS / 2)) rows); VACUUM (FREEZE) + CHECKPOINT before day 0"
  echo "- Data directory without pg_wal: day 0 $DATA_MB MB, day 1 $DATA1_MB MB (du)"
  echo "- Day-1 churn: pgbench -n -c 2 -j 2 -t $TXNS_PER_CLIENT ($((2 * TXNS_PER_CLIENT)) TPC-B transactions), +$((ROWS / 20)) audit_log rows, +$((ROWS / 50)) customer_orders rows, UPDATE of the newest 1% of customer_orders, CHECKPOINT; it wrote $CHURN_SEGS WAL segments"
  echo "- WAL measured: ${#WAL_SEGS[@]} complete 16 MiB segments from that churn: $(for s in "${WAL_SEGS[@]}"; do basename "$s"; done | tr '\n' ' ')"
  echo "- Chunkers: fastcdc 5.0.0 v2020, normalization level 1, non-zero gear seed derived from a test key; min = avg/4, max = avg*4; chunk ids keyed BLAKE3 1.8.7; zstd 0.14.4 (libzstd 1.5.7); every chunk compressed on its own"
  echo "- Command: \`bash scripts/measure-chunking.sh --scale $SCALE --txns $TXNS_PER_CLIENT$([ "$SPEED" = 1 ] || echo ' --no-speed')\` (tool: scripts/measure-chunking, built with CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  echo
  echo "$REPORT"
  echo
  echo "$SPEED_OUT"
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
cat "$OUT"
log "results written to $OUT"
