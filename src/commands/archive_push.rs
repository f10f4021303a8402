//! `pgcairn archive-push %p` (archive_command). Quiet on success: it runs
//! under PostgreSQL's log. Exit 0 only once the file is durable.

use anyhow::Result;

use super::Ctx;
use crate::cli::ArchivePushArgs;
use crate::engine::archive::{push, PushOutcome};

pub async fn run(ctx: &Ctx, a: ArchivePushArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let repo = ctx.open_cached().await?;
    if let PushOutcome::StoredAs(alt) = push(&repo, &server, &a.path).await? {
        eprintln!(
            "pgcairn: WARNING: a different {} was already archived (two promotions from one timeline?); this one is stored as {alt}",
            a.path.display()
        );
    }
    Ok(())
}
