//! `pgcairn archive-get %f %p` (restore_command). PostgreSQL reads exit
//! codes 1 to 125 as "absent" and ends recovery there, so this exits 1 only
//! when a direct lookup confirmed the file is not in the repository; every
//! other failure exits 255 (main.rs), which stops PostgreSQL instead. A
//! standby therefore stops too while the repository is unreachable.

use anyhow::Result;

use super::Ctx;
use crate::cli::ArchiveGetArgs;
use crate::engine::archive::{get_with_prefetch, GetOutcome, Spool};

/// Returns the exit code: 0 restored, 1 confirmed absent.
pub async fn run(ctx: &Ctx, a: ArchiveGetArgs) -> Result<u8> {
    let server = ctx.server_name(&a.server)?;
    let repo = ctx.open_cached().await?;
    let spool = Spool {
        dir: ctx
            .cache_root()
            .join(repo.config().repo_id_hex())
            .join("spool")
            .join(&server),
        max: a.prefetch,
    };
    match get_with_prefetch(&repo, &server, &a.file, &a.dest, &spool).await? {
        GetOutcome::Restored => Ok(0),
        GetOutcome::Absent => Ok(1),
    }
}
