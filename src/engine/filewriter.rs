//! How restore writes a file's bytes: with `O_DIRECT` where the file
//! system takes it, else through the page cache with early write-back;
//! in either case on a thread of its own once the file outgrows one
//! buffer.
//!
//! A restore writes the whole cluster once and fsyncs it; nothing reads it
//! back soon. Through the page cache every byte is copied into a freshly
//! allocated page, and that copy alone was the largest single cost of a
//! restore (27 % of all CPU samples restoring the 5.6 GB bench cluster;
//! on a virtual machine each new page-cache page is also a page the host
//! must hand over). `O_DIRECT` sends the writer's own buffer to the disk
//! and leaves the cache to PostgreSQL. A direct write returns only when
//! the disk has the bytes, so a full buffer goes to a writer thread while
//! the next one fills: the restore's hashing and decoding go on during
//! the disk's work instead of waiting for it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::repo::{PageBuf, WindowSink};

/// Alignment `O_DIRECT` asks of buffer address, length and file offset.
const ALIGN: usize = crate::repo::pagebuf::PAGE;

/// Bytes per write.
const BUF: usize = 1 << 20;

/// Buffers per file: one filling, one queued, one being written.
const BUFFERS: usize = 3;

/// Bytes written through the page cache between two write-back requests
/// (as PostgreSQL's `*_flush_after` settings): otherwise nothing reaches
/// the disk until the dirty limit or the fsync, and the restore alternates
/// between computing with an idle disk and waiting with idle cores.
const WRITE_BEHIND: u64 = 8 << 20;

/// Open `path` for writing, with `O_DIRECT` when the file system
/// supports it: a new file (`new`: it must not exist, and a symlink there
/// is not followed), else created or truncated.
pub(super) fn create(path: &std::path::Path, new: bool) -> std::io::Result<(File, bool)> {
    let mut opts = File::options();
    opts.write(true);
    if new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    crate::repo::pagebuf::open_direct(&opts, path)
}

/// Where writes go: the file itself, and whether it is still direct.
struct Sink {
    file: File,
    direct: bool,
    flushed_to: u64,
}

impl Sink {
    /// Write `data` at `offset` (whole blocks while direct). A file system
    /// that opened with `O_DIRECT` but refuses the write (a larger
    /// alignment) gets this and later writes buffered.
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        match self.file.write_all_at(data, offset) {
            Err(e) if self.direct && e.kind() == std::io::ErrorKind::InvalidInput => {
                clear_direct(&self.file)?;
                self.direct = false;
                self.file.write_all_at(data, offset)?;
            }
            r => r?,
        }
        let end = offset + data.len() as u64;
        if !self.direct && end - self.flushed_to >= WRITE_BEHIND {
            write_behind(&self.file, self.flushed_to, end);
            self.flushed_to = end;
        }
        Ok(())
    }
}

/// The writer thread of a file larger than a buffer.
struct Behind {
    /// A buffer, its file offset, and whether it is one of ours to reuse
    /// (a window is dropped once written).
    full: SyncSender<(PageBuf, u64, bool)>,
    empty: Receiver<PageBuf>,
    thread: JoinHandle<std::io::Result<Sink>>,
    /// Buffers made so far (at most [`BUFFERS`]).
    made: usize,
}

impl Behind {
    fn start(sink: Sink) -> std::io::Result<Self> {
        let (full, queued) = sync_channel::<(PageBuf, u64, bool)>(1);
        let (give_back, empty) = sync_channel::<PageBuf>(BUFFERS);
        let thread = std::thread::Builder::new()
            .name("pgcairn-write".into())
            .spawn(move || {
                let mut sink = sink;
                for (buf, offset, reuse) in queued {
                    sink.write_at(&buf, offset)?;
                    if reuse {
                        // The filling side may have finished and gone.
                        let _ = give_back.try_send(buf);
                    }
                }
                Ok(sink)
            })?;
        Ok(Behind {
            full,
            empty,
            thread,
            made: 1,
        })
    }

    /// The thread's end: its sink, or the error that stopped it.
    fn join(self) -> std::io::Result<Sink> {
        drop(self.full);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("restore writer thread panicked")))
    }
}

/// A writer over a file from [`create`]. Call [`FileWriter::finish`]:
/// dropping it loses the buffered tail.
pub(super) struct FileWriter {
    /// The file while no writer thread has it.
    sink: Option<Sink>,
    behind: Option<Behind>,
    /// Bytes not yet handed over (fewer than [`BUF`]).
    block: PageBuf,
    /// File offset of `block`'s first byte.
    offset: u64,
}

impl FileWriter {
    /// `file` as [`create`] opened it (a duplicate descriptor: the caller
    /// keeps its own for the fsync).
    pub(super) fn new(file: File, direct: bool) -> Self {
        FileWriter {
            sink: Some(Sink {
                file,
                direct,
                flushed_to: 0,
            }),
            behind: None,
            block: PageBuf::with_capacity(BUF),
            offset: 0,
        }
    }

    /// Send `buf` to the writer thread (starting it the first time), to
    /// be written at the current offset (and given back when `reuse`).
    fn send(&mut self, buf: PageBuf, reuse: bool) -> std::io::Result<()> {
        if let Some(sink) = self.sink.take() {
            self.behind = Some(Behind::start(sink)?);
        }
        let Some(b) = self.behind.as_mut() else {
            return Err(std::io::Error::other("restore writer used after an error"));
        };
        let len = buf.len() as u64;
        if b.full.send((buf, self.offset, reuse)).is_err() {
            return Err(self.stopped());
        }
        self.offset += len;
        Ok(())
    }

    /// The error that stopped the writer thread.
    fn stopped(&mut self) -> std::io::Error {
        match self.behind.take().map(Behind::join) {
            Some(Err(e)) => e,
            _ => std::io::Error::other("restore writer thread stopped"),
        }
    }

    /// Hand the full block over and take an empty one: one the thread is
    /// done with, a new one while fewer than [`BUFFERS`] exist, else the
    /// next the thread gives back.
    fn hand_over(&mut self) -> std::io::Result<()> {
        let full = std::mem::take(&mut self.block);
        self.send(full, true)?;
        let Some(b) = self.behind.as_mut() else {
            return Err(std::io::Error::other("restore writer used after an error"));
        };
        let got = match b.empty.try_recv() {
            Ok(buf) => Ok(buf),
            Err(_) if b.made < BUFFERS => {
                b.made += 1;
                Ok(PageBuf::with_capacity(BUF))
            }
            // Wait for the disk; fails only if the thread stopped.
            Err(_) => b.empty.recv(),
        };
        self.block = match got {
            Ok(mut buf) => {
                buf.clear();
                buf
            }
            Err(_) => return Err(self.stopped()),
        };
        Ok(())
    }

    /// Wait for the writer thread, then write what is buffered: whole
    /// blocks directly, the tail (a file whose size is not a multiple of
    /// [`ALIGN`]) buffered. Returns the bytes written.
    pub(super) fn finish(mut self) -> std::io::Result<u64> {
        let mut sink = match (self.behind.take(), self.sink.take()) {
            (Some(b), _) => b.join()?,
            (None, Some(s)) => s,
            (None, None) => {
                return Err(std::io::Error::other("restore writer used after an error"))
            }
        };
        let held = self.block.len();
        let whole = held / ALIGN * ALIGN;
        if whole > 0 {
            sink.write_at(&self.block[..whole], self.offset)?;
        }
        if held > whole {
            if sink.direct {
                clear_direct(&sink.file)?;
                sink.direct = false;
            }
            sink.write_at(&self.block[whole..], self.offset + whole as u64)?;
        }
        Ok(self.offset + held as u64)
    }
}

/// A writer dropped without [`FileWriter::finish`] (its stream failed)
/// still waits for its thread, so no write outlives it.
impl Drop for FileWriter {
    fn drop(&mut self) {
        if let Some(b) = self.behind.take() {
            let _ = b.join();
        }
    }
}

/// Start write-back of `from..to`, written through the page cache (a
/// hint: errors surface at the fsync that follows).
fn write_behind(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor and range; the call only starts
        // write-back of pages already written.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

/// Turn `O_DIRECT` off on an open file.
fn clear_direct(file: &File) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
    Ok(())
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(BUF - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BUF {
            self.hand_over()?;
        }
        Ok(n)
    }

    /// Buffered bytes stay until [`FileWriter::finish`]: a direct write
    /// must be whole blocks.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A window that starts where the last one ended on a block boundary, and
/// is aligned whole blocks, goes to the disk as it is (a relation file's
/// windows are whole 8 KiB pages); anything else is copied.
impl WindowSink for FileWriter {
    fn put(&mut self, window: PageBuf) -> std::io::Result<()> {
        if self.block.is_empty()
            && window.len() >= BUF
            && window.len() % ALIGN == 0
            && window.is_aligned()
        {
            return self.send(window, false);
        }
        self.write_all(&window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around the buffer and block edges come back byte for byte,
    /// direct (where the file system takes it) and through the page cache.
    #[test]
    fn writes_every_size_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for size in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            BUF - 1,
            BUF,
            BUF + 4097,
            3 * BUF + 100,
            (BUFFERS + 4) * BUF,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
            for try_direct in [true, false] {
                let path = dir.path().join(format!("f{size}-{try_direct}"));
                let (file, direct) = if try_direct {
                    create(&path, true).unwrap()
                } else {
                    (File::create(&path).unwrap(), false)
                };
                let mut w = FileWriter::new(file.try_clone().unwrap(), direct);
                // Uneven pieces, as chunks arrive.
                for piece in data.chunks(10_007) {
                    w.write_all(piece).unwrap();
                }
                assert_eq!(w.finish().unwrap(), size as u64);
                drop(file);
                assert_eq!(std::fs::read(&path).unwrap(), data, "size {size}");
            }
        }
    }

    /// Windows delivered whole: aligned ones go to the thread as they
    /// are, others (and any after a partial block) are copied; the file
    /// comes back byte for byte either way.
    #[test]
    fn windows_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [
            4 * BUF,
            BUF + ALIGN,
            5000,
            3 * BUF,
            BUF - ALIGN,
            2 * BUF,
            100,
        ];
        let data: Vec<u8> = (0..sizes.iter().sum::<usize>())
            .map(|i| (i * 13 + i / 4096) as u8)
            .collect();
        let path = dir.path().join("w");
        let (file, direct) = create(&path, false).unwrap();
        let mut w = FileWriter::new(file.try_clone().unwrap(), direct);
        let mut at = 0;
        for n in sizes {
            let mut window = PageBuf::with_capacity(n);
            window.extend_from_slice(&data[at..at + n]);
            w.put(window).unwrap();
            at += n;
        }
        assert_eq!(w.finish().unwrap(), data.len() as u64);
        drop(file);
        assert!(std::fs::read(&path).unwrap() == data);
    }

    /// A write that fails on the writer thread fails the writer: from a
    /// later write or from `finish`, never a silent success.
    #[test]
    fn writer_thread_errors_reach_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        // Opened read-only: every write fails (EBADF).
        let file = File::open(&path).unwrap();
        let mut w = FileWriter::new(file, false);
        let data = vec![1u8; (BUFFERS + 2) * BUF];
        let failed = match w.write_all(&data) {
            Err(_) => true,
            Ok(()) => w.finish().is_err(),
        };
        assert!(failed, "writing to a read-only file reported success");
    }

    /// A new file is never one already there, nor a symlink's target;
    /// otherwise an existing file is truncated.
    #[test]
    fn new_files_refuse_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::write(&old, b"kept").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&old, &link).unwrap();
        for p in [&old, &link] {
            let e = create(p, true).unwrap_err();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists,
                "{}",
                p.display()
            );
        }
        assert_eq!(std::fs::read(&old).unwrap(), b"kept");
        create(&old, false).unwrap();
        assert_eq!(std::fs::metadata(&old).unwrap().len(), 0);
    }
}
