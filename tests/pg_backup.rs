//! Backup and restore of real PostgreSQL clusters (started by the test).

mod common;

use std::process::Stdio;

use common::pg::*;

const ENTROPY_TABLE: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, note text, \
     amount numeric(12,2), created timestamptz) TABLESPACE ts; \
     INSERT INTO orders SELECT g, md5(g::text), md5((g*7)::text) || md5((g*13)::text), \
     (random()*10000)::numeric(12,2), now() - (g || ' seconds')::interval FROM generate_series(1, 60000) g;";

fn digest(c: &Cluster) -> String {
    c.psql("SELECT md5(string_agg(id::text || customer || note || amount::text || created::text, ',' ORDER BY id)) FROM orders")
}

/// pgbench's invariants hold in every consistent state.
fn pgbench_consistent(c: &Cluster) {
    let r = c.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta),0) FROM pgbench_history) \
         AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta),0) FROM pgbench_history) \
         AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT coalesce(sum(delta),0) FROM pgbench_history)",
    );
    assert_eq!(r, "t", "pgbench balances disagree with history");
}

#[test]
fn backup_under_load_restores_and_starts() {
    let dir = user_dir();
    let d = dir.path();
    let mut src = Cluster::init(d, "src", &[]);
    // pg_xact moved to another disk: backed up through the link, restored
    // as a directory (without it the restored cluster cannot start).
    let xact = d.join("xact-src");
    std::fs::rename(src.pgdata.join("pg_xact"), &xact).unwrap();
    std::os::unix::fs::symlink(&xact, src.pgdata.join("pg_xact")).unwrap();
    src.start();
    let ts_dir = d.join("ts-src");
    std::fs::create_dir_all(&ts_dir).unwrap();
    chown(&ts_dir);
    src.psql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'",
        ts_dir.display()
    ));
    src.psql(ENTROPY_TABLE);
    run_ok(&mut src.pgbench(&["-i", "-s", "2", "-q"]));
    src.psql("CREATE UNLOGGED TABLE scratch AS SELECT g FROM generate_series(1,1000) g");
    // A file of the DBA's in the data directory (backed up like any other).
    let probe = src.pgdata.join("pgcairn-probe.txt");
    std::fs::write(&probe, b"first version of the probe").unwrap();
    chown(&probe);
    let before = digest(&src);
    let cairn = Cairn::new(d);
    let backup = || cairn.backup(&src, "main", &["--include-wal", "--fast-checkpoint"]);

    // Back up while pgbench writes.
    let mut load = src
        .pgbench(&["-c", "2", "-t", "3000", "-n"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = backup();
    println!("{out}");
    assert!(load.wait().unwrap().success());
    assert!(out.contains("backup "), "{out}");

    let list = cairn.ok(&["list", "--server", "main", "--format", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    let shown = cairn.ok(&["show", "--server", "main", "latest", "--format", "json"]);
    let meta: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(meta["bad_pages"].as_array().unwrap().len(), 0);
    assert_eq!(meta["tablespaces"].as_array().unwrap().len(), 1);
    assert!(meta["data_checksums"].as_bool().unwrap());
    // The server backed up is the major version under test.
    let v = run_ok(std::process::Command::new(pg_bin().join("postgres")).arg("--version"));
    let major: i64 = v
        .rsplit(' ')
        .next()
        .unwrap()
        .trim()
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        meta["pg_version_num"].as_i64().unwrap() / 10000,
        major,
        "{v}"
    );
    assert!(meta["backup_label"]
        .as_str()
        .unwrap()
        .contains("START WAL LOCATION"));
    // The text form shows the tablespace_map too (oid and location).
    let shown = cairn.ok(&["show", "--server", "main", "latest"]);
    let oid = meta["tablespaces"][0]["oid"].to_string();
    assert!(
        shown.contains(&format!("tablespace_map:\n{oid} {}", ts_dir.display())),
        "{shown}"
    );

    // Restore elsewhere, relocating the tablespace, and start it.
    let target = d.join("restored");
    let ts_new = d.join("ts-restored");
    let map = format!("{}={}", ts_dir.display(), ts_new.display());
    // A relocation that names no tablespace of the backup is refused
    // before anything is written, rather than restoring at the old place.
    let typo = format!("{}x={}", ts_dir.display(), ts_new.display());
    let tgt = target.to_str().unwrap();
    let o = cairn.run(&restore_args(tgt, &typo), &[]);
    assert!(
        !o.status.success()
            && text(&o).contains(&format!("tablespaces are at {}", ts_dir.display())),
        "{}",
        text(&o)
    );
    assert!(!target.exists() && !ts_new.exists());
    // --delta into a new directory without relocating would restore over
    // the source's own tablespace, which it never linked to: refused.
    let fresh = d.join("fresh");
    let ts_files = files_under(&ts_dir);
    let o = cairn.run(
        &[
            "restore",
            "--server",
            "main",
            "latest",
            fresh.to_str().unwrap(),
            "--delta",
        ],
        &[],
    );
    assert!(
        !o.status.success() && text(&o).contains("already holds PG_"),
        "{}",
        text(&o)
    );
    assert!(
        ts_files.iter().all(|f| f.exists()),
        "a file of the source's tablespace went"
    );
    // The location may hold what is not this cluster's (a file system's
    // lost+found): restored beside it, and left alone.
    std::fs::create_dir_all(ts_new.join("lost+found")).unwrap();
    std::fs::write(ts_new.join("lost+found/keep"), b"not ours").unwrap();
    chown(&ts_new);
    let out = cairn.ok(&restore_args(tgt, &map));
    println!("{out}");
    assert!(!target.join("scratch").exists());
    let link = std::fs::read_link(
        target
            .join("pg_tblspc")
            .join(meta["tablespaces"][0]["oid"].to_string()),
    )
    .unwrap();
    assert_eq!(link, ts_new);
    let mut dst = Cluster::existing(&target, d, "dst");
    dst.start();
    assert_eq!(
        digest(&dst),
        before,
        "the untouched table must come back byte for byte"
    );
    pgbench_consistent(&dst);
    // Unlogged tables come back empty, as after a crash.
    assert_eq!(dst.psql("SELECT count(*) FROM scratch"), "0");
    let n: i64 = dst
        .psql("SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    println!("restored pgbench_history rows: {n}");
    run_ok(
        as_user(pg_bin().join("pg_amcheck"))
            .args(["--install-missing", "--heapallindexed", "-h"])
            .arg(&dst.sockdir)
            .args(["-p", &dst.port.to_string(), "-U", "postgres", "--all"]),
    );
    dst.stop();
    run_ok(
        as_user(pg_bin().join("pg_checksums"))
            .arg("--check")
            .arg("-D")
            .arg(&target),
    );

    // --delta over the used copy: damage it, add junk, restore over it.
    let mut biggest = (std::path::PathBuf::new(), 0u64);
    for db in std::fs::read_dir(target.join("base")).unwrap() {
        for f in std::fs::read_dir(db.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let len = std::fs::metadata(&p).unwrap().len();
            if len > biggest.1 {
                biggest = (p, len);
            }
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&biggest.0)
        .unwrap()
        .set_len(8192)
        .unwrap();
    std::fs::write(target.join("junk"), b"not from the backup").unwrap();
    std::fs::write(target.join("pg_wal/00000001000000000000FFFF"), b"stale").unwrap();
    // A file replaced by a symlink to a file outside: --delta replaces the
    // link and leaves what it points at alone.
    let outside = d.join("outside");
    std::fs::write(&outside, b"not part of the cluster").unwrap();
    let linked = target.join("PG_VERSION");
    std::fs::remove_file(&linked).unwrap();
    std::os::unix::fs::symlink(&outside, &linked).unwrap();
    let o = cairn.run(&restore_args(tgt, &map), &[]);
    assert!(
        !o.status.success() && text(&o).contains("--delta"),
        "{}",
        text(&o)
    );
    let out = cairn.ok(&[restore_args(tgt, &map), vec!["--delta"]].concat());
    println!("{out}");
    assert!(out.contains("already matched"), "{out}");
    assert!(!target.join("junk").exists());
    assert!(!target.join("pg_wal/00000001000000000000FFFF").exists());
    assert!(std::fs::symlink_metadata(&linked).unwrap().is_file());
    assert_eq!(std::fs::read(&outside).unwrap(), b"not part of the cluster");
    // Rewritten from the backup (PostgreSQL had grown it after the first
    // restore, so its size now is the backup's, not the truncated one).
    assert!(std::fs::metadata(&biggest.0).unwrap().len() > 8192);
    assert!(std::fs::symlink_metadata(target.join("pg_xact"))
        .unwrap()
        .is_dir());
    dst.start();
    assert_eq!(digest(&dst), before);
    pgbench_consistent(&dst);
    dst.stop();

    // --delta with the tablespace relocated again: the link moves, and
    // nothing in the old location is touched (it may be another copy's).
    let files_in = |p: &std::path::Path| walkdir_count(p);
    let old_files = files_in(&ts_new);
    let ts_moved = d.join("ts-moved");
    let map2 = format!("{}={}", ts_dir.display(), ts_moved.display());
    let out = cairn.ok(&[restore_args(tgt, &map2), vec!["--delta"]].concat());
    println!("{out}");
    assert_eq!(files_in(&ts_new), old_files);
    assert_eq!(
        std::fs::read(ts_new.join("lost+found/keep")).unwrap(),
        b"not ours"
    );
    let oid = meta["tablespaces"][0]["oid"].to_string();
    assert_eq!(
        std::fs::read_link(target.join("pg_tblspc").join(&oid)).unwrap(),
        ts_moved
    );
    dst.start();
    assert_eq!(digest(&dst), before);
    dst.stop();

    // A second backup after a small change stores a small fraction.
    src.psql("UPDATE orders SET amount = amount + 1 WHERE id % 1000 = 0");
    let out = backup();
    println!("{out}");
    let list = cairn.ok(&["list", "--server", "main", "--format", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let logical = rows[1]["logical_bytes"].as_u64().unwrap();
    let new = rows[1]["new_bytes_stored"].as_u64().unwrap();
    println!(
        "second backup: {new} new bytes stored for {logical} logical bytes ({:.2}%)",
        new as f64 * 100.0 / logical as f64
    );
    assert!(
        new * 10 < logical,
        "second backup stored {new} of {logical}"
    );

    // Rewrite the probe with its size and mtime kept (as `cp -p` or
    // `rsync -a` leave a file): only its ctime tells, and the next backup
    // must read it. Files untouched since initdb (long before the second
    // backup started) are taken unread.
    let mtime = std::fs::metadata(&probe).unwrap().modified().unwrap();
    std::fs::write(&probe, b"other version of the probe").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&probe)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    src.psql("UPDATE orders SET amount = amount + 1 WHERE id % 997 = 0");
    let out = backup();
    println!("{out}");
    let third = digest(&src);
    let shown = cairn.ok(&["show", "--server", "main", "latest", "--format", "json"]);
    let meta: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let unchanged = meta["unchanged_files"].as_u64().unwrap();
    assert!(
        unchanged > 100 && unchanged < meta["files"].as_u64().unwrap(),
        "third backup took {unchanged} files unread"
    );
    let target3 = d.join("restored3");
    cairn.ok(&[
        "restore",
        "--server",
        "main",
        "latest",
        target3.to_str().unwrap(),
        "--tablespace-map",
        &format!("{}={}", ts_dir.display(), d.join("ts-restored3").display()),
    ]);
    assert_eq!(
        std::fs::read(target3.join("pgcairn-probe.txt")).unwrap(),
        b"other version of the probe"
    );
    let mut dst3 = Cluster::existing(&target3, d, "dst3");
    dst3.start();
    assert_eq!(digest(&dst3), third);
    pgbench_consistent(&dst3);
    dst3.stop();
}

#[test]
fn clear_errors_and_nothing_partial() {
    let dir = user_dir();
    let d = dir.path();
    let mut a = Cluster::init(d, "a", &[]);
    a.start();
    let mut b = Cluster::init(d, "b", &[]);
    b.start();
    let cairn = Cairn::new(d);
    let pa = a.pgdata.to_string_lossy().to_string();
    let pb = b.pgdata.to_string_lossy().to_string();

    // Wrong pgdata for the connection.
    let o = cairn.run(
        &[
            "backup",
            "--server",
            "a",
            "--pgdata",
            &pb,
            "--conninfo",
            &a.conninfo(),
            "--include-wal",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is not the data directory"),
        "{}",
        text(&o)
    );
    let missing = format!("{pa}-missing");
    let o = cairn.run(
        &[
            "backup",
            "--server",
            "a",
            "--pgdata",
            &missing,
            "--conninfo",
            &a.conninfo(),
        ],
        &[],
    );
    assert!(
        !o.status.success() && text(&o).contains(&format!("cannot access --pgdata {missing}")),
        "{}",
        text(&o)
    );

    // A good backup of a registers server name "a" as cluster a.
    cairn.ok(&[
        "backup",
        "--server",
        "a",
        "--pgdata",
        &pa,
        "--conninfo",
        &a.conninfo(),
        "--include-wal",
        "--fast-checkpoint",
    ]);
    // Cluster b under the same name is refused.
    let o = cairn.run(
        &[
            "backup",
            "--server",
            "a",
            "--pgdata",
            &pb,
            "--conninfo",
            &b.conninfo(),
            "--include-wal",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("system identifier"), "{}", text(&o));

    // PostgreSQL down.
    b.stop();
    let o = cairn.run(
        &[
            "backup",
            "--server",
            "b",
            "--pgdata",
            &pb,
            "--conninfo",
            &b.conninfo(),
            "--include-wal",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("cannot connect to PostgreSQL"),
        "{}",
        text(&o)
    );

    // A corrupt chunk during restore: a clear error naming the pack, and
    // no pg_control in the target, so nothing can start from it.
    let packs = std::fs::read_dir(std::path::Path::new(&cairn.repo).join("packs")).unwrap();
    let mut biggest = None;
    for sub in packs {
        for p in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = p.unwrap();
            let len = p.metadata().unwrap().len();
            if biggest.as_ref().is_none_or(|(_, l)| len > *l) {
                biggest = Some((p.path(), len));
            }
        }
    }
    let (pack, _) = biggest.unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1000] ^= 0x55;
    std::fs::write(&pack, bytes).unwrap();
    let target = d.join("bad-restore");
    let o = cairn.run(
        &[
            "restore",
            "--server",
            "a",
            "latest",
            target.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let name = pack.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        text(&o).contains(&name),
        "error must name the pack: {}",
        text(&o)
    );
    assert!(
        !target.join("global/pg_control").exists(),
        "a failed restore must not look startable"
    );
}

/// Page checksums use the absolute block number. A `.1` segment whose pages
/// carry checksums computed by pgcairn for blocks 131072.. must pass
/// PostgreSQL's own `pg_checksums`; one damaged page must be the only one it
/// reports, and the backup must list exactly that block.
#[test]
fn checksums_of_a_second_segment_agree_with_pg_checksums() {
    use pgcairn::pg::checksum::{page_checksum, CHECKSUM_OFFSET};
    let dir = user_dir();
    let d = dir.path();
    let mut c = Cluster::init(d, "ck", &[]);
    c.start();
    c.psql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g; CHECKPOINT;");
    let rel = c.psql("SELECT pg_relation_filepath('t')");
    c.stop();
    let seg0 = c.pgdata.join(&rel);
    let pages = std::fs::read(&seg0).unwrap();
    assert!(pages.len() >= 8 * 8192);
    let blocks_per_seg = (1u64 << 30) / 8192;
    let mut seg1 = pages[..8 * 8192].to_vec();
    for (k, page) in seg1.chunks_exact_mut(8192).enumerate() {
        let sum = page_checksum(page, (blocks_per_seg + k as u64) as u32);
        page[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 2].copy_from_slice(&sum.to_le_bytes());
    }
    let seg1_path = c.pgdata.join(format!("{rel}.1"));
    std::fs::write(&seg1_path, &seg1).unwrap();
    chown(&seg1_path);
    // PostgreSQL's tool accepts every page pgcairn computed.
    run_ok(
        as_user(pg_bin().join("pg_checksums"))
            .arg("--check")
            .arg("-D")
            .arg(&c.pgdata),
    );
    // Damage block 3 of the .1 segment (absolute block 131075).
    seg1[3 * 8192 + 4000] ^= 0x01;
    std::fs::write(&seg1_path, &seg1).unwrap();
    let o = as_user(pg_bin().join("pg_checksums"))
        .arg("--check")
        .arg("-D")
        .arg(&c.pgdata)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let report = text(&o);
    assert!(report.contains(&format!("{rel}.1\", block 3")), "{report}");
    assert!(report.contains("Bad checksums:  1"), "{report}");

    c.start();
    let cairn = Cairn::new(d);
    cairn.backup(&c, "ck", &["--include-wal", "--fast-checkpoint"]);
    let shown = cairn.ok(&["show", "--server", "ck", "latest", "--format", "json"]);
    let meta: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let bad = meta["bad_pages"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0]["path"], format!("{rel}.1"));
    assert_eq!(bad[0]["block"], blocks_per_seg + 3);
}

#[test]
fn non_default_wal_segment_size_and_standby_refusal() {
    let dir = user_dir();
    let d = dir.path();
    let mut c = Cluster::init(d, "seg64", &["--wal-segsize=64"]);
    c.append_conf("wal_level = replica\nmax_wal_senders = 4\n");
    c.start();
    run_ok(&mut c.pgbench(&["-i", "-s", "1", "-q"]));
    let cairn = Cairn::new(d);
    cairn.backup(&c, "s", &["--include-wal", "--fast-checkpoint"]);
    let meta: serde_json::Value =
        serde_json::from_str(&cairn.ok(&["show", "--server", "s", "latest", "--format", "json"]))
            .unwrap();
    assert_eq!(meta["wal_segment_size"], 64 * 1024 * 1024);
    let target = d.join("seg64-restored");
    cairn.ok(&[
        "restore",
        "--server",
        "s",
        "latest",
        target.to_str().unwrap(),
    ]);
    let mut r = Cluster::existing(&target, d, "seg64r");
    r.start();
    assert_eq!(r.psql("SELECT count(*) FROM pgbench_accounts"), "100000");
    assert_eq!(r.psql("SHOW wal_segment_size"), "64MB");
    r.stop();

    // A standby of c: backups of it are refused (for now), clearly.
    let sb = d.join("standby");
    run_ok(
        as_user(pg_bin().join("pg_basebackup"))
            .arg("-D")
            .arg(&sb)
            .args(["-R", "-X", "stream", "-h"])
            .arg(&c.sockdir)
            .args(["-p", &c.port.to_string(), "-U", "postgres"]),
    );
    let mut s = Cluster::existing(&sb, d, "sb");
    s.start();
    let o = cairn.run(
        &[
            "backup",
            "--server",
            "sb",
            "--pgdata",
            sb.to_str().unwrap(),
            "--conninfo",
            &s.conninfo(),
            "--include-wal",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("standby"), "{}", text(&o));
}

fn count(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let p = e.unwrap().path();
        if p.is_dir() {
            count(&p)
        } else {
            1
        }
    })
    .sum()
}

/// A backup killed mid-way leaves no manifest; the next run reuses what the
/// killed one had stored.
#[test]
fn killed_backup_leaves_no_manifest_and_rerun_reuses_chunks() {
    let dir = user_dir();
    let d = dir.path();
    let mut c = Cluster::init(d, "kill", &[]);
    c.start();
    run_ok(&mut c.pgbench(&["-i", "-s", "20", "-q"]));
    c.psql("CHECKPOINT");
    let cairn = Cairn::with_init(d, &["--pack-size", "1048576"]);
    let pgdata = c.pgdata.to_string_lossy().to_string();
    let args = [
        "backup",
        "--server",
        "killme",
        "--pgdata",
        &pgdata,
        "--conninfo",
        &c.conninfo(),
        "--include-wal",
        "--fast-checkpoint",
        "--jobs",
        "1",
    ];
    let mut child = cairn
        .command(&args, &[("PGCAIRN_INDEX_FLUSH_SECS", "0")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the backup has indexed some packs of its own (the server
    // registration writes the first index object), then kill it.
    let repo = std::path::Path::new(&cairn.repo);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while count(&repo.join("index")) < 3 || count(&repo.join("packs")) < 8 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the backup stored nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let k = std::process::Command::new("pkill")
        .args(["-KILL", "-f", "backup --server killme"])
        .status()
        .unwrap();
    assert!(k.success());
    child.wait().unwrap();
    let stored_before = count(&repo.join("packs"));
    let killed_bytes = dir_bytes(&repo.join("packs"));
    let listed = cairn.ok(&["list", "--server", "killme"]);
    assert!(
        listed.starts_with("no backups of server killme in "),
        "{listed}"
    );
    assert_eq!(
        count(&repo.join("manifests/backups")),
        0,
        "a killed backup must leave no manifest"
    );

    // PostgreSQL ended the killed session's backup by itself: a new one runs.
    cairn.ok(&args);
    let killed_then_rerun = dir_bytes(&repo.join("packs"));
    // Control: the same cluster backed up once into a fresh repository.
    let control_dir = user_dir();
    let control = Cairn::with_init(control_dir.path(), &["--pack-size", "1048576"]);
    control.ok(&args);
    let once = dir_bytes(&std::path::Path::new(&control.repo).join("packs"));
    println!(
        "killed after {stored_before} packs ({killed_bytes} bytes); killed + rerun stored {killed_then_rerun} bytes, one clean backup {once}"
    );
    assert!(
        killed_bytes > once / 10,
        "the killed backup stored too little to tell"
    );
    // Without reuse the rerun would add all of killed_bytes again; packs
    // still uploading at the kill were never indexed and may be stored twice.
    let extra = killed_then_rerun.saturating_sub(once);
    assert!(
        extra < killed_bytes / 2,
        "the rerun stored again what the killed backup had stored: {extra} extra bytes of {killed_bytes}"
    );
}

/// The files under `dir`, at any depth.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Files under `dir`, at any depth.
fn walkdir_count(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walkdir_count(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let p = e.unwrap().path();
        if p.is_dir() {
            dir_bytes(&p)
        } else {
            std::fs::metadata(&p).unwrap().len()
        }
    })
    .sum()
}

/// `restore --server main latest TARGET --tablespace-map MAP`.
fn restore_args<'a>(target: &'a str, map: &'a str) -> Vec<&'a str> {
    vec![
        "restore",
        "--server",
        "main",
        "latest",
        target,
        "--tablespace-map",
        map,
    ]
}
