//! Writer leases and the writer's side of garbage collection.
//!
//! The scheme (repo-format.md, "Concurrency and garbage collection") is
//! grace-period based, like kopia's and rustic's, never an exclusive lock:
//! archive-push writes all the time. A writer
//! - registers `leases/<id>` before its first index lookup and renews it;
//! - never needs delete permission (it tries to remove its own lease at the
//!   end and ignores a refusal; collectors remove expired leases);
//! - before committing a manifest, renews the lease and aborts if it has run
//!   longer than `max_writer_secs` by the store's clock;
//! - before committing a manifest, reads every collector mark in `gc/marks/`
//!   and rewrites any chunk it references that lives only in condemned packs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::backend::{self, DynBackend, WriteMode};
use super::crypto::{random_id, Sealer};
use super::error::{RepoError, Result};
use super::format::{
    aad, frame_document, from_cbor, now_unix, to_cbor, unframe_document, ChunkId, Kind, PackId,
};

pub const LEASES_PREFIX: &str = "leases/";
pub const MARKS_PREFIX: &str = "gc/marks/";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseDoc {
    pub id: String,
    pub hostname: String,
    pub pid: u32,
    pub purpose: String,
    /// The writer's own clock; informational only (ages use store time).
    pub started_local: i64,
    pub renewed_local: i64,
}

/// A collector's mark: packs it will delete once the grace period has passed,
/// and the unreferenced chunks in them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GcMark {
    pub id: String,
    pub created_local: i64,
    pub packs: Vec<CondemnedPack>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CondemnedPack {
    pub pack: PackId,
    pub garbage: Vec<ChunkId>,
}

pub fn seal_doc<T: Serialize>(
    sealer: &Sealer,
    repo_id: &[u8; 16],
    kind: Kind,
    object: &str,
    v: &T,
) -> Result<Vec<u8>> {
    let sealed = sealer.seal(&to_cbor(v)?, &aad(repo_id, kind, object.as_bytes()))?;
    Ok(frame_document(kind, &sealed))
}

pub fn open_doc<T: serde::de::DeserializeOwned>(
    sealer: &Sealer,
    repo_id: &[u8; 16],
    kind: Kind,
    object: &str,
    bytes: &[u8],
) -> Result<T> {
    let payload = unframe_document(bytes, kind, object)?;
    let plain = sealer.open(payload, &aad(repo_id, kind, object.as_bytes()), object)?;
    from_cbor(&plain, object)
}

pub struct Lease {
    backend: DynBackend,
    sealer: Sealer,
    repo_id: [u8; 16],
    pub key: String,
    doc: LeaseDoc,
    /// Store time at which the lease was first written.
    pub started_store: i64,
    max_secs: i64,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    pub async fn acquire(
        backend: DynBackend,
        sealer: Sealer,
        repo_id: [u8; 16],
        purpose: &str,
        max_secs: i64,
    ) -> Result<Lease> {
        let id = random_id()?;
        let key = format!("{LEASES_PREFIX}{id}");
        let now = now_unix();
        let doc = LeaseDoc {
            id,
            hostname: super::keys::hostname(),
            pid: std::process::id(),
            purpose: purpose.into(),
            started_local: now,
            renewed_local: now,
        };
        let bytes = seal_doc(&sealer, &repo_id, Kind::Lease, &key, &doc)?;
        backend::put_immutable(&*backend, &key, Bytes::from(bytes)).await?;
        let started_store = backend
            .head(&key)
            .await
            .map_err(|e| e.into_repo("head", &key))?
            .modified;
        let mut lease = Lease {
            backend,
            sealer,
            repo_id,
            key,
            doc,
            started_store,
            max_secs,
            renewer: None,
        };
        lease.start_renewer();
        Ok(lease)
    }

    fn start_renewer(&mut self) {
        let every = Duration::from_secs((self.max_secs / 8).clamp(1, 600) as u64);
        let (b, s, r, k, d) = (
            self.backend.clone(),
            self.sealer.clone(),
            self.repo_id,
            self.key.clone(),
            self.doc.clone(),
        );
        self.renewer = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                // A failed renewal is caught by `check` before commit.
                let _ = renew(&*b, &s, &r, &k, &d).await;
            }
        }));
    }

    /// Renew now and fail if the writer has outlived its lease by the
    /// store's clock. Called right before a manifest is committed.
    pub async fn check(&self) -> Result<()> {
        let now_store = renew(
            &*self.backend,
            &self.sealer,
            &self.repo_id,
            &self.key,
            &self.doc,
        )
        .await?;
        let age = now_store - self.started_store;
        if age > self.max_secs {
            return Err(RepoError::LeaseExpired {
                lease: self.key.clone(),
                age_secs: age,
                limit_secs: self.max_secs,
            });
        }
        Ok(())
    }

    /// End the lease. Deleting needs a permission writers need not have, so
    /// a refusal is ignored; collectors remove expired leases.
    pub async fn release(mut self) {
        if let Some(h) = self.renewer.take() {
            h.abort();
        }
        let _ = self.backend.delete(&self.key).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = self.renewer.take() {
            h.abort();
        }
    }
}

/// Overwrite the lease and return the store's timestamp for it.
async fn renew(
    b: &dyn backend::Backend,
    s: &Sealer,
    r: &[u8; 16],
    key: &str,
    d: &LeaseDoc,
) -> Result<i64> {
    let mut doc = d.clone();
    doc.renewed_local = now_unix();
    let bytes = seal_doc(s, r, Kind::Lease, key, &doc)?;
    b.put(key, Bytes::from(bytes), WriteMode::Overwrite)
        .await
        .map_err(|e| e.into_repo("renew lease", key))?;
    Ok(b.head(key)
        .await
        .map_err(|e| e.into_repo("head", key))?
        .modified)
}

/// All current marks: condemned packs, and the garbage chunks in them.
pub struct Condemned {
    pub packs: HashSet<PackId>,
    pub garbage: HashMap<ChunkId, PackId>,
}

pub async fn load_marks(b: &DynBackend, s: &Sealer, r: &[u8; 16]) -> Result<Condemned> {
    let mut c = Condemned {
        packs: HashSet::new(),
        garbage: HashMap::new(),
    };
    for o in backend::list(&**b, MARKS_PREFIX).await? {
        let bytes = match b.get(&o.key).await {
            Ok(bytes) => bytes,
            // Swept since the listing: its packs are gone and out of the
            // index; a writer that deduplicated against them kept the mark
            // it read at its start.
            Err(backend::BackendError::NotFound) => continue,
            Err(e) => return Err(e.into_repo("read", &o.key)),
        };
        let mark: GcMark = open_doc(s, r, Kind::GcMark, &o.key, &bytes)?;
        for p in mark.packs {
            c.packs.insert(p.pack);
            for g in p.garbage {
                c.garbage.insert(g, p.pack);
            }
        }
    }
    Ok(c)
}

pub type SharedBackend = Arc<dyn backend::Backend>;
