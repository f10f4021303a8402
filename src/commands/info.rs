//! `pgcairn info`: format, object counts, stored vs logical bytes.

use anyhow::Result;

use super::{human_bytes, Ctx};
use crate::cli::Format;

pub async fn run(ctx: &Ctx) -> Result<()> {
    let repo = ctx.open().await?;
    let i = repo.info().await?;
    if ctx.global.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    println!("repository      {}", i.location);
    println!("id              {}", i.repository_id);
    println!("format version  {}", i.format_version);
    println!(
        "encryption      {}{}",
        i.encryption,
        if i.encryption == "none" {
            "  (NOT encrypted: readable by anyone with storage access)"
        } else {
            ""
        }
    );
    println!(
        "chunking        FastCDC min {} avg {} max {}; zstd level {}",
        human_bytes(i.chunker.min_size as u64),
        human_bytes(i.chunker.avg_size as u64),
        human_bytes(i.chunker.max_size as u64),
        i.compression_level
    );
    println!("keys            {}", i.keys);
    println!("manifests       {}", i.manifests);
    println!(
        "packs           {} ({})",
        i.packs,
        human_bytes(i.stored_bytes)
    );
    println!(
        "index           {} objects, {} entries",
        i.index_objects, i.index_entries
    );
    println!("logical bytes   {}", human_bytes(i.logical_bytes));
    println!("dedup ratio     {:.2}x (logical / stored)", i.dedup_ratio);
    println!("active leases   {}", i.leases);
    Ok(())
}
