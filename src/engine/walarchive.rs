//! The archived WAL of one server, as the repository holds it: which
//! segments, `.partial`, `.backup` and `.history` files exist on which
//! timeline, and what follows from that for recovery: the segments a backup
//! needs from its start to its stop, the timeline path recovery follows, and
//! how far the archive lets a backup be rolled forward without a gap.
//!
//! Built from one listing of `wal/<server>/<sysid>/` (a failed listing is an
//! error, never an empty archive) plus the history files it names. The
//! answers are computed over plain data ([`WalArchive::from_names`]), so
//! retention and verify can test them without a repository.
//!
//! Recovery reads segment `s` from the newest timeline on its path whose
//! begin segment is at or before `s` (PostgreSQL's `XLogFileReadAnyTLI`):
//! the segment holding a switch point comes from the new timeline; the old
//! timeline's copy may exist only as `.partial`, which recovery never reads.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::catalog::{wal_name, wal_prefix, BackupMeta};
use super::{EngineError, Result};
use crate::pg::timeline::{parse_history, reachable, Fork};
use crate::pg::wal::{segment_name, segno_of, Lsn, WalFile};
use crate::repo::Repository;

/// One archived file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedWal {
    /// Its manifest name (`wal/<server>/<sysid>/<TL>/<file>`).
    pub manifest: String,
    /// The last name segment: the file name, or for a second `.partial` of
    /// the same name, `<file>.partial.<hash>`.
    pub file: String,
    /// What it is; `None` for a name pgcairn does not recognise (never
    /// expired, never counted).
    pub kind: Option<WalFile>,
}

impl ArchivedWal {
    /// The segment number the file belongs to (none for history files).
    pub fn segno(&self) -> Option<u64> {
        match self.kind {
            Some(WalFile::Segment { segno, .. })
            | Some(WalFile::Partial { segno, .. })
            | Some(WalFile::BackupLabel { segno, .. }) => Some(segno),
            _ => None,
        }
    }
}

/// A WAL segment on a timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub timeline: u32,
    pub segno: u64,
}

impl SegmentId {
    pub fn name(&self, seg_size: u64) -> String {
        segment_name(self.timeline, self.segno, seg_size)
    }
}

/// One timeline of a path: recovery reads it from `begin` (the switch point
/// from its parent; 0 for the first) up to `end` (where its child forked;
/// `None` for the path's last timeline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathStep {
    pub timeline: u32,
    #[serde(serialize_with = "ser_lsn")]
    pub begin: Lsn,
    #[serde(serialize_with = "ser_opt_lsn")]
    pub end: Option<Lsn>,
}

fn ser_lsn<S: serde::Serializer>(l: &Lsn, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&l.to_string())
}

fn ser_opt_lsn<S: serde::Serializer>(
    l: &Option<Lsn>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match l {
        Some(l) => s.serialize_str(&l.to_string()),
        None => s.serialize_none(),
    }
}

/// The timelines recovery follows to reach one timeline, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelinePath {
    pub steps: Vec<PathStep>,
    /// The target timeline is above 1 but its history file is not archived:
    /// the path is only the target itself, and recovery from an ancestor
    /// cannot reach it.
    pub history_missing: bool,
}

impl TimelinePath {
    /// The timeline recovery reads segment `segno` from.
    pub fn timeline_of_segment(&self, segno: u64, seg_size: u64) -> u32 {
        self.steps
            .iter()
            .rev()
            .find(|s| segno_of(s.begin, seg_size) <= segno)
            .or(self.steps.first())
            .map_or(0, |s| s.timeline)
    }

    pub fn target(&self) -> u32 {
        self.steps.last().map_or(0, |s| s.timeline)
    }

    pub fn timelines(&self) -> Vec<u32> {
        self.steps.iter().map(|s| s.timeline).collect()
    }
}

/// The segments a range of WAL needs, and which of them are not archived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalNeed {
    pub needed: Vec<SegmentId>,
    pub missing: Vec<SegmentId>,
}

impl WalNeed {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// A run of missing segments along a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub first: String,
    pub last: String,
    pub segments: u64,
}

/// How far the archive lets recovery go from a starting segment along a
/// timeline path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recoverable {
    /// The timeline followed: what `recovery_target_timeline = latest`
    /// resolves to from the backup (see [`WalArchive::latest_reachable`]).
    pub timeline: u32,
    pub path: TimelinePath,
    pub first_segment: String,
    /// The last segment of the unbroken run from `first_segment`; `None`
    /// when even the first is missing.
    pub contiguous_to: Option<String>,
    /// The end of `contiguous_to`: recovery can reach any point before it.
    pub contiguous_end_lsn: Option<String>,
    /// The newest archived segment on the path.
    pub last_archived: Option<String>,
    /// Missing runs between `first_segment` and `last_archived`.
    pub gaps: Vec<Gap>,
}

/// The archived WAL of one cluster registered under a server name.
#[derive(Debug, Clone)]
pub struct WalArchive {
    pub server: String,
    pub system_identifier: u64,
    pub segment_size: u64,
    /// Every archived file, ordered by manifest name.
    pub files: Vec<ArchivedWal>,
    /// Parsed history files by the timeline they describe.
    pub histories: BTreeMap<u32, Vec<Fork>>,
    segments: BTreeSet<SegmentId>,
}

/// Classify the last segment of a WAL manifest name.
fn classify(file: &str, seg_size: u64) -> Option<WalFile> {
    if let Some(k) = WalFile::parse(file, seg_size) {
        return Some(k);
    }
    // A second `.partial` of the same name is kept as `<file>.partial.<hash>`.
    let (base, alt) = file.rsplit_once('.')?;
    if base.ends_with(".partial") && !alt.is_empty() && alt.bytes().all(|c| c.is_ascii_hexdigit()) {
        return match WalFile::parse(base, seg_size)? {
            k @ WalFile::Partial { .. } => Some(k),
            _ => None,
        };
    }
    None
}

impl WalArchive {
    /// List `wal/<server>/<sysid>/` once and read every history file.
    /// `seg_size` is the cluster's WAL segment size (from a backup); names
    /// that do not parse with it are kept as unrecognised.
    pub async fn load(
        repo: &Repository,
        server: &str,
        system_identifier: u64,
        seg_size: u64,
    ) -> Result<WalArchive> {
        let names = repo
            .list_manifests(&wal_prefix(server, system_identifier))
            .await?;
        let mut histories = BTreeMap::new();
        for name in &names {
            let file = name.rsplit('/').next().unwrap_or(name);
            if let Some(WalFile::History { timeline }) = WalFile::parse(file, seg_size) {
                let m = repo.read_manifest(name).await?;
                let e = m.entries.first().ok_or_else(|| {
                    EngineError::Refused(format!("{name}: history manifest without its file"))
                })?;
                let mut text = Vec::new();
                repo.restore_entry(e, &mut text).await?;
                let forks = parse_history(&String::from_utf8_lossy(&text))
                    .map_err(|e| EngineError::Refused(format!("{name}: {e}")))?;
                histories.insert(timeline, forks);
            }
        }
        Ok(Self::from_names(
            server,
            system_identifier,
            seg_size,
            names,
            histories,
        ))
    }

    /// An archive over plain data: manifest names (as listed) and parsed
    /// history files by timeline.
    pub fn from_names(
        server: &str,
        system_identifier: u64,
        seg_size: u64,
        names: impl IntoIterator<Item = String>,
        histories: BTreeMap<u32, Vec<Fork>>,
    ) -> WalArchive {
        let mut files: Vec<ArchivedWal> = names
            .into_iter()
            .map(|manifest| {
                let file = manifest.rsplit('/').next().unwrap_or(&manifest).to_string();
                ArchivedWal {
                    kind: classify(&file, seg_size),
                    file,
                    manifest,
                }
            })
            .collect();
        files.sort_by(|a, b| a.manifest.cmp(&b.manifest));
        let segments = files
            .iter()
            .filter_map(|f| match f.kind {
                Some(WalFile::Segment { timeline, segno }) => Some(SegmentId { timeline, segno }),
                _ => None,
            })
            .collect();
        WalArchive {
            server: server.to_string(),
            system_identifier,
            segment_size: seg_size,
            files,
            histories,
            segments,
        }
    }

    /// The manifest name a segment is (or would be) archived under.
    pub fn manifest_of(&self, s: SegmentId) -> String {
        wal_name(
            &self.server,
            self.system_identifier,
            s.timeline,
            &s.name(self.segment_size),
        )
    }

    /// Is the full segment archived?
    pub fn has_segment(&self, s: SegmentId) -> bool {
        self.segments.contains(&s)
    }

    /// Every archived full segment, by timeline then number.
    pub fn segments(&self) -> impl Iterator<Item = SegmentId> + '_ {
        self.segments.iter().copied()
    }

    /// Timelines with any archived file (history files included).
    pub fn timelines(&self) -> BTreeSet<u32> {
        self.files
            .iter()
            .filter_map(|f| f.kind.as_ref().map(|k| k.timeline()))
            .collect()
    }

    /// The path recovery follows to reach `timeline`, from its history file.
    pub fn timeline_path(&self, timeline: u32) -> TimelinePath {
        let Some(forks) = self.histories.get(&timeline) else {
            return TimelinePath {
                steps: vec![PathStep {
                    timeline,
                    begin: Lsn(0),
                    end: None,
                }],
                history_missing: timeline > 1,
            };
        };
        let mut steps = Vec::with_capacity(forks.len() + 1);
        let mut begin = Lsn(0);
        for f in forks {
            steps.push(PathStep {
                timeline: f.parent,
                begin,
                end: Some(f.switch),
            });
            begin = f.switch;
        }
        steps.push(PathStep {
            timeline,
            begin,
            end: None,
        });
        TimelinePath {
            steps,
            history_missing: false,
        }
    }

    /// The segments from `first` to `last` (inclusive) recovery reads when
    /// it follows `path`, and which are not archived. `skip` names segments
    /// that are available elsewhere (WAL carried inside a backup).
    pub fn need_along(
        &self,
        path: &TimelinePath,
        first: u64,
        last: u64,
        skip: &[String],
    ) -> WalNeed {
        let mut need = WalNeed::default();
        for segno in first..=last {
            let s = SegmentId {
                timeline: path.timeline_of_segment(segno, self.segment_size),
                segno,
            };
            if skip.contains(&s.name(self.segment_size)) {
                continue;
            }
            if !self.has_segment(s) {
                need.missing.push(s);
            }
            need.needed.push(s);
        }
        need
    }

    /// The segments a backup needs from its start to its stop, on the path
    /// to its timeline, less the WAL carried inside it.
    pub fn backup_need(&self, meta: &BackupMeta) -> Result<WalNeed> {
        let seg = self.segment_size;
        let (first, last, tl) = backup_range(meta, seg)?;
        Ok(self.need_along(&self.timeline_path(tl), first, last, &meta.included_wal))
    }

    /// The timeline `recovery_target_timeline = latest` follows from a
    /// backup on `timeline` that ended at `backup_end`, found as PostgreSQL
    /// and `restore` find it: each next timeline for as long as its history
    /// file is archived. If that timeline cannot be reached from the backup
    /// (it forked before the backup ended), recovery along `latest` fails,
    /// and what remains is the backup's own timeline
    /// (`--target-timeline current`).
    pub fn latest_reachable(&self, timeline: u32, backup_end: Lsn) -> u32 {
        let mut t = timeline;
        while self.histories.contains_key(&(t + 1)) {
            t += 1;
        }
        match self.histories.get(&t) {
            Some(h) if t != timeline && reachable(timeline, backup_end, t, h).is_ok() => t,
            _ => timeline,
        }
    }

    /// How far recovery can go from segment `start_segno` of a backup on
    /// `timeline` that ended at `backup_end`, following the newest
    /// reachable timeline: the unbroken run of archived segments, the
    /// newest archived one on the path, and the gaps between.
    /// `included`: segments carried inside the backup, present whatever
    /// the archive holds.
    pub fn recoverable_from(
        &self,
        timeline: u32,
        start_segno: u64,
        backup_end: Lsn,
        included: &[String],
    ) -> Recoverable {
        let seg = self.segment_size;
        let target = self.latest_reachable(timeline, backup_end);
        let path = self.timeline_path(target);
        let on_path = |s: &SegmentId| {
            s.segno >= start_segno && path.timeline_of_segment(s.segno, seg) == s.timeline
        };
        let newest = self
            .segments
            .iter()
            .filter(|s| on_path(s))
            .map(|s| s.segno)
            .max();
        let mut contiguous_to = None;
        let mut gaps: Vec<Gap> = Vec::new();
        let mut in_gap: Option<(u64, u64)> = None;
        let mut unbroken = true;
        if let Some(newest) = newest {
            for segno in start_segno..=newest {
                let s = SegmentId {
                    timeline: path.timeline_of_segment(segno, seg),
                    segno,
                };
                if self.has_segment(s) || included.contains(&s.name(seg)) {
                    if unbroken {
                        contiguous_to = Some(s);
                    }
                    if let Some((a, b)) = in_gap.take() {
                        gaps.push(self.gap(&path, a, b));
                    }
                } else {
                    unbroken = false;
                    in_gap = Some(in_gap.map_or((segno, segno), |(a, _)| (a, segno)));
                }
            }
        }
        let name_of = |segno: u64| SegmentId {
            timeline: path.timeline_of_segment(segno, seg),
            segno,
        };
        Recoverable {
            timeline: target,
            first_segment: name_of(start_segno).name(seg),
            contiguous_to: contiguous_to.map(|s| s.name(seg)),
            contiguous_end_lsn: contiguous_to.map(|s| Lsn((s.segno + 1) * seg).to_string()),
            last_archived: newest.map(|n| name_of(n).name(seg)),
            gaps,
            path,
        }
    }

    fn gap(&self, path: &TimelinePath, a: u64, b: u64) -> Gap {
        let seg = self.segment_size;
        let at = |segno| {
            SegmentId {
                timeline: path.timeline_of_segment(segno, seg),
                segno,
            }
            .name(seg)
        };
        Gap {
            first: at(a),
            last: at(b),
            segments: b - a + 1,
        }
    }

    /// The recovery window a backup opens: from its start, along the newest
    /// timeline reachable from it.
    pub fn recoverable_from_backup(&self, meta: &BackupMeta) -> Result<Recoverable> {
        let (first, _, tl) = backup_range(meta, self.segment_size)?;
        let end: Lsn = meta.stop_lsn.parse().map_err(|e| {
            EngineError::Refused(format!("backup {}: stop LSN: {e}", meta.backup_id))
        })?;
        Ok(self.recoverable_from(tl, first, end, &meta.included_wal))
    }
}

/// A backup's first and last segment numbers and its timeline.
pub fn backup_range(meta: &BackupMeta, seg_size: u64) -> Result<(u64, u64, u32)> {
    match (
        WalFile::parse(&meta.start_wal, seg_size),
        WalFile::parse(&meta.stop_wal, seg_size),
    ) {
        (
            Some(WalFile::Segment { segno: a, .. }),
            Some(WalFile::Segment {
                timeline, segno: z, ..
            }),
        ) if a <= z => Ok((a, z, timeline)),
        _ => Err(EngineError::Refused(format!(
            "backup {} of server {}: unreadable WAL range {}..{}",
            meta.backup_id, meta.server, meta.start_wal, meta.stop_wal
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn archive(files: &[(u32, &str)], histories: &[(u32, &str)]) -> WalArchive {
        let names = files.iter().map(|(tl, f)| wal_name("s", 7, *tl, f));
        let h = histories
            .iter()
            .map(|(tl, t)| (*tl, parse_history(t).unwrap()))
            .collect();
        WalArchive::from_names("s", 7, SEG, names, h)
    }

    fn seg(tl: u32, segno: u64) -> String {
        segment_name(tl, segno, SEG)
    }

    #[test]
    fn names_are_classified() {
        let a = archive(
            &[
                (1, &seg(1, 3)),
                (1, "000000010000000000000004.partial"),
                (1, "000000010000000000000004.partial.0123456789abcdef"),
                (1, "000000010000000000000003.00000028.backup"),
                (2, "00000002.history"),
                (2, "junk"),
            ],
            &[(2, "1\t0/4000100\tx\n")],
        );
        let kinds: Vec<_> = a.files.iter().map(|f| f.kind.clone()).collect();
        assert_eq!(kinds.iter().filter(|k| k.is_none()).count(), 1);
        assert_eq!(
            kinds
                .iter()
                .filter(|k| matches!(k, Some(WalFile::Partial { segno: 4, .. })))
                .count(),
            2
        );
        assert!(a.has_segment(SegmentId {
            timeline: 1,
            segno: 3
        }));
        assert_eq!(a.timelines(), BTreeSet::from([1, 2]));
    }

    /// Timeline 2 forked from 1 inside segment 5: segment 5 comes from
    /// timeline 2 (timeline 1 has only its `.partial`), later ones too.
    #[test]
    fn path_takes_the_switch_segment_from_the_new_timeline() {
        let a = archive(
            &[
                (1, &seg(1, 3)),
                (1, &seg(1, 4)),
                (1, "000000010000000000000005.partial"),
                (2, &seg(2, 5)),
                (2, &seg(2, 6)),
                (2, "00000002.history"),
            ],
            &[(2, "1\t0/5000100\tbefore x\n")],
        );
        let p = a.timeline_path(2);
        assert_eq!(p.timelines(), vec![1, 2]);
        assert_eq!(p.timeline_of_segment(4, SEG), 1);
        assert_eq!(p.timeline_of_segment(5, SEG), 2);
        let need = a.need_along(&p, 3, 6, &[]);
        assert!(need.complete(), "{need:?}");
        assert_eq!(
            need.needed[2],
            SegmentId {
                timeline: 2,
                segno: 5
            }
        );
        assert_eq!(
            a.manifest_of(need.needed[2]),
            "wal/s/7/00000002/000000020000000000000005"
        );
        // On timeline 1 alone, segment 5 is only a .partial: missing.
        let need1 = a.need_along(&a.timeline_path(1), 3, 5, &[]);
        assert_eq!(
            need1.missing,
            vec![SegmentId {
                timeline: 1,
                segno: 5
            }]
        );
        // A backup on timeline 1 that ended before the fork reaches 2.
        let r = a.recoverable_from(1, 3, Lsn(0x0400_0000), &[]);
        assert_eq!(r.timeline, 2);
        assert_eq!(r.contiguous_to.as_deref(), Some(seg(2, 6).as_str()));
        assert_eq!(r.contiguous_end_lsn.as_deref(), Some("0/7000000"));
        assert!(r.gaps.is_empty());
        // One that ended after the fork stays on 1 and stops at 4.
        let r = a.recoverable_from(1, 3, Lsn(0x0500_0200), &[]);
        assert_eq!(r.timeline, 1);
        assert_eq!(r.contiguous_to.as_deref(), Some(seg(1, 4).as_str()));
    }

    #[test]
    fn gaps_and_missing_history() {
        let a = archive(
            &[
                (1, &seg(1, 1)),
                (1, &seg(1, 2)),
                (1, &seg(1, 5)),
                (1, &seg(1, 6)),
                (1, &seg(1, 8)),
                (3, &seg(3, 9)),
            ],
            &[],
        );
        let r = a.recoverable_from(1, 1, Lsn(0x0100_0100), &[]);
        assert_eq!(r.contiguous_to.as_deref(), Some(seg(1, 2).as_str()));
        assert_eq!(r.last_archived.as_deref(), Some(seg(1, 8).as_str()));
        assert_eq!(
            r.gaps,
            vec![
                Gap {
                    first: seg(1, 3),
                    last: seg(1, 4),
                    segments: 2
                },
                Gap {
                    first: seg(1, 7),
                    last: seg(1, 7),
                    segments: 1
                }
            ]
        );
        // Timeline 3 without its history: only itself, flagged.
        let p = a.timeline_path(3);
        assert!(p.history_missing);
        assert_eq!(p.timelines(), vec![3]);
        // Nothing archived at all from the start: no run.
        let r = a.recoverable_from(1, 20, Lsn(20 * SEG), &[]);
        assert_eq!(r.contiguous_to, None);
        assert_eq!(r.last_archived, None);
    }

    #[test]
    fn included_wal_is_not_needed() {
        let a = archive(&[(1, &seg(1, 3)), (1, &seg(1, 5))], &[]);
        let p = a.timeline_path(1);
        let need = a.need_along(&p, 3, 4, &[seg(1, 4)]);
        assert!(need.complete());
        assert_eq!(need.needed.len(), 1);
        // Nor is it a gap in the window.
        let r = a.recoverable_from(1, 3, Lsn(4 * SEG + 0x100), &[seg(1, 4)]);
        assert!(r.gaps.is_empty(), "{:?}", r.gaps);
        assert_eq!(r.contiguous_to.as_deref(), Some(seg(1, 5).as_str()));
    }

    /// `latest` as PostgreSQL resolves it: the next history file, then the
    /// next; not the highest reachable timeline.
    #[test]
    fn latest_is_the_next_history_files() {
        // Timeline 2 forked from 1 at 9; timeline 3, made later from an
        // older backup, forked from 1 at 5.
        let a = archive(
            &[(1, &seg(1, 3))],
            &[(2, "1\t0/9000100\tx\n"), (3, "1\t0/5000100\tx\n")],
        );
        // A backup that ended at 3: 3 is the latest, and reachable.
        assert_eq!(a.latest_reachable(1, Lsn(0x0300_0000)), 3);
        // One that ended at 7: `latest` (3) forked before it ended, so only
        // its own timeline remains (2 is reachable, but not `latest`).
        assert_eq!(a.latest_reachable(1, Lsn(0x0700_0000)), 1);
        // A missing history file stops the probe: 3 is not reached past 2.
        let b = archive(&[(1, &seg(1, 3))], &[(3, "1\t0/9000100\tx\n")]);
        assert_eq!(b.latest_reachable(1, Lsn(0x0400_0000)), 1);
    }
}
