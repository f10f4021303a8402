//! The store pipeline: chunk, hash, deduplicate, compress, seal, pack,
//! upload, index; and the reverse for reading.
//!
//! ```text
//! reader thread ──batches──▶ bounded channel ──▶ CPU worker threads
//!   (FastCDC, whole-stream      │                 id, dedup check, zstd, seal
//!    BLAKE3)                    ▼ in stream order
//!                          packer ──full packs──▶ uploads (bounded) ──▶ index objects
//! ```
//!
//! Every stage is bounded, so memory stays flat whatever the input size:
//! batches (about 512 KiB of chunks each) in flight ≤ channel + workers,
//! packs in flight ≤ `io_depth`.
//! Order of durability: packs, then the index objects naming them, then
//! (in `commit`) the manifest.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::task::JoinSet;

use super::backend;
use super::chunker::stream_chunker;
use super::crypto::chunk_id;
use super::error::{RepoError, Result};
use super::format::{now_unix, to_cbor, ChunkId, Kind};
use super::index::{build_index, index_object, Location, PackInfo};
use super::lease::{load_marks, seal_doc, Condemned, Lease};
use super::manifest::{manifest_object, validate_name, ChunkRef, Entry, Manifest, ManifestDoc};
use super::pack::{
    pack_object, seal_chunk, seal_delta, ChunkKind, PackBuilder, PackEntry, SealedChunk,
};
use super::read::{fetch_chunk, fetch_chunks};
use super::workers::Workers;
use super::Inner;

/// How a stream is cut into chunks.
#[derive(Debug, Clone, Copy)]
enum Cutting {
    /// FastCDC with the repository's sizes and keyed gear seed.
    ContentDefined,
    /// Every `n` bytes (the last chunk may be shorter).
    Fixed(usize),
}

/// Chunks of exactly `block` bytes (the last one shorter), however the
/// reader splits its reads.
fn fixed_blocks<R: Read>(
    mut reader: R,
    block: usize,
) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut buf = vec![0u8; block];
        let mut filled = 0;
        while filled < block {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }
        if filled < block {
            done = true;
            if filled == 0 {
                return None;
            }
            buf.truncate(filled);
        }
        Some(Ok(buf))
    })
}

/// Bytes of chunks handed to a CPU worker at once. Per-chunk hand-offs
/// (channel, semaphore, blocking-pool wake-up) cost about as much as
/// compressing a 32 KiB block, and left a core idle in between.
const BATCH_BYTES: usize = 512 << 10;

/// Flush an index object once this many entries await one.
const INDEX_FLUSH_ENTRIES: usize = 64 * 1024;

/// The result of storing one stream.
#[derive(Debug, Clone)]
pub struct StoredStream {
    pub chunks: Vec<ChunkRef>,
    pub size: u64,
    /// Plain BLAKE3 of the whole stream.
    pub hash: ChunkId,
}

/// Counters of a writer session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriteStats {
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub bytes_new_raw: u64,
    pub bytes_new_stored: u64,
    pub bytes_reused: u64,
    pub packs_written: u64,
    pub index_objects_written: u64,
    /// Chunks rewritten because a collector had condemned their packs.
    pub chunks_rescued: u64,
    /// New chunks stored as a delta against their previous version.
    pub chunks_delta: u64,
}

struct Shared {
    inner: Arc<Inner>,
    /// Marks as read when the session started, before its first index
    /// lookup. A chunk whose every copy is in a pack they condemn is not
    /// deduplicated against but stored again: such a pack may be swept
    /// while this writer runs (a mark older than the session is due within
    /// it), and a mark swept is no longer listed at commit.
    marks_at_start: Condemned,
    /// New chunks of this session not yet in an index object it wrote:
    /// a second copy of one is not stored. Chunks found in the index are
    /// not kept here, and written ones leave once indexed, so this stays
    /// a few index flushes' worth however large the cluster (it held every
    /// chunk of a backup, about 50 bytes each).
    seen: Mutex<HashSet<ChunkId>>,
    /// Bases of the delta copies this session relies on (new or reused):
    /// the rescue at commit covers them as it covers referenced chunks.
    bases: Mutex<HashSet<ChunkId>>,
    /// Whether the repository format allows delta blobs (version 2).
    deltas: bool,
    stats: Mutex<WriteStats>,
    level: i32,
}

/// A pack that is durable in the repository, with its table.
type Uploaded = (PackInfo, Vec<PackEntry>);

struct Packers {
    data: PackBuilder,
    meta: PackBuilder,
}

/// A writer session: stores streams and commits manifests.
pub struct Writer {
    shared: Arc<Shared>,
    lease: Option<Lease>,
    cpu: Arc<Workers>,
    packers: tokio::sync::Mutex<Packers>,
    uploads: tokio::sync::Mutex<JoinSet<Result<Uploaded>>>,
    unindexed: Mutex<Vec<(PackInfo, Vec<PackEntry>)>>,
    /// When this writer last wrote an index object.
    last_index: Mutex<std::time::Instant>,
    /// Streams being stored right now; `commit` requires none.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// Counts a stream in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writer {
    pub(crate) async fn new(inner: Arc<Inner>, purpose: &str) -> Result<Writer> {
        let lease = Lease::acquire(
            inner.backend.clone(),
            inner.sealer.clone(),
            inner.repo_id,
            purpose,
            inner.config.gc.max_writer_secs,
        )
        .await?;
        let marks_at_start = load_marks(&inner.backend, &inner.sealer, &inner.repo_id).await?;
        let level = inner
            .opts
            .compression_level
            .unwrap_or(inner.config.compression.level);
        let workers = inner.opts.workers.max(1);
        let deltas = inner.config.format_version >= 2;
        Ok(Writer {
            shared: Arc::new(Shared {
                inner,
                marks_at_start,
                seen: Mutex::new(HashSet::new()),
                bases: Mutex::new(HashSet::new()),
                deltas,
                stats: Mutex::new(WriteStats::default()),
                level,
            }),
            lease: Some(lease),
            cpu: Arc::new(Workers::new(workers)?),
            packers: tokio::sync::Mutex::new(Packers {
                data: PackBuilder::new(ChunkKind::Data),
                meta: PackBuilder::new(ChunkKind::Meta),
            }),
            uploads: tokio::sync::Mutex::new(JoinSet::new()),
            unindexed: Mutex::new(Vec::new()),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last_index: Mutex::new(std::time::Instant::now()),
        })
    }

    pub fn stats(&self) -> WriteStats {
        lock(&self.shared.stats).clone()
    }

    /// Store everything `reader` yields as data chunks.
    pub async fn store_reader<R: Read + Send + 'static>(&self, reader: R) -> Result<StoredStream> {
        self.store(reader, ChunkKind::Data, Cutting::ContentDefined, None)
            .await
    }

    /// Store a stream of fixed-size records that change in place (database
    /// pages): cut at every `block` bytes, so a changed record re-stores
    /// only its own block, never its neighbours. `block` must lie within
    /// the repository's chunk size bounds' maximum.
    pub async fn store_blocks<R: Read + Send + 'static>(
        &self,
        reader: R,
        block: usize,
    ) -> Result<StoredStream> {
        self.store_blocks_after(reader, block, None).await
    }

    /// [`Writer::store_blocks`] for a stream whose previous version was
    /// stored as `previous` (same block size): a changed block is stored as
    /// a delta against the block it replaces (against that block's own
    /// base when it is a delta itself, so chains stay one long), which
    /// costs the bytes that changed rather than the block.
    pub async fn store_blocks_after<R: Read + Send + 'static>(
        &self,
        reader: R,
        block: usize,
        previous: Option<Arc<Vec<ChunkRef>>>,
    ) -> Result<StoredStream> {
        let max = self.shared.inner.config.chunker.max_size as usize;
        if block == 0 || block > max {
            return Err(RepoError::Task(format!(
                "block size {block} outside 1..={max} bytes"
            )));
        }
        let previous = previous.filter(|_| self.shared.deltas);
        self.store(reader, ChunkKind::Data, Cutting::Fixed(block), previous)
            .await
    }

    /// Reference a stream stored before without reading it again (the
    /// caller knows its content is unchanged): true when every chunk is
    /// stored where this session may rely on it, as a deduplicated chunk
    /// must be, and then counted as reused. False (a chunk missing, or only
    /// in packs a collector had condemned when the session started): store
    /// the stream again.
    pub async fn reuse(&self, chunks: Arc<Vec<ChunkRef>>) -> Result<bool> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            for c in chunks.iter() {
                if !lock(&shared.seen).contains(&c.0) && !shared.stored_safely(&c.0)? {
                    return Ok(false);
                }
            }
            let mut st = lock(&shared.stats);
            st.chunks_reused += chunks.len() as u64;
            st.bytes_reused += chunks.iter().map(|c| c.1 as u64).sum::<u64>();
            Ok(true)
        })
        .await?
    }

    /// New chunks of this session not yet in an index object: what the
    /// session holds to deduplicate against (bounded by index flushes, not
    /// by the size of what it stores).
    pub fn unindexed_new_chunks(&self) -> usize {
        lock(&self.shared.seen).len()
    }

    pub async fn store_bytes(&self, data: Vec<u8>) -> Result<StoredStream> {
        self.store(
            std::io::Cursor::new(data),
            ChunkKind::Data,
            Cutting::ContentDefined,
            None,
        )
        .await
    }

    async fn store<R: Read + Send + 'static>(
        &self,
        reader: R,
        kind: ChunkKind,
        cutting: Cutting,
        previous: Option<Arc<Vec<ChunkRef>>>,
    ) -> Result<StoredStream> {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _guard = InFlight(&self.in_flight);
        let inner = &self.shared.inner;
        let workers = inner.opts.workers.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<Vec<u8>>>>(workers * 2);
        let params = inner.config.chunker;
        let seed = inner.keys.gear_seed;
        let chunker = tokio::task::spawn_blocking(move || {
            let mut hasher = blake3::Hasher::new();
            let mut total = 0u64;
            let chunks: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>>> = match cutting {
                Cutting::ContentDefined => Box::new(
                    stream_chunker(reader, &params, seed)
                        .map(|c| c.map(|c| c.data).map_err(Into::into)),
                ),
                Cutting::Fixed(block) => Box::new(fixed_blocks(reader, block)),
            };
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for c in chunks {
                match c {
                    Ok(data) => {
                        hasher.update(&data);
                        total += data.len() as u64;
                        batch_bytes += data.len();
                        batch.push(data);
                        if batch_bytes >= BATCH_BYTES {
                            batch_bytes = 0;
                            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        batch.clear();
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
            (ChunkId(*hasher.finalize().as_bytes()), total)
        });
        let batches =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        // Room for base reads (I/O, no CPU permit held) beside the workers.
        let in_flight = workers * 2 + if previous.is_some() { workers } else { 0 };
        let mut next_chunk = 0usize;
        let processed = batches
            .map(|batch| {
                let shared = self.shared.clone();
                let cpu = self.cpu.clone();
                // The previous version of each chunk, by position.
                let first = next_chunk;
                next_chunk += batch.as_ref().map(|b| b.len()).unwrap_or(0);
                let previous = previous.clone();
                async move {
                    let batch = batch.map_err(|e| RepoError::io("reading the input stream", e))?;
                    let hints: Vec<Option<ChunkRef>> = batch
                        .iter()
                        .enumerate()
                        .map(|(k, data)| {
                            previous
                                .as_ref()
                                .and_then(|p| p.get(first + k).copied())
                                .filter(|h| h.1 as usize == data.len())
                        })
                        .collect();
                    let shared2 = shared.clone();
                    let steps = cpu
                        .run(move || {
                            batch
                                .into_iter()
                                .zip(hints)
                                .map(|(data, hint)| process_chunk(&shared2, kind, data, hint))
                                .collect::<Result<Vec<Step>>>()
                        })
                        .await??;
                    let mut done = Vec::with_capacity(steps.len());
                    let mut deltas = Vec::new();
                    for (k, step) in steps.into_iter().enumerate() {
                        match step {
                            Step::Done(cref, sealed) => done.push(Some((cref, sealed))),
                            Step::Delta {
                                id,
                                data,
                                base,
                                loc,
                            } => {
                                done.push(None);
                                deltas.push((k, id, data, base, loc));
                            }
                        }
                    }
                    if !deltas.is_empty() {
                        // A base that cannot be read costs only the saving:
                        // that block is stored whole.
                        let wanted: Vec<(ChunkId, Location)> =
                            deltas.iter().map(|d| (d.3, d.4)).collect();
                        let bases: Vec<Result<Vec<u8>>> =
                            match fetch_chunks(&shared.inner, &wanted).await {
                                Ok(all) => all.into_iter().map(Ok).collect(),
                                // Find out which base fails: one at a time.
                                Err(_) => {
                                    futures::stream::iter(&deltas)
                                        .map(|d| fetch_chunk(&shared.inner, &d.3, &d.4))
                                        .buffered(shared.inner.opts.io_depth.max(1))
                                        .collect()
                                        .await
                                }
                            };
                        let sealed = cpu
                            .run(move || {
                                deltas
                                    .into_iter()
                                    .zip(bases)
                                    .map(|((k, id, data, base, _), base_data)| {
                                        let base = base_data.ok().map(|d| (base, d));
                                        seal_new(&shared, kind, id, data, base).map(|r| (k, r))
                                    })
                                    .collect::<Result<Vec<_>>>()
                            })
                            .await??;
                        for (k, r) in sealed {
                            done[k] = Some(r);
                        }
                    }
                    done.into_iter()
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| RepoError::Task("a chunk of a batch was lost".into()))
                }
            })
            .buffered(in_flight);
        let mut processed = std::pin::pin!(processed);
        let mut refs = Vec::new();
        while let Some(r) = processed.next().await {
            for (cref, sealed) in r? {
                refs.push(cref);
                if let Some(s) = sealed {
                    self.add_to_pack(s).await?;
                }
            }
        }
        let (hash, size) = chunker.await?;
        let stored: u64 = refs.iter().map(|r| r.1 as u64).sum();
        if stored != size {
            return Err(RepoError::Task(format!(
                "chunked {size} bytes but stored {stored}"
            )));
        }
        Ok(StoredStream {
            chunks: refs,
            size,
            hash,
        })
    }

    /// Add an already sealed chunk (the collector copies live blobs out of
    /// mostly-garbage packs as they are: the seal binds the chunk id and
    /// kind, not the pack). Durable and indexed after [`Writer::flush`].
    pub(crate) async fn add_sealed(&self, s: SealedChunk) -> Result<()> {
        self.add_to_pack(s).await
    }

    async fn add_to_pack(&self, s: SealedChunk) -> Result<()> {
        let target = self.shared.inner.config.pack_target_size as usize;
        let full = {
            let mut p = self.packers.lock().await;
            let b = match s.kind {
                ChunkKind::Data => &mut p.data,
                ChunkKind::Meta => &mut p.meta,
            };
            b.add(s);
            if b.len() >= target {
                Some(std::mem::replace(b, PackBuilder::new(b.kind)))
            } else {
                None
            }
        };
        if let Some(b) = full {
            self.upload(b).await?;
        }
        Ok(())
    }

    /// Seal and upload a pack in the background; at most `io_depth` at once.
    async fn upload(&self, b: PackBuilder) -> Result<()> {
        let depth = self.shared.inner.opts.io_depth.max(1);
        let mut uploads = self.uploads.lock().await;
        while let Some(done) = uploads.try_join_next() {
            self.uploaded(done??)?;
        }
        self.wait_below(&mut uploads, depth).await?;
        drop(uploads);
        self.write_index(false).await?;
        let mut uploads = self.uploads.lock().await;
        // Other streams may have started uploads while the lock was free.
        self.wait_below(&mut uploads, depth).await?;
        let shared = self.shared.clone();
        uploads.spawn(async move {
            let inner = shared.inner.clone();
            let (id, bytes, entries) = {
                let inner = inner.clone();
                tokio::task::spawn_blocking(move || b.finish(&inner.sealer, &inner.repo_id))
                    .await??
            };
            let info = PackInfo {
                id,
                size: bytes.len() as u64,
                kind: entries.first().map(|e| e.kind).unwrap_or(ChunkKind::Data),
            };
            backend::put_immutable(&*inner.backend, &pack_object(&id), Bytes::from(bytes)).await?;
            lock(&shared.stats).packs_written += 1;
            Ok((info, entries))
        });
        Ok(())
    }

    /// Wait until fewer than `depth` uploads run.
    async fn wait_below(
        &self,
        uploads: &mut JoinSet<Result<Uploaded>>,
        depth: usize,
    ) -> Result<()> {
        while uploads.len() >= depth {
            if let Some(done) = uploads.join_next().await {
                self.uploaded(done??)?;
            }
        }
        Ok(())
    }

    fn uploaded(&self, done: (PackInfo, Vec<PackEntry>)) -> Result<()> {
        lock(&self.unindexed).push(done);
        Ok(())
    }

    /// Write every pending pack, wait for all uploads, then write the index
    /// objects that name them. After this, everything stored so far is
    /// durable and findable.
    pub async fn flush(&self) -> Result<()> {
        let (data, meta) = {
            let mut p = self.packers.lock().await;
            (
                std::mem::replace(&mut p.data, PackBuilder::new(ChunkKind::Data)),
                std::mem::replace(&mut p.meta, PackBuilder::new(ChunkKind::Meta)),
            )
        };
        for b in [data, meta] {
            if !b.is_empty() {
                self.upload(b).await?;
            }
        }
        {
            let mut uploads = self.uploads.lock().await;
            while let Some(done) = uploads.join_next().await {
                self.uploaded(done??)?;
            }
        }
        self.write_index(true).await
    }

    async fn write_index(&self, all: bool) -> Result<()> {
        let pending: Vec<(PackInfo, Vec<PackEntry>)> = {
            let mut u = lock(&self.unindexed);
            let n: usize = u.iter().map(|(_, e)| e.len()).sum();
            let due = lock(&self.last_index).elapsed().as_secs()
                >= self.shared.inner.opts.index_flush_secs;
            if u.is_empty() || (!all && n < INDEX_FLUSH_ENTRIES && !due) {
                return Ok(());
            }
            std::mem::take(&mut *u)
        };
        let written: Vec<ChunkId> = pending
            .iter()
            .flat_map(|(_, e)| e.iter().map(|e| e.id))
            .collect();
        let inner = self.shared.inner.clone();
        let page = inner.config.index_page_entries as usize;
        let (name, bytes) = {
            let inner = inner.clone();
            tokio::task::spawn_blocking(move || {
                build_index(&inner.sealer, &inner.repo_id, &pending, page)
            })
            .await??
        };
        // A session that overran its lease (a host frozen for days) must
        // not index packs: a collector may have condemned them as a killed
        // writer's leftovers, and other writers would then rely on them.
        if let Some(l) = &self.lease {
            l.check().await?;
        }
        backend::put_immutable(
            &*inner.backend,
            &index_object(&name),
            Bytes::from(bytes.clone()),
        )
        .await?;
        inner.index.add_written(&name, &bytes).await?;
        // Lookups find them now.
        {
            let mut seen = lock(&self.shared.seen);
            for id in &written {
                seen.remove(id);
            }
        }
        lock(&self.shared.stats).index_objects_written += 1;
        *lock(&self.last_index) = std::time::Instant::now();
        Ok(())
    }

    /// Store the manifest: its entry list as metadata chunks, then (after
    /// everything it references is durable and indexed, the lease is
    /// current, and no reused chunk depends on a condemned pack) the
    /// manifest document, create-if-absent.
    pub async fn commit(&self, manifest: &Manifest) -> Result<()> {
        validate_name(&manifest.name)?;
        // A chunk another stream has claimed but not yet packed would be
        // referenced before it is durable.
        if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            return Err(RepoError::Task(
                "commit called while streams are still being stored".into(),
            ));
        }
        let object = manifest_object(&manifest.name);
        let body = to_cbor(&manifest.entries)?;
        let body_len = body.len() as u64;
        let body_hash = ChunkId(*blake3::hash(&body).as_bytes());
        let stored = self
            .store(
                std::io::Cursor::new(body),
                ChunkKind::Meta,
                Cutting::ContentDefined,
                None,
            )
            .await?;
        self.flush().await?;
        self.rescue_condemned(manifest, &stored.chunks).await?;
        if let Some(l) = &self.lease {
            l.check().await?;
        }
        let doc = ManifestDoc {
            name: manifest.name.clone(),
            created: manifest.created,
            meta: manifest.meta.clone(),
            body: stored.chunks,
            body_len,
            body_hash,
            entry_count: manifest.entries.len() as u64,
            logical_bytes: manifest.entries.iter().map(|e| e.size).sum(),
        };
        let inner = &self.shared.inner;
        let bytes = seal_doc(&inner.sealer, &inner.repo_id, Kind::Manifest, &object, &doc)?;
        backend::put_immutable(&*inner.backend, &object, Bytes::from(bytes)).await?;
        Ok(())
    }

    /// The writer's side of two-phase deletion: any chunk this manifest
    /// references that a collector has marked as garbage, and that has no
    /// copy outside condemned packs, is read back and stored again. Marks
    /// older than the session were honoured while storing (no dedup
    /// against their packs); these are the marks written since, whose
    /// packs stay until well after this session ends.
    async fn rescue_condemned(&self, manifest: &Manifest, body: &[ChunkRef]) -> Result<()> {
        let inner = self.shared.inner.clone();
        let mut condemned = load_marks(&inner.backend, &inner.sealer, &inner.repo_id).await?;
        let at_start = &self.shared.marks_at_start;
        condemned.packs.extend(at_start.packs.iter().copied());
        for (c, p) in &at_start.garbage {
            condemned.garbage.entry(*c).or_insert(*p);
        }
        if condemned.garbage.is_empty() {
            return Ok(());
        }
        let mut rescued = HashSet::new();
        let bases: Vec<ChunkId> = lock(&self.shared.bases).iter().copied().collect();
        let refs = manifest
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| (c.0, ChunkKind::Data)))
            .chain(bases.into_iter().map(|b| (b, ChunkKind::Data)))
            .chain(body.iter().map(|c| (c.0, ChunkKind::Meta)));
        for (id, kind) in refs {
            if !condemned.garbage.contains_key(&id) || rescued.contains(&id) {
                continue;
            }
            let locs = {
                let index = inner.index.clone();
                tokio::task::spawn_blocking(move || index.lookup_all(&id)).await??
            };
            if locs.iter().any(|l| !condemned.packs.contains(&l.pack)) {
                continue;
            }
            // Any copy will do: a pack condemned by a mark read at the
            // start may be swept by now while another copy remains.
            let mut data = Err(RepoError::corrupt(
                id.to_hex(),
                "referenced chunk is in no index",
            ));
            for loc in &locs {
                data = fetch_chunk(&inner, &id, loc).await;
                if data.is_ok() {
                    break;
                }
            }
            let data = data?;
            let sealed = {
                let inner = inner.clone();
                let level = self.shared.level;
                tokio::task::spawn_blocking(move || {
                    seal_chunk(&inner.sealer, &inner.repo_id, kind, id, &data, level)
                })
                .await??
            };
            self.add_to_pack(sealed).await?;
            rescued.insert(id);
        }
        if !rescued.is_empty() {
            lock(&self.shared.stats).chunks_rescued += rescued.len() as u64;
            self.flush().await?;
        }
        Ok(())
    }

    /// End the session: flush what is pending and drop the lease.
    pub async fn finish(mut self) -> Result<WriteStats> {
        self.flush().await?;
        if let Some(l) = self.lease.take() {
            l.release().await;
        }
        Ok(self.stats())
    }
}

impl Shared {
    /// Whether a copy of `id` is in a pack the marks read at the start of
    /// the session do not condemn for it.
    fn safe(&self, id: &ChunkId, l: &Location) -> bool {
        !self.marks_at_start.garbage.contains_key(id)
            || !self.marks_at_start.packs.contains(&l.pack)
    }

    /// A copy of `id` stored whole in a pack this session may rely on.
    fn whole_copy(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self
            .inner
            .index
            .lookup_all(id)?
            .into_iter()
            .find(|l| l.base.is_none() && self.safe(id, l)))
    }

    /// Whether the chunk is stored in a pack this session may rely on: any
    /// pack, unless the marks read at the start list the chunk as garbage,
    /// in which case a copy outside their condemned packs. A delta copy
    /// counts when its base has such a copy stored whole; the base is then
    /// remembered for the rescue at commit.
    fn stored_safely(&self, id: &ChunkId) -> Result<bool> {
        for l in self.inner.index.lookup_all(id)? {
            if !self.safe(id, &l) {
                continue;
            }
            match l.base {
                None => return Ok(true),
                Some(b) => {
                    if self.whole_copy(&b)?.is_some() {
                        lock(&self.bases).insert(b);
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// The base for a new version of a block whose previous version is
    /// `prev`: that chunk when stored whole, else its own base.
    fn base_for(&self, prev: &ChunkId) -> Result<Option<(ChunkId, Location)>> {
        if let Some(l) = self.whole_copy(prev)? {
            return Ok(Some((*prev, l)));
        }
        let Some(b) = self.inner.index.lookup(prev)?.and_then(|l| l.base) else {
            return Ok(None);
        };
        Ok(self.whole_copy(&b)?.map(|l| (b, l)))
    }
}

/// What a worker decided for one chunk.
enum Step {
    /// Reused (no blob) or sealed.
    Done(ChunkRef, Option<SealedChunk>),
    /// New, with a base worth a delta: read the base, then [`seal_new`].
    Delta {
        id: ChunkId,
        data: Vec<u8>,
        base: ChunkId,
        loc: Location,
    },
}

/// Hash a chunk and decide: already stored (reuse), new with a previous
/// version to delta against, or new (compress, seal).
fn process_chunk(
    shared: &Shared,
    kind: ChunkKind,
    data: Vec<u8>,
    hint: Option<ChunkRef>,
) -> Result<Step> {
    let inner = &shared.inner;
    let id = ChunkId(chunk_id(&inner.keys.chunk_id, &data));
    let len = data.len() as u32;
    // Claimed only once the index says new: two workers racing on one new
    // chunk, one claims it and the other takes it as stored.
    let known = lock(&shared.seen).contains(&id)
        || shared.stored_safely(&id)?
        || !lock(&shared.seen).insert(id);
    if known {
        let mut st = lock(&shared.stats);
        st.chunks_reused += 1;
        st.bytes_reused += len as u64;
        return Ok(Step::Done(ChunkRef(id, len), None));
    }
    if let Some(prev) = hint.filter(|h| h.0 != id) {
        if let Some((base, loc)) = shared.base_for(&prev.0)? {
            if base != id {
                return Ok(Step::Delta {
                    id,
                    data,
                    base,
                    loc,
                });
            }
        }
    }
    let (cref, sealed) = seal_new(shared, kind, id, data, None)?;
    Ok(Step::Done(cref, sealed))
}

/// Seal a new chunk: as a delta against `base` when that is clearly
/// smaller (a delta also keeps its base alive), else whole.
fn seal_new(
    shared: &Shared,
    kind: ChunkKind,
    id: ChunkId,
    data: Vec<u8>,
    base: Option<(ChunkId, Vec<u8>)>,
) -> Result<(ChunkRef, Option<SealedChunk>)> {
    let inner = &shared.inner;
    let len = data.len() as u32;
    let mut delta = match &base {
        Some((b, bd)) => seal_delta(&inner.sealer, &inner.repo_id, id, &data, *b, bd, data.len())?,
        None => None,
    };
    // A delta under an eighth of the block is kept without a comparison;
    // otherwise it must beat the whole block by a quarter.
    let sealed = match delta.take() {
        Some(d) if d.blob.len() * 8 < data.len() => d,
        Some(d) => {
            let whole = seal_chunk(&inner.sealer, &inner.repo_id, kind, id, &data, shared.level)?;
            if d.blob.len() * 4 < whole.blob.len() * 3 {
                d
            } else {
                whole
            }
        }
        None => seal_chunk(&inner.sealer, &inner.repo_id, kind, id, &data, shared.level)?,
    };
    if let Some(b) = sealed.base {
        lock(&shared.bases).insert(b);
    }
    let mut st = lock(&shared.stats);
    st.chunks_new += 1;
    st.bytes_new_raw += len as u64;
    st.bytes_new_stored += sealed.blob.len() as u64;
    if sealed.base.is_some() {
        st.chunks_delta += 1;
    }
    Ok((ChunkRef(id, len), Some(sealed)))
}

/// Build an [`Entry`] from a stored stream.
pub fn entry(path: impl Into<String>, s: StoredStream, attrs: ciborium::Value) -> Entry {
    Entry {
        path: path.into(),
        size: s.size,
        hash: s.hash,
        chunks: s.chunks,
        attrs,
    }
}

/// A manifest stamped now.
pub fn manifest(name: impl Into<String>, meta: ciborium::Value, entries: Vec<Entry>) -> Manifest {
    Manifest {
        name: name.into(),
        created: now_unix(),
        meta,
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most 3 bytes per call, like a pipe.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn fixed_blocks_are_exact_whatever_the_reads() {
        let data: Vec<u8> = (0..100u8).collect();
        let blocks: Vec<Vec<u8>> = fixed_blocks(Trickle(&data), 32)
            .collect::<std::io::Result<_>>()
            .unwrap();
        let lens: Vec<usize> = blocks.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![32, 32, 32, 4]);
        assert_eq!(blocks.concat(), data);
        assert_eq!(fixed_blocks(Trickle(&[]), 32).count(), 0);
        assert_eq!(fixed_blocks(Trickle(&data[..64]), 32).count(), 2);
    }
}
