//! Index objects map chunk ids to (pack, offset, length). They are written
//! after their packs and before any manifest that needs them, are immutable,
//! named by the hash of their bytes, and can be rebuilt from pack tables.
//!
//! An index object is paged so that nobody has to hold the whole index in
//! memory (a 10 TB repository has over 10^8 chunk ids):
//!
//! ```text
//! index = header("I") sealed(page)* sealed(directory) dir_len:u32le
//! page  = entry*   sorted by chunk id, at most `index_page_entries`
//! entry = id:32 pack:u32le offset:u32le length:u32le raw_length:u32le kind:u8
//!         [base:32]   when kind has bit 1 set (a delta blob, format 2)
//! ```
//!
//! `kind` bit 0: metadata chunk; bit 1: a base id follows.
//!
//! A reader keeps directories in memory (first and last id of each page:
//! ~80 bytes per 1024 chunks), fetches index objects once into a local cache
//! directory (they never change), and decrypts pages on demand into an LRU
//! bounded by entries. Ids are uniform, so every page of every object spans
//! much of the id space: asking each object would read one page per object
//! per lookup (hundreds of small objects from archive-push make that the
//! whole cost of a restore). So a lookup first asks a [`Filter`]: the first
//! 8 bytes of every id with its object and page, sorted (16 bytes per
//! chunk), built on the first lookup after the set changed.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use lru::LruCache;
use serde::{Deserialize, Serialize};

use super::backend::{self, DynBackend};
use super::crypto::Sealer;
use super::error::{RepoError, Result};
use super::format::{
    aad, check_header, from_cbor, header, now_unix, to_cbor, ChunkId, Kind, PackId, HEADER_LEN,
};
use super::pack::{ChunkKind, PackEntry};

pub const INDEX_PREFIX: &str = "index/";
const ENTRY_LEN: usize = 49;
/// Far above any page written (1024 entries of at most 81 bytes, sealed).
const MAX_PAGE_BYTES: u32 = 256 << 20;

/// Where a chunk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub kind: ChunkKind,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    /// For a delta blob, the chunk it decodes against.
    pub base: Option<ChunkId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackInfo {
    pub id: PackId,
    pub size: u64,
    pub kind: ChunkKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PageRef {
    first: ChunkId,
    last: ChunkId,
    offset: u64,
    length: u32,
    count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Directory {
    created: i64,
    packs: Vec<PackInfo>,
    pages: Vec<PageRef>,
    entries: u64,
}

#[derive(Debug, Clone, Copy)]
struct RawEntry {
    id: ChunkId,
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
    kind: ChunkKind,
    base: Option<ChunkId>,
}

impl RawEntry {
    fn location(&self, pack: PackId) -> Location {
        Location {
            pack,
            kind: self.kind,
            offset: self.offset,
            length: self.length,
            raw_length: self.raw_length,
            base: self.base,
        }
    }
}

pub fn index_object(name_hex: &str) -> String {
    format!("{INDEX_PREFIX}{name_hex}")
}

fn page_aad(repo_id: &[u8; 16], page: u32) -> Vec<u8> {
    let mut ctx = b"page".to_vec();
    ctx.extend_from_slice(&page.to_le_bytes());
    aad(repo_id, Kind::IndexPage, &ctx)
}

/// Build one index object from packs and their tables. Returns (name, bytes).
pub fn build_index(
    sealer: &Sealer,
    repo_id: &[u8; 16],
    packs: &[(PackInfo, Vec<PackEntry>)],
    page_entries: usize,
) -> Result<(String, Vec<u8>)> {
    let mut all: Vec<RawEntry> = Vec::new();
    let mut infos = Vec::with_capacity(packs.len());
    for (i, (info, entries)) in packs.iter().enumerate() {
        infos.push(info.clone());
        all.extend(entries.iter().map(|e| RawEntry {
            id: e.id,
            pack: i as u32,
            offset: e.offset,
            length: e.length,
            raw_length: e.raw_length,
            kind: e.kind,
            base: e.base,
        }));
    }
    all.sort_by_key(|a| a.id);
    let mut out = header(Kind::Index).to_vec();
    let mut pages = Vec::new();
    for (no, chunk) in all.chunks(page_entries.max(1)).enumerate() {
        let mut plain = Vec::with_capacity(chunk.len() * ENTRY_LEN);
        for e in chunk {
            plain.extend_from_slice(&e.id.0);
            plain.extend_from_slice(&e.pack.to_le_bytes());
            plain.extend_from_slice(&e.offset.to_le_bytes());
            plain.extend_from_slice(&e.length.to_le_bytes());
            plain.extend_from_slice(&e.raw_length.to_le_bytes());
            let meta = match e.kind {
                ChunkKind::Data => 0,
                ChunkKind::Meta => 1,
            };
            match e.base {
                None => plain.push(meta),
                Some(b) => {
                    plain.push(meta | 2);
                    plain.extend_from_slice(&b.0);
                }
            }
        }
        let sealed = sealer.seal(&plain, &page_aad(repo_id, no as u32))?;
        pages.push(PageRef {
            first: chunk[0].id,
            last: chunk[chunk.len() - 1].id,
            offset: out.len() as u64,
            length: sealed.len() as u32,
            count: chunk.len() as u32,
        });
        out.extend_from_slice(&sealed);
    }
    let dir = Directory {
        created: now_unix(),
        packs: infos,
        pages,
        entries: all.len() as u64,
    };
    let sealed = sealer.seal(&to_cbor(&dir)?, &aad(repo_id, Kind::IndexPage, b"dir"))?;
    out.extend_from_slice(&sealed);
    out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    let name = blake3::hash(&out).to_hex().to_string();
    Ok((name, out))
}

/// Decrypted pages by (loaded object's sequence number, page number),
/// bounded by the entries they hold.
struct PageCache {
    lru: LruCache<(u64, u32), Arc<Vec<RawEntry>>>,
    entries: usize,
    max_entries: usize,
}

/// Distinguishes loaded objects without hashing their names per lookup.
static LOADED_SEQ: AtomicU64 = AtomicU64::new(0);

struct Loaded {
    seq: u64,
    name: String,
    file: PathBuf,
    dir: Directory,
}

impl Loaded {
    fn new(name: &str, file: PathBuf, dir: Directory) -> Loaded {
        Loaded {
            seq: LOADED_SEQ.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            file,
            dir,
        }
    }
}

/// Which object and page hold each id, by the id's first 8 bytes.
struct Filter {
    /// The set it was built from (`IndexSet::generation`).
    generation: u64,
    loaded: Vec<Arc<Loaded>>,
    /// (id prefix, position in `loaded`, page), sorted.
    keys: Vec<(u64, u32, u32)>,
    /// Where the keys whose top bits are `b` start, at `starts[b]`: a
    /// lookup searches the few keys of its bucket. A binary search over
    /// all keys missed the cache at nearly every step (most of a restore's
    /// index time).
    starts: Vec<u32>,
    shift: u32,
}

impl Filter {
    fn new(generation: u64, loaded: Vec<Arc<Loaded>>, keys: Vec<(u64, u32, u32)>) -> Self {
        // About eight keys a bucket (ids are uniform hashes).
        let bits = (usize::BITS - keys.len().leading_zeros())
            .saturating_sub(3)
            .clamp(1, 24);
        let shift = 64 - bits;
        let mut starts = Vec::with_capacity((1 << bits) + 1);
        let mut i = 0;
        for b in 0..1u64 << bits {
            while i < keys.len() && keys[i].0 >> shift < b {
                i += 1;
            }
            starts.push(i as u32);
        }
        starts.push(keys.len() as u32);
        Filter {
            generation,
            loaded,
            keys,
            starts,
            shift,
        }
    }

    /// The keys with prefix `p`.
    fn find(&self, p: u64) -> &[(u64, u32, u32)] {
        let b = (p >> self.shift) as usize;
        let run = &self.keys[self.starts[b] as usize..self.starts[b + 1] as usize];
        let run = &run[run.partition_point(|k| k.0 < p)..];
        &run[..run.partition_point(|k| k.0 == p)]
    }
}

/// Merge two sorted key lists (from disjoint objects, so no duplicates).
fn merge_sorted(a: &[(u64, u32, u32)], b: &[(u64, u32, u32)]) -> Vec<(u64, u32, u32)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

fn prefix(id: &ChunkId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id.0[..8]);
    u64::from_be_bytes(b)
}

/// Every index object of the repository, paged in on demand.
pub struct IndexSet {
    backend: DynBackend,
    sealer: Sealer,
    repo_id: [u8; 16],
    cache_dir: PathBuf,
    loaded: RwLock<Vec<Arc<Loaded>>>,
    /// Bumped whenever `loaded` changes; the filter is rebuilt lazily.
    generation: AtomicU64,
    filter: Mutex<Option<Arc<Filter>>>,
    /// Pages decrypted to build filters (a cost tests can observe).
    filter_pages_read: AtomicU64,
    pages: Mutex<PageCache>,
}

impl IndexSet {
    pub fn new(
        backend: DynBackend,
        sealer: Sealer,
        repo_id: [u8; 16],
        cache_dir: PathBuf,
        page_cache_entries: usize,
    ) -> Self {
        IndexSet {
            backend,
            sealer,
            repo_id,
            cache_dir,
            loaded: RwLock::new(Vec::new()),
            generation: AtomicU64::new(0),
            filter: Mutex::new(None),
            filter_pages_read: AtomicU64::new(0),
            pages: Mutex::new(PageCache {
                lru: LruCache::unbounded(),
                entries: 0,
                max_entries: page_cache_entries.max(1),
            }),
        }
    }

    /// Bring the set up to date with the repository's `index/` listing:
    /// load new objects, forget removed ones. A failed listing is an error.
    pub async fn refresh(&self) -> Result<()> {
        // An object listed but gone when fetched was superseded by the
        // collector, which writes the compacted object first: list again
        // (a few times, with a pause, as the collector may be deleting a
        // run of them) so that the replacement is seen. Only an object
        // still listed and still missing is an error.
        let mut attempt = 0;
        loop {
            match self.refresh_once().await? {
                None => return Ok(()),
                Some(gone) if attempt >= 5 => return Err(RepoError::NotFound { key: gone }),
                Some(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One pass; `Some(key)` names an object listed but not found.
    async fn refresh_once(&self) -> Result<Option<String>> {
        // Objects loaded after this point (a writer adding what it wrote)
        // are not in the listing below, and stay.
        let before: HashSet<String> = self.read_loaded().iter().map(|l| l.name.clone()).collect();
        let listed = backend::list(&*self.backend, INDEX_PREFIX).await?;
        let names: HashSet<String> = listed
            .iter()
            .filter_map(|o| o.key.strip_prefix(INDEX_PREFIX).map(str::to_string))
            .collect();
        let mut gone = None;
        for o in &listed {
            let Some(name) = o.key.strip_prefix(INDEX_PREFIX) else {
                continue;
            };
            if before.contains(name) {
                continue;
            }
            match self.load_object(name, o.size).await {
                Ok(l) => {
                    self.write_loaded().push(Arc::new(l));
                    self.changed();
                }
                Err(RepoError::NotFound { key }) => gone = Some(key),
                Err(e) => return Err(e),
            }
        }
        let mut loaded = self.write_loaded();
        let n = loaded.len();
        loaded.retain(|l| names.contains(&l.name) || !before.contains(&l.name));
        if loaded.len() != n {
            self.changed();
        }
        drop(loaded);
        if gone.is_none() {
            self.prune_cache(&names);
        }
        Ok(gone)
    }

    /// Remove cached copies of objects the store no longer lists (the
    /// collector superseded them) and temporary files of killed
    /// processes, once no process has loaded them for a week: another
    /// process may still read pages from a copy it loaded. Without this the
    /// cache (on the database's file system, for the postgres user) grows
    /// by an object per archived WAL file for ever. Only after a complete
    /// listing; a failure leaves files for a later run.
    fn prune_cache(&self, listed: &HashSet<String>) {
        const UNUSED: std::time::Duration = std::time::Duration::from_secs(7 * 86400);
        let Ok(rd) = std::fs::read_dir(&self.cache_dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            if !n.starts_with('.') && listed.contains(n) {
                continue;
            }
            let unused = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNUSED);
            if unused && e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Like `refresh`, but every object is read from the store again, and
    /// one that cannot be read or fails its checks is left out and reported
    /// instead of failing the whole load (for `verify`, which names every
    /// damaged object). A failed listing is still an error.
    pub async fn refresh_reporting(&self) -> Result<Vec<(String, RepoError)>> {
        let mut bad = Vec::new();
        let mut fresh: Vec<Arc<Loaded>> = Vec::new();
        // Names loaded or reported, so each listing pass is linear.
        let mut done: HashSet<String> = HashSet::new();
        // A listed object found gone was superseded by a collector if a
        // later listing no longer has it (its replacement is then listed).
        let mut attempt = 0;
        loop {
            let listed = backend::list(&*self.backend, INDEX_PREFIX).await?;
            let mut gone = Vec::new();
            for o in &listed {
                let Some(name) = o.key.strip_prefix(INDEX_PREFIX) else {
                    continue;
                };
                if done.contains(name) {
                    continue;
                }
                match self.load_object_from(name, o.size, false).await {
                    Ok(l) => fresh.push(Arc::new(l)),
                    Err(RepoError::NotFound { .. }) if attempt < 5 => {
                        gone.push(o.key.clone());
                        continue;
                    }
                    Err(e) => bad.push((o.key.clone(), e)),
                }
                done.insert(name.to_string());
            }
            if gone.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
            attempt += 1;
        }
        *self.write_loaded() = fresh;
        self.changed();
        Ok(bad)
    }

    /// Visit every entry of every loaded index object: (index object key,
    /// chunk id, location, pack size as indexed). A page that fails its
    /// checks is reported per object and skipped.
    pub fn scan(
        &self,
        mut f: impl FnMut(&str, &ChunkId, &Location, u64),
    ) -> Vec<(String, RepoError)> {
        let loaded: Vec<Arc<Loaded>> = self.read_loaded().clone();
        let mut bad = Vec::new();
        for l in loaded {
            let object = index_object(&l.name);
            for no in 0..l.dir.pages.len() as u32 {
                let page = match self.read_page(&l, no) {
                    Ok(p) => p,
                    Err(e) => {
                        bad.push((object.clone(), e));
                        break;
                    }
                };
                for e in page.iter() {
                    let p = &l.dir.packs[e.pack as usize];
                    let loc = e.location(p.id);
                    f(&object, &e.id, &loc, p.size);
                }
            }
        }
        bad
    }

    /// Names of the index objects as loaded, with their entry counts.
    pub fn objects(&self) -> Vec<(String, u64)> {
        self.read_loaded()
            .iter()
            .map(|l| (l.name.clone(), l.dir.entries))
            .collect()
    }

    /// Visit every entry of one loaded index object (by name, without the
    /// `index/` prefix): chunk id, location, pack size as indexed. Unlike
    /// [`IndexSet::scan`], a page that fails its checks is an error: the
    /// collector must not act on an index it could only partly read.
    pub fn scan_object(
        &self,
        name: &str,
        mut f: impl FnMut(&ChunkId, &Location, u64),
    ) -> Result<()> {
        let l = self
            .read_loaded()
            .iter()
            .find(|l| l.name == name)
            .cloned()
            .ok_or_else(|| RepoError::NotFound {
                key: index_object(name),
            })?;
        for no in 0..l.dir.pages.len() as u32 {
            let page = self.read_page(&l, no)?;
            for e in page.iter() {
                let p = &l.dir.packs[e.pack as usize];
                let loc = e.location(p.id);
                f(&e.id, &loc, p.size);
            }
        }
        Ok(())
    }

    /// Add an index object this process just wrote.
    pub async fn add_written(&self, name: &str, bytes: &[u8]) -> Result<()> {
        if self.read_loaded().iter().any(|l| l.name == name) {
            return Ok(());
        }
        let file = self.store_in_cache(name, bytes)?;
        let dir = self.read_directory(name, bytes)?;
        self.write_loaded()
            .push(Arc::new(Loaded::new(name, file, dir)));
        self.changed();
        Ok(())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The filter of the current set, brought up to date if the set
    /// changed since the last one. Objects only appended (a writer adding
    /// what it wrote, a refresh finding new objects) are read and merged
    /// in; a removal rebuilds it from every page. Rebuilding on every
    /// append made each backup slower as the repository grew.
    fn filter(&self) -> Result<Arc<Filter>> {
        let mut slot = self.filter.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(f) = slot.as_ref().filter(|f| f.generation == generation) {
            return Ok(f.clone());
        }
        let loaded: Vec<Arc<Loaded>> = self.read_loaded().clone();
        let base = slot.as_ref().filter(|f| {
            f.loaded.len() <= loaded.len()
                && f.loaded.iter().zip(&loaded).all(|(a, b)| Arc::ptr_eq(a, b))
        });
        let from = base.map_or(0, |f| f.loaded.len());
        let mut added = Vec::with_capacity(
            loaded[from..]
                .iter()
                .map(|l| l.dir.entries as usize)
                .sum::<usize>()
                .min(1 << 24),
        );
        for (i, l) in loaded.iter().enumerate().skip(from) {
            for no in 0..l.dir.pages.len() as u32 {
                self.filter_pages_read.fetch_add(1, Ordering::Relaxed);
                for e in self.decrypt_page(l, no)?.iter() {
                    added.push((prefix(&e.id), i as u32, no));
                }
            }
        }
        added.sort_unstable();
        // Two ids sharing a prefix in one page would yield the page twice.
        added.dedup();
        let keys = match base {
            Some(f) => merge_sorted(&f.keys, &added),
            None => added,
        };
        let f = Arc::new(Filter::new(generation, loaded, keys));
        *slot = Some(f.clone());
        Ok(f)
    }

    fn read_loaded(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Loaded>>> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_loaded(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Loaded>>> {
        self.loaded.write().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_path(&self, name: &str) -> PathBuf {
        self.cache_dir.join(name)
    }

    fn store_in_cache(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let path = self.cache_path(name);
        std::fs::create_dir_all(&self.cache_dir).map_err(|e| {
            RepoError::io(
                format!("creating cache directory {}", self.cache_dir.display()),
                e,
            )
        })?;
        let tmp = self
            .cache_dir
            .join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, bytes)
            .map_err(|e| RepoError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| RepoError::io(format!("renaming into {}", path.display()), e))?;
        Ok(path)
    }

    async fn load_object(&self, name: &str, size: u64) -> Result<Loaded> {
        self.load_object_from(name, size, true).await
    }

    /// `use_cache = false` re-reads the stored object (verify checks what a
    /// fresh machine would read, not this machine's copy).
    async fn load_object_from(&self, name: &str, size: u64, use_cache: bool) -> Result<Loaded> {
        let object = index_object(name);
        let path = self.cache_path(name);
        // Cached copies were verified against their name when fetched.
        if let Some(meta) = use_cache.then(|| std::fs::metadata(&path).ok()).flatten() {
            if meta.len() == size {
                let bytes = read_tail(&path, &object)?;
                if let Ok(dir) = self.read_directory_tail(&bytes.0, bytes.1, &object) {
                    // The mtime says (to within a day) when a process last
                    // loaded it, so the cache pruning, after a week unused,
                    // never removes a copy still in use. At most once a day:
                    // every process loads every object.
                    let stale = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_none_or(|age| age > std::time::Duration::from_secs(86400));
                    if stale {
                        if let Ok(f) = std::fs::File::open(&path) {
                            let _ = f.set_modified(std::time::SystemTime::now());
                        }
                    }
                    return Ok(Loaded::new(name, path, dir));
                }
            }
        }
        let bytes: Bytes = backend::get(&*self.backend, &object).await?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            return Err(RepoError::corrupt(
                &object,
                "content does not hash to its name",
            ));
        }
        let file = self.store_in_cache(name, &bytes)?;
        let dir = self.read_directory(name, &bytes)?;
        Ok(Loaded::new(name, file, dir))
    }

    fn read_directory(&self, name: &str, bytes: &[u8]) -> Result<Directory> {
        let object = index_object(name);
        check_header(bytes, Kind::Index, &object)?;
        self.read_directory_tail(bytes, bytes.len() as u64, &object)
    }

    /// `tail` holds the last bytes of an object of `total` bytes.
    fn read_directory_tail(&self, tail: &[u8], total: u64, object: &str) -> Result<Directory> {
        if tail.len() < 4 {
            return Err(RepoError::corrupt(object, "truncated index"));
        }
        let n = u32::from_le_bytes(
            tail[tail.len() - 4..]
                .try_into()
                .map_err(|_| RepoError::corrupt(object, "bad tail"))?,
        ) as usize;
        if n + 4 > tail.len() || (n + 4 + HEADER_LEN) as u64 > total {
            return Err(RepoError::corrupt(object, "directory length out of range"));
        }
        let sealed = &tail[tail.len() - 4 - n..tail.len() - 4];
        let plain =
            self.sealer
                .open(sealed, &aad(&self.repo_id, Kind::IndexPage, b"dir"), object)?;
        from_cbor(&plain, object)
    }

    fn read_page(&self, l: &Loaded, no: u32) -> Result<Arc<Vec<RawEntry>>> {
        let key = (l.seq, no);
        if let Some(p) = self
            .pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lru
            .get(&key)
        {
            return Ok(p.clone());
        }
        let entries = self.decrypt_page(l, no)?;
        let mut cache = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        cache.entries += entries.len();
        if let Some(old) = cache.lru.put(key, entries.clone()) {
            cache.entries -= old.len();
        }
        while cache.entries > cache.max_entries && cache.lru.len() > 1 {
            match cache.lru.pop_lru() {
                Some((_, old)) => cache.entries -= old.len(),
                None => break,
            }
        }
        Ok(entries)
    }

    /// Read and authenticate one page from the cached object (no caching).
    fn decrypt_page(&self, l: &Loaded, no: u32) -> Result<Arc<Vec<RawEntry>>> {
        let object = index_object(&l.name);
        let pr = &l.dir.pages[no as usize];
        let f = std::fs::File::open(&l.file)
            .map_err(|e| RepoError::io(format!("opening cached {}", l.file.display()), e))?;
        // A page holds at most index_page_entries entries of at most 81
        // bytes; a directory saying more is damaged, not an allocation.
        if pr.length > MAX_PAGE_BYTES {
            return Err(RepoError::corrupt(
                object,
                format!("page {no} claims {} bytes", pr.length),
            ));
        }
        let mut buf = vec![0u8; pr.length as usize];
        f.read_exact_at(&mut buf, pr.offset)
            .map_err(|e| RepoError::io(format!("reading cached {}", l.file.display()), e))?;
        let plain = match self
            .sealer
            .open(&buf, &page_aad(&self.repo_id, no), &object)
        {
            Ok(p) => p,
            Err(_) => {
                // The object was verified against its name when cached, so
                // the local copy is what broke. Drop it; the next run refetches.
                let _ = std::fs::remove_file(&l.file);
                return Err(RepoError::corrupt(
                    format!("cached copy {} of {object}", l.file.display()),
                    "page fails authentication; the cached copy was removed, run the command again",
                ));
            }
        };
        let mut entries = Vec::with_capacity((pr.count as usize).min(plain.len() / ENTRY_LEN));
        let mut rest = &plain[..];
        while !rest.is_empty() {
            if rest.len() < ENTRY_LEN {
                return Err(RepoError::corrupt(&object, "page length mismatch"));
            }
            let (e, tail) = rest.split_at(ENTRY_LEN);
            rest = tail;
            let u = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[..32]);
            let pack = u(32);
            if pack as usize >= l.dir.packs.len() {
                return Err(RepoError::corrupt(
                    &object,
                    "entry names a pack outside the directory",
                ));
            }
            let flags = e[48];
            if flags > 3 {
                return Err(RepoError::corrupt(&object, "unknown entry kind"));
            }
            let base = if flags & 2 != 0 {
                if rest.len() < 32 {
                    return Err(RepoError::corrupt(&object, "page length mismatch"));
                }
                let (b, tail) = rest.split_at(32);
                rest = tail;
                let mut base = [0u8; 32];
                base.copy_from_slice(b);
                Some(ChunkId(base))
            } else {
                None
            };
            entries.push(RawEntry {
                id: ChunkId(id),
                pack,
                offset: u(36),
                length: u(40),
                raw_length: u(44),
                kind: if flags & 1 == 1 {
                    ChunkKind::Meta
                } else {
                    ChunkKind::Data
                },
                base,
            });
        }
        if entries.len() != pr.count as usize {
            return Err(RepoError::corrupt(&object, "page length mismatch"));
        }
        Ok(Arc::new(entries))
    }

    /// Every location of `id` across the index (usually zero or one).
    pub fn lookup_all(&self, id: &ChunkId) -> Result<Vec<Location>> {
        let f = self.filter()?;
        let p = prefix(id);
        let mut out = Vec::new();
        for &(_, obj, no) in f.find(p) {
            let l = &f.loaded[obj as usize];
            let page = self.read_page(l, no)?;
            // The prefix first: a whole-id comparison is a memcmp call.
            let at = page.binary_search_by(|e| prefix(&e.id).cmp(&p).then_with(|| e.id.cmp(id)));
            if let Ok(j) = at {
                let e = page[j];
                let p = &l.dir.packs[e.pack as usize];
                out.push(e.location(p.id));
            }
        }
        Ok(out)
    }

    pub fn lookup(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self.lookup_all(id)?.into_iter().next())
    }

    /// (index objects, index entries, distinct packs, pack bytes) as indexed.
    pub fn stats(&self) -> (usize, u64, usize, u64) {
        let loaded = self.read_loaded();
        let mut packs = HashSet::new();
        let mut bytes = 0;
        let mut entries = 0;
        for l in loaded.iter() {
            entries += l.dir.entries;
            for p in &l.dir.packs {
                if packs.insert(p.id) {
                    bytes += p.size;
                }
            }
        }
        (loaded.len(), entries, packs.len(), bytes)
    }
}

/// Read a cached index object's directory and trailer; returns (tail
/// bytes, file length).
fn read_tail(path: &Path, object: &str) -> Result<(Vec<u8>, u64)> {
    let f = std::fs::File::open(path)
        .map_err(|e| RepoError::io(format!("opening cached {object}"), e))?;
    let len = f
        .metadata()
        .map_err(|e| RepoError::io(format!("stat cached {object}"), e))?
        .len();
    if len < (HEADER_LEN + 4) as u64 {
        return Err(RepoError::corrupt(object, "truncated index"));
    }
    let mut n = [0u8; 4];
    f.read_exact_at(&mut n, len - 4)
        .map_err(|e| RepoError::io(format!("reading cached {object}"), e))?;
    let want = (u32::from_le_bytes(n) as u64 + 4).min(len);
    let mut buf = vec![0u8; want as usize];
    f.read_exact_at(&mut buf, len - want)
        .map_err(|e| RepoError::io(format!("reading cached {object}"), e))?;
    Ok((buf, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::crypto::MasterKey;

    /// Bucketed lookups find exactly what a scan of all keys finds: runs
    /// of one prefix, both ends of the range, prefixes absent.
    #[test]
    fn filter_buckets_find_what_a_scan_finds() {
        for n in [0u64, 1, 7, 100, 5000] {
            let mut keys: Vec<(u64, u32, u32)> = (0..n)
                .flat_map(|i| {
                    let p = u64::from_be_bytes(
                        blake3::hash(&i.to_le_bytes()).as_bytes()[..8]
                            .try_into()
                            .unwrap(),
                    );
                    // Every seventh prefix is on two pages.
                    let twice = i % 7 == 0;
                    [(p, 0, i as u32)]
                        .into_iter()
                        .chain(twice.then_some((p, 1, 0)))
                })
                .chain([(0, 2, 0), (u64::MAX, 2, 1), (u64::MAX, 2, 2)])
                .collect();
            keys.sort_unstable();
            let f = Filter::new(0, Vec::new(), keys.clone());
            let mut probes: Vec<u64> = keys.iter().map(|k| k.0).collect();
            probes.extend([1, u64::MAX - 1, 1 << 63, (1 << 63) - 1]);
            probes.extend(keys.iter().map(|k| k.0.wrapping_add(1)));
            for p in probes {
                let scan: Vec<_> = keys.iter().filter(|k| k.0 == p).copied().collect();
                assert_eq!(f.find(p), scan.as_slice(), "n {n}, prefix {p:#x}");
            }
        }
    }

    #[tokio::test]
    async fn paged_lookups_with_a_tiny_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend::open(dir.path().to_str().unwrap(), false).unwrap();
        let mk = MasterKey::generate().unwrap();
        let sealer = Sealer::new(true, &mk.derive().seal);
        let rid = [9u8; 16];
        let id = |i: u32| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes());
        // Two packs, 5000 chunks, pages of 100: 50 pages.
        let packs: Vec<(PackInfo, Vec<PackEntry>)> = (0..2u32)
            .map(|p| {
                let entries = (0..2500u32)
                    .map(|i| PackEntry {
                        id: id(p * 2500 + i),
                        kind: ChunkKind::Data,
                        offset: 9 + i * 10,
                        length: 10,
                        raw_length: 20 + i,
                        base: None,
                    })
                    .collect();
                (
                    PackInfo {
                        id: ChunkId([p as u8; 32]),
                        size: 25_009,
                        kind: ChunkKind::Data,
                    },
                    entries,
                )
            })
            .collect();
        let (name, bytes) = build_index(&sealer, &rid, &packs, 100).unwrap();
        backend::put_immutable(&*b, &index_object(&name), Bytes::from(bytes))
            .await
            .unwrap();
        let set = IndexSet::new(
            b.clone(),
            sealer.clone(),
            rid,
            dir.path().join("cache"),
            250,
        );
        set.refresh().await.unwrap();
        let loaded = set.read_loaded().clone();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].dir.pages.len(), 50);
        for i in (0..5000u32).step_by(7) {
            let loc = set.lookup(&id(i)).unwrap().expect("present");
            assert_eq!(loc.pack, ChunkId([(i / 2500) as u8; 32]));
            assert_eq!(loc.raw_length, 20 + i % 2500);
        }
        assert!(set.lookup(&id(5000)).unwrap().is_none());
        assert!(
            set.pages.lock().unwrap().entries <= 250,
            "page cache is bounded"
        );
        assert_eq!(set.stats(), (1, 5000, 2, 50_018));
        let read = set.filter_pages_read.load(Ordering::Relaxed);
        assert_eq!(read, 50, "the filter read every page once");
        // An object added (as a writer adds what it wrote) is merged in:
        // only its pages are read, and both objects answer.
        let more: Vec<(PackInfo, Vec<PackEntry>)> = vec![(
            PackInfo {
                id: ChunkId([7; 32]),
                size: 1009,
                kind: ChunkKind::Data,
            },
            (5000..5100u32)
                .map(|i| PackEntry {
                    id: id(i),
                    kind: ChunkKind::Data,
                    offset: 9 + (i - 5000) * 10,
                    length: 10,
                    raw_length: 1,
                    base: None,
                })
                .collect(),
        )];
        let (name2, bytes2) = build_index(&sealer, &rid, &more, 100).unwrap();
        backend::put_immutable(&*b, &index_object(&name2), Bytes::from(bytes2.clone()))
            .await
            .unwrap();
        set.add_written(&name2, &bytes2).await.unwrap();
        assert_eq!(
            set.lookup(&id(5050)).unwrap().unwrap().pack,
            ChunkId([7; 32])
        );
        assert_eq!(
            set.lookup(&id(4999)).unwrap().unwrap().pack,
            ChunkId([1; 32])
        );
        assert_eq!(set.filter_pages_read.load(Ordering::Relaxed), read + 1);
        // A removed index object is forgotten on refresh (a rebuild).
        b.delete(&index_object(&name)).await.unwrap();
        set.refresh().await.unwrap();
        assert!(set.lookup(&id(1)).unwrap().is_none());
        assert_eq!(
            set.lookup(&id(5001)).unwrap().unwrap().pack,
            ChunkId([7; 32])
        );
        assert_eq!(set.filter_pages_read.load(Ordering::Relaxed), read + 2);
        // The removed object's cached copy goes once unused for a week,
        // with a killed process's temporary file; what is listed stays.
        let cache = dir.path().join("cache");
        let week_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86400);
        std::fs::write(cache.join(".x.123"), b"tmp").unwrap();
        std::fs::write(cache.join("recent-unlisted"), b"r").unwrap();
        for f in [&name, &name2, &".x.123".to_string()] {
            std::fs::File::open(cache.join(f))
                .unwrap()
                .set_modified(week_ago)
                .unwrap();
        }
        set.refresh().await.unwrap();
        let left: HashSet<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            [name2.clone(), "recent-unlisted".to_string()]
                .into_iter()
                .collect()
        );
    }

    /// A store whose next `phantom` listings still show an index object a
    /// collector has just deleted (it superseded it).
    #[derive(Debug)]
    struct Superseded {
        inner: DynBackend,
        phantom: std::sync::atomic::AtomicU32,
    }

    const GONE: &str = "index/00000000000000000000000000000000000000000000000000000000000000aa";

    #[async_trait::async_trait]
    impl backend::Backend for Superseded {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn put(&self, k: &str, d: Bytes, m: backend::WriteMode) -> backend::BResult<()> {
            self.inner.put(k, d, m).await
        }
        async fn get(&self, k: &str) -> backend::BResult<Bytes> {
            self.inner.get(k).await
        }
        async fn get_range(&self, k: &str, r: std::ops::Range<u64>) -> backend::BResult<Bytes> {
            self.inner.get_range(k, r).await
        }
        async fn head(&self, k: &str) -> backend::BResult<backend::ObjectInfo> {
            self.inner.head(k).await
        }
        async fn list(&self, prefix: &str) -> backend::BResult<Vec<backend::ObjectInfo>> {
            let mut l = self.inner.list(prefix).await?;
            let left = self.phantom.load(Ordering::SeqCst);
            if left > 0 {
                self.phantom.store(left - 1, Ordering::SeqCst);
                l.insert(
                    0,
                    backend::ObjectInfo {
                        key: GONE.into(),
                        size: 100,
                        modified: 0,
                    },
                );
            }
            Ok(l)
        }
        async fn delete(&self, k: &str) -> backend::BResult<()> {
            self.inner.delete(k).await
        }
    }

    /// An index object listed, then deleted by a collector before it is
    /// fetched, is not an error once a later listing no longer has it (a
    /// standby's archive-get exited 255 on it); one that stays listed and
    /// missing is.
    #[tokio::test]
    async fn an_index_object_superseded_during_a_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Superseded {
            inner: backend::open(dir.path().to_str().unwrap(), false).unwrap(),
            phantom: std::sync::atomic::AtomicU32::new(2),
        });
        let b: DynBackend = store.clone();
        let mk = MasterKey::generate().unwrap();
        let sealer = Sealer::new(true, &mk.derive().seal);
        let rid = [3u8; 16];
        let id = ChunkId([5; 32]);
        let packs = vec![(
            PackInfo {
                id: ChunkId([1; 32]),
                size: 100,
                kind: ChunkKind::Data,
            },
            vec![PackEntry {
                id,
                kind: ChunkKind::Data,
                offset: 9,
                length: 10,
                raw_length: 10,
                base: None,
            }],
        )];
        let (name, bytes) = build_index(&sealer, &rid, &packs, 100).unwrap();
        backend::put_immutable(&*b, &index_object(&name), Bytes::from(bytes))
            .await
            .unwrap();
        let set = IndexSet::new(b.clone(), sealer.clone(), rid, dir.path().join("c"), 100);
        set.refresh().await.unwrap();
        assert!(set.lookup(&id).unwrap().is_some());
        store.phantom.store(2, Ordering::SeqCst);
        assert!(set.refresh_reporting().await.unwrap().is_empty());
        assert!(set.lookup(&id).unwrap().is_some());
        // Listed every time and never there: an error naming it.
        let fresh = IndexSet::new(b, sealer, rid, dir.path().join("c2"), 100);
        store.phantom.store(100, Ordering::SeqCst);
        match fresh.refresh().await {
            Err(RepoError::NotFound { key }) => assert_eq!(key, GONE),
            other => panic!("expected NotFound, got {:?}", other.map(|_| ())),
        }
    }
}
