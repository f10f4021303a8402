//! `pgcairn restore ID|latest TARGET`.

use std::sync::Arc;

use anyhow::Result;

use super::progress::Bar;
use super::{human_bytes, Ctx};
use crate::cli::RestoreArgs;
use crate::engine::restore::{run as restore, RestoreOptions};

pub async fn run(ctx: &Ctx, a: RestoreArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let mut map = Vec::new();
    for m in &a.tablespace_map {
        let (old, new) = m.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--tablespace-map {m:?}: expected OLD_DIRECTORY=NEW_DIRECTORY")
        })?;
        map.push((old.to_string(), new.to_string()));
    }
    let repo = ctx.open().await?;
    let name = ctx.resolve_backup(&repo, &server, &a.id).await?;
    let opts = RestoreOptions {
        target: a.target.clone(),
        jobs: a.jobs,
        tablespace_map: map,
    };
    let bar = Arc::new(Bar::new());
    let res = restore(&repo, &name, &opts, bar.clone()).await;
    bar.finish();
    let s = res?;
    let secs = s.duration.as_secs_f64();
    println!(
        "restored backup {} of {} into {}: {} files, {} in {:.1}s ({:.0} MB/s), every chunk authenticated and every file's hash checked",
        s.meta.backup_id,
        s.meta.server,
        a.target.display(),
        s.files,
        human_bytes(s.bytes),
        secs,
        s.bytes as f64 / 1e6 / secs.max(0.001)
    );
    if s.meta.included_wal.is_empty() {
        println!("note: this backup does not carry its WAL; PostgreSQL needs the archived WAL (restore_command) to reach a consistent state");
    }
    Ok(())
}
