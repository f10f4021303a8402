//! `pgcairn verify` against a repository of two real backups with WAL
//! archived by PostgreSQL: clean when nothing is damaged; a flipped byte or
//! a deleted object of each kind is named, with the backups it breaks;
//! restore of an affected backup fails clearly while the other restores.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
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

fn wait_archived(c: &Cluster, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while c
        .psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        .as_str()
        < segment
    {
        assert!(
            Instant::now() < deadline,
            "{segment} not archived:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn switch_and_wait(c: &Cluster) {
    let seg = c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    c.psql("SELECT pg_switch_wal()");
    wait_archived(c, &seg);
}

/// Every file under `dir/sub`, relative to `dir`.
fn files(dir: &Path, sub: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join(sub)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    out
}

fn copy_repo(from: &str, to: &Path) {
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
}

fn flip_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x40;
    // Objects are read-only once written; replace the file.
    std::fs::remove_file(p).unwrap();
    std::fs::write(p, b).unwrap();
    chown(p);
}

/// pgcairn against a copy of the repository, with an empty cache of its own.
fn on_copy(src: &Cairn, d: &Path, case: &str) -> Cairn {
    let repo = d.join(format!("repo-{case}"));
    copy_repo(&src.repo, &repo);
    Cairn {
        repo: repo.to_string_lossy().to_string(),
        cache: d.join(format!("cache-{case}")),
    }
}

fn verify_json(c: &Cairn, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec!["verify", "--format", "json"];
    args.extend_from_slice(extra);
    let o = c.run(&args, &[]);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify output is not JSON ({e}): {}", text(&o)));
    (o, v)
}

/// Asserts verify found problems, one naming `object`, affecting `broken`
/// (a backup id) and not `sound`.
fn assert_found(v: &serde_json::Value, o: &Output, object: &str, broken: &str, sound: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", text(o));
    let problems = v["repository"]["problems"].as_array().unwrap();
    let p = problems
        .iter()
        .find(|p| p["object"] == object)
        .unwrap_or_else(|| panic!("{object} not named: {v:#}"));
    let affects: Vec<&str> = p["affects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        affects.iter().any(|a| a.ends_with(broken))
            || object.ends_with(broken)
            || affects.iter().any(|a| a.starts_with("wal/")),
        "{object} should affect {broken}: {v:#}"
    );
    let status = |id: &str| {
        v["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backup_id"] == id)
            .unwrap()["restorable"]
            .as_bool()
            .unwrap()
    };
    assert!(!status(broken), "{broken} should not be restorable: {v:#}");
    assert!(status(sound), "{sound} should be restorable: {v:#}");
}

fn restore(c: &Cairn, id: &str, target: &Path) -> Output {
    c.run(
        &[
            "restore",
            "--server",
            "main",
            id,
            target.to_str().unwrap(),
            "--target-immediate",
        ],
        &[],
    )
}

#[test]
fn verify_names_damage_and_what_still_restores() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    archiving(&src, &cairn, d);
    src.start();
    run_ok(&mut src.pgbench(&["-i", "-s", "1", "-q"]));
    src.psql("CREATE TABLE a_data AS SELECT g, md5(g::text) AS t FROM generate_series(1, 5000) g");
    let backup = |c: &Cairn| {
        c.backup(&src, "main", &["--fast-checkpoint"]);
    };
    backup(&cairn);
    let ids = |c: &Cairn| -> Vec<String> {
        let l: serde_json::Value =
            serde_json::from_str(&c.ok(&["list", "--server", "main", "--format", "json"])).unwrap();
        l.as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let a = ids(&cairn)[0].clone();

    // B's own data: a table of incompressible text only it holds; its WAL
    // is archived before B starts, so B's packs are B's alone.
    src.psql(
        "CREATE TABLE b_data AS SELECT g, md5(g::text || 'b') || md5(g::text || 'c') AS t
         FROM generate_series(1, 100000) g",
    );
    src.psql("CHECKPOINT");
    switch_and_wait(&src);
    let repo = PathBuf::from(&cairn.repo);
    let packs_before = files(&repo, "packs");
    let index_before = files(&repo, "index");
    // Backup ids are start times to the second: B must start in a later one.
    let deadline = Instant::now() + Duration::from_secs(5);
    while chrono_id() == a {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    backup(&cairn);
    let all = ids(&cairn);
    assert_eq!(all.len(), 2);
    let b = all[1].clone();
    switch_and_wait(&src);
    // WAL past B's stop, which recovery to the latest point reads.
    src.psql("CREATE TABLE after_b AS SELECT 1 AS x");
    switch_and_wait(&src);
    src.stop();

    // B's largest new pack holds b_data; its new index objects name it.
    let new_packs: Vec<String> = files(&repo, "packs")
        .into_iter()
        .filter(|p| !packs_before.contains(p))
        .collect();
    let b_pack = new_packs
        .iter()
        .max_by_key(|p| std::fs::metadata(repo.join(p)).unwrap().len())
        .unwrap()
        .clone();
    let b_index: Vec<String> = files(&repo, "index")
        .into_iter()
        .filter(|p| !index_before.contains(p))
        .collect();
    assert!(!b_index.is_empty());

    // Sound: structure and full read.
    let (o, v) = verify_json(&cairn, &[]);
    assert_eq!(o.status.code(), Some(0), "{v:#} {}", text(&o));
    assert_eq!(v["backups"].as_array().unwrap().len(), 2);
    // The server's recovery window opens at A's end, with no gap.
    let w = &v["windows"][0];
    assert_eq!(w["server"], "main", "{v:#}");
    assert_eq!(w["window"]["from_backup"], a.as_str(), "{v:#}");
    assert_eq!(w["problems"].as_array().unwrap().len(), 0, "{v:#}");
    assert!(w["latest_lsn"].is_string(), "{v:#}");
    let (o, v) = verify_json(&cairn, &["--read-data"]);
    assert_eq!(o.status.code(), Some(0), "{v:#} {}", text(&o));
    assert!(
        v["repository"]["chunks_read"].as_u64().unwrap() > 0,
        "{v:#}"
    );
    let human = cairn.ok(&["verify", "--read-data=50"]);
    assert!(
        human.contains("verify: OK, 2 backup(s) restorable"),
        "{human}"
    );

    // A flipped byte in B's pack: only reading the data finds it.
    let c = on_copy(&cairn, d, "flip-pack");
    flip_byte(&PathBuf::from(&c.repo).join(&b_pack));
    let (o, _) = verify_json(&c, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "structure alone cannot see a flipped byte"
    );
    let (o, v) = verify_json(&c, &["--read-data"]);
    assert_found(&v, &o, &b_pack, &b, &a);
    let human = String::from_utf8_lossy(&c.run(&["verify", "--read-data"], &[]).stdout).to_string();
    println!("{human}");
    assert!(human.contains(&format!("PROBLEM {b_pack}")), "{human}");
    assert!(human.contains("1 of 2 backup(s) restorable"), "{human}");
    // Restore of B fails and names the pack; A restores and starts.
    let tb = d.join("restored-b");
    let o = restore(&c, &b, &tb);
    assert!(!o.status.success(), "restore of a damaged backup succeeded");
    let err = text(&o);
    assert!(err.contains(&b_pack), "{err}");
    assert!(
        !tb.join("global/pg_control").exists(),
        "a failed restore left a startable directory"
    );
    let ta = d.join("restored-a");
    let o = restore(&c, &a, &ta);
    assert!(o.status.success(), "{}", text(&o));
    let mut restored = Cluster::existing(&ta, d, "restored-a");
    restored.start();
    assert_eq!(restored.psql("SELECT count(*) FROM a_data"), "5000");
    restored.stop();

    // A deleted pack: the structure check names it.
    let c = on_copy(&cairn, d, "rm-pack");
    std::fs::remove_file(PathBuf::from(&c.repo).join(&b_pack)).unwrap();
    let (o, v) = verify_json(&c, &[]);
    assert_found(&v, &o, &b_pack, &b, &a);
    let o = restore(&c, &b, &d.join("restored-b2"));
    assert!(!o.status.success());
    assert!(text(&o).contains(&b_pack), "{}", text(&o));

    // Index objects: deleted, or with a flipped byte.
    let c = on_copy(&cairn, d, "rm-index");
    for i in &b_index {
        std::fs::remove_file(PathBuf::from(&c.repo).join(i)).unwrap();
    }
    let (o, v) = verify_json(&c, &[]);
    assert_found(&v, &o, &format!("manifests/backups/main/{b}"), &b, &a);
    let c = on_copy(&cairn, d, "flip-index");
    flip_byte(&PathBuf::from(&c.repo).join(&b_index[0]));
    let (o, v) = verify_json(&c, &[]);
    assert_eq!(o.status.code(), Some(2), "{v:#}");
    assert!(
        v["repository"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["object"] == b_index[0].as_str()),
        "{v:#}"
    );

    // B's manifest: a flipped byte, or deleted WAL it needs.
    let c = on_copy(&cairn, d, "flip-manifest");
    let man = format!("manifests/backups/main/{b}");
    flip_byte(&PathBuf::from(&c.repo).join(&man));
    let (o, v) = verify_json(&c, &[]);
    assert_found(&v, &o, &man, &b, &a);

    let c = on_copy(&cairn, d, "rm-wal");
    let meta: serde_json::Value =
        serde_json::from_str(&c.ok(&["show", "--server", "main", &b, "--format", "json"])).unwrap();
    let stop_wal = meta["stop_wal"].as_str().unwrap().to_string();
    let wal = files(&PathBuf::from(&c.repo), "manifests/wal")
        .into_iter()
        .find(|w| w.ends_with(&stop_wal))
        .unwrap();
    std::fs::remove_file(PathBuf::from(&c.repo).join(&wal)).unwrap();
    let (o, v) = verify_json(&c, &[]);
    assert_eq!(o.status.code(), Some(2), "{v:#}");
    let bb = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["backup_id"] == b.as_str())
        .unwrap();
    assert_eq!(bb["restorable"], false, "{v:#}");
    assert!(
        bb["problems"][0].as_str().unwrap().contains("not archived"),
        "{v:#}"
    );

    gap_between_backups_is_named(&cairn, d, &a, &b);
    wal_after_the_backups_is_checked(&cairn, d, &b);
}

/// A server's verify reads its WAL past the last backup too (recovery to
/// the latest point needs it), and names a timeline without its history.
fn wal_after_the_backups_is_checked(cairn: &Cairn, d: &Path, b: &str) {
    let c = on_copy(cairn, d, "wal-after");
    let m: serde_json::Value =
        serde_json::from_str(&c.ok(&["show", "--server", "main", b, "--format", "json"])).unwrap();
    let stop = m["stop_wal"].as_str().unwrap().to_string();
    let after = files(&PathBuf::from(&c.repo), "manifests/wal")
        .into_iter()
        .find(|w| {
            let f = w.rsplit('/').next().unwrap();
            f.len() == 24 && f > stop.as_str()
        })
        .unwrap_or_else(|| panic!("no segment archived after {stop}"));
    let (o, v) = verify_json(&c, &["--server", "main"]);
    assert_eq!(o.status.code(), Some(0), "{v:#}");
    flip_byte(&PathBuf::from(&c.repo).join(&after));
    window_problem(&c, "cannot be read back");

    // WAL on timeline 2 without 00000002.history: a segment's bytes under
    // the timeline-2 name (its pages are of timeline 1, which a segment of
    // a newer timeline may hold).
    let c = on_copy(cairn, d, "no-history");
    let work = d.join("no-history-work");
    std::fs::create_dir_all(&work).unwrap();
    chown(&work);
    let fetched = work.join("seg");
    let o = c.run(
        &[
            "archive-get",
            "--server",
            "main",
            &stop,
            fetched.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let tl2 = work.join(format!("00000002{}", &stop[8..]));
    std::fs::rename(&fetched, &tl2).unwrap();
    let o = c.run(
        &["archive-push", "--server", "main", tl2.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    window_problem(&c, "00000002.history");
}

/// One server's verify fails with a window problem containing `needle`.
fn window_problem(c: &Cairn, needle: &str) {
    let (o, v) = verify_json(c, &["--server", "main"]);
    assert_eq!(o.status.code(), Some(2), "{v:#}");
    let problems = v["windows"][0]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains(needle)),
        "{needle}: {v:#}"
    );
}

/// A segment archived between two backups deleted: both backups still
/// restore, but the server's recovery window has a gap, named.
fn gap_between_backups_is_named(cairn: &Cairn, d: &Path, a: &str, b: &str) {
    let c = on_copy(cairn, d, "gap");
    let wal_of = |id: &str, field: &str| -> String {
        let m: serde_json::Value =
            serde_json::from_str(&c.ok(&["show", "--server", "main", id, "--format", "json"]))
                .unwrap();
        m[field].as_str().unwrap().to_string()
    };
    let (a_stop, b_start) = (wal_of(a, "stop_wal"), wal_of(b, "start_wal"));
    let between = files(&PathBuf::from(&c.repo), "manifests/wal")
        .into_iter()
        .find(|w| {
            let f = w.rsplit('/').next().unwrap();
            f.len() == 24 && f > a_stop.as_str() && f < b_start.as_str()
        })
        .unwrap_or_else(|| panic!("no segment archived between {a_stop} and {b_start}"));
    std::fs::remove_file(PathBuf::from(&c.repo).join(&between)).unwrap();
    let segment = between.rsplit('/').next().unwrap().to_string();
    let (o, v) = verify_json(&c, &[]);
    assert_eq!(o.status.code(), Some(2), "{v:#}");
    assert!(
        v["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["restorable"] == true),
        "{v:#}"
    );
    let problems = v["windows"][0]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("WAL gap")
                && p.as_str().unwrap().contains(&segment)),
        "{v:#}"
    );
}

/// Backup ids are UTC start times to the second.
fn chrono_id() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    pgcairn::engine::utc_stamp(s)
}

/// A backup that carries its WAL (taken without archiving), then archiving
/// that starts later with a gap: the window starts from the carried WAL,
/// `list` works, and verify names the gap.
#[test]
fn carried_wal_then_a_gap_in_the_archive() {
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::new(d);
    let mut src = Cluster::init(d, "src", &[]);
    src.start();
    cairn.backup(&src, "main", &["--include-wal", "--fast-checkpoint"]);
    let mut complete = Vec::new();
    for i in 0..2 {
        src.psql(&format!(
            "CREATE TABLE t{i} AS SELECT g FROM generate_series(1, 1000) g"
        ));
        complete.push(src.psql("SELECT pg_walfile_name(pg_current_wal_lsn())"));
        src.psql("SELECT pg_switch_wal()");
    }
    // Only the second is archived: the first is a gap right after the
    // backup's own WAL.
    let seg = src.pgdata.join("pg_wal").join(&complete[1]);
    cairn.ok(&["archive-push", "--server", "main", seg.to_str().unwrap()]);
    let listed = cairn.ok(&["list", "--server", "main", "--format", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{listed}");
    window_problem(&cairn, &format!("WAL gap {}", complete[0]));
    src.stop();
}
