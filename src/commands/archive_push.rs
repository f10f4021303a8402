//! `pgcairn archive-push %p` (archive_command). Quiet on success: it runs
//! under PostgreSQL's log. Exit 0 only once the file is durable.

use anyhow::Result;

use super::Ctx;
use crate::cli::ArchivePushArgs;
use crate::engine::archive::{push_with_lookahead, LookAhead, PushOutcome};

pub async fn run(ctx: &Ctx, a: ArchivePushArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let repo = ctx.open_cached().await?;
    let la = LookAhead {
        records: ctx
            .cache_root()
            .join(repo.config().repo_id_hex())
            .join("archive-ahead")
            .join(&server),
        max: a.lookahead,
    };
    if let PushOutcome::StoredAs(alt) = push_with_lookahead(&repo, &server, &a.path, &la)
        .await?
        .outcome
    {
        warnln!(
            "pgcairn: WARNING: a different {} was already archived (two promotions from one timeline?); this one is stored as {alt}",
            a.path.display()
        );
    }
    Ok(())
}
