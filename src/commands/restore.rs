//! `pgcairn restore ID|latest TARGET`.

use std::sync::Arc;

use anyhow::Result;

use super::progress::Bar;
use super::{human_bytes, Ctx};
use crate::cli::RestoreArgs;
use crate::engine::restore::{run as restore, select_backup, RestoreOptions};
use crate::pg::recovery::{command_arg, RecoverySettings};
use crate::pg::timeline::parse_timestamp;

pub async fn run(ctx: &Ctx, a: RestoreArgs) -> Result<()> {
    let has_target = a.target_time.is_some()
        || a.target_xid.is_some()
        || a.target_lsn.is_some()
        || a.target_name.is_some()
        || a.target_immediate;
    if let Some(act @ ("pause" | "shutdown")) = a.target_action.as_deref() {
        if !has_target {
            anyhow::bail!(
                "--target-action {act} needs a recovery target (--target-time, --target-xid, --target-lsn, \
                 --target-name or --target-immediate): recovery to the end of the archive always promotes"
            );
        }
    }
    let server = ctx.server_name(&a.server)?;
    let mut map = Vec::new();
    for m in &a.tablespace_map {
        let (old, new) = m.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--tablespace-map {m:?}: expected OLD_DIRECTORY=NEW_DIRECTORY")
        })?;
        // A relative NEW would be a link resolved inside pg_tblspc.
        if !new.starts_with('/') {
            anyhow::bail!("--tablespace-map {m:?}: the new directory must be an absolute path");
        }
        let trim = |p: &str| match p.trim_end_matches('/') {
            "" => "/".to_string(),
            t => t.to_string(),
        };
        map.push((trim(old), trim(new)));
    }
    // The restored server's restore_command unlocks through the key cache.
    let repo = ctx.open_cached().await?;
    let target_time = a
        .target_time
        .as_deref()
        .map(parse_timestamp)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let target_lsn = a
        .target_lsn
        .as_deref()
        .map(|l| l.parse::<crate::pg::wal::Lsn>())
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let requested = a.target_timeline.as_deref().or(if a.target_immediate {
        Some("current")
    } else {
        None
    });
    let chosen = select_backup(
        &repo,
        &server,
        &a.id,
        target_time,
        target_lsn,
        (!a.no_recovery).then_some(requested),
    )
    .await?;
    for p in &chosen.passed_over {
        outln!("passed over backup {p}");
    }
    if let Some(w) = &chosen.warning {
        warnln!("pgcairn: WARNING: {w}");
    }
    let name = chosen.backup.name.clone();
    let recovery = match chosen.timeline {
        Some(tl) => Some(recovery_settings(ctx, &a, &server, tl, target_lsn)?),
        None => None,
    };
    let opts = RestoreOptions {
        target: a.target.clone(),
        jobs: a.jobs,
        tablespace_map: map,
        recovery: recovery.clone(),
        archive_mode_off: !a.keep_archive_mode,
        delta: a.delta,
    };
    let bar = Arc::new(Bar::new());
    let res = restore(&repo, &name, &opts, bar.clone()).await;
    bar.finish();
    let s = res?;
    let secs = s.duration.as_secs_f64();
    outln!(
        "restored backup {} of {} into {}: {} files, {} in {:.1}s ({:.0} MB/s), every chunk authenticated and every file's hash checked",
        s.meta.backup_id,
        s.meta.server,
        a.target.display(),
        s.files,
        human_bytes(s.bytes),
        secs,
        s.bytes as f64 / 1e6 / secs.max(0.001)
    );
    if a.delta {
        outln!(
            "delta: {} file(s) already matched the backup and were kept, {} file(s) or directories not in the backup were removed",
            s.unchanged, s.removed
        );
    }
    if let Some(r) = &recovery {
        outln!("recovery: recovery.signal and settings written to postgresql.auto.conf");
        outln!("  restore_command = {}", r.restore_command);
        if let Some((k, v)) = &r.target {
            outln!("  {k} = '{v}'");
        }
        outln!("  recovery_target_timeline = '{}'", r.timeline);
    }
    if opts.archive_mode_off {
        outln!("  archive_mode = off (so this copy never archives into the production history; --keep-archive-mode to keep it)");
    }
    for l in &s.replaced_settings {
        outln!("  commented out: {l}");
    }
    match &recovery {
        Some(r) if r.target.is_some() => outln!(
            "If the target is never reached, PostgreSQL stops with \"recovery ended before configured recovery target was reached\": \
             choose an earlier target or a backup that ended before it."
        ),
        Some(_) => {}
        None if s.meta.included_wal.is_empty() => {
            outln!("note: no recovery settings and this backup carries no WAL: PostgreSQL cannot reach a consistent state from it")
        }
        None => outln!(
            "no recovery settings: PostgreSQL replays the WAL carried in pg_wal and starts"
        ),
    }
    Ok(())
}

/// restore_command calls this same pgcairn with the same repository,
/// server and settings. Target values are written as pgcairn validated
/// them (PostgreSQL reads some numbers with C's base prefixes).
fn recovery_settings(
    ctx: &Ctx,
    a: &RestoreArgs,
    server: &str,
    timeline: u32,
    target_lsn: Option<crate::pg::wal::Lsn>,
) -> Result<RecoverySettings> {
    let exe = std::env::current_exe()?;
    let mut cmd = vec![command_arg(&exe.to_string_lossy())];
    cmd.push(format!("--repo {}", command_arg(&ctx.repo_url()?)));
    if let Some(c) = &ctx.global.config {
        cmd.push(format!(
            "--config {}",
            command_arg(&std::path::absolute(c)?.to_string_lossy())
        ));
    }
    if let Some(d) = ctx
        .global
        .cache_dir
        .clone()
        .or_else(|| ctx.settings.repository.cache_dir.clone())
    {
        cmd.push(format!(
            "--cache-dir {}",
            command_arg(&std::path::absolute(d)?.to_string_lossy())
        ));
    }
    if let Some(f) = &ctx.passphrase.file {
        cmd.push(format!(
            "--passphrase-file {}",
            command_arg(&std::path::absolute(f)?.to_string_lossy())
        ));
    }
    cmd.push(format!(
        "archive-get --server {} %f %p",
        command_arg(server)
    ));
    let target = if let Some(t) = &a.target_time {
        Some(("recovery_target_time", t.clone()))
    } else if let Some(x) = &a.target_xid {
        // Decimal (PostgreSQL would read a leading 0 as octal), and a
        // normal id: 0 to 2 never commit, so recovery would never stop.
        let xid = x
            .parse::<u64>()
            .ok()
            .filter(|v| !x.starts_with(['0', '+']) && (v & 0xFFFF_FFFF) >= 3);
        let xid = xid.ok_or_else(|| {
            anyhow::anyhow!("--target-xid {x:?}: expected a transaction id in decimal (3 or more)")
        })?;
        Some(("recovery_target_xid", xid.to_string()))
    } else if let Some(l) = target_lsn {
        Some(("recovery_target_lsn", l.to_string()))
    } else if let Some(n) = &a.target_name {
        Some(("recovery_target_name", n.clone()))
    } else if a.target_immediate {
        Some(("recovery_target", "immediate".to_string()))
    } else {
        None
    };
    // latest and current are PostgreSQL's own words; a number is written
    // as checked against the history files.
    let timeline = match a.target_timeline.as_deref() {
        None | Some("latest") if !a.target_immediate => "latest".to_string(),
        Some("current") | None => "current".to_string(),
        Some(_) => timeline.to_string(),
    };
    Ok(RecoverySettings {
        restore_command: cmd.join(" "),
        inclusive: !(a.target_exclusive && target.is_some()),
        target: target.map(|(k, v)| (k.to_string(), v)),
        timeline,
        action: a.target_action.clone().unwrap_or_else(|| "pause".into()),
    })
}
