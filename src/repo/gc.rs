//! The garbage collector: two-phase deletion with a grace period, as
//! repo-format.md ("Concurrency and garbage collection") specifies.
//!
//! One run:
//! 1. registers its own lease (purpose `gc`), measures the clock skew
//!    against the store's timestamp of that lease, and refuses to run when
//!    another collector's lease is younger than the grace period (unless
//!    it names a process on this machine that has ended);
//! 2. lists marks, index objects, packs and manifests, and computes the set
//!    of live chunk ids (the only per-chunk state held for the whole run);
//!    any failed listing, unreadable index page or unreadable manifest
//!    aborts before anything is deleted;
//! 3. sweeps every mark whose grace period has passed (by store time):
//!    a condemned pack holding a chunk some manifest now references with no
//!    copy outside condemned packs is kept; compacted index objects without
//!    the swept packs are written, then the superseded index objects are
//!    deleted, then the packs, then the mark;
//! 4. marks: packs older than the grace period that are all garbage (or in
//!    no index at all) are condemned; packs with more than
//!    [`REPACK_GARBAGE_SHARE`] garbage bytes have their live chunks copied
//!    into new packs (indexed) and are condemned too; then the mark is
//!    written;
//! 5. deletes leases not renewed for a grace period, aborts incomplete
//!    uploads (a killed writer's staging files, leftover S3 multipart
//!    uploads) begun more than a grace period ago, and releases its lease.
//!
//! Deleting superseded index objects *before* the packs they name (the spec
//! once listed the packs first) means a collector killed between the two
//! leaves only unindexed packs behind, never an index naming a missing pack.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;

use super::backend::{self, BackendError, ObjectInfo};
use super::crypto::random_id;
use super::error::{RepoError, Result};
use super::format::{now_unix, ChunkId, Kind, PackId};
use super::index::{build_index, index_object, Location, PackInfo};
use super::lease::{
    holder_has_ended, open_doc, CondemnedPack, GcMark, Lease, LeaseDoc, LEASES_PREFIX, MARKS_PREFIX,
};
use super::pack::{open_blob, pack_id_from_key, pack_object, PackEntry, SealedChunk};
use super::uploads::UploadListing;
use super::Repository;

/// A pack older than the grace period whose garbage is more than this share
/// of its chunk bytes is repacked: its live chunks are copied to new packs
/// and the pack is condemned. At most half of a kept pack is then dead
/// weight, and no pack is rewritten to reclaim less than half of it.
pub const REPACK_GARBAGE_SHARE: f64 = 0.5;

/// Entries per compacted index object (about 12 MiB).
const COMPACT_ENTRIES: usize = 256 * 1024;

/// Index objects below half of [`COMPACT_ENTRIES`] count as small; once
/// there are this many, they are merged.
const SMALL_INDEX_OBJECTS: usize = 8;

/// Points at which a test can stop a run as if the process had been
/// killed there (the lease is left behind, nothing is cleaned up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GcStep {
    /// Lease written, clock and other collectors checked.
    Locked,
    /// Sweep: compacted index objects written.
    IndexWritten,
    /// Sweep: superseded index objects deleted.
    IndexRemoved,
    /// Sweep: condemned packs deleted, marks not yet.
    PacksDeleted,
    /// Sweep: due marks deleted.
    Swept,
    /// Mark: live chunks of mostly-garbage packs copied and indexed.
    Repacked,
    /// Mark: the new mark written.
    Marked,
}

impl GcStep {
    pub const ALL: [GcStep; 7] = [
        GcStep::Locked,
        GcStep::IndexWritten,
        GcStep::IndexRemoved,
        GcStep::PacksDeleted,
        GcStep::Swept,
        GcStep::Repacked,
        GcStep::Marked,
    ];
}

#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Compute and report, write and delete nothing.
    pub dry_run: bool,
    /// Lengthen the repository's grace period for this run. Shortening is
    /// refused: the configured period is what running writers rely on.
    pub grace_period_secs: Option<i64>,
    /// Test hook: stop right after this step, as if killed.
    pub stop_after: Option<GcStep>,
}

/// Progress callbacks; the library prints nothing.
pub trait GcProgress: Send + Sync {
    fn phase(&self, _name: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
}

impl GcProgress for () {}

#[derive(Debug, Clone, Serialize)]
pub struct RefusedDelete {
    pub object: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PendingMark {
    pub object: String,
    pub packs: u64,
    pub bytes: u64,
    /// Store time (Unix seconds) after which a run sweeps it.
    pub sweep_after: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub grace_period_secs: i64,
    /// Unix seconds by the store's clock (the local clock in a dry run,
    /// which writes nothing and so cannot ask the store).
    pub store_time: i64,
    /// Store clock minus local clock, in seconds (0 in a dry run).
    pub clock_skew_secs: i64,
    pub manifests: u64,
    pub live_chunks: u64,
    /// Bytes of packs before and after the run.
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
    /// Marks whose grace period had passed, swept by this run.
    pub marks_swept: u64,
    pub packs_swept: u64,
    pub bytes_reclaimed: u64,
    /// Condemned packs kept because a manifest committed since the mark
    /// references a chunk found nowhere else.
    pub packs_kept: Vec<String>,
    pub index_objects_written: u64,
    pub index_objects_removed: u64,
    /// The mark this run wrote (`gc/marks/<id>`), if any garbage was found.
    pub mark: Option<String>,
    pub packs_condemned: u64,
    pub bytes_condemned: u64,
    /// Of the condemned packs, those in no index object (a killed
    /// writer's leftovers).
    pub packs_condemned_unindexed: u64,
    pub packs_repacked: u64,
    pub chunks_repacked: u64,
    pub bytes_repacked: u64,
    /// Marks left for a later run.
    pub marks_pending: Vec<PendingMark>,
    pub leases_removed: u64,
    /// Deletes the store refused (object lock, permissions): reported once
    /// per run, never retried in a loop.
    pub refused: Vec<RefusedDelete>,
    pub incomplete_uploads: UploadsReport,
}

/// Uploads begun and never completed (see `repo::uploads`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadsReport {
    /// False when the store cannot list them; `note` says why.
    pub checked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub found: u64,
    /// Begun more than a grace period ago and aborted (or, in a dry run,
    /// to be aborted).
    pub aborted: u64,
    /// Bytes they held, where the store says (local staging files).
    pub bytes_aborted: u64,
    /// Younger than the grace period: possibly a running writer's, left.
    pub young: u64,
}

/// Per-pack totals from the index.
#[derive(Debug, Clone, Copy, Default)]
struct PackStat {
    entries: u64,
    bytes: u64,
    live_entries: u64,
    live_bytes: u64,
}

/// The loaded index, summarised per pack and per object.
struct IndexView {
    /// Index object names (without prefix) and their entry counts.
    objects: Vec<(String, u64)>,
    /// Packs each index object names.
    object_packs: HashMap<String, HashSet<PackId>>,
    /// The index object a pack's entries are counted from: every index
    /// object naming a pack lists its whole table, so one is enough.
    owner: HashMap<PackId, String>,
    stats: HashMap<PackId, PackStat>,
}

struct Mark {
    object: String,
    modified: i64,
    doc: GcMark,
}

fn task(msg: String) -> RepoError {
    RepoError::Task(msg)
}

/// Before each step that writes or deletes: a collector that stalled for a
/// grace period (a suspended VM) may have been succeeded by another, and
/// must not act on what it listed before the stall.
async fn in_time(lease: Option<&Lease>, grace: i64, dry_run: bool) -> Result<()> {
    let Some(l) = lease.filter(|_| !dry_run) else {
        return Ok(());
    };
    l.check().await.map_err(|e| match e {
        RepoError::LeaseExpired { age_secs, .. } => RepoError::invalid(
            "gc",
            format!(
                "this collection has run for {age_secs} s, longer than the grace period ({grace} s); it stopped before its next write or delete, rerun it"
            ),
        ),
        other => other,
    })
}

impl Repository {
    /// Collect garbage (see the module documentation). Errors before the
    /// first delete leave the repository untouched; a run killed at any
    /// point leaves it readable and the next run finishes the job.
    pub async fn gc(&self, opts: &GcOptions, progress: &dyn GcProgress) -> Result<GcReport> {
        let cfg = self.inner.config.gc;
        let grace = match opts.grace_period_secs {
            Some(g) if g < cfg.grace_period_secs => {
                return Err(RepoError::invalid(
                    "grace period",
                    format!(
                        "{g} s is shorter than the repository's {} s: a running backup may still reference what a shorter period deletes; it can only be lengthened",
                        cfg.grace_period_secs
                    ),
                ))
            }
            Some(g) => g,
            None => cfg.grace_period_secs,
        };
        let mut report = GcReport {
            dry_run: opts.dry_run,
            grace_period_secs: grace,
            ..Default::default()
        };
        let lease = if opts.dry_run {
            report.store_time = now_unix();
            None
        } else {
            let before = now_unix();
            let l = Lease::acquire(
                self.inner.backend.clone(),
                self.inner.sealer.clone(),
                self.inner.repo_id,
                "gc",
                // Renewed every grace/8 (at most 10 min), so a running
                // collector's lease is always young; `check` before the
                // sweep's deletes aborts a run that took longer than a
                // grace period (a stalled process another collector may
                // have taken over from).
                grace,
            )
            .await?;
            let after = now_unix();
            let store = l.started_store;
            report.store_time = store;
            report.clock_skew_secs = if store < before {
                store - before
            } else if store > after {
                store - after
            } else {
                0
            };
            if report.clock_skew_secs.abs() > cfg.max_clock_skew_secs {
                l.release().await;
                return Err(RepoError::invalid(
                    "clock skew",
                    format!(
                        "the store's clock differs from this machine's by {} s (limit {} s); every age the collector uses comes from the store, fix the local clock (NTP) and rerun",
                        report.clock_skew_secs, cfg.max_clock_skew_secs
                    ),
                ));
            }
            Some(l)
        };
        let mut stopped = false;
        let result = self
            .collect(
                opts,
                grace,
                lease.as_ref(),
                &mut report,
                &mut stopped,
                progress,
            )
            .await;
        if let Some(l) = lease {
            if stopped {
                drop(l); // as if killed: the lease stays behind
            } else {
                l.release().await;
            }
        }
        result.map(|()| report)
    }

    async fn collect(
        &self,
        opts: &GcOptions,
        grace: i64,
        lease: Option<&Lease>,
        report: &mut GcReport,
        stopped: &mut bool,
        progress: &dyn GcProgress,
    ) -> Result<()> {
        let inner = &self.inner;
        let b = &*inner.backend;
        let now = report.store_time;
        let stop = |step: GcStep, stopped: &mut bool| -> Result<()> {
            if opts.stop_after == Some(step) {
                *stopped = true;
                return Err(task(format!("gc stopped after step {step:?} (test hook)")));
            }
            Ok(())
        };
        let own_lease = lease.map(|l| l.key.clone());

        // One collector at a time; stale leases are removed at the end.
        progress.phase("checking leases", 0);
        let mut stale_leases = Vec::new();
        for o in backend::list(b, LEASES_PREFIX).await? {
            if Some(&o.key) == own_lease.as_ref() {
                continue;
            }
            if now - o.modified > grace {
                stale_leases.push(o.key);
                continue;
            }
            let bytes = match b.get(&o.key).await {
                Ok(bytes) => bytes,
                Err(BackendError::NotFound) => continue, // its writer ended
                Err(e) => return Err(e.into_repo("read", &o.key)),
            };
            let doc: LeaseDoc =
                open_doc(&inner.sealer, &inner.repo_id, Kind::Lease, &o.key, &bytes)?;
            if doc.purpose == "gc" && !opts.dry_run {
                // A collector killed on this machine is known to be gone.
                if holder_has_ended(&doc) {
                    stale_leases.push(o.key);
                    continue;
                }
                let hint = if doc.hostname == super::keys::hostname() {
                    "that process is still running on this host: wait for it to finish".to_string()
                } else {
                    format!("a lease from another host counts until it is {grace} s old: if that collector is gone, rerun after that")
                };
                return Err(RepoError::invalid(
                    "gc",
                    format!(
                        "another collector holds {} (host {}, pid {}), renewed {} s ago by the store's clock; only one runs at a time, and {hint}",
                        o.key,
                        doc.hostname,
                        doc.pid,
                        now - o.modified,
                    ),
                ));
            }
        }
        stop(GcStep::Locked, stopped)?;

        // Everything the run decides on: an incomplete listing, an
        // unreadable mark, index page or manifest aborts it here.
        progress.phase("listing", 0);
        let mut marks = Vec::new();
        for o in backend::list(b, MARKS_PREFIX).await? {
            let bytes = backend::get(b, &o.key).await?;
            let doc: GcMark =
                open_doc(&inner.sealer, &inner.repo_id, Kind::GcMark, &o.key, &bytes)?;
            marks.push(Mark {
                object: o.key,
                modified: o.modified,
                doc,
            });
        }
        let mut stored = self.list_packs().await?;
        report.pack_bytes_before = stored.values().map(|o| o.size).sum();
        inner.index.refresh().await?;
        let mut live = self.live_chunks(report, progress).await?;
        self.add_bases(&mut live)?;
        report.live_chunks = live.len() as u64;
        let view = self.index_view(&live)?;

        // Sweep every mark whose grace period has passed.
        let condemned_all: HashSet<PackId> = marks
            .iter()
            .flat_map(|m| m.doc.packs.iter().map(|p| p.pack))
            .collect();
        let (due, pending): (Vec<Mark>, Vec<Mark>) =
            marks.into_iter().partition(|m| now - m.modified > grace);
        let still_condemned: HashSet<PackId> = pending
            .iter()
            .flat_map(|m| m.doc.packs.iter().map(|p| p.pack))
            .collect();
        let mut swept: HashSet<PackId> = HashSet::new();
        if !due.is_empty() {
            progress.phase("sweeping", 0);
            // A pack a pending mark also lists (condemned again after an
            // old mark could not be deleted) waits for that mark's grace.
            let mut sweep: HashSet<PackId> = due
                .iter()
                .flat_map(|m| m.doc.packs.iter().map(|p| p.pack))
                .filter(|p| !still_condemned.contains(p))
                .collect();
            let kept = self.still_needed(&sweep, &condemned_all, &stored, &live, &view)?;
            for p in &kept {
                sweep.remove(p);
                report.packs_kept.push(pack_object(p));
            }
            report.packs_kept.sort();
            in_time(lease, grace, opts.dry_run).await?;
            let rewrite = self
                .write_compacted(&view, &sweep, opts.dry_run, report)
                .await?;
            stop(GcStep::IndexWritten, stopped)?;
            in_time(lease, grace, opts.dry_run).await?;
            let pinned = self
                .remove_superseded(&view, &rewrite, opts.dry_run, report)
                .await?;
            stop(GcStep::IndexRemoved, stopped)?;
            in_time(lease, grace, opts.dry_run).await?;
            for pack in sweep.iter().filter(|p| !pinned.contains(p)) {
                let Some(info) = stored.get(pack) else {
                    continue; // deleted by an earlier, interrupted sweep
                };
                let object = pack_object(pack);
                if opts.dry_run || self.delete(&object, report).await {
                    report.packs_swept += 1;
                    report.bytes_reclaimed += info.size;
                    swept.insert(*pack);
                }
            }
            stop(GcStep::PacksDeleted, stopped)?;
            for m in &due {
                if opts.dry_run || self.delete(&m.object, report).await {
                    report.marks_swept += 1;
                }
            }
            stop(GcStep::Swept, stopped)?;
            stored.retain(|p, _| !swept.contains(p));
        } else if self.small_objects(&view) >= SMALL_INDEX_OBJECTS {
            in_time(lease, grace, opts.dry_run).await?;
            let rewrite = self
                .write_compacted(&view, &HashSet::new(), opts.dry_run, report)
                .await?;
            in_time(lease, grace, opts.dry_run).await?;
            self.remove_superseded(&view, &rewrite, opts.dry_run, report)
                .await?;
        }
        for m in &pending {
            report.marks_pending.push(PendingMark {
                object: m.object.clone(),
                packs: m.doc.packs.len() as u64,
                bytes: m
                    .doc
                    .packs
                    .iter()
                    .filter_map(|p| stored.get(&p.pack))
                    .map(|o| o.size)
                    .sum(),
                sweep_after: m.modified + grace,
            });
        }

        // Mark: what is garbage now, among packs older than the grace period.
        let view = if opts.dry_run || (report.index_objects_written == 0 && swept.is_empty()) {
            view
        } else {
            inner.index.refresh().await?;
            self.index_view(&live)?
        };
        let mut condemn: BTreeMap<PackId, bool> = BTreeMap::new(); // pack -> repack?
        for (pack, info) in &stored {
            if now - info.modified <= grace || still_condemned.contains(pack) {
                continue;
            }
            match view.stats.get(pack) {
                None => {
                    condemn.insert(*pack, false);
                    report.packs_condemned_unindexed += 1;
                }
                Some(s) if s.live_entries == 0 => {
                    condemn.insert(*pack, false);
                }
                Some(s)
                    if (s.bytes - s.live_bytes) as f64 > REPACK_GARBAGE_SHARE * s.bytes as f64 =>
                {
                    condemn.insert(*pack, true);
                }
                Some(_) => {}
            }
        }
        if condemn.is_empty() {
            self.remove_leases(&stale_leases, opts.dry_run, report)
                .await;
            return self.finish_report(report, opts.dry_run, &stored).await;
        }
        // Garbage lists for the mark; live chunks of the packs to repack.
        let mut garbage: HashMap<PackId, Vec<ChunkId>> = HashMap::new();
        let mut to_copy: BTreeMap<PackId, Vec<(ChunkId, Location)>> = BTreeMap::new();
        for (name, _) in &view.objects {
            inner.index.scan_object(name, |id, loc, _| {
                if view.owner.get(&loc.pack) != Some(name) || !condemn.contains_key(&loc.pack) {
                    return;
                }
                if !live.contains(id) {
                    garbage.entry(loc.pack).or_default().push(*id);
                } else if condemn.get(&loc.pack) == Some(&true) {
                    to_copy.entry(loc.pack).or_default().push((*id, *loc));
                }
            })?;
        }
        let blocked: HashSet<PackId> = condemn
            .keys()
            .copied()
            .chain(still_condemned.iter().copied())
            .collect();
        if !opts.dry_run && !to_copy.is_empty() {
            self.repack(&to_copy, &blocked, &stored, report, progress)
                .await?;
        } else {
            report.packs_repacked = to_copy.len() as u64;
            report.chunks_repacked = to_copy.values().map(|v| v.len() as u64).sum();
            report.bytes_repacked = to_copy
                .values()
                .flat_map(|v| v.iter().map(|(_, l)| l.length as u64))
                .sum();
        }
        stop(GcStep::Repacked, stopped)?;
        let mut packs = Vec::with_capacity(condemn.len());
        for pack in condemn.keys() {
            report.packs_condemned += 1;
            report.bytes_condemned += stored.get(pack).map_or(0, |o| o.size);
            packs.push(CondemnedPack {
                pack: *pack,
                garbage: garbage.remove(pack).unwrap_or_default(),
            });
        }
        let mark = GcMark {
            id: random_id()?,
            created_local: now_unix(),
            packs,
        };
        if !opts.dry_run {
            report.mark = Some(self.write_mark(&mark).await?);
        }
        stop(GcStep::Marked, stopped)?;
        self.remove_leases(&stale_leases, opts.dry_run, report)
            .await;
        self.finish_report(report, opts.dry_run, &stored).await
    }

    async fn finish_report(
        &self,
        report: &mut GcReport,
        dry_run: bool,
        stored: &HashMap<PackId, ObjectInfo>,
    ) -> Result<()> {
        self.abort_uploads(dry_run, report).await?;
        report.pack_bytes_after = if dry_run {
            stored.values().map(|o| o.size).sum()
        } else {
            self.list_packs().await?.values().map(|o| o.size).sum()
        };
        Ok(())
    }

    async fn list_packs(&self) -> Result<HashMap<PackId, ObjectInfo>> {
        Ok(
            backend::list(&*self.inner.backend, super::pack::PACKS_PREFIX)
                .await?
                .into_iter()
                .filter_map(|o| pack_id_from_key(&o.key).map(|id| (id, o)))
                .collect(),
        )
    }

    /// Every chunk id a manifest references: its entry list's metadata
    /// chunks and every entry's data chunks.
    async fn live_chunks(
        &self,
        report: &mut GcReport,
        progress: &dyn GcProgress,
    ) -> Result<HashSet<ChunkId>> {
        let names = self.list_manifests("").await?;
        progress.phase("reading manifests", names.len() as u64);
        let mut live = HashSet::new();
        for name in names {
            let doc = match self.read_manifest_doc(&name).await {
                Ok(d) => d,
                // Deleted since the listing (expire): it references nothing.
                Err(RepoError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            live.extend(doc.body.iter().map(|r| r.0));
            let m = self.read_entries(&name, doc).await?;
            for e in &m.entries {
                live.extend(e.chunks.iter().map(|c| c.0));
            }
            report.manifests += 1;
            progress.advance(1);
        }
        report.live_chunks = live.len() as u64;
        Ok(live)
    }

    /// Add to `live` the base of every delta copy of a live chunk, and
    /// theirs in turn: a chunk is only readable while its base is.
    fn add_bases(&self, live: &mut HashSet<ChunkId>) -> Result<()> {
        let index = &self.inner.index;
        loop {
            let mut found = Vec::new();
            for (name, _) in index.objects() {
                index.scan_object(&name, |id, loc, _| {
                    if let Some(b) = loc.base {
                        if live.contains(id) && !live.contains(&b) {
                            found.push(b);
                        }
                    }
                })?;
            }
            if found.is_empty() {
                return Ok(());
            }
            live.extend(found);
        }
    }

    /// Summarise the loaded index. A page that cannot be read aborts.
    fn index_view(&self, live: &HashSet<ChunkId>) -> Result<IndexView> {
        let index = &self.inner.index;
        let mut objects = index.objects();
        objects.sort();
        let mut object_packs: HashMap<String, HashSet<PackId>> = HashMap::new();
        let mut owner: HashMap<PackId, String> = HashMap::new();
        for (name, _) in &objects {
            let mut packs = HashSet::new();
            index.scan_object(name, |_, loc, _| {
                packs.insert(loc.pack);
            })?;
            for p in &packs {
                owner.entry(*p).or_insert_with(|| name.clone());
            }
            object_packs.insert(name.clone(), packs);
        }
        let mut stats: HashMap<PackId, PackStat> = HashMap::new();
        for (name, _) in &objects {
            index.scan_object(name, |id, loc, _| {
                if owner.get(&loc.pack) != Some(name) {
                    return;
                }
                let s = stats.entry(loc.pack).or_default();
                s.entries += 1;
                s.bytes += loc.length as u64;
                if live.contains(id) {
                    s.live_entries += 1;
                    s.live_bytes += loc.length as u64;
                }
            })?;
        }
        Ok(IndexView {
            objects,
            object_packs,
            owner,
            stats,
        })
    }

    /// Packs about to be swept that hold a live chunk with no copy in a
    /// pack that exists and is not condemned: a writer committed after the
    /// mark without seeing it. They are kept.
    fn still_needed(
        &self,
        sweep: &HashSet<PackId>,
        condemned: &HashSet<PackId>,
        stored: &HashMap<PackId, ObjectInfo>,
        live: &HashSet<ChunkId>,
        view: &IndexView,
    ) -> Result<HashSet<PackId>> {
        let index = &self.inner.index;
        let mut candidates: Vec<ChunkId> = Vec::new();
        for (name, _) in &view.objects {
            index.scan_object(name, |id, loc, _| {
                if sweep.contains(&loc.pack) && live.contains(id) {
                    candidates.push(*id);
                }
            })?;
        }
        let mut kept = HashSet::new();
        for id in candidates {
            let locs = index.lookup_all(&id)?;
            let safe = locs
                .iter()
                .any(|l| !condemned.contains(&l.pack) && stored.contains_key(&l.pack));
            if !safe {
                kept.extend(locs.iter().map(|l| l.pack).filter(|p| sweep.contains(p)));
            }
        }
        Ok(kept)
    }

    fn small_objects(&self, view: &IndexView) -> usize {
        view.objects
            .iter()
            .filter(|(_, n)| (*n as usize) < COMPACT_ENTRIES / 2)
            .count()
    }

    /// Write index objects without the `drop` packs, replacing every object
    /// that names one (and every small object, when there are enough to be
    /// worth merging). Returns the names of the replaced objects.
    async fn write_compacted(
        &self,
        view: &IndexView,
        drop: &HashSet<PackId>,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<Vec<String>> {
        let inner = &self.inner;
        let merge_small = self.small_objects(view) >= SMALL_INDEX_OBJECTS;
        let rewrite: Vec<&String> = view
            .objects
            .iter()
            .filter(|(name, n)| {
                view.object_packs[name].iter().any(|p| drop.contains(p))
                    || (merge_small && (*n as usize) < COMPACT_ENTRIES / 2)
            })
            .map(|(name, _)| name)
            .collect();
        if rewrite.is_empty() {
            return Ok(Vec::new());
        }
        let rewritten: HashSet<&String> = rewrite.iter().copied().collect();
        let kept_packs: HashSet<PackId> = view
            .objects
            .iter()
            .filter(|(name, _)| !rewritten.contains(name))
            .flat_map(|(name, _)| view.object_packs[name].iter().copied())
            .collect();
        let mut emitted: HashSet<PackId> = HashSet::new();
        let mut written: HashSet<String> = HashSet::new();
        let mut batch: Vec<(PackInfo, Vec<PackEntry>)> = Vec::new();
        let mut batch_entries = 0usize;
        for name in &rewrite {
            let mut packs: BTreeMap<PackId, (PackInfo, Vec<PackEntry>)> = BTreeMap::new();
            inner.index.scan_object(name, |id, loc, size| {
                if drop.contains(&loc.pack)
                    || kept_packs.contains(&loc.pack)
                    || emitted.contains(&loc.pack)
                {
                    return;
                }
                packs
                    .entry(loc.pack)
                    .or_insert_with(|| {
                        (
                            PackInfo {
                                id: loc.pack,
                                size,
                                kind: loc.kind,
                            },
                            Vec::new(),
                        )
                    })
                    .1
                    .push(PackEntry {
                        id: *id,
                        kind: loc.kind,
                        offset: loc.offset,
                        length: loc.length,
                        raw_length: loc.raw_length,
                        base: loc.base,
                    });
            })?;
            for (id, p) in packs {
                emitted.insert(id);
                batch_entries += p.1.len();
                batch.push(p);
                if batch_entries >= COMPACT_ENTRIES {
                    written.extend(
                        self.put_index(std::mem::take(&mut batch), dry_run, report)
                            .await?,
                    );
                    batch_entries = 0;
                }
            }
        }
        if !batch.is_empty() {
            written.extend(self.put_index(batch, dry_run, report).await?);
        }
        // An object written now may carry the name of one it replaces (the
        // same entries, sealed the same way, in the same second: possible
        // without encryption after an interrupted run); it must stay.
        Ok(rewrite
            .into_iter()
            .filter(|n| !written.contains(*n))
            .cloned()
            .collect())
    }

    /// Delete the index objects [`Self::write_compacted`] replaced. Returns
    /// the packs that must not be deleted because an object naming them
    /// could not be.
    async fn remove_superseded(
        &self,
        view: &IndexView,
        rewrite: &[String],
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<HashSet<PackId>> {
        let inner = &self.inner;
        let mut pinned = HashSet::new();
        for name in rewrite {
            if dry_run || self.delete(&index_object(name), report).await {
                report.index_objects_removed += 1;
            } else {
                pinned.extend(view.object_packs[name].iter().copied());
            }
        }
        if !dry_run {
            inner.index.refresh().await?;
        }
        Ok(pinned)
    }

    /// Write one index object; returns its name (None in a dry run).
    async fn put_index(
        &self,
        packs: Vec<(PackInfo, Vec<PackEntry>)>,
        dry_run: bool,
        report: &mut GcReport,
    ) -> Result<Option<String>> {
        report.index_objects_written += 1;
        if dry_run {
            return Ok(None);
        }
        let inner = self.inner.clone();
        let page = inner.config.index_page_entries as usize;
        let (name, bytes) = tokio::task::spawn_blocking(move || {
            build_index(&inner.sealer, &inner.repo_id, &packs, page)
        })
        .await??;
        backend::put_immutable(
            &*self.inner.backend,
            &index_object(&name),
            Bytes::from(bytes),
        )
        .await?;
        Ok(Some(name))
    }

    /// Copy live chunks out of mostly-garbage packs into new packs, through
    /// the writer (so they are indexed before the old pack is condemned).
    /// A chunk that already has a copy in a pack that stays is not copied.
    async fn repack(
        &self,
        to_copy: &BTreeMap<PackId, Vec<(ChunkId, Location)>>,
        blocked: &HashSet<PackId>,
        stored: &HashMap<PackId, ObjectInfo>,
        report: &mut GcReport,
        progress: &dyn GcProgress,
    ) -> Result<()> {
        let inner = &self.inner;
        let total: u64 = to_copy
            .keys()
            .filter_map(|p| stored.get(p))
            .map(|o| o.size)
            .sum();
        progress.phase("repacking", total);
        let writer = self.writer("gc-repack").await?;
        let mut copied: HashSet<ChunkId> = HashSet::new();
        for (pack, chunks) in to_copy {
            let mut need = Vec::new();
            for (id, loc) in chunks {
                if copied.contains(id) {
                    continue;
                }
                let elsewhere = inner
                    .index
                    .lookup_all(id)?
                    .iter()
                    .any(|l| !blocked.contains(&l.pack) && stored.contains_key(&l.pack));
                if !elsewhere {
                    need.push((*id, *loc));
                }
            }
            report.packs_repacked += 1;
            if need.is_empty() {
                continue;
            }
            let object = pack_object(pack);
            let bytes = backend::get(&*inner.backend, &object).await?;
            progress.advance(bytes.len() as u64);
            let inner2 = inner.clone();
            let want = pack.0;
            let sealed = tokio::task::spawn_blocking(move || -> Result<Vec<SealedChunk>> {
                if blake3::hash(&bytes).as_bytes() != &want {
                    return Err(RepoError::corrupt(
                        &object,
                        "content does not hash to its name",
                    ));
                }
                let keys = inner2.chunk_keys();
                let mut out = Vec::with_capacity(need.len());
                for (id, loc) in need {
                    let range = loc.offset as usize..loc.offset as usize + loc.length as usize;
                    let blob = bytes
                        .get(range)
                        .ok_or_else(|| RepoError::corrupt(&object, "indexed chunk out of range"))?;
                    // Copy only what opens: damage must not spread. (A
                    // delta is authenticated; its base is kept live.)
                    open_blob(&keys, loc.kind, &id, blob, loc.raw_length as usize, &object)?;
                    out.push(SealedChunk {
                        id,
                        kind: loc.kind,
                        blob: blob.to_vec(),
                        raw_length: loc.raw_length,
                        base: loc.base,
                    });
                }
                Ok(out)
            })
            .await??;
            for s in sealed {
                copied.insert(s.id);
                report.chunks_repacked += 1;
                report.bytes_repacked += s.blob.len() as u64;
                writer.add_sealed(s).await?;
            }
        }
        writer.flush().await?;
        writer.finish().await?;
        Ok(())
    }

    /// Delete one object; a refusal is recorded (once) and `false` returned.
    /// "Not found" counts as deleted: an earlier, interrupted run got there.
    async fn delete(&self, object: &str, report: &mut GcReport) -> bool {
        match self.inner.backend.delete(object).await {
            Ok(()) | Err(BackendError::NotFound) => true,
            Err(e) => {
                report.refused.push(RefusedDelete {
                    object: object.to_string(),
                    error: e.to_string(),
                });
                false
            }
        }
    }

    /// Abort uploads begun more than a grace period ago by the store's
    /// clock: no running writer is that old (a writer's session is shorter
    /// than the grace period). A refused abort is reported like a refused
    /// delete; a failed listing fails the run.
    async fn abort_uploads(&self, dry_run: bool, report: &mut GcReport) -> Result<()> {
        let b = &*self.inner.backend;
        let uploads = match b
            .incomplete_uploads()
            .await
            .map_err(|e| e.into_repo("list incomplete uploads", ""))?
        {
            UploadListing::Listed(u) => u,
            UploadListing::Unsupported(why) => {
                report.incomplete_uploads.note = Some(why);
                return Ok(());
            }
        };
        report.incomplete_uploads.checked = true;
        for u in uploads {
            report.incomplete_uploads.found += 1;
            if report.store_time - u.started <= report.grace_period_secs {
                report.incomplete_uploads.young += 1;
                continue;
            }
            if !dry_run {
                match b.abort_upload(&u).await {
                    Ok(()) | Err(BackendError::NotFound) => {}
                    Err(e) => {
                        report.refused.push(RefusedDelete {
                            object: format!("{} (incomplete upload {})", u.key, u.id),
                            error: e.to_string(),
                        });
                        continue;
                    }
                }
            }
            report.incomplete_uploads.aborted += 1;
            report.incomplete_uploads.bytes_aborted += u.size.unwrap_or(0);
        }
        Ok(())
    }

    async fn remove_leases(&self, stale: &[String], dry_run: bool, report: &mut GcReport) {
        for key in stale {
            if dry_run || self.delete(key, report).await {
                report.leases_removed += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::store::{entry, manifest};
    use crate::repo::{Encryption, GcParams, InitOptions, OpenOptions};

    async fn repo(dir: &std::path::Path) -> Repository {
        let init = InitOptions {
            encryption: Encryption::None,
            pack_target_size: 64 * 1024,
            gc: GcParams {
                grace_period_secs: 3600,
                max_writer_secs: 1800,
                ..GcParams::DEFAULT
            },
            ..InitOptions::default()
        };
        let opts = OpenOptions {
            cache_dir: Some(dir.join("cache")),
            ..OpenOptions::default()
        };
        let url = dir.join("repo").to_string_lossy().to_string();
        Repository::init(&url, &init, None, opts).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_younger_than_the_grace_period_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path()).await;
        let w = r.writer("t").await.unwrap();
        let s = w.store_bytes(vec![7u8; 300_000]).await.unwrap();
        w.commit(&manifest(
            "a/1",
            ciborium::Value::Null,
            vec![entry("f", s, ciborium::Value::Null)],
        ))
        .await
        .unwrap();
        w.finish().await.unwrap();
        r.delete_manifest("a/1").await.unwrap();
        let rep = r.gc(&GcOptions::default(), &()).await.unwrap();
        assert_eq!(rep.manifests, 0);
        assert_eq!(rep.live_chunks, 0);
        assert_eq!(rep.packs_condemned, 0, "{rep:?}");
        assert!(rep.mark.is_none());
        assert!(rep.pack_bytes_before > 0);
        assert_eq!(rep.pack_bytes_after, rep.pack_bytes_before);
        assert!(rep.clock_skew_secs.abs() <= 1, "local store, same clock");
        // The collector's own lease is gone once it finished.
        let leases = backend::list(&*r.backend(), LEASES_PREFIX).await.unwrap();
        assert!(leases.is_empty(), "{leases:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_grace_period_can_be_lengthened_never_shortened() {
        let dir = tempfile::tempdir().unwrap();
        let r = repo(dir.path()).await;
        let short = GcOptions {
            grace_period_secs: Some(60),
            ..GcOptions::default()
        };
        let e = r.gc(&short, &()).await.unwrap_err();
        assert!(e.to_string().contains("only be lengthened"), "{e}");
        assert!(backend::list(&*r.backend(), LEASES_PREFIX)
            .await
            .unwrap()
            .is_empty());
        let long = GcOptions {
            grace_period_secs: Some(7200),
            ..GcOptions::default()
        };
        assert_eq!(r.gc(&long, &()).await.unwrap().grace_period_secs, 7200);
    }
}
