//! Object framing shared by every object in the repository (see
//! `repo-format.md`, "Object framing"):
//!
//! ```text
//! header   = "PGCAIRN" kind:u8 version:u8        (9 bytes)
//! document = header payload blake3(header payload)  (config, keys, manifests, leases, marks)
//! ```
//!
//! The checksum trailer separates "damaged" from "wrong key": a flipped byte
//! is reported as corruption of the named object before any key is tried.
//! Packs and index objects carry the header but are named by the BLAKE3 hash
//! of their bytes instead of a trailer.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{RepoError, Result};

pub const MAGIC: &[u8; 7] = b"PGCAIRN";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 9;
pub const CHECKSUM_LEN: usize = 32;

/// Object kinds; the byte appears in headers and in every AEAD's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Config = b'C',
    Key = b'K',
    Pack = b'P',
    Index = b'I',
    Manifest = b'M',
    Lease = b'L',
    GcMark = b'G',
    /// Data chunk inside a pack (associated data only).
    DataChunk = b'd',
    /// Metadata chunk inside a pack (associated data only).
    MetaChunk = b'm',
    /// A pack's table (associated data only).
    PackTable = b't',
    /// An index object's page or directory (associated data only).
    IndexPage = b'i',
}

pub fn header(kind: Kind) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..7].copy_from_slice(MAGIC);
    h[7] = kind as u8;
    h[8] = FORMAT_VERSION;
    h
}

/// Check an object's header; `object` names it in errors.
pub fn check_header(bytes: &[u8], kind: Kind, object: &str) -> Result<()> {
    if bytes.len() < HEADER_LEN || &bytes[..7] != MAGIC {
        return Err(RepoError::corrupt(
            object,
            "not a pgcairn object (bad magic)",
        ));
    }
    if bytes[7] != kind as u8 {
        return Err(RepoError::corrupt(
            object,
            format!(
                "object kind {:?} where {:?} was expected",
                bytes[7] as char, kind as u8 as char
            ),
        ));
    }
    if bytes[8] != FORMAT_VERSION {
        return Err(RepoError::Unsupported {
            object: object.into(),
            reason: format!(
                "format version {} (this pgcairn reads version {FORMAT_VERSION})",
                bytes[8]
            ),
        });
    }
    Ok(())
}

/// Frame a document: header, payload, checksum.
pub fn frame_document(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(&header(kind));
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Unframe a document, verifying header and checksum; returns the payload.
pub fn unframe_document<'a>(bytes: &'a [u8], kind: Kind, object: &str) -> Result<&'a [u8]> {
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(RepoError::corrupt(
            object,
            format!("truncated ({} bytes)", bytes.len()),
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if blake3::hash(body).as_bytes() != sum {
        return Err(RepoError::corrupt(object, "checksum mismatch"));
    }
    check_header(body, kind, object)?;
    Ok(&body[HEADER_LEN..])
}

/// Associated data for every sealed blob: binds format version, repository,
/// object kind and the object's identity (chunk id, object name, ...), so
/// nothing can be swapped for something else.
pub fn aad(repo_id: &[u8; 16], kind: Kind, context: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(7 + 1 + 16 + 1 + context.len());
    a.extend_from_slice(MAGIC);
    a.push(FORMAT_VERSION);
    a.extend_from_slice(repo_id);
    a.push(kind as u8);
    a.extend_from_slice(context);
    a
}

pub fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out)
        .map_err(|e| RepoError::Task(format!("CBOR encoding failed: {e}")))?;
    Ok(out)
}

pub fn from_cbor<T: DeserializeOwned>(b: &[u8], object: &str) -> Result<T> {
    ciborium::from_reader(b)
        .map_err(|e| RepoError::corrupt(object, format!("undecodable CBOR: {e}")))
}

/// A chunk's identity: keyed BLAKE3 of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
        let arr: [u8; 32] = v
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::custom("chunk id must be 32 bytes"))?;
        Ok(ChunkId(arr))
    }
}

/// A pack's identity: plain BLAKE3 of its bytes (which are ciphertext).
pub type PackId = ChunkId;

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_framing_detects_any_flip() {
        let doc = frame_document(Kind::Manifest, b"some payload");
        assert_eq!(
            unframe_document(&doc, Kind::Manifest, "m").unwrap(),
            b"some payload"
        );
        for i in 0..doc.len() {
            let mut d = doc.clone();
            d[i] ^= 0x40;
            let e = unframe_document(&d, Kind::Manifest, "manifests/x").unwrap_err();
            assert!(e.to_string().contains("manifests/x"), "{e}");
        }
        assert!(unframe_document(&doc, Kind::Config, "c").is_err());
    }

    #[test]
    fn chunk_id_cbor_roundtrip() {
        let id = ChunkId([7u8; 32]);
        let b = to_cbor(&vec![id]).unwrap();
        let back: Vec<ChunkId> = from_cbor(&b, "x").unwrap();
        assert_eq!(back, vec![id]);
    }
}
