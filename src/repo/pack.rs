//! Pack objects: many sealed chunks in one object, so that object storage
//! sees a few large requests instead of millions of tiny ones. The pack's
//! table is at its end, so a pack can be written in one pass and an index
//! rebuilt from pack tables alone if every index object is lost.
//!
//! ```text
//! pack  = header("P") blob* sealed(table) table_len:u32le
//! blob  = sealed(flag:u8 payload)   flag 0 = stored, 1 = zstd,
//!                                    2 = delta: base:32 zstd-with-prefix
//! ```
//!
//! A delta blob (format version 2) is a zstd frame compressed with the
//! plaintext of another chunk, its *base*, as reference prefix: a changed
//! database block costs the bytes that changed, not the block. The base id
//! is both inside the sealed blob and in the pack table and index entries,
//! so the collector can keep bases alive without opening blobs.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::crypto::{chunk_id, Sealer};
use super::error::{RepoError, Result};
use super::format::{
    aad, check_header, from_cbor, header, to_cbor, ChunkId, Kind, PackId, HEADER_LEN,
};
use super::pagebuf::PageBuf;

pub const PACKS_PREFIX: &str = "packs/";

/// Data chunks (file contents) and metadata chunks (manifest bodies) never
/// share a pack: metadata stays cheap to read and to keep when data expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkKind {
    Data,
    Meta,
}

impl ChunkKind {
    pub fn aad_kind(self) -> Kind {
        match self {
            ChunkKind::Data => Kind::DataChunk,
            ChunkKind::Meta => Kind::MetaChunk,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub kind: ChunkKind,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    /// The chunk a delta blob is decoded against (format version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<ChunkId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PackTable {
    entries: Vec<PackEntry>,
}

pub fn pack_object(id: &PackId) -> String {
    let h = id.to_hex();
    format!("{PACKS_PREFIX}{}/{h}", &h[..2])
}

/// Parse a pack id back out of an object key.
pub fn pack_id_from_key(key: &str) -> Option<PackId> {
    let name = key.rsplit('/').next()?;
    let bytes = hex::decode(name).ok()?;
    Some(ChunkId(bytes.try_into().ok()?))
}

/// A chunk ready for a pack: compressed and sealed.
pub struct SealedChunk {
    pub id: ChunkId,
    pub kind: ChunkKind,
    pub blob: Vec<u8>,
    pub raw_length: u32,
    /// Set for a delta blob: the chunk it decodes against.
    pub base: Option<ChunkId>,
}

thread_local! {
    /// One zstd context per worker thread: creating a context per chunk
    /// costs more than compressing a 32 KiB chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// For deltas: a context that takes the base per call.
    static DELTA_CCTX: std::cell::RefCell<Option<zstd::zstd_safe::CCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DELTA_DCTX: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd takes a "dictionary" that starts with these bytes as a trained
/// dictionary, anything else as raw content, i.e. as a prefix: a base with
/// this start (no PostgreSQL page has it) goes through the explicit-prefix
/// API instead. Both make and read the same frames.
const ZSTD_DICT_MAGIC: [u8; 4] = 0xEC30A437u32.to_le_bytes();

fn is_dict_like(base: &[u8]) -> bool {
    base.starts_with(&ZSTD_DICT_MAGIC)
}

/// Compress `data` with `base` as its prefix.
fn compress_with_base(data: &[u8], base: &[u8], level: i32) -> Result<Vec<u8>> {
    let failed = |e| RepoError::Task(format!("zstd delta compression failed: code {e}"));
    let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    if is_dict_like(base) {
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
            .map_err(failed)?;
        cctx.ref_prefix(base).map_err(failed)?;
        cctx.compress2(&mut frame, data).map_err(failed)?;
        return Ok(frame);
    }
    DELTA_CCTX.with(|c| {
        let mut c = c.borrow_mut();
        let cctx = c.get_or_insert_with(zstd::zstd_safe::CCtx::create);
        cctx.compress_using_dict(&mut frame, data, base, level)
            .map_err(failed)
    })?;
    Ok(frame)
}

/// Decompress a frame made by [`compress_with_base`] (or by the
/// explicit-prefix API) against the same base.
fn decompress_with_base<C: zstd::zstd_safe::WriteBuf + ?Sized>(
    frame: &[u8],
    base: &[u8],
    out: &mut C,
) -> std::result::Result<usize, usize> {
    if is_dict_like(base) {
        let mut dctx = zstd::zstd_safe::DCtx::create();
        dctx.ref_prefix(base)?;
        return dctx.decompress(out, frame);
    }
    DELTA_DCTX.with(|d| {
        let mut d = d.borrow_mut();
        let dctx = d.get_or_insert_with(zstd::zstd_safe::DCtx::create);
        dctx.decompress_using_dict(out, frame, base)
    })
}

fn compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    let failed = |e: std::io::Error| RepoError::Task(format!("zstd compression failed: {e}"));
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).map_err(failed)?));
        }
        match c.as_mut() {
            Some((_, z)) => z.compress(data).map_err(failed),
            None => Err(RepoError::Task("zstd context missing".into())),
        }
    })
}

/// Decompress into `out` (a `Vec` fills its spare capacity; a slice is
/// written in place). Returns the bytes written.
fn decompress<C: zstd::zstd_safe::WriteBuf + ?Sized>(
    payload: &[u8],
    out: &mut C,
) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(z) => z.decompress_to_buffer(payload, out),
            None => Err(std::io::Error::other("zstd context missing")),
        }
    })
}

/// Compress (when it helps) and seal one chunk. CPU work: run on a worker.
pub fn seal_chunk(
    sealer: &Sealer,
    repo_id: &[u8; 16],
    kind: ChunkKind,
    id: ChunkId,
    data: &[u8],
    level: i32,
) -> Result<SealedChunk> {
    let compressed = compress(data, level)?;
    let mut plain = Vec::with_capacity(1 + compressed.len().min(data.len()));
    if compressed.len() < data.len() {
        plain.push(1);
        plain.extend_from_slice(&compressed);
    } else {
        plain.push(0);
        plain.extend_from_slice(data);
    }
    let blob = sealer.seal(&plain, &aad(repo_id, kind.aad_kind(), &id.0))?;
    Ok(SealedChunk {
        id,
        kind,
        blob,
        raw_length: data.len() as u32,
        base: None,
    })
}

/// zstd level of delta frames, whatever the repository's level: a changed
/// block's bytes are nearly all a match in its base, which the fast
/// strategy finds too, and loading the base into level 3's two larger
/// match tables was the largest cost of a daily backup (18 % of its CPU
/// samples). Measured on the headline cluster's day-1 backup (56,185
/// deltas, 3-4 runs each): 13 % less CPU and wall time, 2.9 % more delta
/// bytes (46.3 vs 45.0 MiB).
pub const DELTA_LEVEL: i32 = 1;

/// Compress `data` as a delta against `base_data` (the plaintext of chunk
/// `base`) and seal it. Returns `None` when the delta would not be smaller
/// than `limit` bytes of payload (the caller then stores the chunk whole).
pub fn seal_delta(
    sealer: &Sealer,
    repo_id: &[u8; 16],
    id: ChunkId,
    data: &[u8],
    base: ChunkId,
    base_data: &[u8],
    limit: usize,
) -> Result<Option<SealedChunk>> {
    let frame = compress_with_base(data, base_data, DELTA_LEVEL)?;
    if frame.len() >= limit {
        return Ok(None);
    }
    let mut plain = Vec::with_capacity(1 + 32 + frame.len());
    plain.push(2);
    plain.extend_from_slice(&base.0);
    plain.extend_from_slice(&frame);
    let blob = sealer.seal(&plain, &aad(repo_id, ChunkKind::Data.aad_kind(), &id.0))?;
    Ok(Some(SealedChunk {
        id,
        kind: ChunkKind::Data,
        blob,
        raw_length: data.len() as u32,
        base: Some(base),
    }))
}

/// What opening a chunk needs: the sealing key, the repository id bound
/// into every blob, and the id key to re-hash the plaintext.
pub struct ChunkKeys<'a> {
    pub sealer: &'a Sealer,
    pub repo_id: &'a [u8; 16],
    /// `None` skips the re-hash. Only for readers that check a hash over
    /// the whole stream they assemble (restore, manifest entry lists): the
    /// blob is still authenticated, and its tag binds it to the id (the id
    /// is in the associated data), so the re-hash only guards against a
    /// writer that sealed wrong bytes under an id, which the stream hash
    /// catches too. Verify, backup and the collector re-hash.
    pub id_key: Option<&'a [u8; 32]>,
}

/// An authenticated blob: the chunk's plaintext, or a delta that still
/// needs its base's plaintext ([`apply_delta`]).
pub enum Opened {
    Plain(Vec<u8>),
    Delta { base: ChunkId, frame: Vec<u8> },
}

/// An authenticated blob's plaintext, still encoded: a flag byte, then
/// the chunk raw (0), a zstd frame (1), or a base id and a delta frame (2).
pub struct Payload(Bytes);

impl Payload {
    /// The chunk a delta is against.
    pub fn base(&self) -> Option<ChunkId> {
        match self.0.split_first() {
            Some((2, rest)) => {
                let mut base = [0u8; 32];
                base.copy_from_slice(&rest[..32]);
                Some(ChunkId(base))
            }
            _ => None,
        }
    }

    /// Decode onto the end of `out`: exactly `len` bytes (the
    /// reference's length), or an error and `out` as it was. `base` is
    /// the base's plaintext, for a delta. Re-hashed when `keys` say so.
    /// `what` names the blob in an error (made only then: a restore
    /// decodes hundreds of thousands).
    pub fn decode_onto(
        &self,
        keys: &ChunkKeys<'_>,
        id: &ChunkId,
        base: Option<&[u8]>,
        out: &mut PageBuf,
        len: usize,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let start = out.len();
        let (flag, body) = self
            .0
            .split_first()
            .ok_or_else(|| RepoError::corrupt(what(), "empty chunk"))?;
        let n = match (flag, base) {
            (0, _) if body.len() == len => {
                out.extend_from_slice(body);
                len
            }
            (0, _) => body.len(),
            (1, _) => decompress(body, &mut out.tail(len))
                .map_err(|e| RepoError::corrupt(what(), format!("zstd: {e}")))?,
            (2, Some(base)) => decompress_with_base(&body[32..], base, &mut out.tail(len))
                .map_err(|e| RepoError::corrupt(what(), format!("zstd delta: code {e}")))?,
            (2, None) => return Err(RepoError::corrupt(what(), "delta read without its base")),
            (f, _) => {
                return Err(RepoError::corrupt(
                    what(),
                    format!("unknown chunk flag {f}"),
                ))
            }
        };
        let checked = if n != len {
            Err(RepoError::corrupt(
                what(),
                "length differs from the reference",
            ))
        } else {
            check_id(keys, id, &out[start..], what)
        };
        if checked.is_err() {
            out.truncate(start);
        }
        checked
    }
}

/// Authenticate one blob where it lies (its chunk id is in the
/// associated data) and check its flag; decoding comes later
/// ([`Payload::decode_onto`]). `what` names the blob in an error (made
/// only then).
pub fn authenticate(
    keys: &ChunkKeys<'_>,
    entry_kind: ChunkKind,
    id: &ChunkId,
    mut blob: BytesMut,
    what: &dyn Fn() -> String,
) -> Result<Payload> {
    let aad = aad(keys.repo_id, entry_kind.aad_kind(), &id.0);
    let at = keys.sealer.open_in_place(&mut blob, &aad, what)?;
    blob.truncate(at.end);
    let plain = blob.split_off(at.start).freeze();
    match plain.split_first() {
        None => Err(RepoError::corrupt(what(), "empty chunk")),
        Some((0 | 1, _)) => Ok(Payload(plain)),
        Some((2, rest)) if rest.len() > 32 => Ok(Payload(plain)),
        Some((f, _)) => Err(RepoError::corrupt(
            what(),
            format!("unknown chunk flag {f}"),
        )),
    }
}

/// Open one blob: authenticate it, and for a whole chunk decompress and
/// re-hash it (the id must match what was asked). `max_len` bounds the
/// plaintext (pass the indexed raw length when known: it is also the
/// buffer reserved).
pub fn open_blob(
    keys: &ChunkKeys<'_>,
    entry_kind: ChunkKind,
    id: &ChunkId,
    blob: &[u8],
    max_len: usize,
    object: &str,
) -> Result<Opened> {
    let what = || format!("{object} (chunk {})", id.to_hex());
    open_owned(keys, entry_kind, id, BytesMut::from(blob), max_len, &what)
}

/// [`open_blob`] on a blob the caller gives up (decrypted where it lies);
/// `what` names it in an error (made only then).
pub fn open_owned(
    keys: &ChunkKeys<'_>,
    entry_kind: ChunkKind,
    id: &ChunkId,
    blob: BytesMut,
    max_len: usize,
    what: &dyn Fn() -> String,
) -> Result<Opened> {
    let Payload(plain) = authenticate(keys, entry_kind, id, blob, what)?;
    let data = match plain[0] {
        0 => plain[1..].to_vec(),
        1 => {
            let mut data = Vec::with_capacity(max_len);
            decompress(&plain[1..], &mut data)
                .map_err(|e| RepoError::corrupt(what(), format!("zstd: {e}")))?;
            data
        }
        _ => {
            let mut base = [0u8; 32];
            base.copy_from_slice(&plain[1..33]);
            return Ok(Opened::Delta {
                base: ChunkId(base),
                frame: plain[33..].to_vec(),
            });
        }
    };
    check_id(keys, id, &data, what)?;
    Ok(Opened::Plain(data))
}

/// The plaintext must hash to the id it was asked for (unless `keys` do
/// not re-hash); `what` names the blob in an error.
fn check_id(
    keys: &ChunkKeys<'_>,
    id: &ChunkId,
    data: &[u8],
    what: &dyn Fn() -> String,
) -> Result<()> {
    match keys.id_key {
        Some(key) if chunk_id(key, data) != id.0 => Err(RepoError::corrupt(
            what(),
            "content does not hash to its id",
        )),
        _ => Ok(()),
    }
}

/// Decode a delta frame against its base's plaintext and re-hash it.
pub fn apply_delta(
    keys: &ChunkKeys<'_>,
    id: &ChunkId,
    base_data: &[u8],
    frame: &[u8],
    max_len: usize,
    object: &str,
) -> Result<Vec<u8>> {
    let what = || format!("{object} (chunk {})", id.to_hex());
    let mut data = Vec::with_capacity(max_len);
    decompress_with_base(frame, base_data, &mut data)
        .map_err(|e| RepoError::corrupt(what(), format!("zstd delta: code {e}")))?;
    check_id(keys, id, &data, &what)?;
    Ok(data)
}

/// Open a chunk stored whole; a delta blob is an error here (readers that
/// can meet deltas use [`open_blob`]).
pub fn open_chunk(
    keys: &ChunkKeys<'_>,
    entry_kind: ChunkKind,
    id: &ChunkId,
    blob: &[u8],
    max_len: usize,
    object: &str,
) -> Result<Vec<u8>> {
    match open_blob(keys, entry_kind, id, blob, max_len, object)? {
        Opened::Plain(d) => Ok(d),
        Opened::Delta { base, .. } => Err(RepoError::corrupt(
            format!("{object} (chunk {})", id.to_hex()),
            format!("stored as a delta against chunk {base}, which this reader does not follow"),
        )),
    }
}

/// Accumulates sealed chunks into one pack.
pub struct PackBuilder {
    pub kind: ChunkKind,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new(kind: ChunkKind) -> Self {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(&header(Kind::Pack));
        PackBuilder {
            kind,
            buf,
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn add(&mut self, c: SealedChunk) {
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(&c.blob);
        self.entries.push(PackEntry {
            id: c.id,
            kind: c.kind,
            offset,
            length: c.blob.len() as u32,
            raw_length: c.raw_length,
            base: c.base,
        });
    }

    /// Seal the table, append it, and name the pack by the hash of its bytes.
    pub fn finish(
        mut self,
        sealer: &Sealer,
        repo_id: &[u8; 16],
    ) -> Result<(PackId, Vec<u8>, Vec<PackEntry>)> {
        let table = to_cbor(&PackTable {
            entries: self.entries.clone(),
        })?;
        let sealed = sealer.seal(&table, &aad(repo_id, Kind::PackTable, b""))?;
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = ChunkId(*blake3::hash(&self.buf).as_bytes());
        Ok((id, self.buf, self.entries))
    }
}

/// Read a pack's table from its tail (the whole pack, or at least the tail
/// bytes plus the pack's total size).
pub fn read_table(
    sealer: &Sealer,
    repo_id: &[u8; 16],
    pack: &[u8],
    object: &str,
) -> Result<Vec<PackEntry>> {
    check_header(pack, Kind::Pack, object)?;
    if pack.len() < HEADER_LEN + 4 {
        return Err(RepoError::corrupt(object, "truncated pack"));
    }
    let n = u32::from_le_bytes(
        pack[pack.len() - 4..]
            .try_into()
            .map_err(|_| RepoError::corrupt(object, "bad tail"))?,
    ) as usize;
    if n + 4 + HEADER_LEN > pack.len() {
        return Err(RepoError::corrupt(object, "pack table length out of range"));
    }
    let start = pack.len() - 4 - n;
    let plain = sealer.open(
        &pack[start..pack.len() - 4],
        &aad(repo_id, Kind::PackTable, b""),
        object,
    )?;
    let t: PackTable = from_cbor(&plain, object)?;
    for e in &t.entries {
        if (e.offset as usize) < HEADER_LEN || e.offset as usize + e.length as usize > start {
            return Err(RepoError::corrupt(object, "pack table entry out of range"));
        }
    }
    Ok(t.entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::crypto::MasterKey;

    #[test]
    fn pack_roundtrip_and_table() {
        let mk = MasterKey::generate().unwrap();
        let d = mk.derive();
        let s = Sealer::new(true, &d.seal);
        let rid = [3u8; 16];
        let mut pb = PackBuilder::new(ChunkKind::Data);
        let datas: Vec<Vec<u8>> = vec![vec![1u8; 5000], b"short".to_vec(), (0..=255u8).collect()];
        for data in &datas {
            let id = ChunkId(chunk_id(&d.chunk_id, data));
            pb.add(seal_chunk(&s, &rid, ChunkKind::Data, id, data, 3).unwrap());
        }
        let (pid, bytes, entries) = pb.finish(&s, &rid).unwrap();
        assert_eq!(pid.0, *blake3::hash(&bytes).as_bytes());
        let table = read_table(&s, &rid, &bytes, "p").unwrap();
        assert_eq!(table, entries);
        for (e, data) in table.iter().zip(&datas) {
            let blob = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            let keys = ChunkKeys {
                sealer: &s,
                repo_id: &rid,
                id_key: Some(&d.chunk_id),
            };
            let got = open_chunk(&keys, e.kind, &e.id, blob, 1 << 20, "p").unwrap();
            assert_eq!(&got, data);
        }
        // The first chunk compresses; a flipped byte in it is caught and named.
        let e = &table[0];
        let mut blob = bytes[e.offset as usize..(e.offset + e.length) as usize].to_vec();
        blob[40] ^= 1;
        let keys = ChunkKeys {
            sealer: &s,
            repo_id: &rid,
            id_key: Some(&d.chunk_id),
        };
        let err = open_chunk(&keys, e.kind, &e.id, &blob, 1 << 20, "packs/ab/x").unwrap_err();
        assert!(err.to_string().contains("packs/ab/x"));
        let stream = ChunkKeys {
            id_key: None,
            ..keys
        };
        assert!(open_chunk(&stream, e.kind, &e.id, &blob, 1 << 20, "p").is_err());
    }

    /// Without an id key a blob is authenticated, not re-hashed: bytes
    /// sealed under the wrong id open (the stream hash above it catches
    /// them); with the key they are refused.
    #[test]
    fn stream_keys_authenticate_but_do_not_rehash() {
        let d = MasterKey::generate().unwrap().derive();
        let s = Sealer::new(true, &d.seal);
        let rid = [5u8; 16];
        let data = vec![3u8; 4000];
        let wrong = ChunkId([9; 32]);
        let sealed = seal_chunk(&s, &rid, ChunkKind::Data, wrong, &data, 3).unwrap();
        let checked = ChunkKeys {
            sealer: &s,
            repo_id: &rid,
            id_key: Some(&d.chunk_id),
        };
        let err = open_chunk(
            &checked,
            ChunkKind::Data,
            &wrong,
            &sealed.blob,
            1 << 20,
            "p",
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not hash to its id"), "{err}");
        let stream = ChunkKeys {
            id_key: None,
            ..checked
        };
        let got = open_chunk(&stream, ChunkKind::Data, &wrong, &sealed.blob, 1 << 20, "p");
        assert_eq!(got.unwrap(), data);
        // Another id than the one sealed under fails authentication.
        assert!(open_chunk(
            &stream,
            ChunkKind::Data,
            &ChunkId([8; 32]),
            &sealed.blob,
            1 << 20,
            "p"
        )
        .is_err());
    }

    /// Frames made with a reused context and the base as a raw-content
    /// dictionary and frames made with the explicit-prefix API (what
    /// earlier versions wrote) decode either way; a base that looks like a
    /// trained zstd dictionary still works as a prefix.
    #[test]
    fn delta_frames_match_the_prefix_api() {
        for magic in [false, true] {
            let mut base = vec![0u8; 32768];
            blake3::Hasher::new()
                .update(b"prefix")
                .finalize_xof()
                .fill(&mut base);
            if magic {
                base[..4].copy_from_slice(&ZSTD_DICT_MAGIC);
            }
            let mut data = base.clone();
            data[20_000..20_008].copy_from_slice(b"abcdefgh");
            let mut old = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
            let mut cctx = zstd::zstd_safe::CCtx::create();
            cctx.ref_prefix(&base[..]).unwrap();
            cctx.compress2(&mut old, &data).unwrap();
            let mut out = vec![0u8; data.len()];
            assert_eq!(
                decompress_with_base(&old, &base, &mut out[..]),
                Ok(data.len())
            );
            assert_eq!(out, data);
            let new = compress_with_base(&data, &base, 3).unwrap();
            assert!(
                new.len() < 200,
                "delta of {} bytes (magic {magic})",
                new.len()
            );
            let mut back = Vec::with_capacity(data.len());
            let mut dctx = zstd::zstd_safe::DCtx::create();
            dctx.ref_prefix(&base[..]).unwrap();
            dctx.decompress(&mut back, &new).unwrap();
            assert_eq!(back, data);
            // A second use of the thread's contexts is as good as the first.
            let again = compress_with_base(&data, &base, 3).unwrap();
            let mut out = Vec::with_capacity(data.len());
            decompress_with_base(&again, &base, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn delta_roundtrip_needs_the_right_base() {
        let mk = MasterKey::generate().unwrap();
        let d = mk.derive();
        let s = Sealer::new(true, &d.seal);
        let rid = [3u8; 16];
        let keys = ChunkKeys {
            sealer: &s,
            repo_id: &rid,
            id_key: Some(&d.chunk_id),
        };
        // Incompressible on its own: the delta must point into the base.
        let mut base = vec![0u8; 32768];
        blake3::Hasher::new()
            .update(b"base")
            .finalize_xof()
            .fill(&mut base);
        let mut data = base.clone();
        data[1000..1010].copy_from_slice(b"0123456789");
        let bid = ChunkId(chunk_id(&d.chunk_id, &base));
        let id = ChunkId(chunk_id(&d.chunk_id, &data));
        let sealed = seal_delta(&s, &rid, id, &data, bid, &base, data.len())
            .unwrap()
            .expect("a small change makes a small delta");
        assert!(
            sealed.blob.len() < 200,
            "delta is {} bytes",
            sealed.blob.len()
        );
        assert_eq!(sealed.base, Some(bid));
        let Opened::Delta { base: b, frame } =
            open_blob(&keys, ChunkKind::Data, &id, &sealed.blob, data.len(), "p").unwrap()
        else {
            panic!("a delta blob opens as a delta");
        };
        assert_eq!(b, bid);
        assert_eq!(
            apply_delta(&keys, &id, &base, &frame, data.len(), "p").unwrap(),
            data
        );
        // Another base decodes to other bytes, which fail the id check.
        let mut other = base.clone();
        other[5] ^= 1;
        assert!(apply_delta(&keys, &id, &other, &frame, data.len(), "p").is_err());
        // A reader that does not follow bases says so instead of guessing.
        let err =
            open_chunk(&keys, ChunkKind::Data, &id, &sealed.blob, data.len(), "p").unwrap_err();
        assert!(err.to_string().contains("delta"), "{err}");
    }
}
