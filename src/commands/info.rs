//! `pgcairn info`: format, object counts, stored vs logical bytes.

use anyhow::Result;

use super::{human_bytes, Ctx};
use crate::cli::Format;

pub async fn run(ctx: &Ctx) -> Result<()> {
    let repo = ctx.open().await?;
    let i = repo.info().await?;
    if ctx.global.format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    outln!("repository      {}", i.location);
    outln!("id              {}", i.repository_id);
    outln!("format version  {}", i.format_version);
    outln!(
        "encryption      {}{}",
        i.encryption,
        if i.encryption == "none" {
            "  (NOT encrypted: readable by anyone with storage access)"
        } else {
            ""
        }
    );
    outln!(
        "chunking        FastCDC min {} avg {} max {}; zstd level {}",
        human_bytes(i.chunker.min_size as u64),
        human_bytes(i.chunker.avg_size as u64),
        human_bytes(i.chunker.max_size as u64),
        i.compression_level
    );
    outln!("keys            {}", i.keys);
    outln!("manifests       {}", i.manifests);
    outln!(
        "packs           {} ({})",
        i.packs,
        human_bytes(i.stored_bytes)
    );
    outln!(
        "index           {} objects, {} entries",
        i.index_objects,
        i.index_entries
    );
    outln!("logical bytes   {}", human_bytes(i.logical_bytes));
    outln!("dedup ratio     {:.2}x (logical / stored)", i.dedup_ratio);
    outln!("active leases   {}", i.leases);
    Ok(())
}
