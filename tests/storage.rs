//! Storage comes back: after daily backups with churn, `expire` and `gc`
//! shrink the repository to what the retained backups need. "Need" is
//! measured, not estimated: a second repository receives only the backups
//! that the first one retains, taken at the same moments, so it holds
//! exactly what they need.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pg::*;

const DAYS: u32 = 6;
const KEEP: u32 = 2;

/// Bytes of every object under `dir` (a local repository).
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn backup(c: &Cairn, src: &Cluster) -> String {
    c.backup(src, "main", &["--include-wal", "--fast-checkpoint"])
}

/// Run gc until no mark is pending and none is written, once every pack is
/// older than the grace period (so all garbage was a candidate); bounded.
/// The first such run marks, a run a grace period later sweeps.
fn gc_to_the_end(c: &Cairn, all_old_at: Instant) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut reports = Vec::new();
    loop {
        let o = c.run(&["gc", "--format", "json"], &[]);
        assert!(o.status.success(), "gc: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("gc json");
        let pending = v["marks_pending"].as_array().map_or(0, Vec::len);
        let marked = !v["mark"].is_null();
        reports.push(v);
        if pending == 0 && !marked && Instant::now() > all_old_at {
            return reports;
        }
        assert!(Instant::now() < deadline, "gc never finished: {reports:#?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn expire_and_gc_return_the_repository_to_what_retained_backups_need() {
    let dir = user_dir();
    let d = dir.path();
    let all = Cairn::with_init(d, &["--gc-grace-secs", "10", "--gc-max-writer-secs", "5"]);
    let kept_only = Cairn {
        repo: d.join("repo-kept").to_string_lossy().to_string(),
        cache: d.join("cache-kept"),
    };
    let o = kept_only.run(&["init"], &[("PGCAIRN_NEW_PASSPHRASE", "test-pass")]);
    assert!(o.status.success(), "{}", text(&o));

    let mut src = Cluster::init(d, "src", &[]);
    src.start();
    run_ok(&mut src.pgbench(&["-i", "-s", "3", "-q"]));
    src.psql(
        "CREATE TABLE events AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS payload \
         FROM generate_series(1, 200000) g",
    );
    src.psql("VACUUM (FREEZE)");
    src.psql("CHECKPOINT");

    let mut sizes = Vec::new();
    for day in 1..=DAYS {
        if day > 1 {
            // A day of churn: a tenth of the accounts rewritten, rows
            // appended, the old versions vacuumed away.
            src.psql(&format!(
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 10 = {day}"
            ));
            src.psql(&format!(
                "INSERT INTO events SELECT g, md5(random()::text) FROM generate_series(1, 20000) g; \
                 DELETE FROM events WHERE id % 10 = {day}"
            ));
            src.psql("VACUUM");
        }
        println!("day {day}: {}", backup(&all, &src).trim());
        if day > DAYS - KEEP {
            // The same moment, into the repository that only ever holds
            // the retained backups.
            backup(&kept_only, &src);
        }
        sizes.push(bytes_under(Path::new(&all.repo)));
    }
    let before = bytes_under(Path::new(&all.repo));
    // The grace period (10 s) after the last write, with a second of margin
    // for the store's whole-second timestamps.
    let all_old_at = Instant::now() + Duration::from_secs(12);

    let plan = all.ok(&[
        "expire",
        "--server",
        "main",
        "--keep-last",
        &KEEP.to_string(),
        "--gc",
    ]);
    println!("{plan}");
    let listed: serde_json::Value =
        serde_json::from_str(&all.ok(&["list", "--server", "main", "--format", "json"]))
            .expect("list json");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(KEEP as usize),
        "{listed:#}"
    );
    let reports = gc_to_the_end(&all, all_old_at);
    let after = bytes_under(Path::new(&all.repo));
    let need = bytes_under(Path::new(&kept_only.repo));
    let reclaimed: u64 = reports
        .iter()
        .map(|r| r["bytes_reclaimed"].as_u64().unwrap_or(0))
        .sum();
    println!("repository after each day (bytes): {sizes:?}");
    println!(
        "before expire {before} B; after expire + gc {after} B ({} gc runs, {reclaimed} B reclaimed); \
         a repository holding only the {KEEP} retained backups: {need} B; ratio {:.2}",
        reports.len(),
        after as f64 / need as f64
    );
    assert!(reclaimed > 0, "gc reclaimed nothing: {reports:#?}");
    assert!(after < before, "{after} !< {before}");
    // Packs with at most half garbage are kept whole rather than repacked
    // (repo-format.md), so the repository may exceed the minimum by that
    // slack, never by more.
    assert!(
        after as f64 <= need as f64 * 1.5,
        "after gc {after} B, the retained backups need {need} B"
    );

    let o = all.run(&["verify", "--read-data"], &[]);
    assert!(o.status.success(), "verify: {}", text(&o));
    src.stop();
    for (i, id) in listed
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .enumerate()
    {
        let target = d.join(format!("restored-{i}"));
        all.ok(&[
            "restore",
            "--server",
            "main",
            &id,
            target.to_str().expect("path"),
            "--target-immediate",
        ]);
        let mut r = Cluster::existing(&target, d, &format!("restored-{i}"));
        r.start();
        assert_eq!(r.psql("SELECT count(*) FROM pgbench_accounts"), "300000");
        r.stop();
    }
}
