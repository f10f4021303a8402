//! `pgcairn delete ID`: remove one backup and the WAL only it needed;
//! refused for a pinned backup, and below `minimum_redundancy` unless
//! `--force`.

use anyhow::Result;

use super::expire::{configured_rules, print_and_run};
use super::Ctx;
use crate::cli::DeleteArgs;
use crate::engine::retention;
use crate::repo::format::now_unix;

pub async fn run(ctx: &Ctx, a: DeleteArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let rules = configured_rules(ctx, &server)?;
    let repo = ctx.open().await?;
    let name = ctx.resolve_backup(&repo, &server, &a.id).await?;
    let id = name.rsplit('/').next().unwrap_or(&name).to_string();
    let facts = retention::load(&repo, &server).await?;
    let backups = facts.backup_facts()?;
    let plan = retention::plan_delete(
        &facts.archive,
        &backups,
        &id,
        rules.minimum_redundancy,
        a.force,
        now_unix(),
    )
    .map_err(|e| anyhow::anyhow!("server {server}: {e}"))?;
    if let Some(json) = print_and_run(ctx, &repo, &plan, a.dry_run).await? {
        outln!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}
