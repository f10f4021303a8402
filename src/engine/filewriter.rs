//! How restore writes a file's bytes: with `O_DIRECT` where the file
//! system takes it, else through the page cache with early write-back.
//!
//! A restore writes the whole cluster once and fsyncs it; nothing reads it
//! back soon. Through the page cache every byte is copied into a freshly
//! allocated page, and that copy alone was the largest single cost of a
//! restore (27 % of all CPU samples restoring the 5.6 GB bench cluster;
//! on a virtual machine each new page-cache page is also a page the host
//! must hand over). `O_DIRECT` sends the writer's own buffer to the disk
//! and leaves the cache to PostgreSQL.

use std::fs::File;
use std::io::Write;

/// Alignment `O_DIRECT` asks of buffer address, length and file offset
/// (the logical block size; 4096 covers every common device).
const ALIGN: usize = 4096;

/// Bytes per write.
const BUF: usize = 1 << 20;

/// Bytes written through the page cache between two write-back requests
/// (as PostgreSQL's `*_flush_after` settings): otherwise nothing reaches
/// the disk until the dirty limit or the fsync, and the restore alternates
/// between computing with an idle disk and waiting with idle cores.
const WRITE_BEHIND: u64 = 8 << 20;

/// Open `path` for writing (created, truncated), with `O_DIRECT` when the
/// file system supports it.
pub(super) fn create(path: &std::path::Path) -> std::io::Result<(File, bool)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => return Ok((f, true)),
            // tmpfs and some FUSE file systems refuse O_DIRECT.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
            Err(e) => return Err(e),
        }
    }
    File::create(path).map(|f| (f, false))
}

/// A writer over a file from [`create`]. Call [`FileWriter::finish`]:
/// dropping it loses the buffered tail.
pub(super) struct FileWriter<'a> {
    file: &'a File,
    direct: bool,
    /// `BUF + ALIGN` bytes; the buffer is `store[at..at + BUF]`.
    store: Vec<u8>,
    at: usize,
    held: usize,
    written: u64,
    flushed_to: u64,
}

impl<'a> FileWriter<'a> {
    pub(super) fn new(file: &'a File, direct: bool) -> Self {
        let store = vec![0u8; BUF + ALIGN];
        let at = store.as_ptr().align_offset(ALIGN).min(ALIGN);
        FileWriter {
            file,
            direct,
            store,
            at,
            held: 0,
            written: 0,
            flushed_to: 0,
        }
    }

    /// Write out `n` buffered bytes (`n` a multiple of [`ALIGN`] while
    /// direct). A file system that opened with `O_DIRECT` but refuses the
    /// write (a larger alignment) gets this and later writes buffered.
    fn write_out(&mut self, n: usize) -> std::io::Result<()> {
        let mut file = self.file;
        let data = &self.store[self.at..self.at + n];
        match file.write_all(data) {
            Err(e) if self.direct && e.kind() == std::io::ErrorKind::InvalidInput => {
                clear_direct(self.file)?;
                self.direct = false;
                file.write_all(data)?;
            }
            r => r?,
        }
        self.written += n as u64;
        if !self.direct && self.written - self.flushed_to >= WRITE_BEHIND {
            self.write_behind();
        }
        // Keep the unwritten rest at the front.
        self.store
            .copy_within(self.at + n..self.at + self.held, self.at);
        self.held -= n;
        Ok(())
    }

    /// Start write-back of what was written through the page cache since
    /// the last call (a hint: errors surface at the fsync that follows).
    fn write_behind(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor and range; the call only starts
            // write-back of pages already written.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushed_to as libc::off64_t,
                    (self.written - self.flushed_to) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.flushed_to = self.written;
    }

    /// Write what is buffered: whole blocks directly, the tail (a file
    /// whose size is not a multiple of [`ALIGN`]) buffered.
    pub(super) fn finish(mut self) -> std::io::Result<u64> {
        let whole = self.held / ALIGN * ALIGN;
        if whole > 0 {
            self.write_out(whole)?;
        }
        if self.held > 0 {
            if self.direct {
                clear_direct(self.file)?;
                self.direct = false;
            }
            self.write_out(self.held)?;
        }
        Ok(self.written)
    }
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

impl Write for FileWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(BUF - self.held);
        let from = self.at + self.held;
        self.store[from..from + n].copy_from_slice(&buf[..n]);
        self.held += n;
        if self.held == BUF {
            self.write_out(BUF)?;
        }
        Ok(n)
    }

    /// Buffered bytes stay until [`FileWriter::finish`]: a direct write
    /// must be whole blocks.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
            for try_direct in [true, false] {
                let path = dir.path().join(format!("f{size}-{try_direct}"));
                let (file, direct) = if try_direct {
                    create(&path).unwrap()
                } else {
                    (File::create(&path).unwrap(), false)
                };
                let mut w = FileWriter::new(&file, direct);
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
}
