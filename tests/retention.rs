//! Retention against a real PostgreSQL cluster archiving through
//! `pgcairn archive-push`: five backups on two timelines (a restored copy
//! promoted to timeline 2 archives into the same repository), one pinned;
//! `expire` with REDUNDANCY 2 from the config file removes the obsolete
//! backups and the WAL below the oldest retained start, keeps the pinned
//! backup's own WAL and every `.history` file, and every remaining backup
//! still restores and starts with its data. Then `delete` refuses below
//! minimum_redundancy and for a pinned backup.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pg::*;

fn archiving(c: &Cluster, cairn: &Cairn, dir: &Path) {
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

fn wait_for(c: &Cluster, what: &str, sql: &str, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = c.psql(sql);
        if want(&got) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got:?}\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn switch_and_wait(c: &Cluster) {
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    c.psql("SELECT pg_switch_wal()");
    wait_for(
        c,
        &format!("{seg} archived"),
        "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        |last| last >= seg.as_str(),
    );
}

fn wait_promoted(c: &Cluster) {
    wait_for(c, "promotion", "SELECT pg_is_in_recovery()", |r| r == "f");
}

fn list(cairn: &Cairn, config: &Path) -> Vec<serde_json::Value> {
    let out = cairn.ok(&[
        "--config",
        config.to_str().unwrap(),
        "list",
        "--server",
        "main",
        "--format",
        "json",
    ]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn status_of(rows: &[serde_json::Value], id: &str) -> String {
    rows.iter()
        .find(|r| r["id"] == id)
        .map(|r| r["status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

/// Every manifest file under the repository's `manifests/wal/`, by file name.
fn archived(repo: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(repo).join("manifests/wal")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                out.push((p, n));
            }
        }
    }
    out
}

fn has(files: &[(PathBuf, String)], name: &str) -> bool {
    files.iter().any(|f| f.1 == name)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn write_config(d: &Path, name: &str, body: &str) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, body).unwrap();
    chown(&p);
    p
}

/// Restore `id` into a new directory, start it, and return the cluster.
fn restore_and_start(cairn: &Cairn, d: &Path, id: &str, name: &str, extra: &[&str]) -> Cluster {
    let target = d.join(name);
    let mut args = vec![
        "restore",
        "--server",
        "main",
        id,
        target.to_str().unwrap(),
        "--target-action",
        "promote",
    ];
    args.extend_from_slice(extra);
    cairn.ok(&args);
    let mut c = Cluster::existing(&target, d, name);
    c.start();
    wait_promoted(&c);
    c
}

/// Back up `c` and return the id of the backup that ended last. Backup
/// ids are the start time in whole seconds: the next one starts in a later
/// second than the last one ended.
fn take_backup(
    cairn: &Cairn,
    c: &Cluster,
    config: &Path,
    last_backup: &std::cell::Cell<u64>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while unix_secs() <= last_backup.get() {
        assert!(Instant::now() < deadline, "the clock does not advance");
        std::thread::sleep(Duration::from_millis(20));
    }
    cairn.backup(c, "main", &["--fast-checkpoint"]);
    last_backup.set(unix_secs());
    let rows = list(cairn, config);
    rows.iter()
        .max_by_key(|r| r["end_time"].as_i64().unwrap())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn expire_redundancy_across_a_timeline_switch_with_a_pin() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.start();
    let policy = write_config(
        d,
        "pgcairn.toml",
        "[server.main]\nretention_policy = \"REDUNDANCY 2\"\nminimum_redundancy = 2\n",
    );
    let last_backup = std::cell::Cell::new(0u64);
    let backup = |c: &Cluster| take_backup(&cairn, c, &policy, &last_backup);

    src.psql("CREATE TABLE m1 AS SELECT 1 AS x");
    let b1 = backup(&src);
    switch_and_wait(&src);
    src.psql("CREATE TABLE m2 AS SELECT 2 AS x");
    switch_and_wait(&src);
    let b2 = backup(&src);
    switch_and_wait(&src);
    src.psql("CREATE TABLE m3 AS SELECT 3 AS x");
    switch_and_wait(&src);
    let b3 = backup(&src);
    switch_and_wait(&src);

    // A copy of b3 promoted at its end point becomes timeline 2 and
    // archives into the same repository; b4 is a backup of it.
    let mut fork = restore_and_start(
        &cairn,
        d,
        &b3,
        "fork",
        &["--target-immediate", "--keep-archive-mode"],
    );
    wait_for(
        &fork,
        "history archived",
        "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        |l| !l.is_empty(),
    );
    fork.psql("CREATE TABLE on_fork AS SELECT 4 AS x");
    let b4 = backup(&fork);
    fork.psql("CREATE TABLE after_b4 AS SELECT 44 AS x");
    switch_and_wait(&fork);
    fork.stop();

    // The source goes on on timeline 1.
    src.psql("CREATE TABLE m5 AS SELECT 5 AS x");
    let b5 = backup(&src);
    src.psql("CREATE TABLE after_b5 AS SELECT 55 AS x");
    switch_and_wait(&src);

    let out = cairn.ok(&["keep", "--server", "main", &b2, "--note", "audit"]);
    assert!(out.contains("pinned"), "{out}");
    let rows = list(&cairn, &policy);
    assert_eq!(rows.len(), 5);
    for (id, want) in [
        (&b1, "obsolete"),
        (&b2, "pinned"),
        (&b3, "obsolete"),
        (&b4, "kept"),
        (&b5, "kept"),
    ] {
        assert_eq!(status_of(&rows, id), want, "{id}: {rows:#?}");
    }
    let window = &rows[0]["recovery_window"];
    assert_eq!(window["from_backup"], b1.as_str(), "{window:#}");
    assert!(window["latest_lsn"].is_string(), "{window:#}");

    let meta = |id: &str, key: &str| -> String {
        rows.iter().find(|r| r["id"] == id).unwrap()[key]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = archived(&cairn.repo);
    assert!(has(&before, "00000002.history"), "{before:?}");
    assert!(has(&before, &meta(&b1, "start_wal")));

    // Dry run: the plan, nothing removed.
    let cfg = policy.to_str().unwrap();
    let out = cairn.ok(&[
        "--config",
        cfg,
        "expire",
        "--server",
        "main",
        "--dry-run",
        "--format",
        "json",
    ]);
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        plan["plan"]["remove_backups"],
        serde_json::json!([b1, b3]),
        "{plan:#}"
    );
    assert_eq!(plan["executed"], serde_json::Value::Null);
    let removed_wal: Vec<String> = plan["plan"]["remove_wal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    assert!(!removed_wal.is_empty(), "{plan:#}");
    assert_eq!(list(&cairn, &policy).len(), 5, "a dry run removes nothing");
    assert_eq!(archived(&cairn.repo).len(), before.len());

    let out = cairn.ok(&["--config", cfg, "expire", "--server", "main"]);
    println!("{out}");
    assert!(out.contains("REMOVE"), "{out}");
    let rows = list(&cairn, &policy);
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for id in [&b2, &b4, &b5] {
        assert!(ids.contains(&id.as_str()), "{id} kept: {ids:?}");
    }
    let after = archived(&cairn.repo);
    // (The source may archive a segment meanwhile; it only adds.)
    assert!(after.len() + removed_wal.len() >= before.len());
    assert!(after.len() < before.len());
    for f in &removed_wal {
        assert!(!has(&after, f), "{f} should be gone");
    }
    // History files stay; the obsolete backups' WAL goes; the pinned
    // backup keeps exactly its own WAL, not what followed it.
    assert!(has(&after, "00000002.history"));
    assert!(!has(&after, &meta(&b1, "start_wal")));
    assert!(!has(&after, &meta(&b3, "start_wal")));
    assert!(has(&after, &meta(&b2, "start_wal")));
    assert!(has(&after, &meta(&b2, "stop_wal")));
    let out = cairn.ok(&["--config", cfg, "list", "--server", "main"]);
    println!("{out}");
    assert!(out.contains("main: recoverable from"), "{out}");
    assert!(out.contains("pinned"), "{out}");
    let out = cairn.ok(&["--config", cfg, "show", "--server", "main", &b2]);
    assert!(out.contains("status           pinned"), "{out}");
    assert!(out.contains(": audit"), "{out}");
    // Running again finds nothing more to do.
    let out = cairn.ok(&[
        "--config", cfg, "expire", "--server", "main", "--format", "json",
    ]);
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["plan"]["remove_backups"], serde_json::json!([]));
    assert_eq!(again["plan"]["remove_wal"], serde_json::json!([]));

    // The repository is sound and every remaining backup's WAL is there.
    let o = cairn.run(&["verify", "--server", "main"], &[]);
    assert!(o.status.success(), "verify after expire: {}", text(&o));

    // Every remaining backup restores and starts with its data: b4 along
    // timeline 2 (its history file is needed), b5 on timeline 1, the pinned
    // b2 to its end point.
    let r4 = restore_and_start(&cairn, d, &b4, "r4", &[]);
    assert_eq!(r4.psql("SELECT x FROM on_fork"), "4");
    assert_eq!(r4.psql("SELECT x FROM after_b4"), "44");
    drop(r4);
    let r5 = restore_and_start(&cairn, d, &b5, "r5", &["--target-timeline", "current"]);
    assert_eq!(r5.psql("SELECT x FROM after_b5"), "55");
    assert_eq!(
        r5.psql("SELECT count(*) FROM pg_class WHERE relname = 'on_fork'"),
        "0"
    );
    drop(r5);
    let r2 = restore_and_start(&cairn, d, &b2, "r2", &["--target-immediate"]);
    assert_eq!(r2.psql("SELECT x FROM m2"), "2");
    assert_eq!(
        r2.psql("SELECT count(*) FROM pg_class WHERE relname = 'm3'"),
        "0"
    );
    drop(r2);

    // delete: a pinned backup is refused even with --force; below
    // minimum_redundancy (3 complete backups, minimum 3) refused without it.
    let strict = write_config(
        d,
        "strict.toml",
        "[server.main]\nretention_policy = \"REDUNDANCY 2\"\nminimum_redundancy = 3\n",
    );
    let strict = strict.to_str().unwrap();
    let o = cairn.run(
        &[
            "--config", strict, "delete", "--server", "main", &b2, "--force",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("keep --release"), "{}", text(&o));
    let o = cairn.run(
        &["--config", strict, "delete", "--server", "main", &b4],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("minimum_redundancy 3"), "{}", text(&o));
    assert_eq!(
        list(&cairn, &policy).len(),
        3,
        "a refused delete removes nothing"
    );

    // Released, a pin no longer protects: the policy now removes b2 too.
    cairn.ok(&["keep", "--server", "main", &b2, "--release"]);
    assert_eq!(status_of(&list(&cairn, &policy), &b2), "obsolete");
    cairn.ok(&[
        "--config", strict, "delete", "--server", "main", &b2, "--force",
    ]);
    let rows = list(&cairn, &policy);
    assert_eq!(rows.len(), 2);
    assert_eq!(status_of(&rows, &b2), "absent");
    assert!(!has(&archived(&cairn.repo), &meta(&b2, "start_wal")));
    let o = cairn.run(&["verify", "--server", "main"], &[]);
    assert!(o.status.success(), "verify after delete: {}", text(&o));
}

/// `keep --target full` (Barman's): the pinned backup keeps every WAL file
/// from its start on, so after `expire` it still restores to a point after
/// its end, which a standalone pin would have lost.
#[test]
fn a_full_pin_stays_restorable_to_a_later_point() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.start();
    let policy = write_config(
        d,
        "pgcairn.toml",
        "[server.main]\nretention_policy = \"REDUNDANCY 1\"\n\
         [server.other]\nretention_policy = \"REDUNDANCY 3\"\n\
         [server.third]\n",
    );
    let last = std::cell::Cell::new(0u64);
    let b1 = take_backup(&cairn, &src, &policy, &last);
    src.psql("CREATE TABLE m1 AS SELECT 1 AS x");
    switch_and_wait(&src);
    let b2 = take_backup(&cairn, &src, &policy, &last);
    let out = cairn.ok(&["keep", "--server", "main", &b2, "--target", "full"]);
    assert!(out.contains("any later point"), "{out}");
    src.psql("CREATE TABLE later AS SELECT 7 AS x");
    src.psql("SELECT pg_create_restore_point('after_b2')");
    switch_and_wait(&src);
    src.psql("CREATE TABLE m3 AS SELECT 3 AS x");
    switch_and_wait(&src);
    let b3 = take_backup(&cairn, &src, &policy, &last);
    switch_and_wait(&src);
    src.stop();

    let cfg = policy.to_str().unwrap();
    let dry = |cairn: &Cairn| -> serde_json::Value {
        let out = cairn.ok(&[
            "--config",
            cfg,
            "expire",
            "--server",
            "main",
            "--dry-run",
            "--format",
            "json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    // The contrast: pinned standalone, the WAL between b2 and b3 would go.
    cairn.ok(&["keep", "--server", "main", &b2, "--release"]);
    cairn.ok(&["keep", "--server", "main", &b2]);
    let standalone = dry(&cairn)["plan"]["remove_wal"].as_array().unwrap().len();
    cairn.ok(&["keep", "--server", "main", &b2, "--release"]);
    cairn.ok(&["keep", "--server", "main", &b2, "--target", "full"]);
    let o = cairn.run(&["keep", "--server", "main", &b2], &[]);
    assert!(
        !o.status.success(),
        "a pin's target is not changed silently"
    );
    assert!(
        text(&o).contains("already pinned with target full"),
        "{}",
        text(&o)
    );
    let full = dry(&cairn)["plan"]["remove_wal"].as_array().unwrap().len();
    assert!(full > 0, "WAL before b2 goes");
    assert!(
        standalone > full,
        "standalone removes {standalone} WAL files, full only {full}"
    );

    // Without --server, every configured server: one cron line.
    let out = cairn.ok(&["--config", cfg, "expire"]);
    assert!(out.contains("server main: policy REDUNDANCY 1"), "{out}");
    assert!(out.contains("server other: policy REDUNDANCY 3"), "{out}");
    assert!(out.contains("server third: no retention_policy"), "{out}");
    let rows = list(&cairn, &policy);
    assert_eq!(status_of(&rows, &b1), "absent");
    assert_eq!(status_of(&rows, &b2), "pinned");
    assert_eq!(status_of(&rows, &b3), "kept");
    let out = cairn.ok(&["show", "--server", "main", &b2]);
    assert!(out.contains("target full"), "{out}");
    let o = cairn.run(&["verify", "--server", "main"], &[]);
    assert!(o.status.success(), "verify after expire: {}", text(&o));

    // b2 restores to the restore point after its end.
    let r = restore_and_start(&cairn, d, &b2, "r2", &["--target-name", "after_b2"]);
    assert_eq!(r.psql("SELECT x FROM later"), "7");
    assert_eq!(
        r.psql("SELECT count(*) FROM pg_class WHERE relname = 'm3'"),
        "0"
    );
}
