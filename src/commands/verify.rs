//! `pgcairn verify [ID] [--read-data[=PERCENT]]`: exit 0 only when every
//! check passed; 2 when problems were found (each printed with the objects
//! and backups it affects); 1 when the verification itself could not run.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use super::{human_bytes, Ctx};
use crate::cli::{Format, VerifyArgs};
use crate::engine::verify;
use crate::repo::verify::VerifyProgress;

/// Exit code when verification ran and found problems.
pub const PROBLEMS_FOUND: u8 = 2;

struct Bar(Option<ProgressBar>);

impl VerifyProgress for Bar {
    fn reading(&self, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
        }
    }
    fn read(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
}

pub async fn run(ctx: &Ctx, a: VerifyArgs) -> Result<u8> {
    let server = match (&a.server.server, &a.id, ctx.settings.server.len()) {
        (Some(_), _, _) | (None, Some(_), _) | (None, None, 1) => Some(ctx.server_name(&a.server)?),
        _ => None,
    };
    let repo = ctx.open().await?;
    let id = match (&a.id, &server) {
        (Some(id), Some(s)) => Some(ctx.resolve_backup(&repo, s, id).await?),
        _ => None,
    };
    let id = id
        .as_deref()
        .map(|n| n.rsplit('/').next().unwrap_or(n).to_string());
    let bar = Bar(
        (a.read_data.is_some() && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(
            || {
                let b = ProgressBar::new(0);
                b.set_style(
                ProgressStyle::with_template(
                    "reading packs    [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
                b
            },
        ),
    );
    let result = verify::run(&repo, server.as_deref(), id.as_deref(), a.read_data, &bar).await?;
    if let Some(b) = &bar.0 {
        b.finish_and_clear();
    }
    let code = if result.is_clean() { 0 } else { PROBLEMS_FOUND };
    if ctx.global.format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(code);
    }
    let r = &result.repository;
    outln!(
        "checked {} manifests referencing {} chunks, {} index objects, {} packs{}",
        r.manifests_checked,
        r.chunks_referenced,
        r.index_objects,
        r.packs_indexed,
        if r.packs_unindexed > 0 {
            format!(" (+{} not yet indexed)", r.packs_unindexed)
        } else {
            String::new()
        }
    );
    if let Some(p) = r.read_data_percent {
        outln!(
            "read {} packs ({}, {} chunks) in full: {} % of the pack bytes this run",
            r.packs_read,
            human_bytes(r.bytes_read),
            r.chunks_read,
            p
        );
    }
    for p in &r.problems {
        outln!("PROBLEM {}: {}", p.object, p.problem);
        for m in &p.affects {
            outln!("        affects {m}");
        }
    }
    for b in &result.backups {
        if b.restorable {
            outln!("OK      {} {}: restorable", b.server, b.backup_id);
        } else {
            for p in &b.problems {
                outln!("FAILED  {} {}: {p}", b.server, b.backup_id);
            }
        }
    }
    for w in &result.windows {
        match (&w.window, &w.latest_lsn) {
            (Some(win), latest) => outln!(
                "WINDOW  {}: recoverable from {} (end of backup {}, {}) to {} on timeline {}",
                w.server,
                crate::engine::utc_stamp(win.earliest_time),
                win.from_backup,
                win.earliest_lsn,
                latest.as_deref().unwrap_or("its end"),
                w.latest_timeline.unwrap_or(win.timeline)
            ),
            (None, _) => outln!("WINDOW  {}: none", w.server),
        }
        for p in &w.problems {
            outln!("FAILED  {}: {p}", w.server);
        }
    }
    let bad = result.backups.iter().filter(|b| !b.restorable).count();
    if code == 0 {
        outln!("verify: OK, {} backup(s) restorable", result.backups.len());
    } else {
        outln!(
            "verify: FAILED, {} problem(s); {} of {} backup(s) restorable",
            r.problems.len()
                + result
                    .windows
                    .iter()
                    .map(|w| w.problems.len())
                    .sum::<usize>(),
            result.backups.len() - bad,
            result.backups.len()
        );
    }
    Ok(code)
}
