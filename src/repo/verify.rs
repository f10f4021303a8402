//! Proving a repository readable: every chunk a manifest references is in
//! an index and in a pack of the indexed size (always), and, with
//! `read_data`, every blob of (a share of) the packs authenticates,
//! decompresses and hashes back to its id.
//!
//! Problems are collected, not returned as the first error: a scheduled
//! verify must name every damaged object and every manifest it breaks, so
//! that the operator knows what still restores.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use futures::StreamExt;
use serde::Serialize;

use super::backend;
use super::error::{RepoError, Result};
use super::format::{ChunkId, PackId};
use super::index::Location;
use super::manifest::manifest_object;
use super::pack::{apply_delta, open_blob, pack_id_from_key, pack_object, read_table, Opened};
use super::Repository;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Manifests to check; every manifest when `None`.
    pub manifests: Option<Vec<String>>,
    /// Read this share (1..=100 %) of the pack bytes in full. Successive
    /// runs continue where the last one stopped (a cursor in the local
    /// cache), so repeated partial runs cover every pack; without a cursor
    /// a run starts at a random pack.
    pub read_data_percent: Option<u8>,
}

/// One damaged or missing object, and the manifests it breaks.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub object: String,
    pub problem: String,
    pub affects: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub manifests_checked: u64,
    pub chunks_referenced: u64,
    pub index_objects: u64,
    pub packs_indexed: u64,
    /// Packs present but in no index: a writer's packs not yet indexed, or
    /// a killed writer's leftovers that the collector removes.
    pub packs_unindexed: u64,
    pub packs_read: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    pub read_data_percent: Option<u8>,
    pub problems: Vec<Problem>,
    /// Manifests that cannot be read in full.
    pub damaged: BTreeSet<String>,
    /// The packs read in full this run.
    #[serde(skip)]
    pub packs_chosen: Vec<PackId>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Progress callbacks; the library prints nothing.
pub trait VerifyProgress: Send + Sync {
    fn reading(&self, _total_bytes: u64) {}
    fn read(&self, _bytes: u64) {}
}

impl VerifyProgress for () {}

#[derive(Default)]
struct Problems(BTreeMap<String, Problem>);

impl Problems {
    fn add(&mut self, object: impl Into<String>, problem: impl Into<String>) {
        let object = object.into();
        self.0.entry(object.clone()).or_insert_with(|| Problem {
            object,
            problem: problem.into(),
            affects: BTreeSet::new(),
        });
    }
    fn affects(&mut self, object: &str, manifest: &str) {
        if let Some(p) = self.0.get_mut(object) {
            p.affects.insert(manifest.to_string());
        }
    }
}

impl Repository {
    /// Verify, naming every problem. A run that found problems while a
    /// collector replaced index objects is repeated once against the index
    /// as it is then: a chunk or pack that seemed gone may only have moved.
    pub async fn verify(
        &self,
        opts: &VerifyOptions,
        progress: &dyn VerifyProgress,
    ) -> Result<VerifyReport> {
        // Manifests are listed before the index is loaded: a manifest is
        // committed after its index objects, so the index loaded next holds
        // the chunks of every manifest listed now.
        let names = match &opts.manifests {
            Some(n) => n.clone(),
            None => self.list_manifests("").await?,
        };
        let before = self.index_object_keys().await?;
        let report = self.verify_once(opts, &names, None, progress).await?;
        // Only a loaded index object that vanished (a collector replaced
        // it, and may have deleted packs) can make sound data look damaged;
        // new objects (archive-push, backups) cannot. The second run reads
        // the same packs, so nothing the first run read goes unreported.
        if report.is_clean() || before.is_subset(&self.index_object_keys().await?) {
            return Ok(report);
        }
        self.verify_once(opts, &names, Some(&report.packs_chosen), progress)
            .await
    }

    async fn index_object_keys(&self) -> Result<BTreeSet<String>> {
        Ok(
            backend::list(&*self.inner.backend, super::index::INDEX_PREFIX)
                .await?
                .into_iter()
                .map(|o| o.key)
                .collect(),
        )
    }

    /// One pass. `packs`: read these packs (the first pass's choice)
    /// instead of choosing by `read_data_percent`.
    async fn verify_once(
        &self,
        opts: &VerifyOptions,
        names: &[String],
        packs: Option<&[PackId]>,
        progress: &dyn VerifyProgress,
    ) -> Result<VerifyReport> {
        let inner = &self.inner;
        let b = &*inner.backend;
        let mut report = VerifyReport {
            read_data_percent: opts.read_data_percent,
            ..Default::default()
        };
        let mut problems = Problems::default();

        // Index objects: load what can be loaded, name the rest.
        for (object, e) in inner.index.refresh_reporting().await? {
            problems.add(object, e.to_string());
        }
        let stored: HashMap<PackId, u64> = backend::list(b, "packs/")
            .await?
            .into_iter()
            .filter_map(|o| pack_id_from_key(&o.key).map(|id| (id, o.size)))
            .collect();
        let mut copies = Copies::default();
        let mut indexed: HashMap<PackId, u64> = HashMap::new();
        let mut index_objects = HashSet::new();
        let index = inner.index.clone();
        let mut out_of_bounds: BTreeMap<String, Vec<(ChunkId, PackId)>> = BTreeMap::new();
        let bad_pages = index.scan(|object, id, loc, size| {
            if !index_objects.contains(object) {
                index_objects.insert(object.to_string());
            }
            if u64::from(loc.offset) + u64::from(loc.length) > size {
                out_of_bounds
                    .entry(object.to_string())
                    .or_default()
                    .push((*id, loc.pack));
            }
            copies.push(id, loc);
            indexed.insert(loc.pack, size);
        });
        copies.sort();
        for (object, e) in bad_pages {
            problems.add(object, e.to_string());
        }
        let mut bad_copies: HashSet<(ChunkId, PackId)> = HashSet::new();
        for (object, bad) in out_of_bounds {
            problems.add(
                object,
                format!("{} entries point past the end of their pack", bad.len()),
            );
            bad_copies.extend(bad);
        }
        report.index_objects = index_objects.len() as u64;
        report.packs_indexed = indexed.len() as u64;
        report.packs_unindexed = stored.keys().filter(|p| !indexed.contains_key(p)).count() as u64;

        // Indexed packs must exist with the indexed size.
        let mut bad_packs: HashSet<PackId> = HashSet::new();
        for (pack, size) in &indexed {
            match stored.get(pack) {
                None => {
                    problems.add(pack_object(pack), "indexed pack is missing");
                    bad_packs.insert(*pack);
                }
                Some(s) if s != size => {
                    problems.add(
                        pack_object(pack),
                        format!("pack is {s} bytes, the index says {size}"),
                    );
                    bad_packs.insert(*pack);
                }
                Some(_) => {}
            }
        }

        // Read packs in full: every blob authenticates and hashes to its id.
        if let Some(pct) = opts.read_data_percent {
            let chosen = match packs {
                Some(p) => p
                    .iter()
                    .filter(|p| !bad_packs.contains(*p))
                    .filter_map(|p| indexed.get(p).map(|s| (*p, *s)))
                    .collect(),
                None => self.choose_packs(&indexed, &bad_packs, pct)?,
            };
            report.packs_chosen = chosen.iter().map(|(p, _)| *p).collect();
            let total: u64 = chosen.iter().map(|(_, s)| *s).sum();
            progress.reading(total);
            let mut reads = futures::stream::iter(chosen.into_iter().map(|(pack, _)| {
                let repo = self.clone();
                async move { (pack, repo.read_pack(&pack).await) }
            }))
            .buffer_unordered(inner.opts.io_depth.clamp(1, PACKS_IN_FLIGHT));
            while let Some((pack, r)) = reads.next().await {
                let object = pack_object(&pack);
                match r {
                    Ok(read) => {
                        report.packs_read += 1;
                        report.bytes_read += read.bytes;
                        report.chunks_read += read.chunks;
                        progress.read(read.bytes);
                        if !read.bad.is_empty() {
                            problems.add(
                                &object,
                                format!(
                                    "{} chunk(s) fail authentication or their hash",
                                    read.bad.len()
                                ),
                            );
                        }
                        bad_copies.extend(read.bad.into_iter().map(|id| (id, pack)));
                        // Every indexed location must be a blob of the table.
                        if let Some(table) = read.table {
                            let mut wrong = 0u64;
                            for c in copies.in_pack(&pack) {
                                if !table.contains(&(c.id, c.offset, c.length)) {
                                    bad_copies.insert((c.id, pack));
                                    wrong += 1;
                                }
                            }
                            if wrong > 0 {
                                problems.add(
                                    &object,
                                    format!("{wrong} index entries point where the pack has no such chunk"),
                                );
                            }
                        }
                    }
                    Err(e) => {
                        problems.add(&object, e.to_string());
                        bad_packs.insert(pack);
                    }
                }
            }
        }

        // Manifests: every chunk they reference has a sound copy.
        let healthy = |id: &ChunkId| {
            healthy_copy(
                &copies,
                &bad_packs,
                &bad_copies,
                id,
                super::read::MAX_DELTA_DEPTH,
            )
        };
        // Referenced chunks: a mark per indexed chunk, a set for the rest
        // (normally empty), instead of a set of every id.
        let mut marked = vec![false; copies.copies.len()];
        let mut unindexed: HashSet<ChunkId> = HashSet::new();
        let mut mark = |id: &ChunkId| match copies.first(id) {
            Some(i) => !std::mem::replace(&mut marked[i], true),
            None => unindexed.insert(*id),
        };
        for name in names {
            let object = manifest_object(name);
            let doc = match self.read_manifest_doc(name).await {
                Ok(d) => d,
                // Listed, then not found: deleted since (expire, delete).
                Err(RepoError::NotFound { key }) if key.ends_with(name.as_str()) => continue,
                Err(e) => {
                    problems.add(&object, e.to_string());
                    problems.affects(&object, name);
                    continue;
                }
            };
            report.manifests_checked += 1;
            let mut refs: Vec<ChunkId> = doc.body.iter().map(|r| r.0).collect();
            let body_ok = refs.iter().all(|id| healthy(id).is_ok());
            if body_ok {
                match self.read_entries(name, doc).await {
                    Ok(m) => {
                        refs.extend(m.entries.iter().flat_map(|e| e.chunks.iter().map(|c| c.0)))
                    }
                    Err(e) => {
                        problems.add(&object, format!("entry list unreadable: {e}"));
                        problems.affects(&object, name);
                    }
                }
            }
            let mut missing = 0u64;
            let mut unexplained = 0u64;
            for id in refs {
                if !mark(&id) && healthy(&id).is_ok() {
                    continue;
                }
                if let Err(packs) = healthy(&id) {
                    if packs.is_empty() {
                        missing += 1;
                    } else if !packs.iter().any(|p| {
                        problems.0.contains_key(&pack_object(p)) || bad_copies.contains(&(id, *p))
                    }) {
                        // Sound packs, yet no sound copy: a delta whose
                        // base is in no index (or too deep a chain).
                        unexplained += 1;
                    }
                    for p in packs {
                        problems.affects(&pack_object(&p), name);
                    }
                    report.damaged.insert(name.clone());
                }
            }
            if missing > 0 {
                problems.add(
                    &object,
                    format!("{missing} referenced chunk(s) are in no index object"),
                );
                problems.affects(&object, name);
            }
            if unexplained > 0 {
                let what = format!(
                    "{unexplained} referenced chunk(s) are deltas whose base chunk has no sound copy in any index object"
                );
                match problems.0.get_mut(&object) {
                    Some(p) => p.problem = format!("{}; {what}", p.problem),
                    None => problems.add(&object, what),
                }
                problems.affects(&object, name);
            }
        }
        report.chunks_referenced = (marked.iter().filter(|m| **m).count() + unindexed.len()) as u64;
        for p in problems.0.values() {
            report.damaged.extend(p.affects.iter().cloned());
        }
        report.problems = problems.0.into_values().collect();
        Ok(report)
    }

    /// The packs to read this run: all of them at 100 %, otherwise the next
    /// `pct` % of the bytes in id order after the saved cursor, wrapping.
    fn choose_packs(
        &self,
        indexed: &HashMap<PackId, u64>,
        bad: &HashSet<PackId>,
        pct: u8,
    ) -> Result<Vec<(PackId, u64)>> {
        let mut all: Vec<(PackId, u64)> = indexed
            .iter()
            .filter(|(p, _)| !bad.contains(p))
            .map(|(p, s)| (*p, *s))
            .collect();
        all.sort();
        if pct >= 100 || all.is_empty() {
            return Ok(all);
        }
        let path = self.verify_cursor_path();
        let cursor: Option<PackId> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| hex::decode(t.trim()).ok())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .map(ChunkId);
        // Without a cursor (a fresh cache: a container, another host) start
        // at a random pack, so that such runs do not all read the same share.
        let start = match cursor {
            Some(c) => all.partition_point(|(p, _)| *p <= c) % all.len(),
            None => {
                let mut r = [0u8; 8];
                super::crypto::random(&mut r)?;
                (u64::from_le_bytes(r) % all.len() as u64) as usize
            }
        };
        let total: u64 = all.iter().map(|(_, s)| s).sum();
        let want = (total as u128 * pct as u128).div_ceil(100) as u64;
        let mut out = Vec::new();
        let mut got = 0u64;
        for i in 0..all.len() {
            let (p, s) = all[(start + i) % all.len()];
            out.push((p, s));
            got += s;
            if got >= want {
                break;
            }
        }
        if let Some((last, _)) = out.last() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| RepoError::io(format!("creating {}", dir.display()), e))?;
            }
            std::fs::write(&path, last.to_hex())
                .map_err(|e| RepoError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(out)
    }

    fn verify_cursor_path(&self) -> PathBuf {
        super::cache_root(&self.inner.opts)
            .join(hex::encode(self.inner.repo_id))
            .join("verify-cursor")
    }

    /// Download a whole pack, check it against its name, and open every
    /// blob its table lists (a delta is decoded against its base, read
    /// from wherever it is stored).
    async fn read_pack(&self, pack: &PackId) -> Result<PackRead> {
        let mut read = self.read_pack_blobs(pack).await?;
        let deltas = std::mem::take(&mut read.deltas);
        let object = pack_object(pack);
        for batch in deltas.chunks(DELTA_BATCH) {
            let bases: Vec<ChunkId> = batch.iter().map(|d| d.1).collect();
            let base_data = match super::read::read_chunks(&self.inner, &bases).await {
                Ok(b) => b.into_iter().map(Some).collect(),
                // Find out which base fails: one at a time.
                Err(_) => {
                    let mut each = Vec::with_capacity(bases.len());
                    for b in &bases {
                        each.push(
                            super::read::read_chunks(&self.inner, &[*b])
                                .await
                                .ok()
                                .and_then(|mut v| v.pop()),
                        );
                    }
                    each
                }
            };
            let inner = self.inner.clone();
            let batch = batch.to_vec();
            let object = object.clone();
            let bad = tokio::task::spawn_blocking(move || {
                let keys = inner.chunk_keys();
                let mut bad = Vec::new();
                for ((id, _, frame, raw), base) in batch.iter().zip(base_data) {
                    let ok = base.is_some_and(|b| {
                        apply_delta(&keys, id, &b, frame, *raw as usize, &object)
                            .is_ok_and(|d| d.len() == *raw as usize)
                    });
                    if !ok {
                        bad.push(*id);
                    }
                }
                bad
            })
            .await?;
            read.bad.extend(bad);
        }
        Ok(read)
    }

    async fn read_pack_blobs(&self, pack: &PackId) -> Result<PackRead> {
        let object = pack_object(pack);
        let bytes = backend::get(&*self.inner.backend, &object).await?;
        let inner = self.inner.clone();
        let pack = *pack;
        tokio::task::spawn_blocking(move || {
            if blake3::hash(&bytes).as_bytes() != &pack.0 {
                return Err(RepoError::corrupt(
                    &object,
                    "content does not hash to its name",
                ));
            }
            let table = read_table(&inner.sealer, &inner.repo_id, &bytes, &object)?;
            let keys = inner.chunk_keys();
            let max = inner.config.chunker.max_size as usize;
            let mut bad = Vec::new();
            let mut deltas = Vec::new();
            for e in &table {
                let blob = &bytes[e.offset as usize..e.offset as usize + e.length as usize];
                match open_blob(
                    &keys,
                    e.kind,
                    &e.id,
                    blob,
                    (e.raw_length as usize).min(max),
                    &object,
                ) {
                    Ok(Opened::Plain(d)) if d.len() == e.raw_length as usize => {}
                    Ok(Opened::Delta { base, frame })
                        if e.base.is_none_or(|b| b == base) && e.raw_length as usize <= max =>
                    {
                        deltas.push((e.id, base, frame, e.raw_length))
                    }
                    _ => bad.push(e.id),
                }
            }
            Ok(PackRead {
                bytes: bytes.len() as u64,
                chunks: table.len() as u64,
                table: Some(table.iter().map(|e| (e.id, e.offset, e.length)).collect()),
                bad,
                deltas,
            })
        })
        .await?
    }
}

struct PackRead {
    bytes: u64,
    chunks: u64,
    table: Option<HashSet<(ChunkId, u32, u32)>>,
    bad: Vec<ChunkId>,
    /// Delta blobs still to decode: (id, base, frame, raw length).
    deltas: Vec<(ChunkId, ChunkId, Vec<u8>, u32)>,
}

/// Delta blobs decoded per batch of bases read together.
const DELTA_BATCH: usize = 128;

/// Whole packs read at once: each holds up to a pack's size in memory
/// while it is hashed and opened, and two keep both cores busy.
const PACKS_IN_FLIGHT: usize = 2;

/// Every indexed copy of every chunk, sorted by id. The loaded index keeps
/// one location per chunk and pages the rest to disk; verify needs every
/// copy at once, so it keeps them in flat arrays (about 80 bytes a copy; a
/// map of vectors took over 300 bytes a chunk).
#[derive(Default)]
struct Copies {
    copies: Vec<Copy>,
    packs: Vec<PackId>,
    pack_no: HashMap<PackId, u32>,
    /// Positions in `copies`, ordered by pack.
    by_pack: Vec<u32>,
}

struct Copy {
    id: ChunkId,
    pack: u32,
    offset: u32,
    length: u32,
    base: Option<ChunkId>,
}

impl Copies {
    fn push(&mut self, id: &ChunkId, loc: &Location) {
        let next = self.packs.len() as u32;
        let pack = *self.pack_no.entry(loc.pack).or_insert(next);
        if pack == next {
            self.packs.push(loc.pack);
        }
        self.copies.push(Copy {
            id: *id,
            pack,
            offset: loc.offset,
            length: loc.length,
            base: loc.base,
        });
    }

    fn sort(&mut self) {
        self.copies.sort_unstable_by_key(|c| c.id);
        self.copies.shrink_to_fit();
        let mut by_pack: Vec<u32> = (0..self.copies.len() as u32).collect();
        by_pack.sort_unstable_by_key(|&i| self.copies[i as usize].pack);
        self.by_pack = by_pack;
    }

    /// Position of the first copy of `id`.
    fn first(&self, id: &ChunkId) -> Option<usize> {
        let i = self.copies.partition_point(|c| c.id < *id);
        (self.copies.get(i)?.id == *id).then_some(i)
    }

    fn of(&self, id: &ChunkId) -> &[Copy] {
        match self.first(id) {
            Some(i) => {
                let n = self.copies[i..].partition_point(|c| c.id == *id);
                &self.copies[i..i + n]
            }
            None => &[],
        }
    }

    fn pack(&self, c: &Copy) -> PackId {
        self.packs[c.pack as usize]
    }

    fn in_pack(&self, pack: &PackId) -> impl Iterator<Item = &Copy> {
        let no = self.pack_no.get(pack).copied();
        let key = |&i: &u32| self.copies[i as usize].pack;
        let (start, end) = match no {
            Some(n) => (
                self.by_pack.partition_point(|i| key(i) < n),
                self.by_pack.partition_point(|i| key(i) <= n),
            ),
            None => (0, 0),
        };
        self.by_pack[start..end]
            .iter()
            .map(|&i| &self.copies[i as usize])
    }
}

/// Whether `id` has a sound copy: in a pack that is present and whole, not
/// a copy that failed to open, and (for a delta) whose base has one too.
/// Otherwise the packs holding its copies (none: it is in no index).
fn healthy_copy(
    copies: &Copies,
    bad_packs: &HashSet<PackId>,
    bad_copies: &HashSet<(ChunkId, PackId)>,
    id: &ChunkId,
    depth: usize,
) -> std::result::Result<(), Vec<PackId>> {
    let ls = copies.of(id);
    if ls.is_empty() {
        return Err(Vec::new());
    }
    let sound = |c: &Copy| {
        let pack = copies.pack(c);
        !bad_packs.contains(&pack)
            && !bad_copies.contains(&(*id, pack))
            && c.base.is_none_or(|b| {
                depth > 0 && healthy_copy(copies, bad_packs, bad_copies, &b, depth - 1).is_ok()
            })
    };
    if ls.iter().any(sound) {
        Ok(())
    } else {
        let mut packs: Vec<PackId> = ls.iter().map(|c| copies.pack(c)).collect();
        for b in ls.iter().filter_map(|c| c.base) {
            packs.extend(copies.of(&b).iter().map(|c| copies.pack(c)));
        }
        Err(packs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::pack::ChunkKind;

    fn loc(pack: u8, offset: u32, base: Option<ChunkId>) -> Location {
        Location {
            pack: ChunkId([pack; 32]),
            kind: ChunkKind::Data,
            offset,
            length: 10,
            raw_length: 20,
            base,
        }
    }

    #[test]
    fn copies_find_every_copy_by_id_and_by_pack() {
        let (a, b, c) = (ChunkId([1; 32]), ChunkId([2; 32]), ChunkId([3; 32]));
        let mut cs = Copies::default();
        cs.push(&c, &loc(9, 0, Some(a)));
        cs.push(&a, &loc(7, 0, None));
        cs.push(&b, &loc(7, 10, None));
        cs.push(&a, &loc(9, 10, None));
        cs.sort();
        let packs = |id| -> Vec<PackId> { cs.of(id).iter().map(|x| cs.pack(x)).collect() };
        let mut of_a = packs(&a);
        of_a.sort();
        assert_eq!(of_a, vec![ChunkId([7; 32]), ChunkId([9; 32])]);
        assert_eq!(packs(&b), vec![ChunkId([7; 32])]);
        assert!(cs.of(&ChunkId([4; 32])).is_empty());
        assert!(cs.first(&ChunkId([0; 32])).is_none());
        let mut in9: Vec<(ChunkId, u32)> = cs
            .in_pack(&ChunkId([9; 32]))
            .map(|x| (x.id, x.offset))
            .collect();
        in9.sort();
        assert_eq!(in9, vec![(a, 10), (c, 0)]);
        assert_eq!(cs.in_pack(&ChunkId([8; 32])).count(), 0);

        // A delta is sound only while its base has a sound copy.
        let none = HashSet::new();
        assert!(healthy_copy(&cs, &none, &HashSet::new(), &c, 2).is_ok());
        let bad: HashSet<PackId> = [ChunkId([7; 32])].into();
        let bad_copy: HashSet<(ChunkId, PackId)> = [(a, ChunkId([9; 32]))].into();
        assert!(healthy_copy(&cs, &bad, &HashSet::new(), &c, 2).is_ok());
        let err = healthy_copy(&cs, &bad, &bad_copy, &c, 2).unwrap_err();
        assert!(err.contains(&ChunkId([7; 32])) && err.contains(&ChunkId([9; 32])));
        assert_eq!(
            healthy_copy(&cs, &none, &HashSet::new(), &ChunkId([5; 32]), 2),
            Err(vec![])
        );
    }
}
