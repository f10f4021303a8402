//! WAL archiving by PostgreSQL itself through `pgcairn archive-push`, and
//! point-in-time recovery through `pgcairn archive-get`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::pg::*;

/// Configure archiving into the test repository with a passphrase file.
fn archiving(c: &Cluster, cairn: &Cairn, dir: &std::path::Path) {
    let pw = dir.join("passphrase");
    std::fs::write(&pw, "test-pass\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown(&pw);
    let cmd = format!(
        "{} --repo {} --cache-dir {} --passphrase-file {} archive-push --server main %p",
        env!("CARGO_BIN_EXE_pgcairn"),
        cairn.repo,
        cairn.cache.display(),
        pw.display()
    );
    c.append_conf(&format!(
        "archive_mode = on\narchive_command = '{}'\nwal_level = replica\n",
        cmd.replace('\'', "''")
    ));
}

/// Poll (bounded) until PostgreSQL reports `segment` archived.
fn wait_archived(c: &Cluster, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = c.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.as_str() >= segment {
            return;
        }
        let failed = c.psql(
            "SELECT coalesce(last_failed_wal, '') || ' ' || failed_count FROM pg_stat_archiver",
        );
        assert!(
            Instant::now() < deadline,
            "{segment} not archived (last {last}, failed {failed}):\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_promoted(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.psql("SELECT pg_is_in_recovery()") == "t" {
        assert!(
            Instant::now() < deadline,
            "restored server never left recovery:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Create `keepme` with `rows` rows, note the time, drop it, and wait
/// until the WAL holding all that is archived. Returns the time and the
/// last segment.
fn drop_after_target(src: &Cluster, rows: u32) -> (String, String) {
    src.psql(&format!(
        "CREATE TABLE keepme AS SELECT g FROM generate_series(1, {rows}) g"
    ));
    let target = src.psql("SELECT clock_timestamp()");
    src.psql("DROP TABLE keepme");
    src.psql(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())",
    );
    let seg = src.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    src.psql("SELECT pg_switch_wal()");
    wait_archived(src, &seg);
    (target, seg)
}

/// Restore `latest` to `target` (promoting there) with `cache` as the key
/// cache, start the copy and wait for its promotion: the copy and
/// restore's output.
fn restore_to(
    cairn: &Cairn,
    d: &std::path::Path,
    target: &str,
    cache: &std::path::Path,
) -> (Cluster, String) {
    let restored = d.join("restored");
    let out = cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        restored.to_str().unwrap(),
        "--target-time",
        target,
        "--target-action",
        "promote",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    let mut r = Cluster::existing(&restored, d, "restored");
    r.start();
    wait_promoted(&r);
    (r, out)
}

#[test]
fn archive_push_and_point_in_time_recovery() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    // A recovery setting left in postgresql.conf: the restore's target
    // must still be the only one in force.
    src.append_conf("recovery_target_name = 'stale'\n");
    src.start();
    run_ok(&mut src.pgbench(&["-i", "-s", "1", "-q"]));
    // The default backup waits for its WAL to arrive through archive-push.
    let out = cairn.backup(&src, "main", &["--fast-checkpoint"]);
    println!("{out}");

    let checked = cairn.ok(&[
        "check",
        "--server",
        "main",
        "--conninfo",
        &src.conninfo(),
        "--format",
        "json",
    ]);
    let checks: serde_json::Value = serde_json::from_str(&checked).unwrap();
    assert_eq!(checks.as_array().unwrap().len(), 7, "{checked}");
    assert!(
        checks.as_array().unwrap().iter().all(|c| c["ok"] == true),
        "{checked}"
    );

    let (target, seg) = drop_after_target(&src, 1234);

    // Pushing an archived file again with the same content succeeds;
    // different content under its name is refused and overwrites nothing.
    let wal_path = src.pgdata.join("pg_wal").join(&seg);
    if wal_path.exists() {
        let o = cairn.run(
            &[
                "archive-push",
                "--server",
                "main",
                wal_path.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
    }

    // restore_command carries this path through postgresql.auto.conf's
    // quoting, the shell's and PostgreSQL's %-placeholders.
    let odd_cache = d.join("cache 'q%p\\b");
    let (r, out) = restore_to(&cairn, d, &target, &odd_cache);
    println!("{out}");
    assert_eq!(
        r.psql("SELECT count(*) FROM keepme"),
        "1234",
        "the dropped table is back"
    );
    assert_eq!(r.psql("SHOW archive_mode"), "off");
    assert!(
        r.log_text().contains("recovery stopping before commit"),
        "{}",
        r.log_text()
    );

    // Without recovery settings the copy still never archives.
    let plain = d.join("plain");
    let args = [
        "restore",
        "--server",
        "main",
        "latest",
        plain.to_str().unwrap(),
        "--no-recovery",
    ];
    let o = cairn.run(&[&args[..], &["--target-action", "promote"]].concat(), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let out = cairn.ok(&args);
    assert!(out.contains("archive_mode = off"), "{out}");
    let auto = std::fs::read_to_string(plain.join("postgresql.auto.conf")).unwrap();
    assert!(auto.ends_with("archive_mode = 'off'\n"), "{auto}");
    assert!(!plain.join("recovery.signal").exists());
}

/// With archiving on, --include-wal takes the backup's WAL from the
/// archive: no replication slot (this server allows none), no new data, and
/// the copy reaches consistency from its own pg_wal.
#[test]
fn include_wal_comes_from_the_archive_when_archiving() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.append_conf("max_replication_slots = 0\n");
    src.start();
    run_ok(&mut src.pgbench(&["-i", "-s", "1", "-q"]));
    // The archive-or-slot choice goes by the last file the server
    // archived being in this repository.
    let seg = src.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    src.psql("SELECT pg_switch_wal()");
    wait_archived(&src, &seg);
    let out = cairn.backup(&src, "main", &["--include-wal", "--fast-checkpoint"]);
    println!("{out}");
    let shown = cairn.ok(&["show", "--server", "main", "latest", "--format", "json"]);
    let meta: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let included = meta["included_wal"].as_array().unwrap();
    assert!(
        included
            .iter()
            .any(|n| n.as_str() == meta["stop_wal"].as_str()),
        "{shown}"
    );
    let count = src.psql("SELECT count(*) FROM pgbench_accounts");
    let plain = d.join("plain");
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        plain.to_str().unwrap(),
        "--no-recovery",
    ]);
    assert!(plain
        .join("pg_wal")
        .join(meta["stop_wal"].as_str().unwrap())
        .exists());
    let mut r = Cluster::existing(&plain, d, "plain");
    r.start();
    assert_eq!(r.psql("SELECT count(*) FROM pgbench_accounts"), count);
    r.stop();
    src.stop();
}

#[test]
fn archive_get_exit_codes_and_storage_faults_stop_recovery() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.start();
    cairn.backup(&src, "main", &["--fast-checkpoint"]);

    // Confirmed absent: 1. Present: 0, with the right bytes.
    let dest = d.join("fetched");
    let o = cairn.run(
        &[
            "archive-get",
            "--server",
            "main",
            "0000000100000000000000FE",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let first = cairn.ok(&["list", "--server", "main", "--format", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&first).unwrap();
    let start_wal = rows[0]["start_wal"].as_str().unwrap().to_string();
    let o = cairn.run(
        &[
            "archive-get",
            "--server",
            "main",
            &start_wal,
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 * 1024 * 1024);
    // Not a WAL name at all, or a repository that cannot be read: 255.
    let o = cairn.run(
        &[
            "archive-get",
            "--server",
            "main",
            "pg_control",
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));
    let o = cairn.run(
        &[
            "--repo",
            "/nonexistent/repo",
            "archive-get",
            "--server",
            "main",
            &start_wal,
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));

    // Restore, then make the WAL archive unreadable: the .history probe and
    // the segment fetches fail, and PostgreSQL must stop, not promote.
    let restored = d.join("restored");
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        restored.to_str().unwrap(),
        "--target-action",
        "promote",
        "--cache-dir",
        cairn.cache.to_str().unwrap(),
    ]);
    let wal_dir = std::path::Path::new(&cairn.repo).join("manifests/wal");
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut r = Cluster::existing(&restored, d, "restored");
    let o = r.try_start();
    std::fs::set_permissions(&wal_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = r.log_text();
    assert!(
        !o.status.success() || !promoted(&r),
        "recovery must not promote on a storage fault:\n{log}"
    );
    assert!(
        log.contains("could not restore file") && log.contains("exit code 255"),
        "{log}"
    );
    assert!(!log.contains("selected new timeline ID"), "{log}");

    // A fault on a segment alone: the .history probe is answered (absent),
    // the segment fetch fails, and PostgreSQL stops there.
    let restored2 = d.join("restored2");
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        restored2.to_str().unwrap(),
        "--target-action",
        "promote",
        "--cache-dir",
        cairn.cache.to_str().unwrap(),
    ]);
    // Empty the spool the earlier calls may have filled, so every segment
    // must come from the repository (after their fillers have finished).
    wait_for_fillers(std::path::Path::new(&cairn.cache));
    for e in std::fs::read_dir(&cairn.cache).unwrap() {
        let spool = e.unwrap().path().join("spool");
        if spool.exists() {
            std::fs::remove_dir_all(spool).unwrap();
        }
    }
    let cluster_dir = std::fs::read_dir(wal_dir.join("main"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let tl1 = cluster_dir.join("00000001");
    std::fs::set_permissions(&tl1, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut r2 = Cluster::existing(&restored2, d, "restored2");
    let o = r2.try_start();
    std::fs::set_permissions(&tl1, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = r2.log_text();
    assert!(
        !o.status.success() || !promoted(&r2),
        "recovery must not promote on a segment fault:\n{log}"
    );
    assert!(
        log.contains("could not restore file \"00000001") && log.contains("exit code 255"),
        "{log}"
    );
    assert!(!log.contains("selected new timeline ID"), "{log}");
}

fn promoted(c: &Cluster) -> bool {
    c.psql("SELECT NOT pg_is_in_recovery()") == "t"
}

#[test]
fn check_reports_what_is_missing() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut c = Cluster::init(d, "noarch", &[]);
    c.start();
    let o = cairn.run(
        &[
            "check",
            "--server",
            "x",
            "--conninfo",
            &c.conninfo(),
            "--format",
            "json",
            "--timeout",
            "2",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let checks: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let by = |n: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by("repository")["ok"], true);
    assert_eq!(by("connection")["ok"], true);
    assert_eq!(by("archive_mode")["ok"], false);
    assert_eq!(by("archive_command")["ok"], false);
    assert_eq!(by("wal archiving")["ok"], false);
    assert_eq!(by("backup wal")["ok"], false);
    assert!(by("archive_mode")["hint"]
        .as_str()
        .unwrap()
        .contains("archive_mode = on"));
    // A password in the conninfo is never printed.
    let with_pw = format!("{} password=s3cret", c.conninfo());
    let o = cairn.run(
        &[
            "check",
            "--server",
            "x",
            "--conninfo",
            &with_pw,
            "--timeout",
            "1",
        ],
        &[],
    );
    assert!(text(&o).contains("password=***"), "{}", text(&o));
    assert!(!text(&o).contains("s3cret"), "{}", text(&o));
    // Server x registered as another cluster: named, and no WAL wait.
    let other = Cluster::init(d, "other", &[]);
    let seg = other.pgdata.join("pg_wal/000000010000000000000001");
    cairn.ok(&["archive-push", "--server", "x", &seg.to_string_lossy()]);
    let o = cairn.run(
        &[
            "check",
            "--server",
            "x",
            "--conninfo",
            &c.conninfo(),
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let checks: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(!names.contains(&"wal archiving"), "{names:?}");
    let sysid = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "system identifier")
        .unwrap();
    assert_eq!(sysid["ok"], false, "{sysid}");
    assert!(sysid["hint"]
        .as_str()
        .unwrap()
        .contains("another server name"));
    c.stop();
    let o = cairn.run(
        &["check", "--server", "x", "--conninfo", &c.conninfo()],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("connection       FAILED"), "{}", text(&o));
    assert!(text(&o).contains("backup wal"), "{}", text(&o));
}

/// A timeline that forked before a backup ended cannot be reached from it:
/// restore refuses before writing anything. One that forked after can.
#[test]
fn target_timeline_is_validated_against_archived_history() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.start();
    let pgdata = src.pgdata.to_string_lossy().to_string();
    let backup = |c: &Cluster| {
        cairn.ok(&[
            "backup",
            "--server",
            "main",
            "--pgdata",
            &pgdata,
            "--conninfo",
            &c.conninfo(),
            "--fast-checkpoint",
        ]);
    };
    backup(&src);
    src.psql("CREATE TABLE a AS SELECT 1 AS x");
    let t1 = src.psql("SELECT clock_timestamp()");
    src.psql("CREATE TABLE b AS SELECT 2 AS x");
    let seg = src.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    src.psql("SELECT pg_switch_wal()");
    wait_archived(&src, &seg);

    // A copy promoted at t1 keeps archiving into the same repository, so
    // 00000002.history arrives there.
    let fork = d.join("fork");
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        fork.to_str().unwrap(),
        "--target-time",
        &t1,
        "--target-action",
        "promote",
        "--keep-archive-mode",
        "--cache-dir",
        cairn.cache.to_str().unwrap(),
    ]);
    let mut f = Cluster::existing(&fork, d, "fork");
    f.start();
    wait_promoted(&f);
    let deadline = Instant::now() + Duration::from_secs(120);
    while f.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        != "00000002.history"
    {
        assert!(
            Instant::now() < deadline,
            "history not archived:\n{}",
            f.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    f.stop();

    // The source goes on on timeline 1; its next backup ends after the fork.
    src.psql("CREATE TABLE c AS SELECT 3 AS x");
    backup(&src);
    let later = d.join("later");
    let o = cairn.run(
        &[
            "restore",
            "--server",
            "main",
            "latest",
            later.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("before the backup ended"), "{}", text(&o));
    assert!(
        !later.exists(),
        "nothing may be written when the timeline is unreachable"
    );
    // On its own timeline it restores.
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        later.to_str().unwrap(),
        "--target-timeline",
        "current",
    ]);

    // The first backup ended before the fork: timeline 2 is reachable from it.
    let rows: serde_json::Value =
        serde_json::from_str(&cairn.ok(&["list", "--server", "main", "--format", "json"])).unwrap();
    let first = rows[0]["id"].as_str().unwrap().to_string();
    let again = d.join("again");
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        &first,
        again.to_str().unwrap(),
        "--target-timeline",
        "2",
    ]);
    let mut g = Cluster::existing(&again, d, "again");
    g.start();
    wait_promoted(&g);
    let tl: u32 = g
        .psql("SELECT timeline_id FROM pg_control_checkpoint()")
        .parse()
        .unwrap();
    assert!(tl >= 2, "followed timeline 2, promoted past it: {tl}");
    assert_eq!(
        g.psql("SELECT count(*) FROM pg_class WHERE relname = 'b'"),
        "0",
        "timeline 2 forked before b"
    );
    g.stop();
    // `latest` with a timeline number and no time target: the newest
    // backup that can reach it, passing over the newer one.
    let newest_to_two = d.join("newest-to-two");
    let out = cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        newest_to_two.to_str().unwrap(),
        "--target-timeline",
        "2",
    ]);
    let newer = rows[1]["id"].as_str().unwrap();
    assert!(
        out.contains(&format!("passed over backup {newer}")),
        "{out}"
    );
    // A backup named by id that ended after an LSN target: refused before
    // anything is written (PostgreSQL would refuse only after the restore).
    let early = d.join("early");
    let o = cairn.run(
        &[
            "restore",
            "--server",
            "main",
            &first,
            early.to_str().unwrap(),
            "--target-lsn",
            "0/100",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("after the recovery target"),
        "{}",
        text(&o)
    );
    assert!(!early.exists());

    // A time target on timeline 2 after both backups ended: `latest`
    // passes over the newer backup (timeline 1, ended after the fork) and
    // takes the first, from which the target can be reached.
    let second = rows[1]["id"].as_str().unwrap().to_string();
    f.start();
    f.psql("CREATE TABLE on_two AS SELECT 7 AS x");
    let t2 = f.psql("SELECT clock_timestamp()");
    f.psql("INSERT INTO on_two VALUES (8)");
    let seg2 = f.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    f.psql("SELECT pg_switch_wal()");
    wait_archived(&f, &seg2);
    f.stop();
    let via = d.join("via");
    let out = cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        via.to_str().unwrap(),
        "--target-time",
        &t2,
        "--target-action",
        "promote",
        "--cache-dir",
        cairn.cache.to_str().unwrap(),
    ]);
    assert!(
        out.contains(&format!("passed over backup {second}")),
        "{out}"
    );
    assert!(out.contains(&format!("restored backup {first}")), "{out}");
    let mut v = Cluster::existing(&via, d, "via");
    v.start();
    wait_promoted(&v);
    assert_eq!(v.psql("SELECT count(*) FROM on_two"), "1");
}

/// archive-push accepts only what it can vouch for, and never overwrites.
#[test]
fn archive_push_refuses_what_does_not_fit() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut a = Cluster::init(d, "a", &[]);
    a.append_conf("wal_keep_size = '1GB'\n");
    a.start();
    a.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g");
    let name = a.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    a.psql("SELECT pg_switch_wal()");
    a.stop();
    let seg = std::fs::read(a.pgdata.join("pg_wal").join(&name)).unwrap();
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    chown(&work);
    let put = |file: &str, bytes: &[u8]| {
        let p = work.join(file);
        std::fs::write(&p, bytes).unwrap();
        chown(&p);
        cairn.run(&["archive-push", "--server", "a", p.to_str().unwrap()], &[])
    };
    // The real segment, twice: both succeed.
    assert!(put(&name, &seg).status.success());
    let o = put(&name, &seg);
    assert!(o.status.success(), "{}", text(&o));
    // Truncated: refused, naming the size.
    let o = put(&name, &seg[..seg.len() / 2]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("bytes"), "{}", text(&o));
    // Under another segment's name: the page address does not match.
    let mut other = name.clone();
    other.replace_range(23..24, if &name[23..24] == "9" { "8" } else { "9" });
    let o = put(&other, &seg);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("WAL position"), "{}", text(&o));
    // Same name, different content: refused, nothing overwritten.
    let mut changed = seg.clone();
    changed[seg.len() - 100] ^= 1;
    let o = put(&name, &changed);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("different content"), "{}", text(&o));
    let back = d.join("back");
    let o = cairn.run(
        &[
            "archive-get",
            "--server",
            "a",
            &name,
            back.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        std::fs::read(&back).unwrap() == seg,
        "the first content stays"
    );
    // Another cluster's WAL under this server name: refused.
    let mut b = Cluster::init(d, "b", &[]);
    b.append_conf("wal_keep_size = '1GB'\n");
    b.start();
    let bname = b.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    b.psql("SELECT pg_switch_wal()");
    b.stop();
    let bseg = std::fs::read(b.pgdata.join("pg_wal").join(&bname)).unwrap();
    let o = put(&bname, &bseg);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cluster"), "{}", text(&o));
    // Two different .partial files of one name: both kept, with a warning.
    let partial = format!("{name}.partial");
    assert!(put(&partial, &seg).status.success());
    let o = put(&partial, &changed);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("WARNING") && text(&o).contains("stored as"),
        "{}",
        text(&o)
    );
    // The second content pushed again (as when a look-ahead call stored it
    // before PostgreSQL asked): success, and the warning again.
    let o = put(&partial, &changed);
    assert!(
        o.status.success() && text(&o).contains("stored as"),
        "{}",
        text(&o)
    );
    // Not a WAL file name at all.
    let o = put("postgresql.conf", b"x");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("not a WAL archive file name"),
        "{}",
        text(&o)
    );
}

#[test]
fn archive_push_looks_ahead_and_rechecks_records() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut c = Cluster::init(d, "la", &[]);
    // Archiving "fails" for now, so segments pile up as .ready.
    c.append_conf("archive_mode = on\narchive_command = 'false'\nwal_keep_size = '1GB'\n");
    c.start();
    let mut names = Vec::new();
    for i in 0..5 {
        c.psql(&format!(
            "CREATE TABLE t{i} AS SELECT g FROM generate_series(1, 1000) g"
        ));
        names.push(c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())"));
        c.psql("SELECT pg_switch_wal()");
    }
    let wal = c.pgdata.join("pg_wal");
    for n in &names {
        assert!(
            wal.join("archive_status")
                .join(format!("{n}.ready"))
                .exists(),
            "{n} not ready"
        );
    }
    let push = |n: &str| {
        cairn.run(
            &[
                "archive-push",
                "--server",
                "la",
                wal.join(n).to_str().unwrap(),
                "--lookahead",
                "8",
            ],
            &[],
        )
    };
    let o = push(&names[0]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "quiet on success: {}",
        text(&o)
    );
    // names[3] went along with names[0]: it is in the repository.
    cairn.ok(&[
        "archive-get",
        "--server",
        "la",
        &names[3],
        d.join("x").to_str().unwrap(),
    ]);
    // The archive_status files are PostgreSQL's: still .ready.
    assert!(wal
        .join("archive_status")
        .join(format!("{}.ready", names[1]))
        .exists());
    // Later calls are answered from the records: the WAL archive itself is
    // not read (here: unreadable).
    let wal_manifests = std::path::Path::new(&cairn.repo).join("manifests/wal");
    std::fs::set_permissions(&wal_manifests, std::fs::Permissions::from_mode(0o000)).unwrap();
    let o1 = push(&names[1]);
    std::fs::set_permissions(&wal_manifests, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(o1.status.success(), "{}", text(&o1));
    // A record is re-checked against the file's content.
    let mut changed = std::fs::read(wal.join(&names[2])).unwrap();
    let n = changed.len();
    changed[n - 10] ^= 1;
    std::fs::write(wal.join(&names[2]), &changed).unwrap();
    let o2 = push(&names[2]);
    assert_eq!(o2.status.code(), Some(1), "{}", text(&o2));
    assert!(text(&o2).contains("different content"), "{}", text(&o2));

    // archive-get prefetches the next segments into its spool.
    let get = |n: &str, dest: &std::path::Path| {
        cairn.run(
            &[
                "archive-get",
                "--server",
                "la",
                n,
                dest.to_str().unwrap(),
                "--prefetch",
                "4",
            ],
            &[],
        )
    };
    let out = d.join("got");
    assert_eq!(get(&names[0], &out).status.code(), Some(0));
    // The call returns at once; its filler fetches in the background.
    wait_for_fillers(std::path::Path::new(&cairn.cache));
    // With the WAL archive unreadable, a spooled segment is still served,
    // checked; one not spooled is an error (255), never "absent".
    std::fs::set_permissions(&wal_manifests, std::fs::Permissions::from_mode(0o000)).unwrap();
    let o = get(&names[1], &out);
    let missing = get("0000000100000000000000FE", &out);
    std::fs::set_permissions(&wal_manifests, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(wal.join(&names[1])).unwrap());
    assert_eq!(missing.status.code(), Some(255), "{}", text(&missing));
    wait_for_fillers(std::path::Path::new(&cairn.cache));
    // A damaged spool file is not served: the repository's copy is.
    let spooled = find(std::path::Path::new(&cairn.cache), &names[3]).expect("names[3] spooled");
    let mut bytes = std::fs::read(&spooled).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&spooled, &bytes).unwrap();
    assert_eq!(get(&names[3], &out).status.code(), Some(0));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(wal.join(&names[3])).unwrap());
}

/// Wait until no archive-get filler runs under `cache`: a filler holds its
/// spool's lock from before the archive-get that started it returns.
fn wait_for_fillers(cache: &std::path::Path) {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            wait_for_fillers(&p);
        } else if p.file_name().is_some_and(|n| n == ".filler.lock") {
            let f = std::fs::File::open(&p).unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: flock on a descriptor owned by `f`; blocks until the
            // filler exits.
            assert_eq!(unsafe { libc::flock(fd, libc::LOCK_EX) }, 0);
        }
    }
}

fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Every recovery target, each restored and started for real.
#[test]
fn every_recovery_target() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.start();
    src.psql("CREATE TABLE r (v int)");
    cairn.backup(&src, "main", &["--fast-checkpoint"]);
    // One statement, so every psql version prints its result.
    let xid1 = src.psql("INSERT INTO r VALUES (1) RETURNING txid_current()");
    let xid1 = xid1
        .lines()
        .find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty())
        .unwrap()
        .to_string();
    let lsn1 = src.psql("SELECT pg_current_wal_insert_lsn()");
    src.psql("SELECT pg_create_restore_point('before_two')");
    src.psql("INSERT INTO r VALUES (2)");
    src.psql("INSERT INTO r VALUES (3)");
    let seg = src.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    src.psql("SELECT pg_switch_wal()");
    wait_archived(&src, &seg);

    let mut n = 0;
    let mut restore = |args: &[&str]| -> String {
        n += 1;
        let target = d.join(format!("t{n}"));
        let mut full = vec![
            "restore",
            "--server",
            "main",
            "latest",
            target.to_str().unwrap(),
            "--target-action",
            "promote",
        ];
        full.extend_from_slice(args);
        cairn.ok(&full);
        let mut c = Cluster::existing(&target, d, &format!("t{n}"));
        c.start();
        wait_promoted(&c);
        let rows = c.psql("SELECT coalesce(string_agg(v::text, ',' ORDER BY v), '') FROM r");
        c.stop();
        rows
    };
    assert_eq!(restore(&["--target-xid", &xid1]), "1");
    assert_eq!(restore(&["--target-xid", &xid1, "--target-exclusive"]), "");
    assert_eq!(restore(&["--target-lsn", &lsn1]), "1");
    assert_eq!(restore(&["--target-name", "before_two"]), "1");
    assert_eq!(restore(&["--target-immediate"]), "");
    assert_eq!(restore(&[]), "1,2,3", "no target: the end of the archive");
}

/// Segment names mean different positions at different segment sizes.
/// Clusters of 64 MiB segments past the first 4 GiB of WAL, and of 8 MiB
/// segments past segment 0x100 of the first xlogid (pg_resetwal moves the
/// WAL there), archive through PostgreSQL (segments and the `.backup`
/// file) and recover to a point in time through archive-get.
#[test]
fn wal_names_at_other_segment_sizes() {
    for (mb, start) in [
        ("64", "000000010000000100000004"),
        ("8", "000000010000000000000104"),
    ] {
        let dir = user_dir();
        let d = dir.path();
        let cairn = Cairn::new(d);
        let mut src = Cluster::init(d, "src", &[&format!("--wal-segsize={mb}")]);
        run_ok(
            as_user(pg_bin().join("pg_resetwal"))
                .args(["-l", start, "-D"])
                .arg(&src.pgdata),
        );
        archiving(&src, &cairn, d);
        src.start();
        run_ok(&mut src.pgbench(&["-i", "-s", "1", "-q"]));
        cairn.backup(&src, "main", &["--fast-checkpoint"]);
        let (target, seg) = drop_after_target(&src, 321);
        assert!(seg.as_str() > start, "{seg} is not past {start}");
        let (r, _) = restore_to(&cairn, d, &target, &cairn.cache);
        assert_eq!(
            r.psql("SELECT count(*) FROM keepme"),
            "321",
            "{mb} MiB segments"
        );
        assert_eq!(r.psql("SHOW wal_segment_size"), format!("{mb}MB"));
    }
}
