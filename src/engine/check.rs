//! `check`: is this server's backup setup working right now?

use std::time::{Duration, Instant};

use serde::Serialize;

use super::catalog::{list_backups, wal_name};
use super::Result;
use crate::pg::conn::Session;
use crate::pg::wal::{segment_name, WalFile};
use crate::repo::Repository;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What to do when it failed.
    pub hint: Option<String>,
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: true,
        detail: detail.into(),
        hint: None,
    }
}

fn failed(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: false,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

/// Wait until the WAL file `file` of `timeline` is in the repository.
async fn archived_within(
    repo: &Repository,
    server: &str,
    sysid: u64,
    timeline: u32,
    file: &str,
    timeout: Duration,
) -> Result<bool> {
    let name = wal_name(server, sysid, timeline, file);
    let prefix = wal_name(server, sysid, timeline, "");
    let deadline = Instant::now() + timeout;
    loop {
        if repo.list_manifests(&prefix).await?.contains(&name) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Run every check; a failed one does not stop the others where they
/// can still run.
pub async fn run(
    repo: &Repository,
    server: &str,
    conninfo: &str,
    timeout: Duration,
) -> Result<Vec<Check>> {
    let mut out = vec![ok(
        "repository",
        format!(
            "{} opened and unlocked (format {})",
            repo.location(),
            repo.config().format_version
        ),
    )];
    let session = match Session::connect(conninfo).await {
        Ok(s) => {
            out.push(ok("connection", format!("connected ({conninfo})")));
            s
        }
        Err(e) => {
            out.push(failed(
                "connection",
                e.to_string(),
                "check that PostgreSQL runs and that --conninfo (or conninfo in [server.NAME]) is right",
            ));
            return Ok(out);
        }
    };
    let info = session.server_info().await?;
    if info.archive_mode == "off" {
        out.push(failed(
            "archive_mode",
            "archive_mode is off",
            "set archive_mode = on in postgresql.conf and restart PostgreSQL",
        ));
    } else {
        out.push(ok(
            "archive_mode",
            format!("archive_mode is {}", info.archive_mode),
        ));
    }
    if info.archive_command.contains("pgcairn") && info.archive_command.contains("archive-push") {
        out.push(ok("archive_command", info.archive_command.clone()));
    } else {
        out.push(failed(
            "archive_command",
            format!("archive_command is {:?}", info.archive_command),
            "set archive_command = 'pgcairn archive-push %p' (with --config or --repo/--server as needed) and reload",
        ));
    }
    // A forced WAL switch must reach the repository.
    if !info.in_recovery {
        session.commit_marker().await?;
        let lsn = session.switch_wal().await?;
        let file = session.walfile_name(lsn).await?;
        if archived_within(
            repo,
            server,
            info.system_identifier,
            info.timeline,
            &file,
            timeout,
        )
        .await?
        {
            out.push(ok(
                "wal archiving",
                format!("{file} arrived in the repository after a forced WAL switch"),
            ));
        } else {
            out.push(failed(
                "wal archiving",
                format!(
                    "{file} did not arrive within {}s of a forced WAL switch",
                    timeout.as_secs()
                ),
                "look at pg_stat_archiver and the PostgreSQL log for archive-push errors",
            ));
        }
    }
    // The newest backup's WAL must be there.
    let backups = list_backups(repo, Some(server)).await?;
    match backups.last() {
        None => out.push(failed("backup wal", "no backups yet", "run pgcairn backup")),
        Some(b) if !b.meta.included_wal.is_empty() => out.push(ok(
            "backup wal",
            format!("backup {} carries its WAL", b.meta.backup_id),
        )),
        Some(b) => {
            let seg = b.meta.wal_segment_size;
            let (Some(WalFile::Segment { segno: a, .. }), Some(WalFile::Segment { segno: z, .. })) = (
                WalFile::parse(&b.meta.start_wal, seg),
                WalFile::parse(&b.meta.stop_wal, seg),
            ) else {
                out.push(failed(
                    "backup wal",
                    "unreadable WAL range in the backup",
                    "run pgcairn verify",
                ));
                return Ok(out);
            };
            let tl = b.meta.timeline;
            let have = repo
                .list_manifests(&wal_name(server, b.meta.system_identifier, tl, ""))
                .await?;
            let missing: Vec<String> = (a..=z)
                .map(|s| segment_name(tl, s, seg))
                .filter(|n| !have.contains(&wal_name(server, b.meta.system_identifier, tl, n)))
                .collect();
            if missing.is_empty() {
                out.push(ok(
                    "backup wal",
                    format!(
                        "WAL {}..{} of backup {} is in the repository",
                        b.meta.start_wal, b.meta.stop_wal, b.meta.backup_id
                    ),
                ));
            } else {
                out.push(failed(
                    "backup wal",
                    format!("backup {} lacks {}", b.meta.backup_id, missing.join(", ")),
                    "that backup cannot be restored to a consistent state; take a new backup and check archiving",
                ));
            }
        }
    }
    Ok(out)
}
