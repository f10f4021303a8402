//! Manifests: the named roots of everything a repository keeps. A manifest
//! names the chunks it references and is written last, after its packs and
//! index objects, with create-if-absent and never rewritten, so that
//! repositories on WORM / object-lock buckets work and a reader never sees a
//! manifest whose chunks are missing.
//!
//! The repository layer knows nothing of PostgreSQL: a manifest is a list of
//! entries (a path, its bytes as chunk references, opaque attributes) plus an
//! opaque application payload. The entry list is itself stored as metadata
//! chunks, so consecutive manifests of a large tree deduplicate; the small
//! manifest document only references those.

use serde::{Deserialize, Serialize};

use super::error::{RepoError, Result};
use super::format::ChunkId;

pub const MANIFESTS_PREFIX: &str = "manifests/";

/// One chunk of a stream: its id and plaintext length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub ChunkId, pub u32);

/// A stored byte stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    /// Plain BLAKE3 of the whole stream.
    pub hash: ChunkId,
    pub chunks: Vec<ChunkRef>,
    /// Application attributes (mode, mtime, ...), opaque here.
    pub attrs: ciborium::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub created: i64,
    pub meta: ciborium::Value,
    pub entries: Vec<Entry>,
}

/// What is stored in `manifests/<name>`, sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ManifestDoc {
    pub name: String,
    pub created: i64,
    pub meta: ciborium::Value,
    /// Metadata chunks holding the CBOR entry list.
    pub body: Vec<ChunkRef>,
    pub body_len: u64,
    pub body_hash: ChunkId,
    pub entry_count: u64,
    /// Sum of entry sizes: the logical bytes this manifest restores.
    pub logical_bytes: u64,
}

pub fn manifest_object(name: &str) -> String {
    format!("{MANIFESTS_PREFIX}{name}")
}

/// Names are `/`-separated segments of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| RepoError::BadName {
        name: name.into(),
        reason: reason.into(),
    };
    if name.is_empty() || name.len() > 512 {
        return Err(bad("must be 1 to 512 characters"));
    }
    for seg in name.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(bad("empty, '.' or '..' path segment"));
        }
        if !seg
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            return Err(bad(
                "only letters, digits, '.', '_', '-' and '/' are allowed",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("backups/main/20261122T101010").is_ok());
        assert!(validate_name("wal/main/00000001/000000010000000000000001.partial").is_ok());
        for bad in ["", "a//b", "../x", "a/./b", "a b", "a/é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
