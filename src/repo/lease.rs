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
    /// Absent in leases written before it was recorded, or off Linux.
    #[serde(default)]
    pub process: Option<ProcessIdentity>,
}

/// Where a lease's process runs, precisely enough for a process on the same
/// machine to tell that it has ended: a killed collector's lease then stops
/// blocking the next collector at once instead of after a grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// The kernel's boot id: pids compare only within one boot.
    pub boot_id: String,
    /// The pid namespace: containers on one kernel share the boot id.
    pub pid_namespace: String,
    /// Start time in clock ticks since boot, which tells a reused pid from
    /// the process that wrote the lease.
    pub start_ticks: u64,
}

impl ProcessIdentity {
    pub fn current() -> Option<ProcessIdentity> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
        Some(ProcessIdentity {
            boot_id: boot_id.trim().to_string(),
            pid_namespace: ns.to_string_lossy().into_owned(),
            start_ticks: start_ticks("self")?,
        })
    }
}

/// Field 22 of `/proc/<pid>/stat` (the command name, field 2, may hold
/// spaces and parentheses, so fields are counted after its closing one).
fn start_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process holding a lease has certainly ended: it ran on this
/// machine, in this boot and pid namespace, and its pid is gone or now
/// belongs to a process started at another time. Anything unknown (another
/// host, an older lease, an unreadable /proc) answers "not ended".
pub fn holder_has_ended(doc: &LeaseDoc) -> bool {
    let (Some(theirs), Some(mine)) = (&doc.process, ProcessIdentity::current()) else {
        return false;
    };
    if doc.hostname != super::keys::hostname()
        || theirs.boot_id != mine.boot_id
        || theirs.pid_namespace != mine.pid_namespace
    {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(doc.pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the pid exists; nothing is sent.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !exists {
        return true;
    }
    matches!(start_ticks(&doc.pid.to_string()), Some(t) if t != theirs.start_ticks)
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
    /// Tells the renewer to stop after the renewal in progress, if any.
    stop: Option<tokio::sync::watch::Sender<bool>>,
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
            process: ProcessIdentity::current(),
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
            stop: None,
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
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        self.stop = Some(stop);
        self.renewer = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
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
    /// A renewal in flight is let finish first: aborted mid-request, it
    /// could still land after the delete and bring the lease back (a
    /// collector's lease would then hold off collectors on other hosts for
    /// a grace period).
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(h) = self.renewer.take() {
            let _ = h.await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn own_doc() -> LeaseDoc {
        LeaseDoc {
            id: "x".into(),
            hostname: super::super::keys::hostname(),
            pid: std::process::id(),
            purpose: "gc".into(),
            started_local: 0,
            renewed_local: 0,
            process: ProcessIdentity::current(),
        }
    }

    #[test]
    fn only_a_process_known_to_have_ended_has_ended() {
        let mine = own_doc();
        assert!(mine.process.is_some(), "Linux /proc gives an identity");
        assert!(!holder_has_ended(&mine), "this process is running");
        let mut reused = own_doc();
        if let Some(p) = reused.process.as_mut() {
            p.start_ticks += 1;
        }
        assert!(holder_has_ended(&reused), "same pid, other start: reused");
        let elsewhere = LeaseDoc {
            hostname: "another-host".into(),
            ..reused.clone()
        };
        assert!(!holder_has_ended(&elsewhere), "another host is unknown");
        let other_ns = LeaseDoc {
            process: reused.process.clone().map(|p| ProcessIdentity {
                pid_namespace: "pid:[1]".into(),
                ..p
            }),
            ..reused.clone()
        };
        assert!(!holder_has_ended(&other_ns), "another namespace is unknown");
        let older = LeaseDoc {
            process: None,
            ..reused
        };
        assert!(!holder_has_ended(&older), "no identity recorded");
    }
}
