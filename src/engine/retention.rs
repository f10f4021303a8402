//! Retention: which backups a policy keeps and which WAL goes with the rest.
//!
//! Barman's semantics, so that settings move over unchanged:
//! - `REDUNDANCY n` keeps the `max(n, minimum_redundancy)` newest backups.
//! - `RECOVERY WINDOW OF n DAYS|WEEKS|MONTHS` (a month is 31 days) keeps
//!   every backup that ended inside the window plus the newest one that
//!   ended before its start; older ones stay while fewer than
//!   `minimum_redundancy` have been kept.
//! - Backups are ordered by end time (then id), never by name or timeline.
//!   Only backups whose WAL from start to stop is archived count; the others
//!   are "incomplete" and left alone (`delete` removes them). Pinned backups
//!   (`pgcairn keep`) are never removed and do not count toward redundancy.
//! - Pins, as Barman's `keep`: by default a pinned backup keeps only its
//!   own WAL (`--target standalone`), so it stays restorable to its end; with
//!   `--target full` it keeps every WAL file from its start on, on every
//!   timeline, so it stays restorable to any later point. Either way it
//!   never serves as the backup a recovery window starts from; the newest
//!   unpinned one before the window's start does.
//!
//! WAL: every segment, `.partial` and `.backup` file numbered below the
//! oldest retained backup's start segment goes, on every timeline up to the
//! oldest retained backup's timeline (a newer timeline may be a branch the
//! retained backups cannot see, such as the live one after an in-place
//! PITR), except what a pinned backup needs from its own start to its stop
//! and, for a full pin, everything from its start on. WAL positions
//! grow monotonically across timeline switches, so everything a retained
//! backup needs, and every timeline recovery can follow from the oldest one,
//! lies at or above that segment: the promised window stays covered.
//! `.history` files are never removed.
//!
//! The policy and plan are pure functions over plain data ([`classify`],
//! [`plan`]) so they are property-tested without a repository; [`load`]
//! gathers the facts and [`execute`] carries a plan out: backup manifests
//! first, oldest first, then WAL. A kill at any point leaves every remaining
//! backup with its WAL: no WAL is removed until every backup that needed it
//! is gone, and removed WAL is never needed by a retained backup.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::archive::WalMeta;
use super::catalog::{
    backup_name, from_value, list_backups, pin_name, pins_prefix, server_record, to_value,
    wal_name, BackupRef, ServerRecord,
};
use super::walarchive::{backup_range, Gap, SegmentId, WalArchive};
use super::{utc_stamp, EngineError, Progress, Result};
use crate::pg::wal::WalFile;
use crate::repo::format::now_unix;
use crate::repo::store::manifest;
use crate::repo::{RepoError, Repository};

const DAY: i64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowUnit {
    Days,
    Weeks,
    Months,
}

impl WindowUnit {
    fn secs(self) -> i64 {
        match self {
            WindowUnit::Days => DAY,
            WindowUnit::Weeks => 7 * DAY,
            WindowUnit::Months => 31 * DAY,
        }
    }
}

/// A retention policy, as Barman spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Redundancy(u32),
    RecoveryWindow { count: u32, unit: WindowUnit },
}

impl Policy {
    /// `--keep-within`: `7d`, `2w` or `3m` (a month is 31 days).
    pub fn keep_within(s: &str) -> std::result::Result<Policy, String> {
        let bad = || format!("--keep-within {s:?}: use a number and d, w or m, e.g. 7d");
        let t = s.trim();
        let (n, u) = t.split_at(t.len().saturating_sub(1));
        let unit = match u {
            "d" | "D" => WindowUnit::Days,
            "w" | "W" => WindowUnit::Weeks,
            "m" | "M" => WindowUnit::Months,
            _ => return Err(bad()),
        };
        match n.parse::<u32>() {
            Ok(count) if count > 0 => Ok(Policy::RecoveryWindow { count, unit }),
            _ => Err(bad()),
        }
    }

    /// The window's length in seconds (`None` for redundancy).
    pub fn window_secs(&self) -> Option<i64> {
        match self {
            Policy::Redundancy(_) => None,
            Policy::RecoveryWindow { count, unit } => Some(*count as i64 * unit.secs()),
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    /// `REDUNDANCY n` or `RECOVERY WINDOW OF n DAY[S]|WEEK[S]|MONTH[S]`,
    /// any case, as in Barman.
    fn from_str(s: &str) -> std::result::Result<Policy, String> {
        let bad = || {
            format!(
                "retention policy {s:?}: use \"REDUNDANCY n\" or \"RECOVERY WINDOW OF n DAYS|WEEKS|MONTHS\""
            )
        };
        let words: Vec<String> = s.split_whitespace().map(str::to_ascii_uppercase).collect();
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        let positive = |n: &str| n.parse::<u32>().ok().filter(|n| *n > 0);
        match w.as_slice() {
            ["REDUNDANCY", n] => positive(n).map(Policy::Redundancy).ok_or_else(bad),
            ["RECOVERY", "WINDOW", "OF", n, unit] => {
                let unit = match unit.trim_end_matches('S') {
                    "DAY" => WindowUnit::Days,
                    "WEEK" => WindowUnit::Weeks,
                    "MONTH" => WindowUnit::Months,
                    _ => return Err(bad()),
                };
                positive(n)
                    .map(|count| Policy::RecoveryWindow { count, unit })
                    .ok_or_else(bad)
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Redundancy(n) => write!(f, "REDUNDANCY {n}"),
            Policy::RecoveryWindow { count, unit } => {
                let u = match unit {
                    WindowUnit::Days => "DAYS",
                    WindowUnit::Weeks => "WEEKS",
                    WindowUnit::Months => "MONTHS",
                };
                write!(f, "RECOVERY WINDOW OF {count} {u}")
            }
        }
    }
}

/// A server's retention settings; no policy keeps every backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    pub policy: Option<Policy>,
    pub minimum_redundancy: u32,
}

/// What retention makes of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Retained by the policy (or there is no policy).
    Kept,
    /// Obsolete by the policy, kept for `minimum_redundancy`.
    MinimumRedundancy,
    /// Pinned with `pgcairn keep`: no policy removes it.
    Pinned,
    /// The policy removes it.
    Obsolete,
    /// Its WAL from start to stop is not all archived: it does not count
    /// and is not removed by a policy.
    Incomplete,
}

impl Status {
    /// Does a policy keep it?
    pub fn retained(self) -> bool {
        self != Status::Obsolete
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Kept => "kept",
            Status::MinimumRedundancy => "kept (minimum redundancy)",
            Status::Pinned => "pinned",
            Status::Obsolete => "obsolete",
            Status::Incomplete => "incomplete",
        })
    }
}

/// The facts about one backup that retention decides on.
#[derive(Debug, Clone)]
pub struct BackupFacts {
    pub backup_id: String,
    pub stop_time: i64,
    pub start_wal: String,
    pub start_segno: u64,
    /// Its WAL from start to stop is archived (or inside it).
    pub wal_complete: bool,
    pub pinned: bool,
    /// Pinned with `--target full`: every WAL file from its start on stays.
    pub full_pin: bool,
    /// The segments it needs from start to stop: what a pinned backup keeps.
    pub own_wal: Vec<SegmentId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupVerdict {
    pub backup_id: String,
    pub stop_time: i64,
    pub status: Status,
    pub reason: String,
}

/// Newest first by end time, then id (Barman walks backups this way).
fn newest_first(backups: &[BackupFacts]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..backups.len()).collect();
    order.sort_by(|&a, &b| {
        (backups[b].stop_time, &backups[b].backup_id)
            .cmp(&(backups[a].stop_time, &backups[a].backup_id))
    });
    order
}

/// Apply the rules; the verdicts are in the order of `backups`.
pub fn classify(backups: &[BackupFacts], rules: &Rules, now: i64) -> Vec<BackupVerdict> {
    let mut out: Vec<Option<(Status, String)>> = vec![None; backups.len()];
    let minred = rules.minimum_redundancy;
    // Pinned and incomplete backups are decided before the policy counts.
    let pre = |b: &BackupFacts| -> Option<(Status, String)> {
        match (b.pinned, b.wal_complete) {
            (true, true) if b.full_pin => Some((
                Status::Pinned,
                "pinned (pgcairn keep --target full): it and every WAL file from its start on stay"
                    .into(),
            )),
            (true, true) => Some((Status::Pinned, "pinned (pgcairn keep)".into())),
            (true, false) => Some((
                Status::Pinned,
                "pinned (pgcairn keep); its WAL is not all archived".into(),
            )),
            (false, false) => Some((
                Status::Incomplete,
                "its WAL from start to stop is not all archived; it does not count".into(),
            )),
            (false, true) => None,
        }
    };
    match rules.policy {
        None => {
            for (i, b) in backups.iter().enumerate() {
                out[i] = Some(pre(b).unwrap_or((Status::Kept, "no retention policy".into())));
            }
        }
        Some(Policy::Redundancy(n)) => {
            let keep = n.max(minred);
            let mut kept = 0;
            for i in newest_first(backups) {
                let b = &backups[i];
                out[i] = Some(if let Some(v) = pre(b) {
                    v
                } else if kept < keep {
                    kept += 1;
                    (
                        Status::Kept,
                        format!("one of the {keep} newest complete backups"),
                    )
                } else {
                    (
                        Status::Obsolete,
                        format!("older than the {keep} newest complete backups"),
                    )
                });
            }
        }
        Some(p @ Policy::RecoveryWindow { .. }) => {
            let start = now - p.window_secs().unwrap_or(0);
            let mut found = false;
            let mut valid = 0;
            for i in newest_first(backups) {
                let b = &backups[i];
                if !b.wal_complete {
                    out[i] = pre(b);
                    continue;
                }
                out[i] = Some(if found {
                    if let Some(v) = pre(b) {
                        v
                    } else if valid < minred {
                        valid += 1;
                        (
                            Status::MinimumRedundancy,
                            format!("outside the window, kept for minimum_redundancy {minred}"),
                        )
                    } else {
                        (
                            Status::Obsolete,
                            format!("ended before the window's start ({})", utc_stamp(start)),
                        )
                    }
                } else {
                    valid += 1;
                    let inside = b.stop_time >= start;
                    // A pinned backup keeps only its own WAL, so it cannot
                    // be the one recovery to the window's start begins from.
                    pre(b).unwrap_or_else(|| {
                        found = !inside;
                        if inside {
                            (Status::Kept, "ended inside the recovery window".into())
                        } else {
                            (
                                Status::Kept,
                                format!(
                                    "the newest backup that ended before the window's start ({}): recovery to the window's start begins from it",
                                    utc_stamp(start)
                                ),
                            )
                        }
                    })
                });
            }
        }
    }
    backups
        .iter()
        .zip(out)
        .map(|(b, v)| {
            let (status, reason) = v.unwrap_or((Status::Kept, String::new()));
            BackupVerdict {
                backup_id: b.backup_id.clone(),
                stop_time: b.stop_time,
                status,
                reason,
            }
        })
        .collect()
}

/// Where WAL retention starts: the oldest retained backup's first segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalCutoff {
    pub backup_id: String,
    /// WAL numbered below this segment goes, on every timeline up to the
    /// oldest retained backup's (newer timelines stay whole).
    pub segment: String,
}

/// What retention will do, computed before anything is removed.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub server: String,
    /// The policy applied, as Barman spells it (`None`: none, e.g. `delete`).
    pub policy: Option<String>,
    pub minimum_redundancy: u32,
    pub now: i64,
    /// Every backup with its verdict, oldest first.
    pub backups: Vec<BackupVerdict>,
    /// Backups to remove, oldest first.
    pub remove_backups: Vec<String>,
    /// `None`: no backup is retained by the policy, so no WAL is removed.
    pub wal_cutoff: Option<WalCutoff>,
    /// WAL manifests to remove, oldest first.
    pub remove_wal: Vec<String>,
    /// Archived WAL files that stay.
    pub keep_wal: usize,
}

/// The plan for verdicts already made: removed backups, and the WAL below
/// the oldest retained backup's start that no pinned backup needs.
pub fn plan_for(
    archive: &WalArchive,
    backups: &[BackupFacts],
    verdicts: Vec<BackupVerdict>,
    policy: Option<String>,
    minimum_redundancy: u32,
    now: i64,
) -> Plan {
    let mut idx: Vec<usize> = (0..backups.len()).collect();
    idx.sort_by(|&a, &b| {
        (backups[a].stop_time, &backups[a].backup_id)
            .cmp(&(backups[b].stop_time, &backups[b].backup_id))
    });
    let remove_backups = idx
        .iter()
        .filter(|&&i| verdicts[i].status == Status::Obsolete)
        .map(|&i| backups[i].backup_id.clone())
        .collect();
    let cutoff = idx
        .iter()
        .filter(|&&i| matches!(verdicts[i].status, Status::Kept | Status::MinimumRedundancy))
        .min_by_key(|&&i| backups[i].start_segno)
        .map(|&i| &backups[i]);
    let pinned: HashSet<SegmentId> = idx
        .iter()
        .filter(|&&i| verdicts[i].status == Status::Pinned)
        .flat_map(|&i| backups[i].own_wal.iter().copied())
        .collect();
    // Nothing from a full pin's start on goes, whatever its timeline.
    let full_pin_floor = idx
        .iter()
        .filter(|&&i| verdicts[i].status == Status::Pinned && backups[i].full_pin)
        .map(|&i| backups[i].start_segno)
        .min()
        .unwrap_or(u64::MAX);
    // WAL on a timeline newer than every retained backup's stays: after an
    // in-place PITR from an older backup, the live timeline's WAL lies at
    // positions below a retained backup of the abandoned branch. (pgBackRest
    // and Barman keep it too: they compare names, timeline first.)
    let oldest_timeline = idx
        .iter()
        .filter(|&&i| matches!(verdicts[i].status, Status::Kept | Status::MinimumRedundancy))
        .filter_map(|&i| WalFile::parse(&backups[i].start_wal, archive.segment_size))
        .map(|k| k.timeline())
        .min();
    let mut remove: Vec<(u64, u32, &str)> = Vec::new();
    if let (Some(c), Some(oldest_timeline)) = (cutoff, oldest_timeline) {
        for f in &archive.files {
            let (Some(segno), Some(kind)) = (f.segno(), &f.kind) else {
                continue;
            };
            if segno >= c.start_segno || segno >= full_pin_floor {
                continue;
            }
            let timeline = kind.timeline();
            if timeline > oldest_timeline {
                continue;
            }
            if matches!(kind, WalFile::Segment { .. })
                && pinned.contains(&SegmentId { timeline, segno })
            {
                continue;
            }
            remove.push((segno, timeline, &f.manifest));
        }
    }
    remove.sort();
    let mut ordered_verdicts: Vec<BackupVerdict> = Vec::with_capacity(idx.len());
    let mut verdicts: Vec<Option<BackupVerdict>> = verdicts.into_iter().map(Some).collect();
    for &i in &idx {
        if let Some(v) = verdicts[i].take() {
            ordered_verdicts.push(v);
        }
    }
    Plan {
        server: archive.server.clone(),
        policy,
        minimum_redundancy,
        now,
        backups: ordered_verdicts,
        remove_backups,
        wal_cutoff: cutoff.map(|c| WalCutoff {
            backup_id: c.backup_id.clone(),
            segment: c.start_wal.clone(),
        }),
        keep_wal: archive.files.len() - remove.len(),
        remove_wal: remove.into_iter().map(|(_, _, m)| m.to_string()).collect(),
    }
}

/// The plan of `expire`: apply the rules, then retain WAL accordingly.
pub fn plan(archive: &WalArchive, backups: &[BackupFacts], rules: &Rules, now: i64) -> Plan {
    let verdicts = classify(backups, rules, now);
    plan_for(
        archive,
        backups,
        verdicts,
        rules.policy.map(|p| p.to_string()),
        rules.minimum_redundancy,
        now,
    )
}

/// The plan of `delete ID`: that backup goes, every other one stays, and
/// WAL only the deleted one needed goes with it. Refuses a pinned backup,
/// and (unless `force`) one whose removal leaves fewer than
/// `minimum_redundancy` complete backups.
pub fn plan_delete(
    archive: &WalArchive,
    backups: &[BackupFacts],
    id: &str,
    minimum_redundancy: u32,
    force: bool,
    now: i64,
) -> std::result::Result<Plan, String> {
    let target = backups
        .iter()
        .find(|b| b.backup_id == id)
        .ok_or_else(|| format!("no backup {id} (see `pgcairn list`)"))?;
    if target.pinned {
        return Err(format!(
            "backup {id} is pinned; release it first with `pgcairn keep --release {id}`"
        ));
    }
    let complete = backups.iter().filter(|b| b.wal_complete).count();
    if target.wal_complete && complete <= minimum_redundancy as usize && !force {
        return Err(format!(
            "deleting backup {id} would leave {} complete backup(s), fewer than minimum_redundancy {minimum_redundancy}; \
             take a new backup first, or pass --force",
            complete - 1
        ));
    }
    let mut verdicts = classify(backups, &Rules::default(), now);
    for v in verdicts.iter_mut().filter(|v| v.backup_id == id) {
        v.status = Status::Obsolete;
        v.reason = "deleted on request".into();
    }
    Ok(plan_for(
        archive,
        backups,
        verdicts,
        None,
        minimum_redundancy,
        now,
    ))
}

/// `pins/<server>/<backup-id>`: the application payload of a pin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinMeta {
    pub server: String,
    pub backup_id: String,
    pub pinned: i64,
    pub note: String,
    /// Absent in pins written before targets existed: standalone.
    #[serde(default)]
    pub target: PinTarget,
}

/// What a pin keeps besides the backup, named as Barman's `keep --target`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinTarget {
    /// Its own WAL from start to stop: restorable to its end point.
    #[default]
    Standalone,
    /// Every WAL file from its start on: restorable to any later point.
    Full,
}

impl fmt::Display for PinTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PinTarget::Standalone => "standalone",
            PinTarget::Full => "full",
        })
    }
}

/// Every pin of `server`, by backup id.
pub async fn list_pins(repo: &Repository, server: &str) -> Result<BTreeMap<String, PinMeta>> {
    let mut out = BTreeMap::new();
    for name in repo.list_manifests(&pins_prefix(server)).await? {
        let meta: PinMeta = from_value(&repo.manifest_meta(&name).await?, &name)?;
        out.insert(meta.backup_id.clone(), meta);
    }
    Ok(out)
}

/// Is the backup pinned? A direct lookup; only "not found" means no.
pub async fn is_pinned(repo: &Repository, server: &str, id: &str) -> Result<bool> {
    let name = pin_name(server, id);
    match repo.manifest_meta(&name).await {
        Ok(_) => Ok(true),
        Err(RepoError::NotFound { key }) if key.ends_with(&name) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    Pinned,
    /// Already pinned, with this target.
    AlreadyPinned(PinTarget),
}

/// The pin of a backup, if any; only "not found" means none.
pub async fn pin_of(repo: &Repository, server: &str, id: &str) -> Result<Option<PinMeta>> {
    let name = pin_name(server, id);
    match repo.manifest_meta(&name).await {
        Ok(v) => Ok(Some(from_value(&v, &name)?)),
        Err(RepoError::NotFound { key }) if key.ends_with(&name) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Pin a backup: a manifest with no entries, written create-if-absent.
pub async fn pin(
    repo: &Repository,
    server: &str,
    id: &str,
    note: &str,
    target: PinTarget,
) -> Result<PinOutcome> {
    if let Some(p) = pin_of(repo, server, id).await? {
        return Ok(PinOutcome::AlreadyPinned(p.target));
    }
    let meta = PinMeta {
        server: server.into(),
        backup_id: id.into(),
        pinned: now_unix(),
        note: note.into(),
        target,
    };
    let w = repo.writer(&format!("keep {server}/{id}")).await?;
    let r = w
        .commit(&manifest(
            pin_name(server, id),
            to_value(&meta)?,
            Vec::new(),
        ))
        .await;
    w.finish().await?;
    match r {
        // An expire that checked for a pin just before this one was
        // written may have removed the backup since: the pin must not
        // report success for nothing.
        Ok(()) => match repo.manifest_meta(&backup_name(server, id)).await {
            Ok(_) => Ok(PinOutcome::Pinned),
            Err(RepoError::NotFound { key }) if key.ends_with(&backup_name(server, id)) => {
                repo.delete_manifest(&pin_name(server, id)).await?;
                // The expire that removed it may have seen the pin and put
                // the backup back meanwhile.
                let back = repo.manifest_meta(&backup_name(server, id)).await.is_ok();
                Err(EngineError::Refused(if back {
                    format!("backup {id} of server {server} was being removed by an expire, which put it back; run keep again")
                } else {
                    format!("backup {id} of server {server} was removed (by a concurrent expire or delete) as it was being pinned")
                }))
            }
            Err(e) => Err(e.into()),
        },
        // Pinned by someone else at the same moment.
        Err(RepoError::Conflict { .. }) => match pin_of(repo, server, id).await? {
            Some(p) => Ok(PinOutcome::AlreadyPinned(p.target)),
            None => Err(RepoError::invalid(
                "keep",
                format!("the pin of backup {id} of server {server} conflicted and then vanished; run keep again"),
            )
            .into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// Release a pin; `false` if the backup was not pinned.
pub async fn release(repo: &Repository, server: &str, id: &str) -> Result<bool> {
    if !is_pinned(repo, server, id).await? {
        return Ok(false);
    }
    match repo.delete_manifest(&pin_name(server, id)).await {
        Ok(()) => Ok(true),
        Err(RepoError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What retention decides on for one server, as read from the repository.
#[derive(Debug, Clone)]
pub struct Facts {
    pub server: String,
    pub backups: Vec<BackupRef>,
    pub pins: BTreeMap<String, PinMeta>,
    pub archive: WalArchive,
}

const DEFAULT_SEGMENT: u64 = 16 << 20;

/// Read a server's backups (oldest first), pins and archived WAL. Any
/// listing or read that fails is an error: retention never decides on a
/// partial picture.
pub async fn load(repo: &Repository, server: &str) -> Result<Facts> {
    let backups = list_backups(repo, Some(server)).await?;
    let record = server_record(server);
    let sysid = match repo.manifest_meta(&record).await {
        Ok(v) => Some(from_value::<ServerRecord>(&v, &record)?.system_identifier),
        Err(RepoError::NotFound { key }) if key.ends_with(&record) => None,
        Err(e) => return Err(e.into()),
    }
    .or_else(|| backups.first().map(|b| b.meta.system_identifier));
    let seg = backups
        .first()
        .map_or(DEFAULT_SEGMENT, |b| b.meta.wal_segment_size);
    if let Some(b) = backups
        .iter()
        .find(|b| Some(b.meta.system_identifier) != sysid || b.meta.wal_segment_size != seg)
    {
        return Err(EngineError::Refused(format!(
            "backup {} of server {server} is of another cluster (system identifier {}, WAL segment {}) \
             than the one registered; retention will not guess which WAL belongs to it",
            b.meta.backup_id, b.meta.system_identifier, b.meta.wal_segment_size
        )));
    }
    let archive = match sysid {
        Some(s) => WalArchive::load(repo, server, s, seg).await?,
        None => WalArchive::from_names(server, 0, seg, Vec::new(), BTreeMap::new()),
    };
    let pins = list_pins(repo, server).await?;
    Ok(Facts {
        server: server.into(),
        backups,
        pins,
        archive,
    })
}

impl Facts {
    /// Each backup's retention facts, in the order of `self.backups`.
    pub fn backup_facts(&self) -> Result<Vec<BackupFacts>> {
        self.backups
            .iter()
            .map(|b| {
                let m = &b.meta;
                let (first, _, _) = backup_range(m, self.archive.segment_size)?;
                let need = self.archive.backup_need(m)?;
                Ok(BackupFacts {
                    backup_id: m.backup_id.clone(),
                    stop_time: m.stop_time,
                    start_wal: m.start_wal.clone(),
                    start_segno: first,
                    wal_complete: need.complete(),
                    pinned: self.pins.contains_key(&m.backup_id),
                    full_pin: self
                        .pins
                        .get(&m.backup_id)
                        .is_some_and(|p| p.target == PinTarget::Full),
                    own_wal: need.needed,
                })
            })
            .collect()
    }

    /// The recovery window the archive offers now: from the end of the
    /// oldest backup whose WAL is complete, along the newest timeline
    /// reachable from it, to the end of the unbroken run of segments.
    pub async fn window(
        &self,
        repo: &Repository,
        facts: &[BackupFacts],
    ) -> Result<Option<ServerWindow>> {
        // A standalone pin keeps only its own WAL, so the window opens at
        // the oldest complete backup that is unpinned or fully pinned (a
        // standalone-pinned one only when no other is complete).
        let complete = || {
            self.backups
                .iter()
                .zip(facts)
                .filter(|(_, f)| f.wal_complete)
        };
        let Some((b, _)) = complete()
            .find(|(_, f)| !f.pinned || f.full_pin)
            .or_else(|| complete().next())
        else {
            return Ok(None);
        };
        let r = self.archive.recoverable_from_backup(&b.meta)?;
        let latest_archived_time = match &r.contiguous_to {
            Some(file) => {
                let tl = WalFile::parse(file, self.archive.segment_size)
                    .map_or(r.timeline, |k| k.timeline());
                let name = wal_name(&self.server, self.archive.system_identifier, tl, file);
                match repo.manifest_meta(&name).await {
                    Ok(v) => Some(from_value::<WalMeta>(&v, &name)?.archived),
                    // Carried inside the backup, never archived: the run
                    // ends with the backup's own WAL.
                    Err(crate::repo::RepoError::NotFound { key })
                        if key.ends_with(&name) && b.meta.included_wal.contains(file) =>
                    {
                        Some(b.meta.stop_time)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => None,
        };
        Ok(Some(ServerWindow {
            server: self.server.clone(),
            from_backup: b.meta.backup_id.clone(),
            earliest_time: b.meta.stop_time,
            earliest_lsn: b.meta.stop_lsn.clone(),
            timeline: r.timeline,
            latest_segment: r.contiguous_to,
            latest_lsn: r.contiguous_end_lsn,
            latest_archived_time,
            last_archived: r.last_archived,
            gaps: r.gaps,
        }))
    }
}

/// A server's recovery window as the archive shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerWindow {
    pub server: String,
    /// The oldest backup recovery can start from.
    pub from_backup: String,
    /// The earliest recoverable point: that backup's end.
    pub earliest_time: i64,
    pub earliest_lsn: String,
    /// The timeline recovery follows (what `latest` resolves to).
    pub timeline: u32,
    /// The last segment of the unbroken run, and the position it ends at.
    pub latest_segment: Option<String>,
    pub latest_lsn: Option<String>,
    /// When that segment was archived: the latest point lies before it.
    pub latest_archived_time: Option<i64>,
    /// The newest archived segment on the path (beyond a gap if any).
    pub last_archived: Option<String>,
    pub gaps: Vec<Gap>,
}

/// What [`execute`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Executed {
    pub backups_removed: usize,
    pub wal_removed: usize,
    /// Names already gone when their turn came (a concurrent run).
    pub already_gone: usize,
}

/// Carry out a plan: backup manifests first, oldest first, each only if no
/// pin appeared since the plan was made; then WAL manifests. Chunks are
/// left for `gc`.
pub async fn execute(repo: &Repository, plan: &Plan, progress: &dyn Progress) -> Result<Executed> {
    let mut done = Executed::default();
    progress.phase("removing backups", plan.remove_backups.len() as u64);
    for id in &plan.remove_backups {
        if is_pinned(repo, &plan.server, id).await? {
            return Err(EngineError::Refused(format!(
                "backup {id} of server {} was pinned after the plan was made; stopped before removing it \
                 ({} backup(s) removed so far, no WAL); run again",
                plan.server, done.backups_removed
            )));
        }
        let name = backup_name(&plan.server, id);
        let saved = match repo.manifest_bytes(&name).await {
            Ok(b) => Some(b),
            Err(RepoError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        match repo.delete_manifest(&name).await {
            Ok(()) => {
                // `keep` may have pinned it between the check and the
                // delete: then it is put back, and this run stops. A pin
                // lookup that fails counts as a pin (fail safe).
                let pinned = is_pinned(repo, &plan.server, id).await;
                if !matches!(pinned, Ok(false)) {
                    if let Some(bytes) = saved {
                        repo.put_back_manifest(&name, bytes).await.map_err(|e| {
                            EngineError::Refused(format!(
                                "backup {id} of server {} may have been pinned while it was being removed, \
                                 and putting it back failed: {e}",
                                plan.server
                            ))
                        })?;
                    }
                    return Err(match pinned {
                        Err(e) => e,
                        Ok(_) => EngineError::Refused(format!(
                            "backup {id} of server {} was pinned while it was being removed; it was put back \
                             ({} backup(s) removed so far, no WAL); run again",
                            plan.server, done.backups_removed
                        )),
                    });
                }
                done.backups_removed += 1
            }
            // The name is gone either way: a concurrent run removed it.
            Err(RepoError::NotFound { .. }) => done.already_gone += 1,
            Err(e) => return Err(e.into()),
        }
        progress.advance(1);
    }
    progress.phase("removing WAL", plan.remove_wal.len() as u64);
    // Every file here is below what any retained backup needs, so the order
    // among them does not matter; a few deletes run at once.
    let results: Vec<bool> = futures::stream::iter(plan.remove_wal.iter())
        .map(|name| async move {
            let r = match repo.delete_manifest(name).await {
                Ok(()) => Ok(true),
                Err(RepoError::NotFound { .. }) => Ok(false),
                Err(e) => Err(EngineError::from(e)),
            };
            progress.advance(1);
            r
        })
        .buffered(8)
        .try_collect()
        .await?;
    done.wal_removed = results.iter().filter(|r| **r).count();
    done.already_gone += results.len() - done.wal_removed;
    Ok(done)
}

#[cfg(test)]
mod tests;
