//! Key objects (`keys/<key-id>`): the master key wrapped under a passphrase.
//! Several keys may wrap the same master key, one per person or host.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{random, KdfParams, MasterKey, Sealer};
use super::error::{RepoError, Result};
use super::format::{aad, frame_document, from_cbor, to_cbor, unframe_document, Kind};

pub const KEYS_PREFIX: &str = "keys/";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "kebab-case")]
pub enum Kdf {
    Argon2id {
        #[serde(flatten)]
        params: KdfParams,
        #[serde(with = "serde_bytes")]
        salt: Vec<u8>,
    },
    /// `--encryption none`: the master key is stored in the clear.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub id: String,
    pub created: i64,
    pub hostname: String,
    pub username: String,
    pub kdf: Kdf,
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
}

pub fn key_object(id: &str) -> String {
    format!("{KEYS_PREFIX}{id}")
}

fn wrap_aad(repo_id: &[u8; 16], key_id: &str) -> Vec<u8> {
    aad(repo_id, Kind::Key, key_id.as_bytes())
}

impl KeyFile {
    /// Wrap `master` under `passphrase` (or store it plainly when `encrypted`
    /// is false).
    pub fn wrap(
        repo_id: &[u8; 16],
        master: &MasterKey,
        passphrase: Option<&[u8]>,
        params: KdfParams,
        id: String,
        now: i64,
    ) -> Result<KeyFile> {
        let (kdf, wrapped) = match passphrase {
            Some(pw) => {
                let mut salt = vec![0u8; 16];
                random(&mut salt)?;
                let kek = params.derive(pw, &salt)?;
                let sealer = Sealer::new(true, &kek);
                let wrapped = sealer.seal(master.as_bytes(), &wrap_aad(repo_id, &id))?;
                (Kdf::Argon2id { params, salt }, wrapped)
            }
            None => (Kdf::None, master.as_bytes().to_vec()),
        };
        Ok(KeyFile {
            id,
            created: now,
            hostname: hostname(),
            username: username(),
            kdf,
            wrapped,
        })
    }

    /// Try to unwrap with a passphrase. `Ok(None)` means "not this key".
    pub fn unwrap_with(
        &self,
        repo_id: &[u8; 16],
        passphrase: Option<&[u8]>,
    ) -> Result<Option<MasterKey>> {
        let object = key_object(&self.id);
        match (&self.kdf, passphrase) {
            (Kdf::None, _) => Ok(Some(
                MasterKey::from_bytes(&self.wrapped)
                    .ok_or_else(|| RepoError::corrupt(&object, "bad key length"))?,
            )),
            (Kdf::Argon2id { .. }, None) => Ok(None),
            (Kdf::Argon2id { params, salt }, Some(pw)) => {
                let kek = params.derive(pw, salt)?;
                let sealer = Sealer::new(true, &kek);
                match sealer.open(&self.wrapped, &wrap_aad(repo_id, &self.id), &object) {
                    Ok(plain) => {
                        let plain = Zeroizing::new(plain);
                        Ok(Some(MasterKey::from_bytes(&plain).ok_or_else(|| {
                            RepoError::corrupt(&object, "bad key length")
                        })?))
                    }
                    // The document checksum already passed, so the bytes are as
                    // written: a failure here is the wrong passphrase.
                    Err(_) => Ok(None),
                }
            }
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        Ok(frame_document(Kind::Key, &to_cbor(self)?))
    }

    pub fn decode(bytes: &[u8], object: &str) -> Result<KeyFile> {
        let payload = unframe_document(bytes, Kind::Key, object)?;
        let k: KeyFile = from_cbor(payload, object)?;
        if key_object(&k.id) != object {
            return Err(RepoError::corrupt(
                object,
                format!("names itself {:?}", k.id),
            ));
        }
        Ok(k)
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        // SAFETY: geteuid has no preconditions and cannot fail.
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::geteuid() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_passphrase() {
        let repo_id = [1u8; 16];
        let mk = MasterKey::generate().unwrap();
        let p = KdfParams {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        };
        let kf = KeyFile::wrap(&repo_id, &mk, Some(b"secret"), p, "k1".into(), 0).unwrap();
        let bytes = kf.encode().unwrap();
        let back = KeyFile::decode(&bytes, "keys/k1").unwrap();
        let got = back
            .unwrap_with(&repo_id, Some(b"secret"))
            .unwrap()
            .unwrap();
        assert_eq!(got.as_bytes(), mk.as_bytes());
        assert!(back
            .unwrap_with(&repo_id, Some(b"wrong"))
            .unwrap()
            .is_none());
        assert!(back
            .unwrap_with(&[2u8; 16], Some(b"secret"))
            .unwrap()
            .is_none());
        // A key file copied under another name is refused.
        assert!(KeyFile::decode(&bytes, "keys/k2").is_err());
    }
}
