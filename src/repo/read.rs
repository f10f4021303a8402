//! The reading side of the store: chunk references back to bytes.
//!
//! Reads are planned per window of a stream: the window's distinct chunks
//! are looked up, grouped by pack and merged into few ranged reads, so
//! restoring a file whose blocks were written by many backups costs a few
//! requests per window, not one per chunk. Any read that fails falls back
//! to [`read_chunk`], which reloads the index and tries every copy before
//! reporting a chunk missing or damaged.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};

use super::error::{RepoError, Result};
use super::format::ChunkId;
use super::index::Location;
use super::manifest::ChunkRef;
use super::pack::{apply_delta, authenticate, open_owned, pack_object, ChunkKeys, Opened, Payload};
use super::pagebuf::PageBuf;
use super::Inner;

/// Longest chain of deltas a read follows. Writers only ever make chains
/// of one (a base is a chunk stored whole); this bounds what a damaged or
/// hostile repository can make a reader do.
pub(crate) const MAX_DELTA_DEPTH: usize = 4;

/// Fetch and open one chunk at a known location (following its base when
/// it is stored as a delta).
pub(crate) async fn fetch_chunk(
    inner: &Arc<Inner>,
    id: &ChunkId,
    loc: &Location,
) -> Result<Vec<u8>> {
    fetch_at(inner, *id, *loc, 0).await
}

fn fetch_at(
    inner: &Arc<Inner>,
    id: ChunkId,
    loc: Location,
    depth: usize,
) -> BoxFuture<'_, Result<Vec<u8>>> {
    Box::pin(async move {
        let object = pack_object(&loc.pack);
        let range = loc.offset as u64..loc.offset as u64 + loc.length as u64;
        inner.pack_reads.fetch_add(1, Ordering::Relaxed);
        let blob = match inner.backend.get_range(&object, range).await {
            Ok(b) => b,
            Err(e) => return Err(e.into_repo("read", &object)),
        };
        let inner2 = inner.clone();
        let max = max_len(inner, &loc);
        let object2 = object.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let what = || format!("{object2} (chunk {id})");
            open_owned(&inner2.chunk_keys(), loc.kind, &id, owned(blob), max, &what)
        })
        .await??;
        let (base, frame) = match opened {
            Opened::Plain(d) => return Ok(d),
            Opened::Delta { base, frame } => (base, frame),
        };
        let what = || format!("{object} (chunk {id})");
        if loc.base.is_some_and(|b| b != base) {
            return Err(RepoError::corrupt(
                what(),
                "blob and index name different bases",
            ));
        }
        if depth >= MAX_DELTA_DEPTH {
            return Err(RepoError::corrupt(
                what(),
                format!("delta chain longer than {MAX_DELTA_DEPTH}"),
            ));
        }
        let base_data = read_chunk_at(inner, base, depth + 1).await?;
        let inner2 = inner.clone();
        tokio::task::spawn_blocking(move || {
            apply_delta(&inner2.chunk_keys(), &id, &base_data, &frame, max, &object)
        })
        .await?
    })
}

/// A read's bytes as ours to decrypt in place (copied only when the
/// backend still shares them).
fn owned(data: bytes::Bytes) -> BytesMut {
    data.try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// A window blob's name in an error: its pack and chunk (made only then).
fn blob_name((id, loc): &(ChunkId, Location)) -> impl Fn() -> String + '_ {
    move || format!("{} (chunk {id})", pack_object(&loc.pack))
}

/// The bytes read again for a chunk must be as long as its reference.
fn expect_len(r: &ChunkRef, d: &[u8]) -> Result<()> {
    if d.len() != r.1 as usize {
        return Err(RepoError::corrupt(
            format!("chunk {}", r.0),
            "length differs from the reference",
        ));
    }
    Ok(())
}

/// The plaintext bound for a chunk at `loc`.
fn max_len(inner: &Inner, loc: &Location) -> usize {
    (loc.raw_length as usize).min(inner.config.chunker.max_size as usize)
}

/// Find and read one chunk. A pack that has gone missing (collected and
/// re-packed since our index was loaded) makes us reload the index once;
/// a damaged copy (or one whose base cannot be read) makes us try the
/// other copies before giving up.
async fn read_chunk(inner: &Arc<Inner>, id: ChunkId) -> Result<Vec<u8>> {
    read_chunk_at(inner, id, 0).await
}

async fn read_chunk_at(inner: &Arc<Inner>, id: ChunkId, depth: usize) -> Result<Vec<u8>> {
    let mut reloaded = false;
    loop {
        let locs = {
            let index = inner.index.clone();
            tokio::task::spawn_blocking(move || index.lookup_all(&id)).await??
        };
        let mut missing_pack = None;
        let mut damaged = None;
        for loc in &locs {
            match fetch_at(inner, id, *loc, depth).await {
                Ok(d) => return Ok(d),
                Err(RepoError::NotFound { key }) => missing_pack = Some(key),
                Err(e @ RepoError::Corrupt { .. }) => {
                    damaged.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = damaged {
            return Err(e);
        }
        if reloaded {
            return Err(match missing_pack {
                Some(key) => RepoError::corrupt(key, format!("pack holding chunk {id} is missing")),
                None => RepoError::corrupt(
                    format!("chunk {id}"),
                    "referenced but in no index object (run `pgcairn verify`)",
                ),
            });
        }
        inner.index.refresh().await?;
        reloaded = true;
    }
}

/// Plaintext bytes in one read window. A window's chunks are fetched
/// together, grouped by pack: after weeks of incremental backups a file's
/// blocks come from many backups' packs, interleaved, and reading them in
/// file order would cost one request per chunk.
const WINDOW_RAW: u64 = 4 << 20;

/// Windows in flight per stream: with [`WINDOW_RAW`], what bounds a
/// stream's memory.
const READ_AHEAD: usize = 4;

/// Stored bytes between two wanted blobs of one pack that are read and
/// dropped rather than paying for a second request (an object store
/// request costs about as much as this many bytes of transfer).
const MAX_GAP: u64 = 256 << 10;

/// Largest single ranged read.
const MAX_RANGE: u64 = 8 << 20;

/// One ranged read of a pack and the distinct blobs it covers.
struct Fetch {
    start: u64,
    end: u64,
    /// Indexes into [`Window::blobs`].
    members: Vec<usize>,
}

/// Chunks read together. `slots[i]` says where `refs[i]`'s bytes come
/// from: a distinct blob of the window, or (`None`) a chunk the loaded
/// index lacks, read on its own (which reloads the index once).
struct Window {
    refs: Vec<ChunkRef>,
    slots: Vec<Option<usize>>,
    blobs: Vec<(ChunkId, Location)>,
    fetches: Vec<Fetch>,
    /// Re-hash each chunk against its id. Off only for streams whose
    /// caller checks a hash over the whole ([`Inner::keys_for`]).
    rehash: bool,
}

/// Cut `refs` into windows and plan each window's ranged reads.
fn plan_windows(inner: &Inner, refs: &[ChunkRef]) -> Result<Vec<Window>> {
    let mut windows = Vec::new();
    let mut rest = refs;
    while !rest.is_empty() {
        let mut raw = 0u64;
        let mut n = 0;
        while n < rest.len() && (n == 0 || raw + rest[n].1 as u64 <= WINDOW_RAW) {
            raw += rest[n].1 as u64;
            n += 1;
        }
        let mut w = plan_window(inner, &rest[..n], |id| inner.index.lookup(id))?;
        w.rehash = false;
        windows.push(w);
        rest = &rest[n..];
    }
    Ok(windows)
}

/// Plan a window's reads; `locate` finds a chunk (the index, or locations
/// the caller already has).
fn plan_window(
    inner: &Inner,
    refs: &[ChunkRef],
    locate: impl Fn(&ChunkId) -> Result<Option<Location>>,
) -> Result<Window> {
    let mut blobs: Vec<(ChunkId, Location)> = Vec::new();
    let mut seen: HashMap<ChunkId, usize> = HashMap::new();
    let mut slots = Vec::with_capacity(refs.len());
    for r in refs {
        if let Some(&i) = seen.get(&r.0) {
            slots.push(Some(i));
            continue;
        }
        match locate(&r.0)? {
            Some(loc) => {
                seen.insert(r.0, blobs.len());
                slots.push(Some(blobs.len()));
                blobs.push((r.0, loc));
            }
            None => slots.push(None),
        }
    }
    // Bases of deltas are read in the same requests (usually from the
    // full backup's packs). One level: a base is normally stored whole.
    for i in 0..blobs.len() {
        if let Some(b) = blobs[i].1.base {
            if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(b) {
                if let Some(loc) = inner.index.lookup(&b)? {
                    v.insert(blobs.len());
                    blobs.push((b, loc));
                }
            }
        }
    }
    // By pack, then offset; merge neighbours closer than MAX_GAP.
    let mut order: Vec<usize> = (0..blobs.len()).collect();
    order.sort_by_key(|&i| (blobs[i].1.pack, blobs[i].1.offset));
    let mut fetches: Vec<Fetch> = Vec::new();
    let mut last_pack = None;
    for i in order {
        let l = &blobs[i].1;
        let (start, end) = (l.offset as u64, l.offset as u64 + l.length as u64);
        if last_pack == Some(l.pack) {
            if let Some(f) = fetches.last_mut() {
                if start <= f.end + MAX_GAP && end.max(f.end) - f.start <= MAX_RANGE {
                    f.end = f.end.max(end);
                    f.members.push(i);
                    continue;
                }
            }
        }
        last_pack = Some(l.pack);
        fetches.push(Fetch {
            start,
            end,
            members: vec![i],
        });
    }
    Ok(Window {
        refs: refs.to_vec(),
        slots,
        blobs,
        fetches,
        rehash: true,
    })
}

/// Perform one ranged read and cut it into its blobs, still sealed (each
/// is opened where it lies by whoever decodes it). A blob that cannot be
/// had this way (the pack collected since the index was loaded) comes
/// back as `None`, for [`read_chunk`] to retry elsewhere.
async fn run_fetch(
    inner: &Arc<Inner>,
    blobs: &[(ChunkId, Location)],
    f: Fetch,
) -> Result<Vec<(usize, Option<BytesMut>)>> {
    let object = pack_object(&blobs[f.members[0]].1.pack);
    inner.pack_reads.fetch_add(1, Ordering::Relaxed);
    let Ok(data) = inner.backend.get_range(&object, f.start..f.end).await else {
        return Ok(f.members.into_iter().map(|i| (i, None)).collect());
    };
    let mut rest = owned(data);
    let mut at = f.start;
    let cut = f.members.into_iter().map(|i| {
        let l = &blobs[i].1;
        let (start, end) = (l.offset as u64, l.offset as u64 + l.length as u64);
        // Members are in offset order; one overlapping the last (a
        // damaged index) is left for read_chunk.
        let blob = (start >= at && end <= f.end).then(|| {
            rest.advance((start - at) as usize);
            at = end;
            rest.split_to(l.length as usize)
        });
        (i, blob)
    });
    Ok(cut.collect())
}

/// Run a window's fetches, `io_depth` at once: each distinct blob's
/// sealed bytes, or `None` where the grouped read could not have it.
async fn fetch_window(
    inner: &Arc<Inner>,
    blobs: &Arc<Vec<(ChunkId, Location)>>,
    fetches: Vec<Fetch>,
) -> Result<Vec<Option<BytesMut>>> {
    let mut got: Vec<Option<BytesMut>> = (0..blobs.len()).map(|_| None).collect();
    let mut fetched = futures::stream::iter(fetches)
        .map(|f| run_fetch(inner, blobs, f))
        .buffer_unordered(inner.opts.io_depth.max(1));
    while let Some(list) = fetched.try_next().await? {
        for (i, d) in list {
            got[i] = d;
        }
    }
    Ok(got)
}

/// A window's sealed blobs, each authenticated when first needed (just
/// before it is decoded, while its bytes are still in the cache).
struct Sealed {
    raw: Vec<Option<BytesMut>>,
    open: Vec<Option<Payload>>,
}

impl Sealed {
    fn new(raw: Vec<Option<BytesMut>>) -> Self {
        let open = (0..raw.len()).map(|_| None).collect();
        Sealed { raw, open }
    }

    /// Blob `i` authenticated, or `None` if it was not read or does not
    /// authenticate.
    fn get(
        &mut self,
        keys: &ChunkKeys<'_>,
        blobs: &[(ChunkId, Location)],
        i: usize,
    ) -> Option<&Payload> {
        if let Some(b) = self.raw[i].take() {
            let (id, l) = &blobs[i];
            self.open[i] = authenticate(keys, l.kind, id, b, &blob_name(&blobs[i])).ok();
        }
        self.open[i].as_ref()
    }
}

/// Read a window's chunks, in `refs` order.
async fn read_window(inner: &Arc<Inner>, w: Window) -> Result<Vec<Vec<u8>>> {
    let blobs = Arc::new(w.blobs);
    let raw = fetch_window(inner, &blobs, w.fetches).await?;
    let (inner2, blobs2, rehash) = (inner.clone(), blobs.clone(), w.rehash);
    let got = tokio::task::spawn_blocking(move || {
        let keys = inner2.keys_for(rehash);
        let open = |(b, blob): (Option<BytesMut>, &(ChunkId, Location))| {
            let (id, l) = blob;
            let max = max_len(&inner2, l);
            b.and_then(|b| open_owned(&keys, l.kind, id, b, max, &blob_name(blob)).ok())
        };
        raw.into_iter()
            .zip(blobs2.iter())
            .map(open)
            .collect::<Vec<_>>()
    })
    .await?;
    let mut data: Vec<Option<Vec<u8>>> = vec![None; blobs.len()];
    let mut deltas: Vec<(usize, ChunkId, Vec<u8>)> = Vec::new();
    for (i, d) in got.into_iter().enumerate() {
        match d {
            Some(Opened::Plain(d)) => data[i] = Some(d),
            Some(Opened::Delta { base, frame }) => deltas.push((i, base, frame)),
            None => data[i] = Some(read_chunk(inner, blobs[i].0).await?),
        }
    }
    if !deltas.is_empty() {
        data = apply_deltas(inner, &blobs, data, deltas, w.rehash).await?;
    }
    // A chunk repeated in the window (zero blocks) is copied; its last
    // use takes the buffer.
    let mut uses = vec![0usize; data.len()];
    for i in w.slots.iter().flatten() {
        uses[*i] += 1;
    }
    let mut out = Vec::with_capacity(w.refs.len());
    for (r, slot) in w.refs.iter().zip(&w.slots) {
        let held = match *slot {
            Some(i) => {
                uses[i] -= 1;
                if uses[i] == 0 {
                    data[i].take()
                } else {
                    data[i].clone()
                }
            }
            None => None,
        };
        let d = match held {
            Some(d) => d,
            None => read_chunk(inner, r.0).await?,
        };
        expect_len(r, &d)?;
        out.push(d);
    }
    Ok(out)
}

/// Where each of a window's distinct blobs is in its list.
fn positions(blobs: &[(ChunkId, Location)]) -> HashMap<ChunkId, usize> {
    blobs.iter().enumerate().map(|(i, b)| (b.0, i)).collect()
}

/// The bases of a window's deltas that it did not read, or could not
/// (`have` says which of its blobs it has), each read on its own.
async fn missing_bases(
    inner: &Arc<Inner>,
    pos: &HashMap<ChunkId, usize>,
    wanted: impl Iterator<Item = ChunkId>,
    have: impl Fn(usize) -> bool,
) -> Result<HashMap<ChunkId, Vec<u8>>> {
    let mut extra = HashMap::new();
    for b in wanted {
        if !pos.get(&b).is_some_and(|&j| have(j)) && !extra.contains_key(&b) {
            extra.insert(b, read_chunk_at(inner, b, 1).await?);
        }
    }
    Ok(extra)
}

/// Read a window's chunks, in `refs` order, into one page-aligned buffer:
/// each blob is authenticated where it was read and decoded straight into
/// its place, by one task per window (a restore's writer then sends the
/// buffer to the disk as it is). Anything that does not decode is read
/// again through [`read_chunk`], which tries every copy before reporting
/// it.
async fn read_window_into(inner: &Arc<Inner>, w: Window) -> Result<PageBuf> {
    let blobs = Arc::new(w.blobs);
    let raw = fetch_window(inner, &blobs, w.fetches).await?;
    let pos = positions(&blobs);
    // The index names each delta's base (the blob itself says it again).
    let wanted: Vec<ChunkId> = (blobs.iter().zip(&raw))
        .filter_map(|((_, l), b)| b.as_ref().and(l.base))
        .collect();
    let extra = missing_bases(inner, &pos, wanted.iter().copied(), |j| raw[j].is_some()).await?;
    let (refs, slots, rehash) = (Arc::new(w.refs), w.slots, w.rehash);
    let (inner2, blobs2, refs2) = (inner.clone(), blobs.clone(), refs.clone());
    let (mut out, missed) = tokio::task::spawn_blocking(move || {
        let keys = inner2.keys_for(rehash);
        let what = |i: usize| blob_name(&blobs2[i]);
        let mut sealed = Sealed::new(raw);
        // Bases read in the window, decoded first, one after another
        // into one buffer.
        let mut bases: HashMap<ChunkId, Range<usize>> = HashMap::new();
        let mut seen = HashSet::new();
        let todo: Vec<(ChunkId, usize)> = wanted
            .into_iter()
            .filter(|&b| seen.insert(b))
            .filter_map(|b| pos.get(&b).map(|&j| (b, j)))
            .collect();
        let need = todo.iter().map(|&(_, j)| max_len(&inner2, &blobs2[j].1));
        let mut based = PageBuf::with_capacity(need.sum());
        for (b, j) in todo {
            let (at, len) = (based.len(), blobs2[j].1.raw_length as usize);
            let decoded = sealed.get(&keys, &blobs2, j).is_some_and(|bp| {
                bp.decode_onto(&keys, &b, None, &mut based, len, &what(j))
                    .is_ok()
            });
            if decoded {
                bases.insert(b, at..at + len);
            }
        }
        let total: usize = refs2.iter().map(|r| r.1 as usize).sum();
        let mut out = PageBuf::with_capacity(total);
        // Where each blob's first copy went; refs left for read_chunk.
        let mut placed: Vec<Option<(usize, usize)>> = vec![None; blobs2.len()];
        let mut missed = Vec::new();
        for (k, (r, slot)) in refs2.iter().zip(&slots).enumerate() {
            let (start, len) = (out.len(), r.1 as usize);
            let decoded = slot.and_then(|i| match placed[i] {
                Some((at, n)) if n == len => {
                    out.extend_from_within(at..at + len);
                    Some(())
                }
                Some(_) => None,
                None => {
                    let p = sealed.get(&keys, &blobs2, i)?;
                    let base = p.base().and_then(|b| {
                        bases
                            .get(&b)
                            .map(|r| &based[r.clone()])
                            .or_else(|| extra.get(&b).map(Vec::as_slice))
                    });
                    p.decode_onto(&keys, &r.0, base, &mut out, len, &what(i))
                        .ok()?;
                    placed[i] = Some((start, len));
                    Some(())
                }
            });
            if decoded.is_none() {
                out.extend_zeroed(len);
                missed.push(k);
            }
        }
        (out, missed)
    })
    .await?;
    let mut at = 0;
    let mut next = missed.into_iter().peekable();
    for (k, r) in refs.iter().enumerate() {
        let len = r.1 as usize;
        if next.peek() == Some(&k) {
            next.next();
            let d = read_chunk(inner, r.0).await?;
            expect_len(r, &d)?;
            out[at..at + len].copy_from_slice(&d);
        }
        at += len;
    }
    Ok(out)
}

/// Decode a window's delta blobs against their bases (read in the same
/// requests, or on their own when the window lacks them). A delta that
/// does not decode is read again through [`read_chunk`], which tries every
/// copy before reporting it.
async fn apply_deltas(
    inner: &Arc<Inner>,
    blobs: &Arc<Vec<(ChunkId, Location)>>,
    mut data: Vec<Option<Vec<u8>>>,
    deltas: Vec<(usize, ChunkId, Vec<u8>)>,
    rehash: bool,
) -> Result<Vec<Option<Vec<u8>>>> {
    let pos = positions(blobs);
    let wanted = deltas.iter().map(|(_, base, _)| *base);
    let extra = missing_bases(inner, &pos, wanted, |j| data[j].is_some()).await?;
    let inner2 = inner.clone();
    let blobs2 = blobs.clone();
    let (mut data, failed) = tokio::task::spawn_blocking(move || {
        let keys = inner2.keys_for(rehash);
        let mut failed = Vec::new();
        for (i, base, frame) in deltas {
            let (id, loc) = &blobs2[i];
            let base_data = pos
                .get(&base)
                .and_then(|&j| data[j].as_deref())
                .or_else(|| extra.get(&base).map(Vec::as_slice));
            let object = pack_object(&loc.pack);
            let got = base_data.and_then(|b| {
                apply_delta(&keys, id, b, &frame, max_len(&inner2, loc), &object).ok()
            });
            match got {
                Some(d) => data[i] = Some(d),
                None => failed.push(i),
            }
        }
        (data, failed)
    })
    .await?;
    for i in failed {
        data[i] = Some(read_chunk(inner, blobs[i].0).await?);
    }
    Ok(data)
}

/// Read a few chunks (at most a window's worth) with grouped requests.
pub(crate) async fn read_chunks(inner: &Arc<Inner>, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
    let w = {
        let inner = inner.clone();
        let ids = ids.to_vec();
        tokio::task::spawn_blocking(move || -> Result<Window> {
            let mut refs = Vec::with_capacity(ids.len());
            for id in ids {
                let loc = inner.index.lookup(&id)?.ok_or_else(|| {
                    RepoError::corrupt(format!("chunk {id}"), "referenced but in no index object")
                })?;
                refs.push(ChunkRef(id, loc.raw_length));
            }
            plan_window(&inner, &refs, |id| inner.index.lookup(id))
        })
        .await??
    };
    read_window(inner, w).await
}

/// Read chunks whose locations the caller has (the bases of a backup
/// batch's changed blocks: neighbours in a few packs) with grouped
/// requests, instead of a request each.
pub(crate) async fn fetch_chunks(
    inner: &Arc<Inner>,
    chunks: &[(ChunkId, Location)],
) -> Result<Vec<Vec<u8>>> {
    let known: HashMap<ChunkId, Location> = chunks.iter().copied().collect();
    let refs: Vec<ChunkRef> = chunks
        .iter()
        .map(|(id, l)| ChunkRef(*id, l.raw_length))
        .collect();
    let w = plan_window(inner, &refs, |id| match known.get(id) {
        Some(l) => Ok(Some(*l)),
        None => inner.index.lookup(id),
    })?;
    read_window(inner, w).await
}

/// Where [`read_refs`] delivers a stream: whole decoded windows, in
/// order. A sink may keep a window (a restore sends it to the disk as it
/// is) or copy it.
pub trait WindowSink {
    fn put(&mut self, window: PageBuf) -> std::io::Result<()>;
}

impl WindowSink for Vec<u8> {
    fn put(&mut self, window: PageBuf) -> std::io::Result<()> {
        self.extend_from_slice(&window);
        Ok(())
    }
}

/// Deliver the chunks' bytes to `out` in order, reading the next window
/// while this one is delivered (a window's own reads run `io_depth` at
/// once).
pub(crate) async fn read_refs<S: WindowSink + Send>(
    inner: &Arc<Inner>,
    refs: &[ChunkRef],
    out: &mut S,
) -> Result<()> {
    let windows = {
        let inner = inner.clone();
        let refs = refs.to_vec();
        tokio::task::spawn_blocking(move || plan_windows(&inner, &refs)).await??
    };
    // Each window is its own task, so reads and decoding go on while
    // this task waits in a write.
    let mut s = futures::stream::iter(windows)
        .map(|w| {
            let inner = inner.clone();
            let task = tokio::spawn(async move { read_window_into(&inner, w).await });
            async move { task.await? }
        })
        .buffered(READ_AHEAD);
    // Writing may block (back-pressure from the disk): off the async
    // workers, so the other streams' reads and decoding go on meanwhile.
    let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    while let Some(window) = s.try_next().await? {
        let write = || {
            out.put(window)
                .map_err(|e| RepoError::io("writing restored data", e))
        };
        if multi_thread {
            tokio::task::block_in_place(write)?;
        } else {
            write()?;
        }
    }
    Ok(())
}

/// Hashes a stream on its way to the sink.
pub(crate) struct HashingSink<'a, S: WindowSink> {
    pub inner: &'a mut S,
    pub hasher: &'a mut blake3::Hasher,
    pub written: u64,
}

impl<S: WindowSink> WindowSink for HashingSink<'_, S> {
    fn put(&mut self, window: PageBuf) -> std::io::Result<()> {
        self.hasher.update(&window);
        self.written += window.len() as u64;
        self.inner.put(window)
    }
}
