//! `pgcairn list`: a line per backup.

use anyhow::Result;
use serde::Serialize;

use super::{human_bytes, Ctx};
use crate::cli::{Format, ServerArg};
use crate::engine::catalog::list_backups;
use crate::engine::utc_stamp;

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
}

pub async fn run(ctx: &Ctx, a: ServerArg) -> Result<()> {
    let server = match &a.server {
        Some(_) => Some(ctx.server_name(&a)?),
        None if ctx.settings.server.len() == 1 => Some(ctx.server_name(&a)?),
        None => None,
    };
    let repo = ctx.open().await?;
    let rows: Vec<Row> = list_backups(&repo, server.as_deref())
        .await?
        .into_iter()
        .map(|b| Row {
            server: b.meta.server,
            id: b.meta.backup_id,
            end_time: b.meta.stop_time,
            logical_bytes: b.meta.logical_bytes,
            new_bytes_stored: b.meta.new_bytes_stored,
            start_wal: b.meta.start_wal,
            stop_wal: b.meta.stop_wal,
            self_contained: !b.meta.included_wal.is_empty(),
        })
        .collect();
    if ctx.global.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no backups");
    }
    for r in rows {
        println!(
            "{:<12} {}  ended {}  {:>10}  new {:>10}  WAL {}..{}{}",
            r.server,
            r.id,
            utc_stamp(r.end_time),
            human_bytes(r.logical_bytes),
            human_bytes(r.new_bytes_stored),
            r.start_wal,
            r.stop_wal,
            if r.self_contained {
                "  (WAL included)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
