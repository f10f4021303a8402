//! `pgcairn gc [--dry-run]`: two-phase garbage collection. A run sweeps
//! marks whose grace period has passed and marks what is garbage now; the
//! space is reclaimed one grace period after it became garbage.

use anyhow::Result;

use super::progress::Bar;
use super::{human_bytes, Ctx};
use crate::cli::{Format, GcArgs};
use crate::engine::Progress;
use crate::repo::gc::{GcOptions, GcProgress, GcReport};
use crate::repo::Repository;

struct GcBar(Bar);

impl GcProgress for GcBar {
    fn phase(&self, name: &str, total: u64) {
        self.0.phase(name, total);
    }
    fn advance(&self, n: u64) {
        self.0.advance(n);
    }
}

pub async fn run(ctx: &Ctx, a: GcArgs) -> Result<()> {
    let repo = ctx.open().await?;
    let opts = GcOptions {
        dry_run: a.dry_run,
        grace_period_secs: a.grace_period,
        stop_after: None,
    };
    let r = with_bar(&repo, &opts).await?;
    if ctx.global.format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print_report(&r)
}

/// One collection with the repository's own grace period (`expire --gc`).
pub async fn collect(repo: &Repository) -> Result<GcReport> {
    with_bar(repo, &GcOptions::default()).await
}

async fn with_bar(repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
    let bar = GcBar(Bar::new());
    let r = repo.gc(opts, &bar).await;
    bar.0.finish();
    Ok(r?)
}

pub fn print_report(r: &GcReport) -> Result<()> {
    let would = if r.dry_run { "would be " } else { "" };
    if r.dry_run {
        outln!("dry run: nothing was written or deleted (ages by the local clock)");
    }
    outln!(
        "{} manifests reference {} chunks; packs hold {}",
        r.manifests,
        r.live_chunks,
        human_bytes(r.pack_bytes_before)
    );
    outln!(
        "sweep: {} mark(s) due, {} pack(s) {would}deleted, {} {would}reclaimed; index: {} object(s) {would}written, {} {would}removed",
        r.marks_swept,
        r.packs_swept,
        human_bytes(r.bytes_reclaimed),
        r.index_objects_written,
        r.index_objects_removed
    );
    for p in &r.packs_kept {
        outln!("  kept {p}: a backup committed since the mark needs it");
    }
    outln!(
        "mark: {} pack(s) ({}) {would}condemned, {} of them unindexed leftovers; {} pack(s) {would}repacked ({} live chunks, {} copied)",
        r.packs_condemned,
        human_bytes(r.bytes_condemned),
        r.packs_condemned_unindexed,
        r.packs_repacked,
        r.chunks_repacked,
        human_bytes(r.bytes_repacked)
    );
    for m in &r.marks_pending {
        outln!(
            "  pending {}: {} pack(s), {}, swept by a run after {} (store time)",
            m.object,
            m.packs,
            human_bytes(m.bytes),
            crate::engine::utc_stamp(m.sweep_after)
        );
    }
    if r.leases_removed > 0 {
        outln!("removed {} stale lease(s)", r.leases_removed);
    }
    let u = &r.incomplete_uploads;
    match &u.note {
        Some(why) if !u.checked => outln!("incomplete uploads: {why}"),
        _ => outln!(
            "incomplete uploads: {} found, {} {would}aborted ({}), {} younger than the grace period left",
            u.found,
            u.aborted,
            human_bytes(u.bytes_aborted),
            u.young
        ),
    }
    for d in &r.refused {
        warnln!(
            "WARNING: the store refused to delete {} ({}); object lock or permissions? It is left in place and tried again by the next run only",
            d.object, d.error
        );
    }
    outln!(
        "packs: {} before, {} after",
        human_bytes(r.pack_bytes_before),
        human_bytes(r.pack_bytes_after)
    );
    Ok(())
}
