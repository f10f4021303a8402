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
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
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
    XChaCha(Box<XChaCha>),
    None,
}

/// XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha): HChaCha20 turns the key
/// and the nonce's first 16 bytes into a one-message key for the RFC 8439
/// ChaCha20-Poly1305, whose nonce is four zero bytes and the nonce's last
/// 8. Composed here so that the AEAD runs on AWS-LC's assembly (already in
/// the build for object_store's TLS): about twice RustCrypto's speed on
/// this machine, and the same bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct XChaCha {
    key: [u8; 32],
}

impl XChaCha {
    /// The one-message ChaCha20-Poly1305 key and nonce for `nonce`.
    fn message_key(&self, nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce)> {
        let (head, tail) = nonce.split_at(16);
        let head: [u8; 16] = head
            .try_into()
            .map_err(|_| RepoError::Task("nonce split".into()))?;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(tail);
        let mut sub: [u8; 32] = chacha20::hchacha::<chacha20::R20>(
            &chacha20::Key::from(self.key),
            &chacha20::cipher::Array::from(head),
        )
        .into();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &sub);
        sub.zeroize();
        let key = key.map_err(|_| RepoError::Task("ChaCha20-Poly1305 key rejected".into()))?;
        Ok((LessSafeKey::new(key), Nonce::assume_unique_for_key(n)))
    }

    /// Decrypt `ct ‖ tag` in place; the plaintext is its first
    /// `len - TAG_LEN` bytes. `false`: authentication failed.
    fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], ct_tag: &mut [u8]) -> Result<bool> {
        let (key, nonce) = self.message_key(nonce)?;
        Ok(key.open_in_place(nonce, Aad::from(aad), ct_tag).is_ok())
    }
}

impl Sealer {
    pub fn new(encrypted: bool, key: &[u8; 32]) -> Self {
        if encrypted {
            Sealer::XChaCha(Box::new(XChaCha { key: *key }))
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
                let (key, n) = c.message_key(&nonce)?;
                let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
                out.extend_from_slice(&nonce);
                out.extend_from_slice(plain);
                let tag = key
                    .seal_in_place_separate_tag(n, Aad::from(aad), &mut out[NONCE_LEN..])
                    .map_err(|_| RepoError::Task("encryption failed".into()))?;
                out.extend_from_slice(tag.as_ref());
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
                let nonce = nonce_of(sealed, what)?;
                if !c.open(&nonce, aad, &mut sealed[NONCE_LEN..])? {
                    return Err(auth_failed(&what()));
                }
                Ok(NONCE_LEN..sealed.len() - TAG_LEN)
            }
        }
    }

    /// Open a sealed blob; `object` names it in the error.
    pub fn open(&self, sealed: &[u8], aad: &[u8], object: &str) -> Result<Vec<u8>> {
        match self {
            Sealer::None => Ok(sealed.to_vec()),
            Sealer::XChaCha(c) => {
                let nonce = nonce_of(sealed, &|| object.to_string())?;
                let mut buf = sealed[NONCE_LEN..].to_vec();
                if !c.open(&nonce, aad, &mut buf)? {
                    return Err(auth_failed(object));
                }
                buf.truncate(buf.len() - TAG_LEN);
                Ok(buf)
            }
        }
    }
}

/// The nonce of a sealed blob that is long enough to hold a nonce and a
/// tag.
fn nonce_of(sealed: &[u8], what: &dyn Fn() -> String) -> Result<[u8; NONCE_LEN]> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(RepoError::corrupt(what(), "sealed data too short"));
    }
    sealed[..NONCE_LEN]
        .try_into()
        .map_err(|_| RepoError::corrupt(what(), "bad nonce"))
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
                    [m, t, p] => {
                        let k = KdfParams {
                            m_cost: *m,
                            t_cost: *t,
                            p_cost: *p,
                        };
                        k.check()?;
                        Ok(k)
                    }
                    _ => Err(RepoError::invalid(
                        "PGCAIRN_KDF",
                        "expected m_cost,t_cost,p_cost",
                    )),
                }
            }
        }
    }

    /// Bounds on parameters read from a key object, which anyone with
    /// write access to the storage can forge: no unlock may take minutes or
    /// the host's memory. 8 KiB to 1 GiB, 1 to 64 passes, 1 to 64 lanes,
    /// and at most 4 GiB-passes of work (the default is 192 MiB-passes).
    pub fn check(&self) -> Result<()> {
        if (8..=1 << 20).contains(&self.m_cost)
            && (1..=64).contains(&self.t_cost)
            && (1..=64).contains(&self.p_cost)
            && u64::from(self.m_cost) * u64::from(self.t_cost) <= 4 << 20
        {
            Ok(())
        } else {
            Err(RepoError::invalid(
                "argon2id parameters",
                format!(
                    "memory {} KiB, {} passes, {} lanes: outside what pgcairn accepts (8 KiB to 1 GiB, 1 to 64 passes, 1 to 64 lanes, memory times passes at most 4 GiB)",
                    self.m_cost, self.t_cost, self.p_cost
                ),
            ))
        }
    }

    /// Derive a key-encryption key from a passphrase.
    pub fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        self.check()?;
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

    /// Repositories written with RustCrypto's XChaCha20-Poly1305 (before
    /// AWS-LC did the AEAD) read, and what is written now reads there.
    #[test]
    fn same_bytes_as_rustcrypto_xchacha20poly1305() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        use chacha20poly1305::{XChaCha20Poly1305, XNonce};
        let mk = MasterKey::generate().unwrap();
        let key = mk.derive().seal;
        let ours = Sealer::new(true, &key);
        let theirs = XChaCha20Poly1305::new(&key.into());
        for len in [0, 1, 63, 64, 65, 1000, 40_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let aad = format!("aad {len}");
            let sealed = ours.seal(&plain, aad.as_bytes()).unwrap();
            let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().unwrap();
            let msg = Payload {
                msg: &sealed[NONCE_LEN..],
                aad: aad.as_bytes(),
            };
            assert_eq!(theirs.decrypt(&XNonce::from(nonce), msg).unwrap(), plain);

            let mut old = nonce.to_vec();
            let msg = Payload {
                msg: &plain,
                aad: aad.as_bytes(),
            };
            old.extend(theirs.encrypt(&XNonce::from(nonce), msg).unwrap());
            assert_eq!(old, sealed, "same key and nonce, same bytes");
            assert_eq!(ours.open(&old, aad.as_bytes(), "x").unwrap(), plain);
        }
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
