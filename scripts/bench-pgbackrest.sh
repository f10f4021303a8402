#!/usr/bin/env bash
# Side-by-side benchmark: pgcairn vs pgBackRest (Debian package) vs restic on
# one throwaway PostgreSQL 15 cluster. A full backup, then DAYS days of churn
# each followed by a backup from every tool, then a restore of each tool's
# latest backup into an empty directory, each restored cluster started and
# checked against the source's final contents.
#
#   scripts/bench-pgbackrest.sh                 # quick: scale 20 (~0.7 GB), 3 days, 10 s of pgbench a day
#   scripts/bench-pgbackrest.sh --scale 150     # headline: ~5.8 GB, 5 days, 30 s of pgbench a day
#   options: --quick | --scale N | --days N | --churn-seconds N | --out FILE (default /tmp/bench-results.md)
#            --keep (leave the work directory) | --no-encryption (pgcairn and pgBackRest unencrypted;
#            restic always encrypts)
#   env: BENCH_TARGET_DIR (cargo target dir, default /tmp/pgcairn-bench-target), PGBIN, BENCH_TMP
#
# How it measures (all three tools, same cluster, same moment, the server idle during backups):
#  - WAL: one archive_command chains `pgcairn archive-push && pgbackrest archive-push`, so both
#    archives hold the same WAL from the full backup on (the bulk load's WAL is discarded). restic
#    backs up the data directory only, between pg_backup_start(fast) and pg_backup_stop(false); its
#    restored copy gets WAL from pgcairn's archive (archive-get) to start.
#  - Time: wall clock of each command. The split start(checkpoint) / copy / stop+WAL comes from the
#    server log: backups connect as role bench_backup, which logs every statement with its duration
#    (log_min_duration_statement = 0, log_line_prefix starts with epoch %n); "start" ends when
#    pg_backup_start returns, "copy" ends when pg_backup_stop is called, "stop+WAL" is the rest
#    (stop, waiting for the WAL to be archived, writing the manifest).
#  - MB/s: the data directory's bytes without pg_wal (du -sb, 1 MB = 1e6 B) / wall seconds, the same
#    numerator for every tool.
#  - Repository: du -sb of each repository after each day (pgcairn's and pgBackRest's include
#    their WAL archive; restic's holds data only, and "new" shows pgcairn's backup data alone).
#  - Peak RSS: /usr/bin/time -v (for pgBackRest, the largest of its processes, not their sum).
#  - Ceiling: after the full backups, examples/compress_ceiling reads the data directory and compresses
#    it the way pgcairn does (zstd level 3, independent 32 KiB blocks, 2 threads) and does nothing else;
#    its MB/s bounds pgcairn's full-backup MB/s on this machine.
#  - Restore: wall clock of the tool's restore + `sync -f` of the target (pgcairn and pgBackRest
#    fsync themselves, restic does not), each tool's repository read once (untimed) just before
#    its restore, so every tool restores from the page cache whatever the bench wrote since.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SCALE=20 DAYS=3 CHURN_SECS=10 OUT=/tmp/bench-results.md KEEP=0 ENCRYPT=1 HEADLINE=0
DAYS_SET=0 CHURN_SET=0
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) SCALE=20; HEADLINE=0 ;;
    --scale) SCALE=${2:?--scale needs a number}; HEADLINE=1; shift ;;
    --days) DAYS=${2:?--days needs a number}; DAYS_SET=1; shift ;;
    --churn-seconds) CHURN_SECS=${2:?}; CHURN_SET=1; shift ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --keep) KEEP=1 ;;
    --no-encryption) ENCRYPT=0 ;;
    -h|--help) usage 0 ;;
    *) echo "bench: unknown option $1" >&2; usage 2 >&2 ;;
  esac
  shift
done
if [ "$HEADLINE" = 1 ]; then
  [ "$DAYS_SET" = 1 ] || DAYS=5
  [ "$CHURN_SET" = 1 ] || CHURN_SECS=30
fi
[[ "$SCALE" =~ ^[0-9]+$ && "$DAYS" =~ ^[0-9]+$ && "$CHURN_SECS" =~ ^[0-9]+$ && "$SCALE" -ge 1 ]] \
  || { echo "bench: --scale, --days and --churn-seconds take whole numbers" >&2; exit 2; }

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# --- what the machine lacks ---------------------------------------------------
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
missing=()
[ -x "$PGBIN/initdb" ] && [ -x "$PGBIN/pgbench" ] || missing+=(postgresql-15)
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v restic >/dev/null || missing+=(restic)
[ -x /usr/bin/time ] || missing+=(time)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi

TARGET_DIR=${BENCH_TARGET_DIR:-/tmp/pgcairn-bench-target}
log "building pgcairn (release, CARGO_TARGET_DIR=$TARGET_DIR)"
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet --bin pgcairn --example compress_ceiling

# --- the unprivileged user, the work directory, ports -------------------------
RUN=()
if [ "$(id -u)" = 0 ]; then
  id pgcairn-test >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin pgcairn-test
  RUN=(runuser -u pgcairn-test --)
fi
W=$(mktemp -d "${BENCH_TMP:-/tmp}/pgcairn-bench.XXXXXX")
chmod 755 "$W"
PG=$W/pg RESTORES=$W/restore T=$W/times
SRC_UP=0 RESTORED_PG=""
cleanup() {
  local rc=$?
  if [ -n "$RESTORED_PG" ] && [ -f "$RESTORED_PG/postmaster.pid" ]; then
    "${RUN[@]}" "$PGBIN/pg_ctl" -D "$RESTORED_PG" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ "$SRC_UP" = 1 ]; then "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PG" -m immediate stop >/dev/null 2>&1 || true; fi
  if [ "$KEEP" = 1 ]; then log "kept $W"; else rm -rf "$W"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "error at line $LINENO (exit $?)"' ERR
mkdir -p "$W/home" "$T" "$RESTORES" "$W/label" "$W/pgcairn-cache" "$W/restic-cache" "$W/pbr-log" "$W/pbr-lock" "$W/pbr-spool"
install -m 755 "$TARGET_DIR/release/pgcairn" "$W/pgcairn"
BIN=$W/pgcairn
if [ "$(id -u)" = 0 ]; then chown -R pgcairn-test: "$W"; fi

free_port() {
  python3 - "$@" <<'PY'
import socket, sys
used = set(sys.argv[1:])
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = str(s.getsockname()[1]); s.close()
    if p not in used:
        print(p); break
PY
}
PORT=$(free_port); PORT2=$(free_port "$PORT")

as() { "${RUN[@]}" env HOME="$W/home" "$@"; }
sql() { as "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U postgres -d postgres -c "$1"; }
sql2() { as "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W" -p "$PORT2" -U postgres -d postgres -c "$1"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
data_bytes() { du -sb --exclude=pg_wal "$1" | cut -f1; }
dir_bytes() { du -sb "$1" | cut -f1; }
rss_kb() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1"; }

# --- secrets and repositories ----------------------------------------------------
PASSFILE=$W/passphrase
head -c 24 /dev/urandom | base64 > "$PASSFILE"
chmod 600 "$PASSFILE"
if [ "$(id -u)" = 0 ]; then chown pgcairn-test: "$PASSFILE"; fi
CREPO=$W/pgcairn-repo
CAIRN=("$BIN" --repo "$CREPO" --cache-dir "$W/pgcairn-cache" --passphrase-file "$PASSFILE")
PBR_CONF=$W/pgbackrest.conf
PBR=(pgbackrest "--config=$PBR_CONF" --stanza=bench)
export RESTIC_REPOSITORY=$W/restic-repo RESTIC_PASSWORD_FILE=$PASSFILE RESTIC_CACHE_DIR=$W/restic-cache
RESTIC=(env RESTIC_REPOSITORY="$RESTIC_REPOSITORY" RESTIC_PASSWORD_FILE="$PASSFILE" RESTIC_CACHE_DIR="$W/restic-cache" restic)

# --- the cluster ---------------------------------------------------------------------
log "work directory $W; cluster on port $PORT (socket in $W)"
as "$PGBIN/initdb" -k -A trust -U postgres -D "$PG" >/dev/null
cat >> "$PG/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$W'
wal_level = replica
archive_mode = on
archive_command = 'true'
max_wal_size = 4GB
log_line_prefix = '%n [%p] %u '
log_checkpoints = on
CONF
as "$PGBIN/pg_ctl" -D "$PG" -w -t 300 -l "$W/pg.log" start >/dev/null
SRC_UP=1
sql "CREATE ROLE bench_backup SUPERUSER LOGIN; ALTER ROLE bench_backup SET log_min_duration_statement = 0"

# Wait (bounded) until every completed WAL segment up to now has been archived.
wait_archived() {
  local seg last i ready
  seg=$(sql "SELECT pg_walfile_name(pg_current_wal_lsn())")
  sql "SELECT pg_switch_wal()" >/dev/null
  for i in $(seq 1 6000); do
    last=$(sql "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
    ready=$(find "$PG/pg_wal/archive_status" -name '*.ready' | wc -l)
    if [ "$ready" = 0 ] && [[ "$last" > "$seg" || "$last" == "$seg" ]]; then return 0; fi
    sleep 0.1
  done
  sql "SELECT * FROM pg_stat_archiver" >&2
  die "WAL up to $seg was not archived within 600 s (see $W/pg.log)"
}

log "loading pgbench scale $SCALE, real_data and events ($((SCALE * 100000)) rows each)"
as "$PGBIN/pgbench" -i -s "$SCALE" -q -h "$W" -p "$PORT" -U postgres postgres >/dev/null 2>&1
sql "CREATE TABLE real_data AS SELECT g AS id, md5(g::text) || md5((g*7)::text) AS txt,
       now() - (g || ' s')::interval AS ts, (random()*1e6)::numeric(12,3) AS num, random() AS f
     FROM generate_series(1, $SCALE * 100000) g"
sql "CREATE TABLE events AS SELECT g AS id, now() AS at, md5(random()::text) AS payload
     FROM generate_series(1, $SCALE * 100000) g"
sql "VACUUM (FREEZE, ANALYZE)"
sql "CHECKPOINT"
wait_archived

# --- repositories, then the real archive_command --------------------------------------
if [ "$ENCRYPT" = 1 ]; then
  as env PGCAIRN_NEW_PASSPHRASE_FILE="$PASSFILE" "$BIN" --repo "$CREPO" init >/dev/null
  PBR_CIPHER="repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$(cat "$PASSFILE")"
  ENC_NOTE="all three encrypted: pgcairn XChaCha20-Poly1305, pgBackRest aes-256-cbc, restic AES-256-CTR+Poly1305"
else
  as "$BIN" --repo "$CREPO" init --encryption none >/dev/null
  PBR_CIPHER=""
  ENC_NOTE="pgcairn and pgBackRest unencrypted; restic always encrypts (AES-256-CTR+Poly1305)"
fi
cat > "$PBR_CONF" <<CONF
[global]
repo1-path=$W/pgbackrest-repo
repo1-retention-full=99
$PBR_CIPHER
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-async=n
log-level-console=warn
log-level-file=info
log-path=$W/pbr-log
lock-path=$W/pbr-lock
spool-path=$W/pbr-spool

[bench]
pg1-path=$PG
pg1-port=$PORT
pg1-socket-path=$W
pg1-user=bench_backup
CONF
chmod 600 "$PBR_CONF"
if [ "$(id -u)" = 0 ]; then chown pgcairn-test: "$PBR_CONF"; fi
as "${RESTIC[@]}" init >/dev/null
as "${PBR[@]}" stanza-create >/dev/null
ARCHIVE_CMD="${CAIRN[*]} archive-push --server bench %p && ${PBR[*]} archive-push %p"
sql "ALTER SYSTEM SET archive_command = '$ARCHIVE_CMD'"
sql "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 1 100); do
  [ "$(sql "SHOW archive_command")" = "$ARCHIVE_CMD" ] && break
  sleep 0.1
done
[ "$(sql "SHOW archive_command")" = "$ARCHIVE_CMD" ] || die "archive_command was not reloaded"
wait_archived
as "${PBR[@]}" check >/dev/null

# --- one backup of each tool -----------------------------------------------------------
RESULTS=$W/results.tsv
printf 'tool\tday\twall\tstart\tcopy\tstop\tdata\tnew\trepo\trss_kb\textra\n' > "$RESULTS"

# Phases from the server log between $1 and $2 (epoch seconds): prints "start copy stop".
phases() {
  python3 - "$W/pg.log" "$1" "$2" <<'PY'
import re, sys
log, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
head = re.compile(r'^(\d+\.\d+) \[\d+\] ')
rx = re.compile(r'^(\d+\.\d+) \[\d+\] bench_backup LOG:  duration: ([\d.]+) ms  (?:statement|execute [^:]*): (.*)', re.S)
entries, cur = [], None
for line in open(log, errors="replace"):
    if head.match(line):
        cur = [line]; entries.append(cur)
    elif cur is not None:
        cur.append(line)  # continuation of a multi-line statement
start_end = stop_begin = None
for e in entries:
    m = rx.match("".join(e))
    if not m:
        continue
    ts, dur, text = float(m.group(1)), float(m.group(2)) / 1000, m.group(3)
    if not (t0 - 0.005 <= ts <= t1 + 0.005):
        continue
    if "pg_backup_start" in text and start_end is None:
        start_end = ts
    elif "pg_backup_stop" in text:
        stop_begin = ts - dur
if start_end is None or stop_begin is None:
    print("- - -")
else:
    start_end = max(t0, start_end); stop_begin = min(max(stop_begin, start_end), t1)
    print(f"{start_end - t0:.2f} {stop_begin - start_end:.2f} {t1 - stop_begin:.2f}")
PY
}

record() { # tool day t0 t1 timefile new extra
  local data repo ph
  data=$(data_bytes "$PG")
  case "$1" in
    pgcairn) repo=$(dir_bytes "$CREPO") ;;
    pgbackrest) repo=$(dir_bytes "$W/pgbackrest-repo") ;;
    restic) repo=$(dir_bytes "$RESTIC_REPOSITORY") ;;
  esac
  ph=$(phases "$3" "$4")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$(secs "$3" "$4")" "$(tr ' ' '\t' <<<"$ph")" \
    "$data" "$6" "$repo" "$(rss_kb "$5")" "$7" >> "$RESULTS"
}

backup_pgcairn() {
  local day=$1 t0 t1 line new
  t0=$(now)
  line=$(/usr/bin/time -v -o "$T/pgcairn-$day" "${RUN[@]}" env HOME="$W/home" "${CAIRN[@]}" backup --server bench \
    --pgdata "$PG" --conninfo "host=$W port=$PORT user=bench_backup dbname=postgres" --fast-checkpoint --jobs 2)
  t1=$(now)
  new=$(as "${CAIRN[@]}" show --server bench latest --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["new_bytes_stored"])')
  record pgcairn "$day" "$t0" "$t1" "$T/pgcairn-$day" "$new" "${line#backup }"
}

backup_pgbackrest() {
  local day=$1 type=incr t0 t1 before after
  [ "$day" = 0 ] && type=full
  before=$(dir_bytes "$W/pgbackrest-repo/backup")
  t0=$(now)
  /usr/bin/time -v -o "$T/pgbackrest-$day" "${RUN[@]}" env HOME="$W/home" "${PBR[@]}" --type=$type backup
  t1=$(now)
  after=$(dir_bytes "$W/pgbackrest-repo/backup")
  record pgbackrest "$day" "$t0" "$t1" "$T/pgbackrest-$day" "$((after - before))" \
    "$type; backup/ $((after / 1000000)) MB, archive/ $(($(dir_bytes "$W/pgbackrest-repo/archive") / 1000000)) MB"
}

backup_restic() {
  local day=$1 t0 t1 before after
  before=$(dir_bytes "$RESTIC_REPOSITORY")
  cat > "$W/restic-copy.sh" <<SH
#!/bin/sh
exec /usr/bin/time -v -o "$T/restic-$day" env HOME="$W/home" ${RESTIC[*]} backup -q --tag data --host bench \\
  --exclude '$PG/pg_wal/*' --exclude '$PG/postmaster.pid' --exclude '$PG/postmaster.opts' --exclude '$PG/pg_stat_tmp/*' \\
  --exclude pg_internal.init --exclude 'pgsql_tmp*' '$PG'
SH
  cat > "$W/restic-backup.sql" <<SQL
SELECT pg_backup_start('restic day $day', true);
\! sh $W/restic-copy.sh
SELECT labelfile FROM pg_backup_stop(false) \g $W/label/backup_label
SQL
  chmod 755 "$W/restic-copy.sh"
  if [ "$(id -u)" = 0 ]; then chown pgcairn-test: "$W/restic-copy.sh" "$W/restic-backup.sql"; fi
  t0=$(now)
  as "$PGBIN/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$W" -p "$PORT" -U bench_backup -d postgres -f "$W/restic-backup.sql" >/dev/null
  # Exit status 3: a file vanished while restic read it (a dropped table); the snapshot is still made.
  grep -Eq 'Exit status: (0|3)$' "$T/restic-$day" || die "restic backup failed (see $T/restic-$day)"
  as "${RESTIC[@]}" backup -q --tag label --host bench "$W/label" >/dev/null
  t1=$(now)
  after=$(dir_bytes "$RESTIC_REPOSITORY")
  grep -q '^START WAL LOCATION' "$W/label/backup_label" || die "restic: no backup_label from pg_backup_stop"
  record restic "$day" "$t0" "$t1" "$T/restic-$day" "$((after - before))" "data snapshot + backup_label snapshot"
}

backup_all() {
  log "day $1: pgcairn backup";    backup_pgcairn "$1"
  log "day $1: pgBackRest backup"; backup_pgbackrest "$1"
  log "day $1: restic backup";     backup_restic "$1"
}

DATA0=$(data_bytes "$PG")
log "full backups of $((DATA0 / 1000000)) MB (data directory without pg_wal)"
backup_all 0
# What compression alone allows: the same data directory read and zstd-compressed at level 3 in
# pgcairn's 32 KiB blocks on 2 threads, with no hashing, encryption or writing
# (examples/compress_ceiling.rs): pgcairn's full backup, which does all of that and more, cannot be faster.
log "ceiling: the data directory read and compressed (zstd 3, 32 KiB blocks, 2 threads), nothing else"
"$TARGET_DIR/release/examples/compress_ceiling" "$PG" 3 2 > "$W/ceiling" || die "compress_ceiling failed"
for day in $(seq 1 "$DAYS"); do
  log "day $day: churn (pgbench ${CHURN_SECS}s, $((SCALE * 5000)) appended events, hot 1% of real_data updated)"
  as "$PGBIN/pgbench" -n -T "$CHURN_SECS" -c 2 -j 2 -h "$W" -p "$PORT" -U postgres postgres >/dev/null 2>&1
  sql "INSERT INTO events SELECT g, now(), md5(random()::text)
       FROM generate_series((SELECT max(id)+1 FROM events), (SELECT max(id) + $SCALE * 5000 FROM events)) g"
  sql "UPDATE real_data SET num = num + 1 WHERE id > (SELECT max(id) FROM real_data) * 0.99"
  sql "CHECKPOINT"
  wait_archived
  backup_all "$day"
done

# --- restores ------------------------------------------------------------------------------------
FINGERPRINT_SQL="SELECT (SELECT count(*) FROM pgbench_accounts) || '/' || (SELECT sum(abalance) FROM pgbench_accounts)
  || '/' || (SELECT count(*) FROM events) || '/' || (SELECT sum(num) FROM real_data)"
EXPECTED=$(sql "$FINGERPRINT_SQL")
wait_archived
log "stopping the source cluster (fingerprint $EXPECTED)"
as "$PGBIN/pg_ctl" -D "$PG" -m fast -w stop >/dev/null
SRC_UP=0
RESTORE_TSV=$W/restores.tsv
printf 'tool\twall\tbytes\trss_kb\tcheck\tready\n' > "$RESTORE_TSV"

# Start a restored cluster, wait until recovery ends, compare the fingerprint;
# sets CHECK ("ok" or "FAIL(...)") and READY (seconds from start to the end of recovery).
check_restored() {
  local dir=$1 t0 t1 got i
  RESTORED_PG=$dir
  t0=$(now)
  if ! as "$PGBIN/pg_ctl" -D "$dir" -w -t 900 -l "$dir.log" \
      -o "-p $PORT2 -k $W -c archive_mode=off -c listen_addresses=''" start >/dev/null; then
    tail -5 "$dir.log" >&2; CHECK="FAIL(start)" READY="-"; RESTORED_PG=""; return
  fi
  for i in $(seq 1 6000); do
    [ "$(sql2 "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ] && break
    sleep 0.1
  done
  t1=$(now)
  got=$(sql2 "$FINGERPRINT_SQL" 2>/dev/null || echo "?")
  as "$PGBIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
  RESTORED_PG=""
  READY=$(secs "$t0" "$t1")
  if [ "$got" = "$EXPECTED" ]; then CHECK=ok; else CHECK="FAIL(got $got)"; log "$dir: expected $EXPECTED, got $got"; fi
}

restore_one() { # tool
  local tool=$1 dir=$RESTORES/$1 pgdir t0 t1 bytes
  as mkdir -p "$dir"
  case $tool in
    pgcairn) find "$CREPO" -type f -exec cat {} + >/dev/null ;;
    pgbackrest) find "$W/pgbackrest-repo" -type f -exec cat {} + >/dev/null ;;
    restic) find "$RESTIC_REPOSITORY" -type f -exec cat {} + >/dev/null ;;
  esac
  sync
  log "restore: $tool"
  t0=$(now)
  case $tool in
    pgcairn)
      /usr/bin/time -v -o "$T/restore-$tool" "${RUN[@]}" env HOME="$W/home" "${CAIRN[@]}" \
        restore --server bench latest "$dir" --jobs 2 >/dev/null
      pgdir=$dir ;;
    pgbackrest)
      /usr/bin/time -v -o "$T/restore-$tool" "${RUN[@]}" env HOME="$W/home" "${PBR[@]}" \
        "--pg1-path=$dir" restore >/dev/null
      pgdir=$dir ;;
    restic)
      /usr/bin/time -v -o "$T/restore-$tool" "${RUN[@]}" env HOME="$W/home" "${RESTIC[@]}" \
        restore latest --tag data --host bench --target "$dir" >/dev/null
      as "${RESTIC[@]}" restore latest --tag label --host bench --target "$dir/label" >/dev/null
      pgdir=$dir$PG
      as cp "$dir/label$W/label/backup_label" "$pgdir/backup_label"
      as mkdir -p "$pgdir/pg_wal/archive_status" ;;
  esac
  sync -f "$dir"
  t1=$(now)
  if [ "$tool" = restic ]; then
    # restic knows nothing of WAL: fetch it from pgcairn's archive.
    echo "restore_command = '${CAIRN[*]} archive-get --server bench %f %p'" >> "$pgdir/postgresql.auto.conf"
    as touch "$pgdir/recovery.signal"
  fi
  bytes=$(data_bytes "$pgdir")
  check_restored "$pgdir"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$(secs "$t0" "$t1")" "$bytes" \
    "$(rss_kb "$T/restore-$tool")" "$CHECK" "$READY" >> "$RESTORE_TSV"
  [ "$KEEP" = 1 ] || rm -rf "$dir" "$pgdir.log"
}
for tool in pgcairn pgbackrest restic; do restore_one $tool; done

# --- report ------------------------------------------------------------------------------------------
HEADER="pgcairn $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'), $(pgbackrest version), $(restic version | cut -d' ' -f1-2), PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')
$(date -Is) on $(nproc) cores; pgbench scale $SCALE + real_data + events; $DAYS days of churn ($CHURN_SECS s of pgbench -c2, $((SCALE * 5000)) appended events, hot 1% of real_data); data $((DATA0 / 1000000)) MB at the full backup
WAL: one archive_command, \`pgcairn archive-push && pgbackrest archive-push\` (both archives hold the same WAL); restic backs up the data directory only (pg_backup_start/stop around it, WAL from pgcairn's archive at restore)
Encryption: $ENC_NOTE. pgBackRest: zstd level 3, process-max 2. pgcairn: --jobs 2. restic: default (repository v2, zstd auto)"
python3 - "$RESULTS" "$RESTORE_TSV" "$OUT" "$HEADER" "$W/ceiling" <<'PY'
import csv, sys
res_path, rest_path, out_path, header, ceiling_path = sys.argv[1:6]
rows = list(csv.DictReader(open(res_path), delimiter="\t"))
rests = {r["tool"]: r for r in csv.DictReader(open(rest_path), delimiter="\t")}
tools = ["pgcairn", "pgbackrest", "restic"]
MB = 1e6
def f(x, nd=1):
    try: return f"{float(x):.{nd}f}"
    except (TypeError, ValueError): return "-"
by = {(r["tool"], int(r["day"])): r for r in rows}
days = sorted({int(r["day"]) for r in rows})
out = ["# pgcairn vs pgBackRest vs restic", ""] + [l + "  " for l in header.splitlines()] + [""]
out += ["## Backups (day 0 = full)", "",
        "| tool | day | wall s | start s | copy s | stop+WAL s | MB/s | data MB | new MB | repo MB | repo +MB | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for t in tools:
    prev = None
    for d in days:
        r = by[(t, d)]
        wall = float(r["wall"]); repo = int(r["repo"])
        grow = "" if prev is None else f"{(repo - prev) / MB:.1f}"
        out.append(f"| {t} | {d} | {wall:.1f} | {r['start']} | {r['copy']} | {r['stop']} | {int(r['data']) / MB / wall:.0f} | "
                   f"{int(r['data']) / MB:.0f} | {int(r['new']) / MB:.1f} | {repo / MB:.1f} | {grow} | {int(r['rss_kb']) / 1024:.0f} |")
        prev = repo
out += ["", "start = until pg_backup_start returned (checkpoint), copy = until pg_backup_stop was called, "
        "stop+WAL = the rest; new = pgcairn: new_bytes_stored of the backup (no WAL); pgBackRest: growth of backup/; "
        "restic: growth of the repository. repo = du -sb of the whole repository (pgcairn and pgBackRest include WAL).", ""]
out += ["## Restore of the latest backup (into an empty directory, including fsync)", "",
        "| tool | restore s | MB/s | peak RSS MB | restored cluster | start + recovery s |", "|---|---:|---:|---:|---|---:|"]
for t in tools:
    r = rests.get(t)
    if not r: continue
    w = float(r["wall"])
    out.append(f"| {t} | {w:.1f} | {int(r['bytes']) / MB / w:.0f} | {int(r['rss_kb']) / 1024:.0f} | {r['check']} | {r['ready']} |")
out += ["", "restored cluster: started with pg_ctl -w, recovery to the end of the archive, then counts and sums compared with the source's.", ""]
def wall(t, d): return float(by[(t, d)]["wall"])
def mbps(t, d): return int(by[(t, d)]["data"]) / MB / wall(t, d)
daily = [d for d in days if d > 0]
def mean(xs): return sum(xs) / len(xs) if xs else float("nan")
def growth(t): return mean([(int(by[(t, d)]["repo"]) - int(by[(t, d - 1)]["repo"])) / MB for d in daily])
out += ["## Ratios", ""]
out.append(f"- full-backup throughput pgcairn/pgBackRest: {mbps('pgcairn', 0) / mbps('pgbackrest', 0):.2f} "
           f"({mbps('pgcairn', 0):.0f} vs {mbps('pgbackrest', 0):.0f} MB/s)")
out.append(f"- full-backup throughput pgcairn/restic: {mbps('pgcairn', 0) / mbps('restic', 0):.2f} "
           f"({mbps('pgcairn', 0):.0f} vs {mbps('restic', 0):.0f} MB/s)")
c_read, c_secs, c_out = open(ceiling_path).read().split()
ceiling = int(c_read) / MB / float(c_secs)
out.append(f"- ceiling: reading the data directory and compressing it like pgcairn (zstd 3, 32 KiB blocks, 2 threads), "
           f"and nothing else, runs at {ceiling:.0f} MB/s = {ceiling / mbps('pgbackrest', 0):.2f}x pgBackRest's full "
           f"({int(c_read) / MB:.0f} MB in {float(c_secs):.1f} s, {int(c_out) / MB:.0f} MB out); "
           f"pgcairn's full backup runs at {mbps('pgcairn', 0) / ceiling:.0%} of it")
if daily:
    c, r, p = mean([wall('pgcairn', d) for d in daily]), mean([wall('restic', d) for d in daily]), mean([wall('pgbackrest', d) for d in daily])
    out.append(f"- daily backup time pgcairn/restic: {c / r:.2f} ({c:.1f} s vs {r:.1f} s mean; pgBackRest incr {p:.1f} s)")
    cn = mean([int(by[('pgcairn', d)]['new']) / MB for d in daily])
    out.append(f"- daily growth pgcairn/restic: {growth('pgcairn') / growth('restic'):.2f} with pgcairn's WAL "
               f"({growth('pgcairn'):.1f} vs {growth('restic'):.1f} MB/day); backup data alone {cn / growth('restic'):.2f} ({cn:.1f} MB/day); "
               f"pgBackRest {growth('pgbackrest'):.1f} MB/day with WAL")
if "pgcairn" in rests and "pgbackrest" in rests:
    out.append(f"- restore time pgBackRest/pgcairn: {float(rests['pgbackrest']['wall']) / float(rests['pgcairn']['wall']):.2f} "
               f"({rests['pgbackrest']['wall']} s vs {rests['pgcairn']['wall']} s; restic {rests.get('restic', {}).get('wall', '-')} s)")
last = days[-1]
rc, rp, rr = (int(by[(t, last)]["repo"]) / MB for t in tools)
out.append(f"- repository after full + {last} days pgcairn/pgBackRest: {rc / rp:.2f} ({rc:.0f} MB vs {rp:.0f} MB, both with WAL; restic {rr:.0f} MB without WAL)")
import re
pb = re.search(r"backup/ (\d+) MB", by[("pgbackrest", last)]["extra"])
if pb:
    cb = sum(int(by[("pgcairn", d)]["new"]) for d in days) / MB
    out.append(f"- backups alone (no WAL) after full + {last} days pgcairn/pgBackRest: {cb / int(pb.group(1)):.2f} "
               f"({cb:.0f} MB: sum of pgcairn's new backup data, vs {pb.group(1)} MB: pgBackRest's backup/)")
out += ["", "## pgcairn's own summary lines", ""] + [f"- day {r['day']}: {r['extra']}" for r in rows if r["tool"] == "pgcairn"]
out += ["", "## pgBackRest", ""] + [f"- day {r['day']}: {r['extra']}" for r in rows if r["tool"] == "pgbackrest"]
text = "\n".join(out) + "\n"
open(out_path, "w").write(text)
print(text)
PY
log "results written to $OUT"
