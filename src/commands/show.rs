//! `pgcairn show ID|latest`: everything a backup records.

use anyhow::Result;

use super::expire::configured_rules;
use super::list::window_line;
use super::{human_bytes, Ctx};
use crate::cli::{Format, ShowArgs};
use crate::engine::catalog::{from_value, BackupMeta};
use crate::engine::retention;
use crate::engine::utc_stamp;
use crate::repo::format::now_unix;

pub async fn run(ctx: &Ctx, a: ShowArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let repo = ctx.open().await?;
    let name = ctx.resolve_backup(&repo, &server, &a.id).await?;
    let meta: BackupMeta = from_value(&repo.manifest_meta(&name).await?, &name)?;
    let info = repo.info().await?;
    // What retention makes of it, and the server's recovery window.
    let facts = retention::load(&repo, &server).await?;
    let bf = facts.backup_facts()?;
    let rules = configured_rules(ctx, &server)?;
    let verdict = retention::classify(&bf, &rules, now_unix())
        .into_iter()
        .find(|v| v.backup_id == meta.backup_id);
    let window = facts.window(&repo, &bf).await?;
    let pin = facts.pins.get(&meta.backup_id);
    let dedup = if meta.new_bytes_stored == 0 {
        f64::INFINITY
    } else {
        meta.logical_bytes as f64 / meta.new_bytes_stored as f64
    };
    let throughput = meta.logical_bytes as f64 / 1e6 / meta.duration_secs.max(0.001);
    if ctx.global.format == Format::Json {
        let mut v = serde_json::to_value(&meta)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("manifest".into(), name.clone().into());
            o.insert("throughput_mb_s".into(), throughput.into());
            o.insert(
                "dedup_ratio".into(),
                if dedup.is_finite() {
                    dedup.into()
                } else {
                    serde_json::Value::Null
                },
            );
            o.insert("repository_dedup_ratio".into(), info.dedup_ratio.into());
            if let Some(v) = &verdict {
                o.insert("status".into(), serde_json::to_value(v.status)?);
                o.insert("status_reason".into(), v.reason.clone().into());
            }
            o.insert("pin".into(), serde_json::to_value(pin)?);
            o.insert("recovery_window".into(), serde_json::to_value(&window)?);
        }
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    outln!(
        "backup           {} (server {})",
        meta.backup_id,
        meta.server
    );
    outln!("label            {}", meta.label);
    if let Some(v) = &verdict {
        outln!("status           {}: {}", v.status, v.reason);
    }
    if let Some(p) = pin {
        outln!(
            "pinned           since {}, target {}{}",
            utc_stamp(p.pinned),
            p.target,
            if p.note.is_empty() {
                String::new()
            } else {
                format!(": {}", p.note)
            }
        );
    }
    outln!("recovery window  {}", window_line(&server, window.as_ref()));
    outln!(
        "started / ended  {} / {}",
        utc_stamp(meta.start_time),
        utc_stamp(meta.stop_time)
    );
    outln!(
        "LSN              {} .. {} (timeline {})",
        meta.start_lsn,
        meta.stop_lsn,
        meta.timeline
    );
    outln!("WAL              {} .. {}", meta.start_wal, meta.stop_wal);
    outln!(
        "PostgreSQL       {} ({}), system identifier {}",
        meta.pg_version,
        meta.pg_version_num,
        meta.system_identifier
    );
    outln!(
        "cluster          block size {}, WAL segment {}, data checksums {}",
        meta.block_size,
        human_bytes(meta.wal_segment_size),
        if meta.data_checksums { "on" } else { "off" }
    );
    for t in &meta.tablespaces {
        outln!(
            "tablespace       {} (oid {}) at {}",
            t.name,
            t.oid,
            t.location
        );
    }
    outln!(
        "files            {}, {}",
        meta.files,
        human_bytes(meta.logical_bytes)
    );
    outln!(
        "stored           {} new ({} before compression), {} reused; this backup's dedup {}, repository {:.2}x",
        human_bytes(meta.new_bytes_stored),
        human_bytes(meta.new_bytes_raw),
        human_bytes(meta.reused_bytes),
        if dedup.is_finite() {
            format!("{dedup:.1}x")
        } else {
            "total (nothing new)".to_string()
        },
        info.dedup_ratio
    );
    if meta.unchanged_files > 0 {
        outln!(
            "unchanged        {} file(s), {}, taken from the previous backup without reading",
            meta.unchanged_files,
            human_bytes(meta.unchanged_bytes)
        );
    }
    outln!(
        "duration         {:.1}s ({:.0} MB/s)",
        meta.duration_secs,
        throughput
    );
    if !meta.included_wal.is_empty() {
        outln!("WAL included     {} file(s)", meta.included_wal.len());
    }
    outln!("bad pages        {}", meta.bad_pages.len());
    for b in &meta.bad_pages {
        outln!(
            "  {} block {}: stored {:#06x}, computed {:#06x}",
            b.path,
            b.block,
            b.stored,
            b.computed
        );
    }
    outln!("backup_label:\n{}", meta.backup_label.trim_end());
    if let Some(map) = meta.tablespace_map.as_deref().filter(|m| !m.is_empty()) {
        outln!("tablespace_map:\n{}", map.trim_end());
    }
    Ok(())
}
