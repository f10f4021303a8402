//! `pgcairn check`: OK/FAILED per check with a hint; non-zero on any failure.

use std::time::Duration;

use anyhow::{Context, Result};

use super::Ctx;
use crate::cli::{CheckArgs, Format};
use crate::engine::check::{run as check, Check};

pub async fn run(ctx: &Ctx, a: CheckArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let conninfo = a
        .conninfo
        .or(ctx.server_settings(&server).conninfo)
        .with_context(|| format!("no connection for server {server}: pass --conninfo or set conninfo in [server.{server}]"))?;
    let results: Vec<Check> = match ctx.open().await {
        Ok(repo) => check(&repo, &server, &conninfo, Duration::from_secs(a.timeout)).await?,
        Err(e) => vec![Check {
            name: "repository".into(),
            ok: false,
            detail: format!("{e:#}"),
            hint: Some(
                "check --repo, the passphrase source, and that the storage is reachable".into(),
            ),
        }],
    };
    if ctx.global.format == Format::Json {
        outln!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for c in &results {
            outln!(
                "{:<16} {:<6} {}",
                c.name,
                if c.ok { "OK" } else { "FAILED" },
                c.detail
            );
            if let Some(h) = &c.hint {
                outln!("{:<16} {:<6} hint: {h}", "", "");
            }
        }
    }
    let failed = results.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}
