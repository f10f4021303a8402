//! `pgcairn keep ID [--note TEXT]` pins a backup so no retention policy
//! removes it (it keeps its own WAL, so it stays restorable to its end);
//! `--release` unpins it.

use anyhow::Result;

use super::Ctx;
use crate::cli::{Format, KeepArgs};
use crate::engine::retention::{self, PinOutcome};

pub async fn run(ctx: &Ctx, a: KeepArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let repo = ctx.open().await?;
    let name = ctx.resolve_backup(&repo, &server, &a.id).await?;
    let id = name.rsplit('/').next().unwrap_or(&name).to_string();
    let (pinned, changed) = if a.release {
        (false, retention::release(&repo, &server, &id).await?)
    } else {
        let note = a.note.as_deref().unwrap_or("");
        let r = retention::pin(&repo, &server, &id, note).await?;
        (true, r == PinOutcome::Pinned)
    };
    if ctx.global.format == Format::Json {
        println!(
            "{}",
            serde_json::json!({"server": server, "backup_id": id, "pinned": pinned, "changed": changed})
        );
        return Ok(());
    }
    match (pinned, changed) {
        (true, true) => {
            println!("backup {id} of server {server} is pinned: no retention policy removes it")
        }
        (true, false) => println!("backup {id} of server {server} was already pinned"),
        (false, true) => println!("backup {id} of server {server} is no longer pinned"),
        (false, false) => println!("backup {id} of server {server} was not pinned"),
    }
    Ok(())
}
