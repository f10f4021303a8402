//! `pgcairn keep ID [--note TEXT] [--target standalone|full]` pins a backup
//! so no retention policy removes it, with its own WAL (standalone) or every
//! WAL file from its start on (full); `--release` unpins it.

use anyhow::{bail, Result};

use super::Ctx;
use crate::cli::{Format, KeepArgs, KeepTarget};
use crate::engine::retention::{self, PinOutcome, PinTarget};

pub async fn run(ctx: &Ctx, a: KeepArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let repo = ctx.open().await?;
    let name = ctx.resolve_backup(&repo, &server, &a.id).await?;
    let id = name.rsplit('/').next().unwrap_or(&name).to_string();
    let target = match a.target {
        KeepTarget::Standalone => PinTarget::Standalone,
        KeepTarget::Full => PinTarget::Full,
    };
    let (pinned, changed) = if a.release {
        (false, retention::release(&repo, &server, &id).await?)
    } else {
        let note = a.note.as_deref().unwrap_or("");
        match retention::pin(&repo, &server, &id, note, target).await? {
            PinOutcome::Pinned => (true, true),
            PinOutcome::AlreadyPinned(t) if t == target => (true, false),
            PinOutcome::AlreadyPinned(t) => bail!(
                "backup {id} of server {server} is already pinned with target {t}; to change it to {target}, \
                 run `pgcairn keep --release {id}` and then `pgcairn keep --target {target} {id}`, \
                 with no expire running in between"
            ),
        }
    };
    if ctx.global.format == Format::Json {
        let target = pinned.then(|| target.to_string());
        outln!(
            "{}",
            serde_json::json!({"server": server, "backup_id": id, "pinned": pinned, "target": target, "changed": changed})
        );
        return Ok(());
    }
    let keeps = match target {
        PinTarget::Standalone => "its own WAL stays, so it restores to its end point",
        PinTarget::Full => {
            "every WAL file from its start on stays, so it restores to any later point"
        }
    };
    match (pinned, changed) {
        (true, true) => {
            outln!(
                "backup {id} of server {server} is pinned: no retention policy removes it; {keeps}"
            )
        }
        (true, false) => outln!("backup {id} of server {server} was already pinned ({target})"),
        (false, true) => outln!("backup {id} of server {server} is no longer pinned"),
        (false, false) => outln!("backup {id} of server {server} was not pinned"),
    }
    Ok(())
}
