//! `pgcairn list`: a line per backup, with what retention makes of it, and
//! each server's recovery window as the archive shows it.

use anyhow::Result;
use serde::Serialize;

use super::expire::configured_rules;
use super::{human_bytes, Ctx};
use crate::cli::{Format, ServerArg};
use crate::engine::retention::{self, ServerWindow, Status};
use crate::engine::utc_stamp;
use crate::repo::format::now_unix;
use crate::repo::Repository;

#[derive(Serialize)]
struct Row {
    server: String,
    id: String,
    end_time: i64,
    logical_bytes: u64,
    new_bytes_stored: u64,
    start_wal: String,
    stop_wal: String,
    self_contained: bool,
    /// kept, minimum_redundancy, pinned, obsolete or incomplete, under the
    /// server's configured retention policy.
    status: Status,
    status_reason: String,
    /// The server's recovery window (the same on every row of a server).
    recovery_window: Option<ServerWindow>,
}

/// The servers that have backups (one listing).
async fn servers_with_backups(repo: &Repository) -> Result<Vec<String>> {
    let mut out: Vec<String> = repo
        .list_manifests("backups/")
        .await?
        .iter()
        .filter_map(|n| n.split('/').nth(1).map(str::to_string))
        .collect();
    out.dedup();
    Ok(out)
}

/// A text line for a server's recovery window.
pub fn window_line(server: &str, w: Option<&ServerWindow>) -> String {
    let Some(w) = w else {
        return format!(
            "{server}: no backup with its WAL complete: no point in time is recoverable"
        );
    };
    let to = match (&w.latest_lsn, &w.latest_segment) {
        (Some(lsn), Some(seg)) => format!(
            "{lsn} on timeline {} (segment {seg}{})",
            w.timeline,
            w.latest_archived_time
                .map_or(String::new(), |t| format!(", archived {}", utc_stamp(t)))
        ),
        _ => "its end".to_string(),
    };
    let mut line = format!(
        "{server}: recoverable from {} (end of backup {}, {}) to {to}",
        utc_stamp(w.earliest_time),
        w.from_backup,
        w.earliest_lsn
    );
    if let Some(g) = w.gaps.first() {
        line.push_str(&format!(
            "; {} gap(s) in the archive after it, first {}..{} ({} segment(s)); newest archived {}",
            w.gaps.len(),
            g.first,
            g.last,
            g.segments,
            w.last_archived.as_deref().unwrap_or("?")
        ));
    }
    line
}

pub async fn run(ctx: &Ctx, a: ServerArg) -> Result<()> {
    let server = match &a.server {
        Some(_) => Some(ctx.server_name(&a)?),
        None if ctx.settings.server.len() == 1 => Some(ctx.server_name(&a)?),
        None => None,
    };
    let repo = ctx.open().await?;
    let servers = match server {
        Some(s) => vec![s],
        None => servers_with_backups(&repo).await?,
    };
    let now = now_unix();
    let mut per_server: Vec<(String, Vec<Row>, Option<ServerWindow>)> = Vec::new();
    for s in servers {
        let rules = configured_rules(ctx, &s)?;
        let facts = retention::load(&repo, &s).await?;
        let bf = facts.backup_facts()?;
        let verdicts = retention::classify(&bf, &rules, now);
        let window = facts.window(&repo, &bf).await?;
        let rows = facts
            .backups
            .iter()
            .zip(verdicts)
            .map(|(b, v)| Row {
                server: b.meta.server.clone(),
                id: b.meta.backup_id.clone(),
                end_time: b.meta.stop_time,
                logical_bytes: b.meta.logical_bytes,
                new_bytes_stored: b.meta.new_bytes_stored,
                start_wal: b.meta.start_wal.clone(),
                stop_wal: b.meta.stop_wal.clone(),
                self_contained: !b.meta.included_wal.is_empty(),
                status: v.status,
                status_reason: v.reason,
                recovery_window: window.clone(),
            })
            .collect();
        per_server.push((s, rows, window));
    }
    if ctx.global.format == Format::Json {
        let rows: Vec<&Row> = per_server.iter().flat_map(|s| &s.1).collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if per_server.iter().all(|s| s.1.is_empty()) {
        match per_server.first() {
            Some((s, _, _)) if per_server.len() == 1 => {
                let others: Vec<String> = servers_with_backups(&repo)
                    .await?
                    .into_iter()
                    .filter(|o| o != s)
                    .collect();
                if others.is_empty() {
                    outln!("no backups of server {s} in {}", repo.location());
                } else {
                    outln!(
                        "no backups of server {s} in {} (servers with backups there: {})",
                        repo.location(),
                        others.join(", ")
                    );
                }
            }
            _ => outln!("no backups in {}", repo.location()),
        }
    }
    for (s, rows, window) in &per_server {
        for r in rows {
            outln!(
                "{:<12} {}  ended {}  {:>10}  new {:>10}  WAL {}..{}  {}{}",
                r.server,
                r.id,
                utc_stamp(r.end_time),
                human_bytes(r.logical_bytes),
                human_bytes(r.new_bytes_stored),
                r.start_wal,
                r.stop_wal,
                r.status,
                if r.self_contained {
                    "  (WAL included)"
                } else {
                    ""
                }
            );
        }
        if !rows.is_empty() {
            outln!("{}", window_line(s, window.as_ref()));
        }
    }
    Ok(())
}
