//! Page-aligned byte buffers. A restore decodes each window of a file
//! straight into one, so the writer can hand it to an `O_DIRECT` file as
//! it is instead of copying every byte into an aligned buffer of its own
//! (that copy was a tenth of a restore's CPU samples).

use std::ops::{Deref, DerefMut, Range};
use std::sync::Mutex;

/// The alignment kept: `O_DIRECT` asks buffer addresses and lengths to be
/// multiples of the logical block size, and 4096 covers every common
/// device.
pub const PAGE: usize = 4096;

/// Open `path` with `opts`, then switch the file to `O_DIRECT` when the
/// file system takes it (tmpfs on older kernels and some FUSE file systems
/// do not); says whether it did. Setting the flag after the open, rather
/// than opening with it, means a refusal leaves no file created by a
/// failed open behind, and the caller needs no second open.
pub fn open_direct(
    opts: &std::fs::OpenOptions,
    path: &std::path::Path,
) -> std::io::Result<(std::fs::File, bool)> {
    let f = opts.open(path)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        // SAFETY: `fd` is open for as long as `f` lives; F_GETFL/F_SETFL
        // only read and set its status flags.
        let direct = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) == 0
        };
        if direct {
            return Ok((f, true));
        }
    }
    Ok((f, false))
}

/// Bytes at a [`PAGE`]-aligned address, filled by appending. Growing past
/// the capacity asked for moves the bytes and may lose the alignment:
/// writers check [`PageBuf::is_aligned`] before relying on it.
pub struct PageBuf {
    /// `store[..at]` is padding up to the aligned start.
    store: Vec<u8>,
    at: usize,
}

/// Buffers this large are kept for reuse when dropped, at most
/// [`POOL_MAX`] of them. A restore makes a window buffer for every 4 MiB
/// it writes and frees it on another thread; left to malloc, the memory
/// went back to the system and came back as fresh pages, and the page
/// faults of filling them cost more CPU than the decryption's copying.
const POOL_MIN: usize = 1 << 20;
const POOL_MAX: usize = 8;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The smallest pooled store that holds `capacity` bytes after its
/// alignment padding.
fn pooled(capacity: usize) -> Option<Vec<u8>> {
    let mut pool = POOL.lock().ok()?;
    let room = |v: &Vec<u8>| v.capacity() - v.as_ptr().align_offset(PAGE).min(v.capacity());
    let best = (0..pool.len())
        .filter(|&i| room(&pool[i]) >= capacity)
        .min_by_key(|&i| pool[i].capacity())?;
    Some(pool.swap_remove(best))
}

impl PageBuf {
    pub fn with_capacity(capacity: usize) -> Self {
        let mut store = match capacity >= POOL_MIN {
            true => pooled(capacity).unwrap_or_default(),
            false => Vec::new(),
        };
        store.clear();
        if store.capacity() == 0 {
            store.reserve_exact(capacity + PAGE);
        }
        let at = store.as_ptr().align_offset(PAGE).min(PAGE);
        store.resize(at, 0);
        PageBuf { store, at }
    }

    /// Whether the content starts at a [`PAGE`]-aligned address.
    pub fn is_aligned(&self) -> bool {
        self.as_ptr().align_offset(PAGE) == 0
    }

    pub fn clear(&mut self) {
        self.store.truncate(self.at);
    }

    pub fn truncate(&mut self, len: usize) {
        self.store.truncate(self.at + len);
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.store.extend_from_slice(data);
    }

    /// Append a copy of `range` of the content (a chunk repeated in a
    /// stream, such as an all-zero block).
    pub fn extend_from_within(&mut self, range: Range<usize>) {
        self.store
            .extend_from_within(self.at + range.start..self.at + range.end);
    }

    /// Append `len` zero bytes (a place filled in later).
    pub fn extend_zeroed(&mut self, len: usize) {
        self.store.resize(self.store.len() + len, 0);
    }

    /// The next at most `len` unfilled bytes, for a decoder to write into
    /// (without zeroing them first).
    pub(crate) fn tail(&mut self, len: usize) -> Tail<'_> {
        self.store.reserve(len);
        Tail {
            store: &mut self.store,
            len,
        }
    }
}

/// Empty, without an allocation (and so not aligned).
impl Default for PageBuf {
    fn default() -> Self {
        PageBuf {
            store: Vec::new(),
            at: 0,
        }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if self.store.capacity() >= POOL_MIN {
            if let Ok(mut pool) = POOL.lock() {
                if pool.len() < POOL_MAX {
                    pool.push(std::mem::take(&mut self.store));
                }
            }
        }
    }
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.store[self.at..]
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.store[self.at..]
    }
}

/// See [`PageBuf::tail`].
pub(crate) struct Tail<'a> {
    store: &'a mut Vec<u8>,
    len: usize,
}

// SAFETY: `as_mut_ptr` points at the vector's spare capacity, of which
// `capacity()` bytes are reserved (`tail` reserved them); zstd calls
// `filled_until(n)` only after initialising the first `n` of them, so
// the vector's length never covers uninitialised bytes.
unsafe impl zstd::zstd_safe::WriteBuf for Tail<'_> {
    fn as_slice(&self) -> &[u8] {
        &[]
    }
    fn capacity(&self) -> usize {
        self.len.min(self.store.capacity() - self.store.len())
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.store.spare_capacity_mut().as_mut_ptr().cast()
    }
    unsafe fn filled_until(&mut self, n: usize) {
        let len = self.store.len();
        // SAFETY: see the impl's comment.
        unsafe { self.store.set_len(len + n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_aligned_within_its_capacity() {
        for cap in [0, 1, PAGE, 3 * PAGE + 5, 1 << 20] {
            let mut b = PageBuf::with_capacity(cap);
            assert!(b.is_aligned() && b.is_empty());
            let data: Vec<u8> = (0..cap).map(|i| i as u8).collect();
            b.extend_from_slice(&data);
            assert!(b.is_aligned(), "capacity {cap}");
            assert_eq!(&b[..], &data[..]);
        }
    }

    /// Large buffers come back from the pool empty, aligned, and with
    /// room for what was asked without moving.
    #[test]
    fn pooled_buffers_hold_what_was_asked() {
        for round in 0..3 {
            for cap in [
                POOL_MIN,
                3 * POOL_MIN + 5,
                POOL_MIN + PAGE - 1,
                4 * POOL_MIN,
            ] {
                let mut b = PageBuf::with_capacity(cap);
                assert!(b.is_empty() && b.is_aligned(), "round {round}, {cap}");
                let at = b.as_ptr();
                b.extend_from_slice(&vec![round as u8; cap]);
                assert_eq!(b.as_ptr(), at, "round {round}, {cap}: moved");
                assert!(b[..].iter().all(|&x| x == round as u8));
            }
        }
    }

    /// A decoder writes after what is there; repeats and placeholders
    /// append as asked.
    #[test]
    fn appends_decoded_repeated_and_zeroed_bytes() {
        let chunk: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let frame = zstd::bulk::compress(&chunk, 3).unwrap();
        let mut b = PageBuf::with_capacity(3 * chunk.len() + 10);
        b.extend_from_slice(b"head");
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let n = d
            .decompress_to_buffer(&frame, &mut b.tail(chunk.len()))
            .unwrap();
        assert_eq!(n, chunk.len());
        b.extend_from_within(4..4 + chunk.len());
        b.extend_zeroed(6);
        assert_eq!(b.len(), 4 + 2 * chunk.len() + 6);
        assert_eq!(&b[4..4 + chunk.len()], &chunk[..]);
        assert_eq!(&b[4 + chunk.len()..4 + 2 * chunk.len()], &chunk[..]);
        assert_eq!(&b[b.len() - 6..], &[0u8; 6]);
        // A frame larger than the room given is refused, not overrun.
        assert!(d.decompress_to_buffer(&frame, &mut b.tail(100)).is_err());
        assert_eq!(b.len(), 4 + 2 * chunk.len() + 6);
        assert!(b.is_aligned());
    }
}
