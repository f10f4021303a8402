//! The fastest a backup that compresses like pgcairn could go on this
//! machine: read a data directory and zstd-compress it in independent
//! 32 KiB blocks (as pgcairn stores relation files) on N threads, and do
//! nothing else: no hashing, no encryption, no writing.
//! `scripts/bench-pgbackrest.sh` runs it beside the full backups, so the
//! full-backup ratio can be read against what compression alone allows.
//!
//!     cargo run --release --example compress_ceiling -- DATADIR [LEVEL] [THREADS] [BLOCK]
//!
//! Prints one line: `bytes_read seconds bytes_compressed`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Every regular file under `dir` but pg_wal's, as a backup reads them.
fn files(dir: &Path, top: bool, out: &mut Vec<(u64, PathBuf)>) -> Result<(), Error> {
    for e in std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() && !(top && e.file_name() == "pg_wal") {
            files(&e.path(), false, out)?;
        } else if t.is_file() {
            out.push((e.metadata().map(|m| m.len()).unwrap_or(0), e.path()));
        }
    }
    Ok(())
}

fn arg<T: std::str::FromStr>(a: &[String], i: usize, default: T) -> Result<T, Error> {
    match a.get(i) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("argument {i}: {s:?} is not a number").into()),
    }
}

fn main() -> Result<(), Error> {
    let a: Vec<String> = std::env::args().collect();
    let dir = a
        .get(1)
        .ok_or("usage: compress_ceiling DATADIR [LEVEL] [THREADS] [BLOCK]")?;
    let (level, threads, block): (i32, usize, usize) =
        (arg(&a, 2, 3)?, arg(&a, 3, 2)?, arg(&a, 4, 32 << 10)?);
    let mut list = Vec::new();
    files(Path::new(dir), true, &mut list)?;
    // Largest first, so the threads finish together.
    list.sort_by_key(|f| std::cmp::Reverse(f.0));
    let next = AtomicUsize::new(0);
    let (read, written) = (AtomicU64::new(0), AtomicU64::new(0));
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let run = || -> Result<(), Error> {
                    let mut z = zstd::bulk::Compressor::new(level)?;
                    let mut buf = vec![0u8; 1 << 20];
                    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(block));
                    while let Some((_, p)) = list.get(next.fetch_add(1, Ordering::Relaxed)) {
                        // A file the server removed since the listing is skipped, as a backup does.
                        let mut f = match std::fs::File::open(p) {
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            r => r.map_err(|e| format!("{}: {e}", p.display()))?,
                        };
                        loop {
                            let mut n = 0;
                            while n < buf.len() {
                                match f.read(&mut buf[n..])? {
                                    0 => break,
                                    k => n += k,
                                }
                            }
                            for b in buf[..n].chunks(block) {
                                out.clear();
                                z.compress_to_buffer(b, &mut out)?;
                                written.fetch_add(out.len() as u64, Ordering::Relaxed);
                            }
                            read.fetch_add(n as u64, Ordering::Relaxed);
                            if n < buf.len() {
                                break;
                            }
                        }
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    println!(
        "{} {:.3} {}",
        read.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        written.load(Ordering::Relaxed)
    );
    Ok(())
}
