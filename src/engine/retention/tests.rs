//! Policy tests over generated histories: a seeded generator archives
//! segments on several timelines (forks with and without `.partial`, gaps,
//! `.backup` files), takes backups with end times out of id order, pins some,
//! then checks every plan against what a retained backup or the promised
//! window needs, at every point a killed run could stop.

use std::collections::BTreeMap;

use super::*;
use crate::engine::catalog::wal_name;
use crate::engine::walarchive::WalArchive;
use crate::pg::timeline::Fork;
use crate::pg::wal::{segment_name, Lsn};

const SEG: u64 = 16 << 20;
const HOUR: i64 = 3600;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Tl {
    id: u32,
    next: u64,
    history: Vec<Fork>,
}

struct World {
    names: Vec<String>,
    histories: BTreeMap<u32, Vec<Fork>>,
    /// (id, timeline, first segno, last segno, stop time)
    backups: Vec<(String, u32, u64, u64, i64)>,
    pinned: Vec<String>,
    /// Pinned with `--target full` (a subset of `pinned`).
    full_pins: Vec<String>,
    now: i64,
}

fn push(names: &mut Vec<String>, tl: u32, file: String) {
    let n = wal_name("s", 7, tl, &file);
    if !names.contains(&n) {
        names.push(n);
    }
}

fn generate(rng: &mut Rng) -> World {
    let mut tls = vec![Tl {
        id: 1,
        next: 1,
        history: Vec::new(),
    }];
    let mut w = World {
        names: Vec::new(),
        histories: BTreeMap::new(),
        backups: Vec::new(),
        pinned: Vec::new(),
        full_pins: Vec::new(),
        now: 0,
    };
    let mut t: i64 = 1_800_000_000;
    let steps = 20 + rng.below(60);
    for _ in 0..steps {
        // Mostly the newest timeline; sometimes an old primary goes on.
        let i = if rng.chance(75) {
            tls.len() - 1
        } else {
            rng.below(tls.len() as u64) as usize
        };
        match rng.below(100) {
            0..=49 => {
                let tl = &mut tls[i];
                if !rng.chance(4) {
                    push(&mut w.names, tl.id, segment_name(tl.id, tl.next, SEG));
                }
                tl.next += 1;
                t += rng.below(6 * HOUR as u64) as i64;
            }
            50..=71 => {
                let tl = &mut tls[i];
                let first = tl.next;
                let last = first + rng.below(3);
                for s in first..=last {
                    if !rng.chance(3) {
                        push(&mut w.names, tl.id, segment_name(tl.id, s, SEG));
                    }
                }
                if rng.chance(50) {
                    push(
                        &mut w.names,
                        tl.id,
                        format!("{}.00000028.backup", segment_name(tl.id, first, SEG)),
                    );
                }
                tl.next = last + 1;
                // Ids are random, so neither name nor timeline orders them;
                // end times jitter so a later start may end earlier.
                let stop = t + rng.below(8 * HOUR as u64) as i64;
                let id = format!("b{:08x}", rng.next() as u32);
                if rng.chance(12) {
                    w.pinned.push(id.clone());
                    if rng.chance(50) {
                        w.full_pins.push(id.clone());
                    }
                }
                w.backups.push((id, tl.id, first, last, stop));
                t += rng.below(30 * HOUR as u64) as i64;
            }
            72..=81 => {
                let parent = &tls[i];
                if parent.next < 2 {
                    continue;
                }
                let back = rng.below(3).min(parent.next - 1);
                let s = parent.next - 1 - back;
                let switch = if rng.chance(20) {
                    Lsn(s * SEG)
                } else {
                    Lsn(s * SEG + 1 + rng.below(SEG - 2))
                };
                let new_id = tls.iter().map(|t| t.id).max().unwrap_or(1) + 1;
                let mut history = parent.history.clone();
                history.push(Fork {
                    parent: parent.id,
                    switch,
                });
                let first = switch.0 / SEG;
                if switch.0 % SEG != 0 && rng.chance(50) {
                    push(
                        &mut w.names,
                        parent.id,
                        format!("{}.partial", segment_name(parent.id, first, SEG)),
                    );
                }
                push(&mut w.names, new_id, format!("{new_id:08X}.history"));
                w.histories.insert(new_id, history.clone());
                tls.push(Tl {
                    id: new_id,
                    next: first,
                    history,
                });
            }
            _ => t += rng.below(48 * HOUR as u64) as i64,
        }
    }
    w.now = t + rng.below(24 * HOUR as u64) as i64;
    w
}

fn archive_of(names: &[String], histories: &BTreeMap<u32, Vec<Fork>>) -> WalArchive {
    WalArchive::from_names("s", 7, SEG, names.to_vec(), histories.clone())
}

fn facts(a: &WalArchive, w: &World) -> Vec<BackupFacts> {
    w.backups
        .iter()
        .map(|(id, tl, first, last, stop)| {
            let need = a.need_along(&a.timeline_path(*tl), *first, *last, &[]);
            BackupFacts {
                backup_id: id.clone(),
                stop_time: *stop,
                start_wal: segment_name(*tl, *first, SEG),
                start_segno: *first,
                wal_complete: need.complete(),
                pinned: w.pinned.contains(id),
                full_pin: w.full_pins.contains(id),
                own_wal: need.needed,
            }
        })
        .collect()
}

fn random_rules(rng: &mut Rng) -> Rules {
    let policy = match rng.below(3) {
        0 => Policy::Redundancy(1 + rng.below(4) as u32),
        1 => Policy::RecoveryWindow {
            count: 1 + rng.below(10) as u32,
            unit: WindowUnit::Days,
        },
        _ => Policy::RecoveryWindow {
            count: 1 + rng.below(2) as u32,
            unit: WindowUnit::Weeks,
        },
    };
    Rules {
        policy: Some(policy),
        minimum_redundancy: rng.below(4) as u32,
    }
}

/// Is everything a retained backup needs, and the window it opens, intact
/// in `after`?
fn check_retained(
    before: &WalArchive,
    after: &WalArchive,
    w: &World,
    backups: &[BackupFacts],
    gone: &[String],
    ctx: &str,
) {
    for (b, raw) in backups.iter().zip(&w.backups) {
        if gone.contains(&b.backup_id) || !b.wal_complete {
            continue;
        }
        let (_, tl, first, last, _) = raw;
        let need = after.need_along(&after.timeline_path(*tl), *first, *last, &[]);
        assert!(
            need.complete(),
            "{ctx}: backup {} lost WAL it needs: {:?}",
            b.backup_id,
            need.missing
        );
    }
    assert_eq!(before.histories, after.histories, "{ctx}");
}

fn apply(names: &[String], removed: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| !removed.contains(n))
        .cloned()
        .collect()
}

#[test]
fn generated_histories_never_lose_what_is_retained() {
    let mut checked_plans = 0;
    let mut removed_wal = 0;
    let mut forks = 0;
    let mut full_pins_checked = 0;
    for seed in 1..=400u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let w = generate(&mut rng);
        forks += w.histories.len();
        let before = archive_of(&w.names, &w.histories);
        let backups = facts(&before, &w);
        let rules = random_rules(&mut rng);
        let p = plan(&before, &backups, &rules, w.now);
        let ctx = format!("seed {seed}, {:?}", rules);
        checked_plans += 1;
        removed_wal += p.remove_wal.len();

        let status: BTreeMap<&str, Status> = p
            .backups
            .iter()
            .map(|v| (v.backup_id.as_str(), v.status))
            .collect();
        // Only obsolete backups go; pinned and incomplete ones never.
        for b in &backups {
            let s = status[b.backup_id.as_str()];
            let removed = p.remove_backups.contains(&b.backup_id);
            assert_eq!(removed, s == Status::Obsolete, "{ctx}: {}", b.backup_id);
            if b.pinned {
                assert_eq!(s, Status::Pinned, "{ctx}");
            } else if !b.wal_complete {
                assert_eq!(s, Status::Incomplete, "{ctx}");
            }
        }
        // Policy semantics, by end time.
        let mut counted: Vec<&BackupFacts> = backups
            .iter()
            .filter(|b| b.wal_complete && !b.pinned)
            .collect();
        counted.sort_by(|a, b| (b.stop_time, &b.backup_id).cmp(&(a.stop_time, &a.backup_id)));
        match rules.policy {
            Some(Policy::Redundancy(n)) => {
                let keep = n.max(rules.minimum_redundancy) as usize;
                for (i, b) in counted.iter().enumerate() {
                    let want = if i < keep {
                        Status::Kept
                    } else {
                        Status::Obsolete
                    };
                    assert_eq!(status[b.backup_id.as_str()], want, "{ctx}: #{i}");
                }
            }
            Some(pol @ Policy::RecoveryWindow { .. }) => {
                let start = w.now - pol.window_secs().unwrap();
                let anchor = counted.iter().find(|b| b.stop_time < start);
                for b in &counted {
                    let s = status[b.backup_id.as_str()];
                    if b.stop_time >= start || anchor.is_some_and(|a| a.backup_id == b.backup_id) {
                        assert_eq!(s, Status::Kept, "{ctx}: {}", b.backup_id);
                    } else {
                        assert_ne!(s, Status::Kept, "{ctx}: {}", b.backup_id);
                    }
                }
                let kept = counted
                    .iter()
                    .filter(|b| status[b.backup_id.as_str()] != Status::Obsolete)
                    .count();
                // Pinned backups inside the window count, as in Barman.
                let pinned = backups
                    .iter()
                    .filter(|b| b.wal_complete && b.pinned)
                    .count();
                if kept < counted.len() {
                    assert!(kept + pinned >= rules.minimum_redundancy as usize, "{ctx}");
                }
                // The promise: recovery to the window's start is possible
                // from a retained backup, with the WAL that follows it.
                if let Some(a) = anchor {
                    let raw = w.backups.iter().find(|r| r.0 == a.backup_id).unwrap();
                    let end = Lsn((raw.3 + 1) * SEG - 1);
                    let win_before = before.recoverable_from(raw.1, raw.2, end, &[]);
                    let after = archive_of(&apply(&w.names, &p.remove_wal), &w.histories);
                    assert_eq!(
                        win_before,
                        after.recoverable_from(raw.1, raw.2, end, &[]),
                        "{ctx}: the window from {} shrank",
                        a.backup_id
                    );
                }
            }
            None => unreachable!(),
        }
        // History files never go; WAL goes only below the cutoff.
        let cutoff = p.wal_cutoff.as_ref().map(|c| {
            backups
                .iter()
                .find(|b| b.backup_id == c.backup_id)
                .unwrap()
                .start_segno
        });
        for n in &p.remove_wal {
            assert!(!n.ends_with(".history"), "{ctx}: {n}");
            let f = before.files.iter().find(|f| &f.manifest == n).unwrap();
            assert!(f.segno().unwrap() < cutoff.unwrap(), "{ctx}: {n}");
        }
        // Every retained backup's window, and a full pin's, is unchanged
        // by the plan.
        let after = archive_of(&apply(&w.names, &p.remove_wal), &w.histories);
        for (b, raw) in backups.iter().zip(&w.backups) {
            let s = status[b.backup_id.as_str()];
            if b.full_pin {
                full_pins_checked += 1;
            }
            if matches!(s, Status::Kept | Status::MinimumRedundancy)
                || (s == Status::Pinned && b.full_pin)
            {
                let end = Lsn((raw.3 + 1) * SEG - 1);
                assert_eq!(
                    before.recoverable_from(raw.1, raw.2, end, &[]),
                    after.recoverable_from(raw.1, raw.2, end, &[]),
                    "{ctx}: window of {}",
                    b.backup_id
                );
            }
        }
        // A run killed after any step leaves every remaining complete
        // backup with its WAL: backups go first, then WAL.
        let steps: Vec<(bool, &String)> = p
            .remove_backups
            .iter()
            .map(|b| (true, b))
            .chain(p.remove_wal.iter().map(|n| (false, n)))
            .collect();
        for k in 0..=steps.len() {
            let gone_b: Vec<String> = steps[..k]
                .iter()
                .filter(|s| s.0)
                .map(|s| s.1.clone())
                .collect();
            let gone_w: Vec<String> = steps[..k]
                .iter()
                .filter(|s| !s.0)
                .map(|s| s.1.clone())
                .collect();
            let mid = archive_of(&apply(&w.names, &gone_w), &w.histories);
            check_retained(
                &before,
                &mid,
                &w,
                &backups,
                &gone_b,
                &format!("{ctx}, killed after {k} steps"),
            );
        }
        // Running again on the result removes nothing more.
        let remaining: Vec<BackupFacts> = facts(&after, &w)
            .into_iter()
            .filter(|b| !p.remove_backups.contains(&b.backup_id))
            .collect();
        let again = plan(&after, &remaining, &rules, w.now);
        assert!(again.remove_backups.is_empty(), "{ctx}: {again:?}");
        assert!(again.remove_wal.is_empty(), "{ctx}: {:?}", again.remove_wal);
    }
    // The generator exercised what it is meant to.
    assert!(forks > 100, "{forks} forks");
    assert!(full_pins_checked > 50, "{full_pins_checked} full pins");
    assert!(removed_wal > 1000, "{removed_wal} WAL files removed");
    assert_eq!(checked_plans, 400);
}

fn fact(id: &str, stop: i64, start: u64, complete: bool, pinned: bool) -> BackupFacts {
    BackupFacts {
        backup_id: id.into(),
        stop_time: stop,
        start_wal: segment_name(1, start, SEG),
        start_segno: start,
        wal_complete: complete,
        pinned,
        full_pin: false,
        own_wal: vec![SegmentId {
            timeline: 1,
            segno: start,
        }],
    }
}

fn statuses(v: &[BackupVerdict]) -> Vec<(&str, Status)> {
    v.iter().map(|v| (v.backup_id.as_str(), v.status)).collect()
}

#[test]
fn policies_parse_as_barman_spells_them() {
    assert_eq!("REDUNDANCY 2".parse(), Ok(Policy::Redundancy(2)));
    assert_eq!(" redundancy   3 ".parse(), Ok(Policy::Redundancy(3)));
    assert_eq!(
        "RECOVERY WINDOW OF 4 WEEKS".parse(),
        Ok(Policy::RecoveryWindow {
            count: 4,
            unit: WindowUnit::Weeks
        })
    );
    assert_eq!(
        "recovery window of 1 month"
            .parse::<Policy>()
            .map(|p| p.window_secs()),
        Ok(Some(31 * DAY))
    );
    for bad in [
        "REDUNDANCY 0",
        "REDUNDANCY",
        "RECOVERY WINDOW OF 3 YEARS",
        "keep 3",
    ] {
        assert!(bad.parse::<Policy>().is_err(), "{bad}");
    }
    assert_eq!(
        Policy::keep_within("7d").unwrap().window_secs(),
        Some(7 * DAY)
    );
    assert_eq!(
        Policy::keep_within("2w").unwrap().to_string(),
        "RECOVERY WINDOW OF 2 WEEKS"
    );
    assert!(Policy::keep_within("7").is_err());
    assert!(Policy::keep_within("0d").is_err());
}

/// Ordered by end time: "a" started first (and sorts first by name) but
/// ended last, so it is the newest.
#[test]
fn redundancy_orders_by_end_time_and_skips_incomplete_and_pinned() {
    let b = vec![
        fact("a", 400, 1, true, false),
        fact("b", 100, 2, true, false),
        fact("c", 200, 3, false, false),
        fact("d", 300, 4, true, true),
        fact("e", 250, 5, true, false),
    ];
    let rules = Rules {
        policy: Some(Policy::Redundancy(2)),
        minimum_redundancy: 0,
    };
    let v = classify(&b, &rules, 1000);
    assert_eq!(
        statuses(&v),
        vec![
            ("a", Status::Kept),
            ("b", Status::Obsolete),
            ("c", Status::Incomplete),
            ("d", Status::Pinned),
            ("e", Status::Kept),
        ]
    );
    // minimum_redundancy above the policy raises it.
    let v = classify(
        &b,
        &Rules {
            minimum_redundancy: 3,
            ..rules
        },
        1000,
    );
    assert_eq!(v[1].status, Status::Kept);
}

#[test]
fn recovery_window_keeps_the_newest_backup_before_its_start() {
    let now = 100 * DAY;
    let b = vec![
        fact("old", 80 * DAY, 1, true, false),
        fact("anchor", 92 * DAY, 2, true, false),
        fact("in1", 95 * DAY, 3, true, false),
        fact("in2", 99 * DAY, 4, true, false),
    ];
    let rules = Rules {
        policy: Some(Policy::RecoveryWindow {
            count: 1,
            unit: WindowUnit::Weeks,
        }),
        minimum_redundancy: 0,
    };
    let v = classify(&b, &rules, now);
    assert_eq!(
        statuses(&v),
        vec![
            ("old", Status::Obsolete),
            ("anchor", Status::Kept),
            ("in1", Status::Kept),
            ("in2", Status::Kept),
        ]
    );
    let v = classify(
        &b,
        &Rules {
            minimum_redundancy: 4,
            ..rules
        },
        now,
    );
    assert_eq!(v[0].status, Status::MinimumRedundancy);
    // A pinned backup keeps only its own WAL, so it is not the anchor.
    let mut pinned = b.clone();
    pinned[1].pinned = true;
    let v = classify(&pinned, &rules, now);
    assert_eq!(
        statuses(&v),
        vec![
            ("old", Status::Kept),
            ("anchor", Status::Pinned),
            ("in1", Status::Kept),
            ("in2", Status::Kept),
        ]
    );
}

#[test]
fn delete_honours_pins_and_minimum_redundancy() {
    let a = WalArchive::from_names(
        "s",
        7,
        SEG,
        (1..=6).map(|s| wal_name("s", 7, 1, &segment_name(1, s, SEG))),
        BTreeMap::new(),
    );
    let b = vec![
        fact("x", 100, 1, true, false),
        fact("y", 200, 3, true, true),
        fact("z", 300, 5, true, false),
    ];
    let e = plan_delete(&a, &b, "y", 0, true, 0).unwrap_err();
    assert!(e.contains("keep --release"), "{e}");
    let e = plan_delete(&a, &b, "x", 3, false, 0).unwrap_err();
    assert!(e.contains("minimum_redundancy 3"), "{e}");
    // Deleting the oldest takes the WAL before the next kept backup, but
    // the pinned backup's own segment 3 stays.
    let p = plan_delete(&a, &b, "x", 3, true, 0).unwrap();
    assert_eq!(p.remove_backups, vec!["x".to_string()]);
    assert_eq!(
        p.remove_wal,
        vec![
            wal_name("s", 7, 1, &segment_name(1, 1, SEG)),
            wal_name("s", 7, 1, &segment_name(1, 2, SEG)),
            wal_name("s", 7, 1, &segment_name(1, 4, SEG)),
        ]
    );
    assert!(plan_delete(&a, &b, "nope", 0, false, 0).is_err());
}

#[test]
fn a_full_pin_keeps_every_wal_file_from_its_start_on() {
    // Timeline 1 to segment 8, timeline 2 forked at segment 5.
    let mut names: Vec<String> = (1..=8)
        .map(|s| wal_name("s", 7, 1, &segment_name(1, s, SEG)))
        .collect();
    names.extend((5..=9).map(|s| wal_name("s", 7, 2, &segment_name(2, s, SEG))));
    let a = WalArchive::from_names("s", 7, SEG, names, BTreeMap::new());
    let mut b = vec![
        fact("p", 100, 2, true, true),
        fact("x", 200, 4, true, false),
        fact("y", 300, 8, true, false),
    ];
    let rules = Rules {
        policy: Some(Policy::Redundancy(1)),
        minimum_redundancy: 0,
    };
    let removed = |b: &[BackupFacts]| -> Vec<(u32, u64)> {
        plan(&a, b, &rules, 1000)
            .remove_wal
            .iter()
            .map(|n| {
                let f = a.files.iter().find(|f| &f.manifest == n).unwrap();
                (f.kind.as_ref().unwrap().timeline(), f.segno().unwrap())
            })
            .collect()
    };
    // Standalone: only p's own segment 2 stays below y's start on y's
    // timeline; timeline 2, newer than every retained backup's, stays (it
    // may be the live one after an in-place PITR from an older backup).
    assert_eq!(
        removed(&b),
        vec![(1, 1), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7)]
    );
    // Full: everything from segment 2 on stays, on both timelines.
    b[0].full_pin = true;
    assert_eq!(removed(&b), vec![(1, 1)]);
    let v = plan(&a, &b, &rules, 1000);
    assert_eq!(v.remove_backups, vec!["x".to_string()]);
}

/// After an in-place PITR from an older backup, the live timeline's WAL
/// lies below the start of a backup of the abandoned branch that
/// retention keeps: it stays.
#[test]
fn the_live_timeline_after_an_in_place_pitr_keeps_its_wal() {
    let mut names: Vec<String> = (1..=10)
        .map(|s| wal_name("s", 7, 1, &segment_name(1, s, SEG)))
        .collect();
    names.extend((5..=7).map(|s| wal_name("s", 7, 2, &segment_name(2, s, SEG))));
    let a = WalArchive::from_names("s", 7, SEG, names, BTreeMap::new());
    // b0 on timeline 1 from segment 2; b1 on timeline 1 from segment 9,
    // taken after the mistake; timeline 2 is the PITR from b0 to 5.
    let b = vec![
        fact("b0", 100, 2, true, false),
        fact("b1", 200, 9, true, false),
    ];
    let rules = Rules {
        policy: Some(Policy::Redundancy(1)),
        minimum_redundancy: 0,
    };
    let p = plan(&a, &b, &rules, 1000);
    assert_eq!(p.remove_backups, vec!["b0".to_string()]);
    let on_2: Vec<&String> = p
        .remove_wal
        .iter()
        .filter(|n| n.contains("/00000002/"))
        .collect();
    assert!(on_2.is_empty(), "{on_2:?}");
    assert!(p
        .remove_wal
        .contains(&wal_name("s", 7, 1, &segment_name(1, 8, SEG))));
}
