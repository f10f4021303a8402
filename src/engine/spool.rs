//! archive-get's prefetch spool: the segments after the one PostgreSQL
//! asked for, fetched ahead into a local directory while PostgreSQL
//! replays, as pgBackRest's asynchronous archive-get does. Recovery calls
//! restore_command once per segment and waits for each call, so the call
//! itself only serves; a background *filler* keeps the spool full.
//!
//! Who touches the spool:
//! - the serving call reads a spooled segment, checks it, moves it to
//!   PostgreSQL's path, and records the segment as the spool's position;
//! - the filler (one at a time, under the lock file) fetches the window of
//!   segments after the position that are missing, and removes the rest.
//!
//! A spooled file is only ever a shortcut: a miss, or a file that fails its
//! hash or header check, goes to the repository, so "absent" is only ever
//! the answer of a direct lookup there.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::archive::{get, registered_sysid, write_record, GetOutcome};
use super::{EngineError, Result};
use crate::pg::wal::{is_segment_size, segment_name, WalFile};
use crate::pg::walfile::check_segment;
use crate::repo::Repository;

/// The lock a filler holds for as long as it runs.
pub const FILLER_LOCK: &str = ".filler.lock";
/// The last segment served: `NAME SEGMENT_SIZE`.
const POSITION: &str = ".position";
/// The most segments a window may hold.
pub const MAX_WINDOW: usize = 32;

/// A spool directory (per repository and server) and its window size.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
    /// How many segments after the last one served to keep fetched.
    pub max: usize,
}

fn sidecar(file: &str) -> String {
    format!("{file}.b3")
}

impl Spool {
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(FILLER_LOCK)
    }

    /// The segments after `file` that the spool should hold.
    fn window(&self, file: &str, seg_size: u64) -> Vec<String> {
        if !is_segment_size(seg_size) {
            return Vec::new();
        }
        match WalFile::parse(file, seg_size) {
            Some(WalFile::Segment { timeline, segno }) => (1..=self.max.min(MAX_WINDOW) as u64)
                .map(|k| segment_name(timeline, segno + k, seg_size))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn is_spooled(&self, file: &str) -> bool {
        self.dir.join(file).exists() && self.dir.join(sidecar(file)).exists()
    }

    /// Record `file` (just served, `seg_size` bytes) as the position, and
    /// say whether the window after it still lacks segments, i.e. whether a
    /// filler should run. Errors only cost the prefetch, so they read as
    /// "no filler".
    pub fn advance(&self, file: &str, seg_size: u64) -> bool {
        let window = self.window(file, seg_size);
        if window.is_empty() || std::fs::create_dir_all(&self.dir).is_err() {
            return false;
        }
        if write_record(&self.dir, POSITION, &format!("{file} {seg_size}\n")).is_err() {
            return false;
        }
        window.iter().any(|n| !self.is_spooled(n))
    }

    /// The segment last served, if any.
    pub fn position_name(&self) -> Option<String> {
        self.position().map(|p| p.0)
    }

    fn position(&self) -> Option<(String, u64)> {
        let text = std::fs::read_to_string(self.dir.join(POSITION)).ok()?;
        let mut parts = text.split_whitespace();
        let file = parts.next()?.to_string();
        let seg_size = parts.next()?.parse().ok()?;
        Some((file, seg_size))
    }

    /// Remove everything but the lock, the position and the window (spent
    /// segments, other timelines, a crashed filler's temporary files).
    /// Only the filler calls this, under the lock.
    fn clean(&self, window: &[String]) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().to_string();
            let keep = n == FILLER_LOCK
                || n == POSITION
                || window.iter().any(|w| *w == n || sidecar(w) == n);
            if !keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Serve `file` from the spool if it is there and still checks out: the
/// hash recorded when it was fetched, and the segment header (this system,
/// this timeline and segment). Either way the spooled copy is consumed.
fn from_spool(spool: &Spool, file: &str, dest: &Path) -> Result<bool> {
    let p = spool.dir.join(file);
    let side = spool.dir.join(sidecar(file));
    let (Ok(data), Ok(want)) = (std::fs::read(&p), std::fs::read_to_string(&side)) else {
        return Ok(false);
    };
    let mut parts = want.split_whitespace();
    let (Some(sysid), Some(hash)) = (
        parts.next().and_then(|s| s.parse::<u64>().ok()),
        parts.next(),
    ) else {
        return Ok(false);
    };
    let ok_hash = blake3::hash(&data).to_hex().as_str() == hash;
    let ok_header = check_segment(file, &data, Some(sysid)).is_ok();
    let _ = std::fs::remove_file(&side);
    if !(ok_hash && ok_header) {
        let _ = std::fs::remove_file(&p);
        return Ok(false);
    }
    // Same file system: a rename saves writing 16 MiB again. No fsync, as
    // in `get`: PostgreSQL fsyncs a restored file it keeps.
    if std::fs::rename(&p, dest).is_ok() {
        return Ok(true);
    }
    let _ = std::fs::remove_file(&p);
    let tmp = dest.with_file_name(format!(".{file}.pgcairn-tmp"));
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| EngineError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(&data)
        .map_err(|e| EngineError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, dest)
        .map_err(|e| EngineError::io(format!("renaming into {}", dest.display()), e))?;
    Ok(true)
}

/// archive-get through the spool: a spool hit is served after its checks,
/// anything else is a direct `get`. A served segment becomes the spool's
/// position; the caller starts a filler when [`Spool::advance`] says so.
pub async fn get_spooled(
    repo: &Repository,
    server: &str,
    file: &str,
    dest: &Path,
    spool: &Spool,
) -> Result<GetOutcome> {
    if spool.max > 0 && from_spool(spool, file, dest)? {
        return Ok(GetOutcome::Restored);
    }
    get(repo, server, file, dest).await
}

/// The filler: fetch the window after the position, in parallel, and again
/// for as long as recovery moved the position during a round. A segment
/// that is absent (the end of the archive) or fails (the serving call meets
/// that failure itself and reports it) is tried again only for a new
/// position. Returns the last position it filled for.
pub async fn fill(repo: &Repository, server: &str, spool: &Spool) -> Result<Option<String>> {
    let Some(sysid) = registered_sysid(repo, server).await? else {
        return Ok(None);
    };
    let mut done: Option<String> = None;
    while let Some((file, seg_size)) = spool.position() {
        if done.as_deref() == Some(file.as_str()) {
            break;
        }
        let window = spool.window(&file, seg_size);
        spool.clean(&window);
        let wanted: Vec<&String> = window.iter().filter(|n| !spool.is_spooled(n)).collect();
        // Each fetch holds a whole segment: at most about 64 MiB in
        // flight, so 1 GiB segments do not take prefetch × 1 GiB of the
        // database host's memory during recovery.
        let parallel = usize::try_from((64 << 20) / seg_size.max(1))
            .unwrap_or(usize::MAX)
            .clamp(1, wanted.len().max(1));
        use futures::StreamExt as _;
        let results: Vec<Result<bool>> = futures::stream::iter(wanted.iter().map(|n| async move {
            let p = spool.dir.join(n);
            match get(repo, server, n, &p).await {
                Ok(GetOutcome::Restored) => {
                    let data = std::fs::read(&p)
                        .map_err(|e| EngineError::io(format!("reading {}", p.display()), e))?;
                    let text = format!("{sysid} {}\n", blake3::hash(&data).to_hex());
                    write_record(&spool.dir, &sidecar(n), &text)?;
                    Ok(true)
                }
                Ok(GetOutcome::Absent) => Ok(false),
                Err(e) => Err(e),
            }
        }))
        .buffer_unordered(parallel)
        .collect()
        .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(e);
        }
        done = Some(file);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn spool(max: usize) -> (tempfile::TempDir, Spool) {
        let d = tempfile::tempdir().unwrap();
        let s = Spool {
            dir: d.path().join("spool"),
            max,
        };
        (d, s)
    }

    #[test]
    fn window_follows_the_segment_and_crosses_log_ids() {
        let (_d, s) = spool(3);
        assert_eq!(
            s.window("0000000200000001000000FE", SEG),
            [
                "0000000200000001000000FF",
                "000000020000000200000000",
                "000000020000000200000001"
            ]
        );
        // History files and partial segments have no window.
        assert!(s.window("00000002.history", SEG).is_empty());
        assert!(s.window("000000020000000100000003", 0).is_empty());
        assert!(s.window("000000020000000100000003.partial", SEG).is_empty());
        let (_d, big) = spool(1000);
        assert_eq!(
            big.window("000000010000000000000001", SEG).len(),
            MAX_WINDOW
        );
    }

    #[test]
    fn advance_records_the_position_and_asks_for_a_filler_until_full() {
        let (_d, s) = spool(2);
        assert!(s.advance("000000010000000000000010", SEG));
        assert_eq!(
            s.position(),
            Some(("000000010000000000000010".to_string(), SEG))
        );
        for n in ["000000010000000000000011", "000000010000000000000012"] {
            std::fs::write(s.dir.join(n), b"x").unwrap();
        }
        // A segment without its hash sidecar is not spooled yet.
        assert!(s.advance("000000010000000000000010", SEG));
        for n in ["000000010000000000000011", "000000010000000000000012"] {
            std::fs::write(s.dir.join(sidecar(n)), b"x").unwrap();
        }
        assert!(!s.advance("000000010000000000000010", SEG));
        assert!(s.advance("000000010000000000000011", SEG));
    }

    #[test]
    fn clean_keeps_the_lock_the_position_and_the_window() {
        let (_d, s) = spool(1);
        assert!(s.advance("000000010000000000000010", SEG));
        let window = s.window("000000010000000000000010", SEG);
        let keep = [
            FILLER_LOCK.to_string(),
            POSITION.to_string(),
            window[0].clone(),
            sidecar(&window[0]),
        ];
        let drop = [
            "000000010000000000000010".to_string(),
            "000000020000000000000011".to_string(),
            ".000000010000000000000012.pgcairn-tmp".to_string(),
        ];
        for n in keep.iter().chain(drop.iter()) {
            std::fs::write(s.dir.join(n), b"x").unwrap();
        }
        s.clean(&window);
        for n in &keep {
            assert!(s.dir.join(n).exists(), "{n} kept");
        }
        for n in &drop {
            assert!(!s.dir.join(n).exists(), "{n} removed");
        }
    }
}
