//! The WAL archive: `archive-push` and `archive-get`. PostgreSQL acts on
//! what these say: archive-push must not report success before the file is
//! durable, and archive-get must report "absent" only when a direct lookup
//! in the repository says so (recovery ends there).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::catalog::{from_value, server_record, to_value, wal_name, FileAttrs, ServerRecord};
use super::{EngineError, Result};
use crate::pg::wal::{WalFile, MIN_SEGMENT_SIZE};
use crate::pg::walfile::check_segment;
use crate::repo::format::now_unix;
use crate::repo::store::{entry, manifest};
use crate::repo::{RepoError, Repository};

/// The application payload of a WAL manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WalMeta {
    pub server: String,
    pub system_identifier: u64,
    /// The name PostgreSQL knows the file by.
    pub file: String,
    pub size: u64,
    pub archived: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// The same content was already archived (PostgreSQL retried).
    AlreadyArchived,
    /// A second, different `.partial` of the same name, kept beside the
    /// first under this name (now or by an earlier call: either way the
    /// caller warns, and look-ahead leaves such a file to PostgreSQL's own
    /// call so that the warning reaches its log).
    StoredAs(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetOutcome {
    Restored,
    /// A direct lookup found no such file in the repository.
    Absent,
}

/// Timeline whose directory holds `file` (history files by their own).
fn timeline_of(file: &WalFile) -> u32 {
    file.timeline()
}

/// The system identifier registered for `server`, if any.
pub(super) async fn registered_sysid(repo: &Repository, server: &str) -> Result<Option<u64>> {
    let name = server_record(server);
    match repo.manifest_meta(&name).await {
        Ok(v) => Ok(Some(
            from_value::<ServerRecord>(&v, &name)?.system_identifier,
        )),
        Err(RepoError::NotFound { key }) if key.ends_with(&name) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn push(repo: &Repository, server: &str, path: &Path) -> Result<PushOutcome> {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| EngineError::Refused(format!("{}: not a WAL file path", path.display())))?
        .to_string();
    let data = std::fs::read(path)
        .map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
    // The kind and timeline of a name do not depend on the segment size; a
    // segment's number does, and check_segment reads it from the header.
    let kind = WalFile::parse(&file, MIN_SEGMENT_SIZE)
        .ok_or_else(|| EngineError::Refused(format!("{file}: not a WAL archive file name")))?;
    let mut sysid = registered_sysid(repo, server).await?;
    if let WalFile::Segment { .. } | WalFile::Partial { .. } = kind {
        let h = check_segment(&file, &data, sysid).map_err(EngineError::Refused)?;
        if sysid.is_none() {
            super::backup::register_server(repo, server, h.system_identifier).await?;
            sysid = Some(h.system_identifier);
        }
    }
    let sysid = sysid.ok_or_else(|| {
        EngineError::Refused(format!(
            "{file}: server {server} is not registered in this repository yet; archive a WAL segment or take a backup first"
        ))
    })?;
    let hash = blake3::hash(&data);
    let tl = timeline_of(&kind);
    let mut name = wal_name(server, sysid, tl, &file);
    let mut outcome = PushOutcome::Stored;
    if let Some(existing) = archived_hash(repo, &name).await? {
        if existing == *hash.as_bytes() {
            return Ok(PushOutcome::AlreadyArchived);
        }
        if matches!(kind, WalFile::Partial { .. }) {
            // Two promotions from one timeline: keep both rather than stall
            // archiving forever.
            let alt = format!("{file}.{}", &hash.to_hex()[..16]);
            name = wal_name(server, sysid, tl, &alt);
            if archived_hash(repo, &name).await? == Some(*hash.as_bytes()) {
                return Ok(PushOutcome::StoredAs(alt));
            }
            outcome = PushOutcome::StoredAs(alt);
        } else {
            return Err(EngineError::Refused(format!(
                "{file} is already archived for server {server} with different content (archived BLAKE3 {}, this file {}); \
                 nothing was overwritten. Is another cluster archiving under the same server name?",
                hex::encode(existing),
                hash.to_hex()
            )));
        }
    }
    let size = data.len() as u64;
    let w = repo
        .writer(&format!("archive-push {server}/{file}"))
        .await?;
    let s = w.store_bytes(data).await?;
    let attrs = to_value(&FileAttrs {
        ctime_ns: None,
        ino: None,
        kind: "file".into(),
        mode: 0o600,
        mtime: now_unix(),
        target: None,
    })?;
    let meta = WalMeta {
        server: server.into(),
        system_identifier: sysid,
        file: file.clone(),
        size,
        archived: now_unix(),
    };
    let res = w
        .commit(&manifest(
            name.clone(),
            to_value(&meta)?,
            vec![entry(file.clone(), s, attrs)],
        ))
        .await;
    w.finish().await?;
    match res {
        Ok(()) => Ok(outcome),
        // A concurrent push of the same file: identical content is success.
        Err(RepoError::Conflict { .. })
            if archived_hash(repo, &name).await? == Some(*hash.as_bytes()) =>
        {
            Ok(match outcome {
                PushOutcome::StoredAs(alt) => PushOutcome::StoredAs(alt),
                _ => PushOutcome::AlreadyArchived,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The content hash of an archived file, `None` only if a direct lookup
/// says it is not there.
async fn archived_hash(repo: &Repository, name: &str) -> Result<Option<[u8; 32]>> {
    match repo.read_manifest(name).await {
        Ok(m) => Ok(m.entries.first().map(|e| e.hash.0)),
        Err(RepoError::NotFound { key }) if key.ends_with(name) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Fetch `file` into `dest`. `Absent` only after a direct lookup of the
/// file's manifest answered "not found"; every other failure is an error.
pub async fn get(repo: &Repository, server: &str, file: &str, dest: &Path) -> Result<GetOutcome> {
    let kind = WalFile::parse(file, MIN_SEGMENT_SIZE)
        .ok_or_else(|| EngineError::Refused(format!("{file}: not a WAL archive file name")))?;
    // No cluster registered under this name: a direct lookup says so.
    let Some(sysid) = registered_sysid(repo, server).await? else {
        return Ok(GetOutcome::Absent);
    };
    let name = wal_name(server, sysid, timeline_of(&kind), file);
    let m = match repo.read_manifest(&name).await {
        Ok(m) => m,
        Err(RepoError::NotFound { key }) if key.ends_with(&name) => return Ok(GetOutcome::Absent),
        Err(RepoError::NotFound { key }) => {
            // Something the manifest needs is missing: damage, not absence.
            return Err(EngineError::Refused(format!(
                "{file} is archived but {key} is missing from the repository (run `pgcairn verify`)"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let meta: WalMeta = from_value(&m.meta, &name)?;
    let e = m
        .entries
        .first()
        .ok_or_else(|| RepoError::corrupt(&name, "WAL manifest without its file"))?;
    let tmp = dest.with_file_name(format!(
        ".{}.pgcairn-tmp",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal")
    ));
    let result = async {
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| EngineError::io(format!("creating {}", tmp.display()), e))?;
        let mut buf = Vec::with_capacity(e.size as usize);
        repo.restore_entry(e, &mut buf).await?;
        if let WalFile::Segment { .. } | WalFile::Partial { .. } = kind {
            check_segment(file, &buf, Some(meta.system_identifier))
                .map_err(EngineError::Refused)?;
        }
        f.write_all(&buf)
            .map_err(|e| EngineError::io(format!("writing {}", tmp.display()), e))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| EngineError::io(format!("chmod {}", tmp.display()), e))?;
        // No fsync: PostgreSQL fsyncs a restored file it keeps (it
        // renames it into pg_wal with durable_rename), and one it does not
        // keep is fetched again after a crash. Recovery waits for every
        // call, and an fsync of 16 MiB (two with look-ahead) is a tenth of one.
        std::fs::rename(&tmp, dest)
            .map_err(|e| EngineError::io(format!("renaming into {}", dest.display()), e))?;
        Ok::<(), EngineError>(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    Ok(GetOutcome::Restored)
}

/// Where look-ahead records live: outside the data directory (a base
/// backup must never carry them), per repository and server.
#[derive(Debug, Clone)]
pub struct LookAhead {
    pub records: std::path::PathBuf,
    /// How many other `.ready` files one call may push (bounded).
    pub max: usize,
}

/// What one archive-push call did.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub outcome: PushOutcome,
    /// Other files pushed ahead of PostgreSQL's own calls.
    pub ahead: Vec<String>,
}

fn record_text(sysid: u64, hash: &blake3::Hash) -> String {
    format!("{sysid} {}\n", hash.to_hex())
}

pub(super) fn write_record(dir: &Path, file: &str, text: &str) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join(format!(".{file}.{}", std::process::id()));
    std::fs::write(&tmp, text)
        .map_err(|e| EngineError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, dir.join(file))
        .map_err(|e| EngineError::io(format!("renaming into {}", dir.display()), e))
}

/// archive-push with look-ahead: a file pushed ahead by an earlier call is
/// answered from its record once its content hash still matches (the record
/// was written only after the file's manifest was committed); otherwise the
/// file is pushed, and then up to `max` other `.ready` files next to it.
/// archive_status files are never renamed: PostgreSQL does that.
pub async fn push_with_lookahead(
    repo: &Repository,
    server: &str,
    path: &Path,
    la: &LookAhead,
) -> Result<PushReport> {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if let (Some(sysid), Ok(data)) = (registered_sysid(repo, server).await?, std::fs::read(path)) {
        let rec = la.records.join(&file);
        if let Ok(text) = std::fs::read_to_string(&rec) {
            if text == record_text(sysid, &blake3::hash(&data)) {
                let _ = std::fs::remove_file(&rec);
                return Ok(PushReport {
                    outcome: PushOutcome::AlreadyArchived,
                    ahead: Vec::new(),
                });
            }
            // Content changed since it was pushed ahead: push it for real.
            let _ = std::fs::remove_file(&rec);
        }
    }
    let outcome = push(repo, server, path).await?;
    let mut ahead = Vec::new();
    if la.max == 0 {
        return Ok(PushReport { outcome, ahead });
    }
    let wal_dir = path.parent().unwrap_or(Path::new("."));
    let status = wal_dir.join("archive_status");
    let mut ready: Vec<String> = match std::fs::read_dir(&status) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".ready"))
                    .map(str::to_string)
            })
            .filter(|n| *n != file && !la.records.join(n).exists())
            .collect(),
        Err(_) => Vec::new(),
    };
    ready.sort();
    ready.truncate(la.max.min(64));
    let results: Vec<(String, Result<PushOutcome>)> =
        futures::future::join_all(ready.into_iter().map(|n| {
            let p = wal_dir.join(&n);
            async move {
                let r = push(repo, server, &p).await;
                (n, r)
            }
        }))
        .await;
    let sysid = registered_sysid(repo, server).await?;
    for (n, r) in results {
        // A file that fails here, or that is kept under another name, is
        // pushed (and reported) when PostgreSQL asks.
        if let (Ok(PushOutcome::Stored | PushOutcome::AlreadyArchived), Some(sysid)) = (r, sysid) {
            if let Ok(data) = std::fs::read(wal_dir.join(&n)) {
                write_record(&la.records, &n, &record_text(sysid, &blake3::hash(&data)))?;
                ahead.push(n);
            }
        }
    }
    // Forget records of files PostgreSQL has already recycled.
    if let Ok(rd) = std::fs::read_dir(&la.records) {
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().to_string();
            if !n.starts_with('.') && !wal_dir.join(&n).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(PushReport { outcome, ahead })
}
