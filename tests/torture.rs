//! Torture: backups, PostgreSQL's own archive-push, `expire` and `gc`
//! running at the same time, round after round, with processes killed at
//! random points (SIGKILL, no chance to clean up). Afterwards the
//! repository must verify clean with `--read-data`, the collector must
//! finish its pending work, and every backup that is still listed must
//! restore and start with the data it had.
//!
//! The repository uses a short grace period (30 s, writers give up after
//! 15 s) so that marks are swept while writers still run.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::*;

const ROUNDS: u64 = 10;

/// xorshift64*: a seeded, reproducible choice of what to kill and when.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A child that is SIGKILLed after `kill_after` unless it ends first.
struct Victim {
    what: String,
    child: Child,
    kill_at: Option<Instant>,
}

impl Victim {
    fn spawn(what: &str, mut c: Command, kill_after: Option<Duration>) -> Victim {
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        Victim {
            what: what.into(),
            child,
            kill_at: kill_after.map(|d| Instant::now() + d),
        }
    }
}

/// Run the victims to their end (or their kill); returns (what, killed,
/// exit success, output) for each.
fn run_all(mut vs: Vec<Victim>) -> Vec<(String, bool, bool, String)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut done: Vec<Option<(bool, bool)>> = vs.iter().map(|_| None).collect();
    while done.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "a round did not finish in 300 s");
        for (v, d) in vs.iter_mut().zip(done.iter_mut()) {
            if d.is_some() {
                continue;
            }
            if let Some(status) = v.child.try_wait().expect("wait") {
                *d = Some((false, status.success()));
            } else if v.kill_at.is_some_and(|t| Instant::now() >= t) {
                // runuser passes SIGKILL on to nothing: kill the whole
                // process group of the command instead.
                kill_tree(v.child.id());
                let _ = v.child.wait();
                *d = Some((true, false));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    vs.into_iter()
        .zip(done)
        .map(|(v, d)| {
            let (killed, ok) = d.expect("finished");
            let o = v.child.wait_with_output().expect("output");
            (v.what, killed, ok, text(&o))
        })
        .collect()
}

/// SIGKILL a process and all its descendants (runuser → pgcairn).
fn kill_tree(pid: u32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace() {
        if let Ok(c) = c.parse::<u32>() {
            kill_tree(c);
        }
    }
    // SAFETY: kill(2) with a pid we spawned (or its child); no memory involved.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// archive_command: one call in four is SIGKILLed after 0-300 ms, so
/// PostgreSQL sees archive-push die at every point and retries.
fn killing_archive_command(cairn: &Cairn, d: &Path) -> String {
    let script = d.join("archive.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nif (( RANDOM % 4 == 0 )); then\n  exec timeout -s KILL 0.$(printf %03d $((RANDOM % 300))) {} \"$1\"\nfi\nexec {} \"$1\"\n",
            cairn.archive_push_command(d),
            cairn.archive_push_command(d)
        ),
    )
    .expect("script");
    run_ok(Command::new("chmod").arg("755").arg(&script));
    chown(&script);
    format!("{} %p", script.display())
}

#[test]
fn concurrent_backups_archiving_expire_and_gc_killed_at_random() {
    let seed = std::env::var("PGCAIRN_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    println!("seed {seed} (PGCAIRN_TORTURE_SEED to replay)");
    let mut rng = Rng(seed | 1);
    let dir = user_dir();
    let d = dir.path();
    let cairn = Cairn::with_init(d, &["--gc-grace-secs", "30", "--gc-max-writer-secs", "15"]);
    let mut src = Cluster::init(d, "src", &[]);
    src.append_conf(&format!(
        "archive_mode = on\narchive_command = '{}'\nwal_level = replica\n",
        killing_archive_command(&cairn, d)
    ));
    src.start();
    run_ok(&mut src.pgbench(&["-i", "-s", "1", "-q"]));
    src.psql("CREATE TABLE marker (round int PRIMARY KEY)");
    let backup_args = Cairn::backup_args(&src, "main", &["--fast-checkpoint"]);
    let backup_args: Vec<&str> = backup_args.iter().map(String::as_str).collect();

    // Which round's marker each successful backup holds.
    let mut markers: Vec<(String, u64)> = Vec::new();
    let mut killed = Vec::new();
    for round in 0..ROUNDS {
        src.psql(&format!("INSERT INTO marker VALUES ({round})"));
        // Churn that creates garbage for later rounds: rewrite a slice of
        // the accounts table.
        src.psql(&format!(
            "UPDATE pgbench_accounts SET filler = md5(random()::text) WHERE aid % 10 = {}",
            round % 10
        ));
        let mut vs = Vec::new();
        let mut churn = src.pgbench(&["-n", "-c", "2", "-t", "200"]);
        churn.stdout(Stdio::null());
        vs.push(Victim::spawn("pgbench", churn, None));
        let kill = |rng: &mut Rng, one_in: u64, max_ms: u64| {
            (rng.below(one_in) == 0).then(|| Duration::from_millis(rng.below(max_ms)))
        };
        let k = kill(&mut rng, 3, 2500);
        vs.push(Victim::spawn("backup", cairn.command(&backup_args, &[]), k));
        let k = kill(&mut rng, 2, 1500);
        vs.push(Victim::spawn("gc", cairn.command(&["gc"], &[]), k));
        if round % 3 == 2 {
            let k = kill(&mut rng, 3, 800);
            vs.push(Victim::spawn(
                "expire",
                cairn.command(&["expire", "--server", "main", "--keep-last", "3"], &[]),
                k,
            ));
        }
        for (what, was_killed, ok, out) in run_all(vs) {
            println!(
                "round {round}: {what} {}",
                if was_killed {
                    "killed".to_string()
                } else if ok {
                    "ok".to_string()
                } else {
                    format!("failed: {}", out.trim())
                }
            );
            if was_killed {
                killed.push(what.clone());
            }
            if what == "backup" && ok {
                let id = out
                    .lines()
                    .find_map(|l| {
                        l.split_once(" of main: ")
                            .and_then(|(head, _)| head.split_whitespace().last())
                            .map(str::to_string)
                    })
                    .unwrap_or_else(|| panic!("no summary line in backup output: {out}"));
                markers.push((id, round));
            }
            if what == "pgbench" {
                assert!(ok, "pgbench failed: {out}");
            }
        }
    }
    println!("killed: {killed:?}");
    assert!(!markers.is_empty(), "no backup finished in {ROUNDS} rounds");

    // Archiving without kills from here on; everything still .ready goes.
    src.psql(&format!(
        "ALTER SYSTEM SET archive_command = '{} %p'",
        cairn.archive_push_command(d).replace('\'', "''")
    ));
    src.psql("SELECT pg_reload_conf()");
    src.switch_and_wait();

    // The collector finishes whatever killed runs left: run it until no
    // mark is pending (each run refuses while a killed collector's lease is
    // younger than the grace period; bounded).
    // Done once nothing is pending or newly marked after every pack has
    // become older than the grace period (30 s, plus a second of margin).
    let all_old_at = Instant::now() + Duration::from_secs(32);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let o = cairn.run(&["gc", "--format", "json"], &[]);
        if o.status.success() {
            let v: serde_json::Value =
                serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
            let pending = v["marks_pending"].as_array().map_or(0, Vec::len);
            let new_mark = !v["mark"].is_null();
            let young_uploads = v["incomplete_uploads"]["young"].as_u64().unwrap_or(1);
            if pending == 0 && !new_mark && young_uploads == 0 && Instant::now() > all_old_at {
                println!("gc done: {v}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "gc never finished: {}", text(&o));
        std::thread::sleep(Duration::from_millis(500));
    }

    // Killed writers' staging files (`<key>#<n>`, hidden from listings)
    // are gone too.
    let mut dirs = vec![std::path::PathBuf::from(&cairn.repo)];
    let mut staged = Vec::new();
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("read repo dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.rsplit_once('#')
                    .is_some_and(|(_, d)| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            }) {
                staged.push(p);
            }
        }
    }
    assert!(staged.is_empty(), "staging files left behind: {staged:?}");

    let o = cairn.run(&["verify", "--read-data", "--format", "json"], &[]);
    assert!(o.status.success(), "verify after the torture: {}", text(&o));

    // Every backup still listed restores, starts, and holds its round's
    // marker and no later one.
    let listed: serde_json::Value =
        serde_json::from_str(&cairn.ok(&["list", "--server", "main", "--format", "json"]))
            .expect("list json");
    let listed: Vec<String> = listed
        .as_array()
        .expect("list is an array")
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect();
    assert!(!listed.is_empty(), "expire removed every backup");
    for id in &listed {
        // Ids are the start second, or the next free one, unique among the
        // backups that exist: with rounds faster than a second, ids run
        // ahead of the clock, and a backup may take the id of one that the
        // concurrent expire has just removed. The newest backup reporting
        // an id is the one listed.
        let round = markers
            .iter()
            .rev()
            .find(|(m, _)| m == id)
            .map(|(_, r)| *r)
            .unwrap_or_else(|| panic!("{id} is listed but no backup reported it: {markers:?}"));
        let target = d.join(format!("restore-{id}"));
        cairn.ok(&[
            "restore",
            "--server",
            "main",
            id,
            target.to_str().expect("path"),
            "--target-immediate",
        ]);
        let mut r = Cluster::existing(&target, d, &format!("r-{id}"));
        r.start();
        assert_eq!(
            r.psql("SELECT max(round) FROM marker"),
            round.to_string(),
            "backup {id} of round {round}"
        );
        assert_eq!(r.psql("SELECT count(*) FROM pgbench_accounts"), "100000");
        r.stop();
        std::fs::remove_dir_all(&target).expect("remove restore");
        println!("{id} (round {round}) restored");
    }
}
