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
/// can still run, and an error in one is reported as its failure.
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
            out.push(ok(
                "connection",
                format!("connected ({})", crate::pg::conn::redact(conninfo)),
            ));
            s
        }
        Err(e) => {
            out.push(failed(
                "connection",
                e.to_string(),
                "check that PostgreSQL runs and that --conninfo (or conninfo in [server.NAME]) is right",
            ));
            out.push(backup_wal(repo, server).await);
            return Ok(out);
        }
    };
    let info = match session.server_info().await {
        Ok(i) => i,
        Err(e) => {
            out.push(failed(
                "server",
                e.to_string(),
                "the connection's role must be able to read the server settings (grant pg_read_all_settings)",
            ));
            out.push(backup_wal(repo, server).await);
            return Ok(out);
        }
    };
    if info.in_recovery {
        out.push(failed(
            "server",
            "the server is a standby (in recovery): it archives nothing with archive_mode = on, and backup refuses it",
            "point conninfo at the primary (standby backups are not supported yet)",
        ));
    }
    let same_cluster = match super::archive::registered_sysid(repo, server).await {
        Ok(Some(id)) if id != info.system_identifier => {
            out.push(failed(
                "system identifier",
                format!(
                    "server {server} in this repository is the cluster with system identifier {id}, \
                     but this cluster has {}: archive-push and backup refuse it",
                    info.system_identifier
                ),
                "use another server name for a different cluster (a pg_upgrade or a new initdb makes a new cluster)",
            ));
            false
        }
        Ok(Some(id)) => {
            out.push(ok("system identifier", format!("{id}, as registered")));
            true
        }
        Ok(None) => {
            out.push(ok(
                "system identifier",
                format!(
                    "{}; server {server} is not registered yet (its first WAL file or backup registers it)",
                    info.system_identifier
                ),
            ));
            true
        }
        Err(e) => {
            out.push(failed(
                "system identifier",
                e.to_string(),
                "run pgcairn verify on the repository",
            ));
            false
        }
    };
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
    if !info.in_recovery && same_cluster {
        out.push(
            wal_arrives(repo, server, &session, &info, timeout)
                .await
                .unwrap_or_else(|e| {
                    failed(
                        "wal archiving",
                        e.to_string(),
                        "the connection's role needs EXECUTE on pg_switch_wal (or superuser) for this check",
                    )
                }),
        );
    }
    out.push(backup_wal(repo, server).await);
    Ok(out)
}

/// A forced WAL switch reaches the repository within `timeout`.
async fn wal_arrives(
    repo: &Repository,
    server: &str,
    session: &Session,
    info: &crate::pg::conn::ServerInfo,
    timeout: Duration,
) -> Result<Check> {
    session.commit_marker().await?;
    let lsn = session.switch_wal().await?;
    let file = session.walfile_name(lsn).await?;
    Ok(
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
            ok(
                "wal archiving",
                format!("{file} arrived in the repository after a forced WAL switch"),
            )
        } else {
            failed(
                "wal archiving",
                format!(
                    "{file} did not arrive within {}s of a forced WAL switch",
                    timeout.as_secs()
                ),
                "look at pg_stat_archiver and the PostgreSQL log for archive-push errors",
            )
        },
    )
}

/// The newest backup's WAL is in the repository (or in the backup).
async fn backup_wal(repo: &Repository, server: &str) -> Check {
    newest_backup_wal(repo, server)
        .await
        .unwrap_or_else(|e| failed("backup wal", e.to_string(), "run pgcairn verify"))
}

async fn newest_backup_wal(repo: &Repository, server: &str) -> Result<Check> {
    let backups = list_backups(repo, Some(server)).await?;
    let Some(b) = backups.last() else {
        return Ok(failed("backup wal", "no backups yet", "run pgcairn backup"));
    };
    if !b.meta.included_wal.is_empty() {
        return Ok(ok(
            "backup wal",
            format!("backup {} carries its WAL", b.meta.backup_id),
        ));
    }
    let seg = b.meta.wal_segment_size;
    let (Some(WalFile::Segment { segno: a, .. }), Some(WalFile::Segment { segno: z, .. })) = (
        WalFile::parse(&b.meta.start_wal, seg),
        WalFile::parse(&b.meta.stop_wal, seg),
    ) else {
        return Ok(failed(
            "backup wal",
            "unreadable WAL range in the backup",
            "run pgcairn verify",
        ));
    };
    let tl = b.meta.timeline;
    let have = repo
        .list_manifests(&wal_name(server, b.meta.system_identifier, tl, ""))
        .await?;
    let missing: Vec<String> = (a..=z)
        .map(|s| segment_name(tl, s, seg))
        .filter(|n| !have.contains(&wal_name(server, b.meta.system_identifier, tl, n)))
        .collect();
    Ok(if missing.is_empty() {
        ok(
            "backup wal",
            format!(
                "WAL {}..{} of backup {} is in the repository",
                b.meta.start_wal, b.meta.stop_wal, b.meta.backup_id
            ),
        )
    } else {
        failed(
            "backup wal",
            format!("backup {} lacks {}", b.meta.backup_id, missing.join(", ")),
            "that backup cannot be restored to a consistent state; take a new backup and check archiving",
        )
    })
}
