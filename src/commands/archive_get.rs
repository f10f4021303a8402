//! `pgcairn archive-get %f %p` (restore_command). PostgreSQL reads exit
//! codes 1 to 125 as "absent" and ends recovery there, so this exits 1 only
//! when a direct lookup confirmed the file is not in the repository; every
//! other failure exits 255 (main.rs), which stops PostgreSQL instead. A
//! standby therefore stops too while the repository is unreachable.
//!
//! With `--prefetch N` (the default) a served segment starts a background
//! filler, this same command re-run with [`FILLER_ENV`] set, which fetches
//! the next N segments into the spool while PostgreSQL replays.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use anyhow::Result;

use super::Ctx;
use crate::cli::ArchiveGetArgs;
use crate::engine::archive::GetOutcome;
use crate::engine::spool::{fill, get_spooled, Spool};
use crate::repo::Repository;

/// Set in the environment of a filler process.
pub const FILLER_ENV: &str = "PGCAIRN_SPOOL_FILLER";

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
    if std::env::var_os(FILLER_ENV).is_some() {
        run_filler(&repo, &server, &spool).await;
        // Nothing reads the filler's exit code; were the variable ever in
        // PostgreSQL's environment, 0 without a file would read as
        // "absent" and end recovery.
        return Ok(255);
    }
    match get_spooled(&repo, &server, &a.file, &a.dest, &spool).await? {
        GetOutcome::Restored => {
            let size = std::fs::metadata(&a.dest).map(|m| m.len()).unwrap_or(0);
            if spool.max > 0 && size > 0 && spool.advance(&a.file, size) {
                start_filler(&spool);
            }
            Ok(0)
        }
        GetOutcome::Absent => Ok(1),
    }
}

/// Take the filler lock if nobody holds it.
fn try_lock(spool: &Spool) -> Option<std::fs::File> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(spool.lock_path())
        .ok()?;
    // SAFETY: flock on a descriptor owned by `lock`; the lock belongs to
    // the open file description, which a child inherits as its stdin.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(lock)
}

/// Start a filler unless one is running. The lock is taken here and handed
/// to the child as its standard input, so it is held from before this call
/// returns until the filler is done: whoever waits for the lock waits for
/// the filler. Failing to start one only costs the prefetch.
fn start_filler(spool: &Spool) {
    let Some(lock) = try_lock(spool) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let _ = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(FILLER_ENV, "1")
        .stdin(Stdio::from(lock))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: signals meant for PostgreSQL's startup
        // process and its restore_command do not reach it.
        .process_group(0)
        .spawn();
}

/// The filler process: its stdin is the lock its parent took. Nobody reads
/// its output or exit code: a segment it could not fetch is fetched (and
/// any error reported) by the serving call.
///
/// No position is ever left unfilled: a serving call records its position
/// before it tries the lock, and the filler looks at the position again
/// after it released the lock. So either the serving call got the lock (and
/// started a new filler), or this one sees the new position and goes on.
async fn run_filler(repo: &Repository, server: &str, spool: &Spool) {
    // SAFETY: descriptor 0 is this process's stdin, which nothing else in
    // a filler uses; it is closed exactly once, when `lock` is dropped.
    let mut lock = unsafe { std::fs::File::from_raw_fd(0) };
    loop {
        let Ok(Some(last)) = fill(repo, server, spool).await else {
            return;
        };
        drop(lock);
        if spool.position_name().as_deref() == Some(last.as_str()) {
            return;
        }
        match try_lock(spool) {
            Some(l) => lock = l,
            None => return,
        }
    }
}
