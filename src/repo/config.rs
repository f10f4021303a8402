//! The `config` object: what every reader needs before it can read anything
//! else. Stored as a plain (unencrypted) document so that a reader learns the
//! encryption mode; its body is authenticated after unlocking by a MAC under
//! a key derived from the master key, so that nobody can, say, switch a
//! repository to `none` behind its owners' backs.

use serde::{Deserialize, Serialize};

use super::error::{RepoError, Result};
use super::format::{frame_document, from_cbor, to_cbor, unframe_document, Kind};

pub const CONFIG_KEY: &str = "config";

/// The repository format this pgcairn writes. Version 2 added delta blobs
/// (and base ids in pack tables and index entries); version 1 repositories
/// are read and written without them.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// XChaCha20-Poly1305 under keys derived from the wrapped master key.
    Xchacha20poly1305,
    /// No encryption: anyone who can read the storage can read the data.
    None,
}

impl Encryption {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Encryption::Xchacha20poly1305)
    }
    pub fn name(&self) -> &'static str {
        match self {
            Encryption::Xchacha20poly1305 => "xchacha20poly1305",
            Encryption::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    /// Chosen by measurement on PostgreSQL data files; see repo-format.md.
    pub const DEFAULT: ChunkerParams = ChunkerParams {
        min_size: 64 * 1024,
        avg_size: 256 * 1024,
        max_size: 1024 * 1024,
    };

    pub fn validate(&self) -> Result<()> {
        let ok = self.min_size >= 64
            && self.avg_size >= 256
            && self.max_size <= 16 * 1024 * 1024
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size
            && self.min_size % 2 == 0
            && self.avg_size % 2 == 0
            && self.max_size % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(RepoError::invalid(
                "chunker parameters",
                format!("{self:?}: need 64 <= min <= avg <= max <= 16 MiB, avg >= 256, all even"),
            ))
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcParams {
    /// Nothing younger than this (by the store's clock) is ever deleted,
    /// and condemned objects survive this long after being marked.
    pub grace_period_secs: i64,
    /// A writer that has run longer than this aborts instead of committing.
    pub max_writer_secs: i64,
    /// A collector aborts when its clock and the store's differ by more.
    pub max_clock_skew_secs: i64,
}

impl GcParams {
    pub const DEFAULT: GcParams = GcParams {
        grace_period_secs: 48 * 3600,
        max_writer_secs: 24 * 3600,
        max_clock_skew_secs: 300,
    };

    /// The protocol's safety rests on a writer giving up before a condemned
    /// chunk it might still reference can be swept (ages are store times,
    /// so clock skew does not enter).
    pub fn validate(&self) -> Result<()> {
        if self.max_writer_secs >= 1
            && self.grace_period_secs > self.max_writer_secs
            && self.max_clock_skew_secs >= 0
        {
            Ok(())
        } else {
            Err(RepoError::invalid(
                "gc parameters",
                format!(
                    "grace period {} s, max writer {} s: need max writer >= 1 s and a grace period longer than the max writer time",
                    self.grace_period_secs, self.max_writer_secs
                ),
            ))
        }
    }
}

/// Everything in `config` but its MAC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    pub format_version: u32,
    #[serde(with = "serde_bytes")]
    pub repo_id: Vec<u8>,
    pub created: i64,
    pub encryption: Encryption,
    pub chunker: ChunkerParams,
    pub compression: Compression,
    pub pack_target_size: u64,
    pub index_page_entries: u32,
    pub gc: GcParams,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Compression {
    /// "zstd" is the only algorithm in format version 1.
    pub algorithm: CompressionAlgorithm,
    pub level: i32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionAlgorithm {
    Zstd,
}

impl Compression {
    pub const DEFAULT: Compression = Compression {
        algorithm: CompressionAlgorithm::Zstd,
        level: 3,
    };

    /// A level zstd takes as given (it clamps others silently: 50 would
    /// run as 22, a hundred times slower than 3). Its negative "fast"
    /// levels are not offered.
    pub fn validate_level(level: i32) -> Result<()> {
        if (1..=zstd::zstd_safe::max_c_level()).contains(&level) {
            Ok(())
        } else {
            Err(RepoError::invalid(
                "compression level",
                format!(
                    "{level}: choose a zstd level from 1 to {}; the default is 3",
                    zstd::zstd_safe::max_c_level()
                ),
            ))
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ConfigDoc {
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    mac: Vec<u8>,
}

/// Largest pack target: a pack's offsets and lengths are 32-bit, and a pack
/// may exceed its target by one blob, so 2 GiB leaves ample room.
pub const MAX_PACK_TARGET: u64 = 2 << 30;

/// A pack target size a writer can honour.
pub fn validate_pack_target(size: u64) -> Result<()> {
    if (1..=MAX_PACK_TARGET).contains(&size) {
        Ok(())
    } else {
        Err(RepoError::invalid(
            "pack size",
            format!("{size} bytes: choose between 1 byte and {MAX_PACK_TARGET} bytes (2 GiB); the default is 32 MiB"),
        ))
    }
}

impl RepoConfig {
    pub fn repo_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.repo_id[..16]);
        id
    }

    pub fn repo_id_hex(&self) -> String {
        hex::encode(&self.repo_id)
    }

    /// Encode as the `config` document, MACed with `mac_key`.
    pub fn encode(&self, mac_key: &[u8; 32]) -> Result<Vec<u8>> {
        let body = to_cbor(self)?;
        let mac = blake3::keyed_hash(mac_key, &body).as_bytes().to_vec();
        Ok(frame_document(
            Kind::Config,
            &to_cbor(&ConfigDoc { body, mac })?,
        ))
    }

    /// Decode without a key (integrity only). Returns the config and the
    /// (body, mac) pair to authenticate once the master key is unlocked.
    pub fn decode(bytes: &[u8]) -> Result<(RepoConfig, Vec<u8>, Vec<u8>)> {
        let payload = unframe_document(bytes, Kind::Config, CONFIG_KEY)?;
        let doc: ConfigDoc = from_cbor(payload, CONFIG_KEY)?;
        let cfg: RepoConfig = from_cbor(&doc.body, CONFIG_KEY)?;
        if !(1..=FORMAT_VERSION).contains(&cfg.format_version) {
            return Err(RepoError::Unsupported {
                object: CONFIG_KEY.into(),
                reason: format!(
                    "repository format version {} (this pgcairn reads versions 1 to {FORMAT_VERSION}; upgrade pgcairn)",
                    cfg.format_version
                ),
            });
        }
        if cfg.repo_id.len() != 16 {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                "repository id is not 16 bytes",
            ));
        }
        cfg.chunker.validate()?;
        validate_pack_target(cfg.pack_target_size)?;
        Ok((cfg, doc.body, doc.mac))
    }

    /// Authenticate the body with the unlocked MAC key.
    pub fn authenticate(body: &[u8], mac: &[u8], mac_key: &[u8; 32]) -> Result<()> {
        let want = blake3::keyed_hash(mac_key, body);
        if want.as_bytes().as_slice() != mac {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                "its MAC does not match the repository key (altered or replaced)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::GcParams;

    #[test]
    fn pack_targets_that_overflow_32_bit_offsets_are_refused() {
        use super::{validate_pack_target, MAX_PACK_TARGET};
        assert!(validate_pack_target(32 << 20).is_ok());
        assert!(validate_pack_target(MAX_PACK_TARGET).is_ok());
        let e = validate_pack_target(4 << 30).expect_err("4 GiB");
        assert!(e.to_string().contains("pack size"), "{e}");
        assert!(validate_pack_target(0).is_err());
    }

    #[test]
    fn gc_parameters_keep_writers_inside_the_grace_period() {
        assert!(GcParams::DEFAULT.validate().is_ok());
        let p = |g, w| GcParams {
            grace_period_secs: g,
            max_writer_secs: w,
            max_clock_skew_secs: 300,
        };
        assert!(p(10, 5).validate().is_ok());
        assert!(p(6, 5).validate().is_ok());
        assert!(
            p(5, 5).validate().is_err(),
            "a writer as long as the grace period"
        );
        assert!(p(10, 0).validate().is_err(), "a writer must get some time");
        assert!(p(-1, 5).validate().is_err());
    }
}
