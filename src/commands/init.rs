//! `pgcairn init`: create a repository.

use anyhow::Result;

use super::Ctx;
use crate::cli::{EncryptionArg, InitArgs};
use crate::passphrase::new_passphrase;
use crate::repo::crypto::KdfParams;
use crate::repo::{ChunkerParams, Encryption, InitOptions, Repository};

pub async fn run(ctx: &Ctx, a: InitArgs) -> Result<()> {
    let url = ctx.repo_url()?;
    let mut opts = InitOptions {
        kdf: KdfParams::from_env()?,
        ..InitOptions::default()
    };
    if let Some(l) = a.compression.or(ctx.settings.repository.compression) {
        opts.compression.level = l;
    }
    if let Some(avg) = a.chunk_avg {
        // Relation files are cut in blocks of 4 pages (up to 4 × 32 KiB),
        // which must fit in one chunk.
        const MIN_AVG: u32 = 32 * 1024;
        if avg < MIN_AVG {
            anyhow::bail!(
                "--chunk-avg {avg}: must be at least {MIN_AVG}, so that four PostgreSQL pages \
                 (up to 32 KiB each) fit in the largest chunk (4 × the average)"
            );
        }
        opts.chunker = ChunkerParams {
            min_size: avg / 4,
            avg_size: avg,
            max_size: avg.saturating_mul(4),
        };
    }
    if let Some(p) = a.pack_size {
        opts.pack_target_size = p;
    }
    if let Some(g) = a.gc_grace_secs {
        opts.gc.grace_period_secs = g;
    }
    if let Some(w) = a.gc_max_writer_secs {
        opts.gc.max_writer_secs = w;
    }
    let pw = match a.encryption {
        EncryptionArg::Repokey => {
            opts.encryption = Encryption::Xchacha20poly1305;
            Some(new_passphrase(Some(&ctx.passphrase)).map_err(anyhow::Error::msg)?)
        }
        EncryptionArg::None => {
            opts.encryption = Encryption::None;
            None
        }
    };
    let repo = Repository::init(
        &url,
        &opts,
        pw.as_ref().map(|p| p.as_slice()),
        ctx.open_options(),
    )
    .await?;
    let c = repo.config();
    outln!(
        "created repository {} at {}",
        c.repo_id_hex(),
        repo.location()
    );
    match c.encryption {
        Encryption::None => outln!(
            "WARNING: this repository is NOT encrypted. Anyone who can read {} can read every backup in it.",
            repo.location()
        ),
        Encryption::Xchacha20poly1305 => outln!(
            "encryption: XChaCha20-Poly1305, master key wrapped by argon2id (key {}). Keep the passphrase safe: without it the repository cannot be read.",
            repo.current_key()
        ),
    }
    Ok(())
}
