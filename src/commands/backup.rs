//! `pgcairn backup`: back up a running cluster.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::progress::Bar;
use super::{human_bytes, Ctx};
use crate::cli::BackupArgs;
use crate::engine::backup::{run as backup, BackupOptions};

pub async fn run(ctx: &Ctx, a: BackupArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let ss = ctx.server_settings(&server);
    let pgdata = a
        .pgdata
        .or(ss.pgdata)
        .with_context(|| format!("no data directory for server {server}: pass --pgdata or set pgdata in [server.{server}]"))?;
    let conninfo = a
        .conninfo
        .or(ss.conninfo)
        .with_context(|| format!("no connection for server {server}: pass --conninfo or set conninfo in [server.{server}]"))?;
    let repo = ctx.open().await?;
    let opts = BackupOptions {
        server,
        pgdata,
        conninfo,
        label: a.label,
        fast_checkpoint: a.fast_checkpoint,
        jobs: a.jobs,
        include_wal: a.include_wal,
        wal_timeout: Duration::from_secs(a.wal_timeout),
        read_all: a.read_all,
    };
    let bar = Arc::new(Bar::new());
    let res = backup(&repo, &opts, bar.clone()).await;
    bar.finish();
    let s = res?;
    let m = &s.meta;
    let mbps = m.logical_bytes as f64 / 1e6 / m.duration_secs.max(0.001);
    let deltas = match &s.deltas_against {
        Some(prev) => format!(
            "; {} unchanged file(s) ({}) taken from {prev} without reading, {} changed block(s) as deltas against it",
            s.unchanged_files,
            human_bytes(s.unchanged_bytes),
            s.stats.chunks_delta
        ),
        None => String::new(),
    };
    outln!(
        "backup {} of {}: {} files, {} in {:.1}s ({:.0} MB/s); new {} stored ({} before compression), reused {}; WAL {}..{}{deltas}",
        m.backup_id,
        m.server,
        m.files,
        human_bytes(m.logical_bytes),
        m.duration_secs,
        mbps,
        human_bytes(m.new_bytes_stored),
        human_bytes(m.new_bytes_raw),
        human_bytes(m.reused_bytes),
        m.start_wal,
        m.stop_wal
    );
    for w in &s.warnings {
        warnln!("WARNING: {w}");
    }
    if !m.bad_pages.is_empty() {
        warnln!(
            "WARNING: {} page(s) failed their checksum (listed by `pgcairn show {}`):",
            m.bad_pages.len(),
            m.backup_id
        );
        for b in m.bad_pages.iter().take(20) {
            warnln!(
                "  {} block {}: stored {:#06x}, computed {:#06x}",
                b.path,
                b.block,
                b.stored,
                b.computed
            );
        }
    }
    Ok(())
}
