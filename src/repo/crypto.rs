//! Keys and sealing.
//!
//! One random 32-byte master key per repository. Everything else is derived
//! from it with BLAKE3's key derivation, each for one purpose, so that no key
//! is used twice: the chunk-id key (keyed BLAKE3, ids reveal nothing about
//! content), the sealing key (XChaCha20-Poly1305), the chunker's gear seed
//! (boundaries do not fingerprint content) and the config MAC key.
//!
//! The master key itself lives only wrapped in `keys/` objects: sealed under a
//! key-encryption key that argon2id derives from a passphrase. Key material is
//! zeroized when dropped.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::error::{RepoError, Result};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

/// The repository's secret. Never written anywhere unwrapped (except in
/// `--encryption none` repositories, which say plainly that they are readable).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    pub fn generate() -> Result<Self> {
        let mut k = [0u8; 32];
        random(&mut k)?;
        Ok(MasterKey(k))
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = b.try_into().ok()?;
        Some(MasterKey(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn derive(&self) -> DerivedKeys {
        let chunk_id = blake3::derive_key("pgcairn 2026-11 chunk id", &self.0);
        let seal = blake3::derive_key("pgcairn 2026-11 object sealing", &self.0);
        let mac = blake3::derive_key("pgcairn 2026-11 config mac", &self.0);
        let seed_bytes = blake3::derive_key("pgcairn 2026-11 chunker gear seed", &self.0);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&seed_bytes[..8]);
        DerivedKeys {
            chunk_id,
            seal,
            mac,
            gear_seed: u64::from_le_bytes(seed),
        }
    }
}

/// Purpose-bound keys derived from the master key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DerivedKeys {
    pub chunk_id: [u8; 32],
    pub seal: [u8; 32],
    pub mac: [u8; 32],
    pub gear_seed: u64,
}

pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| RepoError::Task(format!("no randomness from the OS: {e}")))
}

pub fn random_id() -> Result<String> {
    let mut b = [0u8; 16];
    random(&mut b)?;
    Ok(hex::encode(b))
}

/// How objects are sealed. `None` only compresses; integrity then rests on
/// checksums and chunk-id recomputation, and anyone with the files reads them.
#[derive(Clone)]
pub enum Sealer {
    XChaCha(Box<XChaCha20Poly1305>),
    None,
}

impl Sealer {
    pub fn new(encrypted: bool, key: &[u8; 32]) -> Self {
        if encrypted {
            let k = chacha20poly1305::Key::from(*key);
            Sealer::XChaCha(Box::new(XChaCha20Poly1305::new(&k)))
        } else {
            Sealer::None
        }
    }

    pub fn overhead(&self) -> usize {
        match self {
            Sealer::XChaCha(_) => NONCE_LEN + TAG_LEN,
            Sealer::None => 0,
        }
    }

    /// nonce ‖ ciphertext ‖ tag, with a fresh random nonce.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        match self {
            Sealer::None => Ok(plain.to_vec()),
            Sealer::XChaCha(c) => {
                let mut nonce = [0u8; NONCE_LEN];
                random(&mut nonce)?;
                let ct = c
                    .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad })
                    .map_err(|_| RepoError::Task("encryption failed".into()))?;
                let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&ct);
                Ok(out)
            }
        }
    }

    /// Open a sealed blob where it lies (a restore reads many; copying
    /// each out first cost as much as a third of the decryption). Returns
    /// where the plaintext is in `sealed`; after an error the bytes are
    /// unspecified. `what` names the blob in an error (made only then).
    pub fn open_in_place(
        &self,
        sealed: &mut [u8],
        aad: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<std::ops::Range<usize>> {
        match self {
            Sealer::None => Ok(0..sealed.len()),
            Sealer::XChaCha(c) => {
                let Some(end) = sealed
                    .len()
                    .checked_sub(TAG_LEN)
                    .filter(|&e| e >= NONCE_LEN)
                else {
                    return Err(RepoError::corrupt(what(), "sealed data too short"));
                };
                let (head, tag) = sealed.split_at_mut(end);
                let (n, ct) = head.split_at_mut(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] = (&*n)
                    .try_into()
                    .map_err(|_| RepoError::corrupt(what(), "bad nonce"))?;
                let tag: [u8; TAG_LEN] = (&*tag)
                    .try_into()
                    .map_err(|_| RepoError::corrupt(what(), "bad tag"))?;
                c.decrypt_inout_detached(&XNonce::from(nonce), aad, ct.into(), &tag.into())
                    .map_err(|_| auth_failed(&what()))?;
                Ok(NONCE_LEN..end)
            }
        }
    }

    /// Open a sealed blob; `object` names it in the error.
    pub fn open(&self, sealed: &[u8], aad: &[u8], object: &str) -> Result<Vec<u8>> {
        match self {
            Sealer::None => Ok(sealed.to_vec()),
            Sealer::XChaCha(c) => {
                if sealed.len() < NONCE_LEN + TAG_LEN {
                    return Err(RepoError::corrupt(object, "sealed data too short"));
                }
                let (n, ct) = sealed.split_at(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] = n
                    .try_into()
                    .map_err(|_| RepoError::corrupt(object, "bad nonce"))?;
                c.decrypt(&XNonce::from(nonce), Payload { msg: ct, aad })
                    .map_err(|_| auth_failed(object))
            }
        }
    }
}

fn auth_failed(object: &str) -> RepoError {
    RepoError::corrupt(
        object,
        "authentication failed (damaged, or moved from another place or repository)",
    )
}

/// Argon2id parameters, stored beside each wrapped key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes: about a quarter of a second on one core of the
    /// project's reference machine; unlocking happens once per command.
    pub const DEFAULT: KdfParams = KdfParams {
        m_cost: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// Parameters from `PGCAIRN_KDF` (`m_cost,t_cost,p_cost`), for tests and
    /// constrained hosts; the default otherwise.
    pub fn from_env() -> Result<KdfParams> {
        match std::env::var("PGCAIRN_KDF") {
            Err(_) => Ok(KdfParams::DEFAULT),
            Ok(v) => {
                let parts: Vec<u32> = v
                    .split(',')
                    .map(|p| p.trim().parse::<u32>())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| {
                        RepoError::invalid("PGCAIRN_KDF", "expected m_cost,t_cost,p_cost")
                    })?;
                match parts.as_slice() {
                    [m, t, p] => Ok(KdfParams {
                        m_cost: *m,
                        t_cost: *t,
                        p_cost: *p,
                    }),
                    _ => Err(RepoError::invalid(
                        "PGCAIRN_KDF",
                        "expected m_cost,t_cost,p_cost",
                    )),
                }
            }
        }
    }

    /// Derive a key-encryption key from a passphrase.
    pub fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let params = Params::new(self.m_cost, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| RepoError::invalid("argon2id parameters", e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, salt, out.as_mut())
            .map_err(|e| RepoError::invalid("argon2id", e.to_string()))?;
        Ok(out)
    }
}

/// Keyed BLAKE3 over a chunk's plaintext: its id.
pub fn chunk_id(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(key, data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_aad_binding() {
        let mk = MasterKey::generate().unwrap();
        let s = Sealer::new(true, &mk.derive().seal);
        let sealed = s.seal(b"payload", b"aad-1").unwrap();
        assert_eq!(sealed.len(), 7 + NONCE_LEN + TAG_LEN);
        assert_eq!(s.open(&sealed, b"aad-1", "x").unwrap(), b"payload");
        let err = s.open(&sealed, b"aad-2", "obj/x").unwrap_err();
        assert!(err.to_string().contains("obj/x"), "{err}");
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert!(s.open(&flipped, b"aad-1", "x").is_err());
    }

    #[test]
    fn open_in_place_agrees_with_open() {
        let mk = MasterKey::generate().unwrap();
        for s in [Sealer::new(true, &mk.derive().seal), Sealer::None] {
            let sealed = s.seal(b"payload", b"aad-1").unwrap();
            let mut buf = sealed.clone();
            let r = s.open_in_place(&mut buf, b"aad-1", &|| "x".into()).unwrap();
            assert_eq!(&buf[r], b"payload");
        }
        let s = Sealer::new(true, &mk.derive().seal);
        let sealed = s.seal(b"payload", b"aad-1").unwrap();
        let err = s
            .open_in_place(&mut sealed.clone(), b"aad-2", &|| "obj/x".into())
            .unwrap_err();
        assert!(err.to_string().contains("obj/x"), "{err}");
        for at in [0, NONCE_LEN, sealed.len() - 1] {
            let mut flipped = sealed.clone();
            flipped[at] ^= 1;
            assert!(s
                .open_in_place(&mut flipped, b"aad-1", &|| "x".into())
                .is_err());
        }
        let mut short = sealed[..NONCE_LEN + TAG_LEN - 1].to_vec();
        assert!(s
            .open_in_place(&mut short, b"aad-1", &|| "x".into())
            .is_err());
    }

    #[test]
    fn derived_keys_differ_per_purpose() {
        let mk = MasterKey::generate().unwrap();
        let d = mk.derive();
        assert_ne!(d.chunk_id, d.seal);
        assert_ne!(d.seal, d.mac);
        assert_ne!(&d.chunk_id, mk.as_bytes());
    }

    #[test]
    fn kdf_is_deterministic_per_salt() {
        let p = KdfParams {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        };
        let a = p.derive(b"pw", b"saltsaltsaltsalt").unwrap();
        let b = p.derive(b"pw", b"saltsaltsaltsalt").unwrap();
        let c = p.derive(b"pw", b"othersaltothersa").unwrap();
        assert_eq!(*a, *b);
        assert_ne!(*a, *c);
    }
}
