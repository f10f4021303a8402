//! `verify`: the repository's own checks (every referenced chunk indexed
//! and in a sound pack; with `--read-data`, re-hashed), then what they mean
//! for PostgreSQL: each backup restorable or not, and why (its files, or
//! the WAL from its start to its stop).

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use super::catalog::{backup_name, backups_prefix, from_value, wal_name, wal_prefix, BackupRef};
use super::retention::{self, ServerWindow};
use super::Result;
use crate::pg::wal::{segment_name, WalFile};
use crate::repo::verify::{VerifyOptions, VerifyProgress, VerifyReport};
use crate::repo::{RepoError, Repository};

#[derive(Debug, Clone, Serialize)]
pub struct BackupStatus {
    pub server: String,
    pub backup_id: String,
    /// Restorable to its end point: its files read back and the WAL from
    /// its start to its stop is in the archive (or inside the backup).
    pub restorable: bool,
    pub problems: Vec<String>,
}

/// A server's recovery window and what breaks it.
#[derive(Debug, Clone, Serialize)]
pub struct WindowStatus {
    pub server: String,
    /// From the end of the oldest backup whose WAL is complete, along the
    /// timeline `latest` resolves to, to the end of the unbroken archive.
    pub window: Option<ServerWindow>,
    /// With a gap, recovery from the oldest backup stops at it; the newest
    /// complete backup may reach further: its unbroken end.
    pub latest_lsn: Option<String>,
    pub latest_segment: Option<String>,
    /// The timeline `latest_lsn` is on (the newest backup's path may not
    /// be the oldest's).
    pub latest_timeline: Option<u32>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyResult {
    pub repository: VerifyReport,
    pub backups: Vec<BackupStatus>,
    /// Per server, when a whole server or repository was verified.
    pub windows: Vec<WindowStatus>,
}

impl VerifyResult {
    /// Sound only when every check found nothing.
    pub fn is_clean(&self) -> bool {
        self.repository.is_clean()
            && self.backups.iter().all(|b| b.restorable)
            && self.windows.iter().all(|w| w.problems.is_empty())
    }
}

/// The recovery window of one server, with its gaps as problems. A failure
/// to compute it is a problem too, never "no window".
async fn window_status(repo: &Repository, server: &str) -> WindowStatus {
    let mut st = WindowStatus {
        server: server.to_string(),
        window: None,
        latest_lsn: None,
        latest_segment: None,
        latest_timeline: None,
        problems: Vec::new(),
    };
    let computed = async {
        let facts = retention::load(repo, server).await?;
        let bf = facts.backup_facts()?;
        let window = facts.window(repo, &bf).await?;
        let newest = facts
            .backups
            .iter()
            .zip(&bf)
            .rev()
            .find(|(_, f)| f.wal_complete)
            .map(|(b, _)| {
                facts
                    .archive
                    .recoverable_from_backup(&b.meta)
                    .map(|r| (b.meta.backup_id.clone(), r))
            })
            .transpose()?;
        // A timeline with WAL but without its history file cannot be
        // followed from an older timeline: recovery from a backup there
        // stays on the old one. (A cluster that started archiving here
        // already past timeline 1 has no history files, and needs none
        // while its backups are on that timeline or later.)
        let oldest = facts.backups.iter().map(|b| b.meta.timeline).min();
        let no_history: Vec<u32> = facts
            .archive
            .timelines()
            .into_iter()
            .filter(|t| oldest.is_some_and(|o| o < *t) && !facts.archive.histories.contains_key(t))
            .collect();
        Ok::<_, super::EngineError>((window, newest, facts.backups.len(), no_history))
    }
    .await;
    match computed {
        Err(e) => st
            .problems
            .push(format!("its recovery window cannot be computed: {e}")),
        Ok((window, newest, backups, no_history)) => {
            for t in no_history {
                st.problems.push(format!(
                    "timeline {t} has archived WAL but its history file {t:08X}.history is not in the repository: recovery cannot follow timeline {t} (archive the file again from the server that created it, or restore with --target-timeline current)"
                ));
            }
            if window.is_none() && backups > 0 {
                st.problems.push(
                    "no backup has its WAL from start to stop: no point in time is recoverable"
                        .into(),
                );
            }
            if let Some(w) = &window {
                for g in &w.gaps {
                    st.problems.push(format!(
                        "WAL gap {}..{} ({} segment(s) not archived): recovery from backup {} stops before {}; later points are recoverable only from a backup that starts after the gap",
                        g.first, g.last, g.segments, w.from_backup, g.first
                    ));
                }
            }
            if let Some((id, r)) = newest {
                // The newest backup's path may differ from the oldest's (a
                // timeline that forked between them): its gaps count too.
                let known: Vec<&str> = window
                    .iter()
                    .flat_map(|w| w.gaps.iter().map(|g| g.first.as_str()))
                    .collect();
                for g in r.gaps.iter().filter(|g| !known.contains(&g.first.as_str())) {
                    st.problems.push(format!(
                        "WAL gap {}..{} ({} segment(s) not archived) on timeline {}: recovery from backup {id} stops before {}",
                        g.first, g.last, g.segments, r.timeline, g.first
                    ));
                }
                st.latest_lsn = r.contiguous_end_lsn;
                st.latest_segment = r.contiguous_to;
                st.latest_timeline = Some(r.timeline);
            }
            st.window = window;
        }
    }
    st
}

/// Verify one backup (`Some(server), Some(id)`), one server's backups, or
/// the whole repository.
pub async fn run(
    repo: &Repository,
    server: Option<&str>,
    id: Option<&str>,
    read_data_percent: Option<u8>,
    progress: &dyn VerifyProgress,
) -> Result<VerifyResult> {
    // A backup manifest that cannot be read is a finding, not a reason to
    // stop: list names, then read each one's metadata.
    let prefix = server.map_or_else(|| "backups/".to_string(), backups_prefix);
    let mut backups: Vec<BackupRef> = Vec::new();
    let mut unreadable: Vec<BackupStatus> = Vec::new();
    for name in repo.list_manifests(&prefix).await? {
        let meta = match repo.manifest_meta(&name).await {
            Ok(v) => from_value(&v, &name),
            // Listed, then not found: deleted meanwhile (a concurrent
            // expire or delete), which is no damage.
            Err(RepoError::NotFound { key }) if key.ends_with(&name) => continue,
            Err(e) => Err(e),
        };
        match meta {
            Ok(meta) => backups.push(BackupRef { name, meta }),
            Err(e) => {
                let mut parts = name.splitn(3, '/').skip(1);
                let srv = parts.next().unwrap_or_default().to_string();
                let bid = parts.next().unwrap_or_default().to_string();
                if id.is_none_or(|i| i == bid) {
                    unreadable.push(BackupStatus {
                        server: srv,
                        backup_id: bid,
                        restorable: false,
                        problems: vec![format!("its manifest cannot be read: {e}")],
                    });
                }
            }
        }
    }
    backups.sort_by(|a, b| {
        (a.meta.stop_time, &a.meta.backup_id).cmp(&(b.meta.stop_time, &b.meta.backup_id))
    });
    if let Some(id) = id {
        backups.retain(|b| b.meta.backup_id == id);
        if backups.is_empty() && unreadable.is_empty() {
            return Err(super::EngineError::Refused(format!(
                "no backup {id} of server {} in {} (see `pgcairn list`)",
                server.unwrap_or("?"),
                repo.location()
            )));
        }
    }
    // The WAL each backup needs, by manifest name.
    let mut wal_names: BTreeSet<String> = BTreeSet::new();
    let mut listed: HashSet<String> = HashSet::new();
    let mut listed_prefixes: HashSet<String> = HashSet::new();
    let mut needs: Vec<Vec<String>> = Vec::new();
    for b in &backups {
        let m = &b.meta;
        let prefix = wal_prefix(&m.server, m.system_identifier);
        if listed_prefixes.insert(prefix.clone()) {
            listed.extend(repo.list_manifests(&prefix).await?);
        }
        let mut need = Vec::new();
        let seg = m.wal_segment_size;
        match (
            WalFile::parse(&m.start_wal, seg),
            WalFile::parse(&m.stop_wal, seg),
        ) {
            (
                Some(WalFile::Segment { timeline, segno: a }),
                Some(WalFile::Segment { segno: z, .. }),
            ) => {
                for segno in a..=z {
                    let file = segment_name(timeline, segno, seg);
                    if !m.included_wal.contains(&file) {
                        need.push(wal_name(&m.server, m.system_identifier, timeline, &file));
                    }
                }
            }
            _ => need.push(format!(
                "(unreadable WAL range {}..{})",
                m.start_wal, m.stop_wal
            )),
        }
        wal_names.extend(need.iter().filter(|n| listed.contains(*n)).cloned());
        needs.push(need);
    }
    // One backup: its own WAL. One server: all of its archived WAL, which
    // recovery past its backups reads too.
    if id.is_none() {
        wal_names.extend(listed.iter().cloned());
    }
    let manifests = match (server, id) {
        (None, None) => None,
        _ => Some(
            backups
                .iter()
                .map(|b| backup_name(&b.meta.server, &b.meta.backup_id))
                .chain(
                    unreadable
                        .iter()
                        .map(|b| backup_name(&b.server, &b.backup_id)),
                )
                .chain(wal_names.iter().cloned())
                .collect(),
        ),
    };
    let report = repo
        .verify(
            &VerifyOptions {
                manifests,
                read_data_percent,
            },
            progress,
        )
        .await?;
    let mut statuses: Vec<BackupStatus> = backups
        .iter()
        .zip(needs)
        .map(|(b, need)| {
            let name = backup_name(&b.meta.server, &b.meta.backup_id);
            let mut problems = Vec::new();
            if report.damaged.contains(&name) {
                problems.push("its files cannot be read in full (see the problems above)".into());
            }
            let missing: Vec<&String> = need.iter().filter(|n| !listed.contains(*n)).collect();
            if let (Some(first), n) = (missing.first(), missing.len()) {
                problems.push(format!(
                    "{n} WAL file(s) between its start and stop are not archived (first: {first})"
                ));
            }
            let damaged: Vec<&String> = need
                .iter()
                .filter(|n| report.damaged.contains(*n))
                .collect();
            if let (Some(first), n) = (damaged.first(), damaged.len()) {
                problems.push(format!(
                    "{n} WAL file(s) between its start and stop are damaged (first: {first})"
                ));
            }
            BackupStatus {
                server: b.meta.server.clone(),
                backup_id: b.meta.backup_id.clone(),
                restorable: problems.is_empty(),
                problems,
            }
        })
        .collect();
    statuses.extend(unreadable);
    let mut windows = Vec::new();
    if id.is_none() {
        let mut servers: Vec<String> = statuses.iter().map(|b| b.server.clone()).collect();
        servers.sort();
        servers.dedup();
        for s in servers {
            let mut w = window_status(repo, &s).await;
            // Archived WAL that cannot be read back stops recovery there.
            let wal_root = format!("wal/{s}/");
            let damaged: Vec<&String> = report
                .damaged
                .iter()
                .filter(|n| n.starts_with(&wal_root))
                .collect();
            if let (Some(first), n) = (damaged.first(), damaged.len()) {
                w.problems.push(format!(
                    "{n} archived WAL file(s) cannot be read back (first: {first}); recovery that needs them fails there"
                ));
            }
            windows.push(w);
        }
    }
    Ok(VerifyResult {
        repository: report,
        backups: statuses,
        windows,
    })
}
