//! pgcairn's names and records inside a repository: which manifest holds
//! which backup or WAL file, and the PostgreSQL facts a backup records. The
//! repository layer sees these only as opaque CBOR.
//!
//! ```text
//! manifests/servers/<server>                      the cluster registered under a name
//! manifests/backups/<server>/<backup-id>          a base backup
//! manifests/wal/<server>/<sysid>/<timeline>/<file> an archived WAL file
//! manifests/pins/<server>/<backup-id>             a backup no retention policy removes
//! ```

use serde::{Deserialize, Serialize};

use crate::repo::{Entry, RepoError, Repository};

pub fn server_record(server: &str) -> String {
    format!("servers/{server}")
}

pub fn backup_name(server: &str, id: &str) -> String {
    format!("backups/{server}/{id}")
}

pub fn backups_prefix(server: &str) -> String {
    format!("backups/{server}/")
}

/// A pin (`pgcairn keep`): no entries, created only if absent, deleted to
/// release it.
pub fn pin_name(server: &str, id: &str) -> String {
    format!("pins/{server}/{id}")
}

pub fn pins_prefix(server: &str) -> String {
    format!("pins/{server}/")
}

/// WAL manifests are grouped by cluster and timeline. The name is the
/// manifest's AEAD context, so it binds server, system identifier and file
/// name: a WAL file cannot be passed off as another cluster's or another
/// file's. History files live under their own timeline.
pub fn wal_name(server: &str, sysid: u64, timeline: u32, file: &str) -> String {
    format!("wal/{server}/{sysid}/{timeline:08X}/{file}")
}

/// Every WAL manifest of one cluster under `server`.
pub fn wal_prefix(server: &str, sysid: u64) -> String {
    format!("wal/{server}/{sysid}/")
}

/// Server and backup names: what manifest names allow, one segment.
pub fn validate_server(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return Err(format!(
            "server name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

/// `manifests/servers/<server>`: the cluster a server name stands for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRecord {
    pub server: String,
    pub system_identifier: u64,
    pub registered: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TablespaceMeta {
    pub oid: u32,
    pub name: String,
    pub location: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadPage {
    pub path: String,
    /// Absolute block number within the relation.
    pub block: u64,
    pub stored: u16,
    pub computed: u16,
}

/// Per-entry attributes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileAttrs {
    /// "file", "dir", or "tablespace" (a `pg_tblspc/<oid>` link).
    pub kind: String,
    pub mode: u32,
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A backed-up file's status change time (ns) and inode, for the next
    /// backup's unchanged-file check (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime_ns: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ino: Option<u64>,
}

/// What a backup manifest's application payload records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupMeta {
    pub server: String,
    pub backup_id: String,
    pub label: String,
    pub start_time: i64,
    pub stop_time: i64,
    /// The sub-second part of `stop_time`, in nanoseconds (absent in older
    /// manifests): a time target a fraction of a second after the end must
    /// still tell whether the backup ended before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_time_ns: Option<u32>,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub timeline: u32,
    pub pg_version: String,
    pub pg_version_num: i32,
    pub system_identifier: u64,
    pub wal_segment_size: u64,
    pub block_size: u32,
    pub data_checksums: bool,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    pub tablespaces: Vec<TablespaceMeta>,
    pub bad_pages: Vec<BadPage>,
    pub files: u64,
    pub logical_bytes: u64,
    pub new_bytes_stored: u64,
    pub new_bytes_raw: u64,
    pub reused_bytes: u64,
    /// Files taken from the previous backup without reading them (size and
    /// timestamps unchanged), and their bytes (absent before 0.1's
    /// unchanged-file check: 0).
    #[serde(default)]
    pub unchanged_files: u64,
    #[serde(default)]
    pub unchanged_bytes: u64,
    pub duration_secs: f64,
    /// WAL files carried inside this backup (`--include-wal`), as entries
    /// under `pg_wal/`.
    pub included_wal: Vec<String>,
}

impl BackupMeta {
    /// The latest instant (Unix seconds) at which the backup may have
    /// ended: exact with `stop_time_ns`, else the end of the recorded second.
    pub fn ended_by(&self) -> f64 {
        self.stop_time as f64 + self.stop_time_ns.map_or(1.0, |n| f64::from(n) / 1e9)
    }
}

pub fn to_value<T: Serialize>(v: &T) -> Result<ciborium::Value, RepoError> {
    ciborium::Value::serialized(v).map_err(|e| RepoError::Task(format!("encoding metadata: {e}")))
}

pub fn from_value<T: for<'de> Deserialize<'de>>(
    v: &ciborium::Value,
    what: &str,
) -> Result<T, RepoError> {
    v.deserialized()
        .map_err(|e| RepoError::corrupt(what.to_string(), format!("unexpected metadata: {e}")))
}

pub fn attrs_of(e: &Entry) -> Result<FileAttrs, RepoError> {
    from_value(&e.attrs, &e.path)
}

/// A backup as listed: its manifest name and metadata.
#[derive(Debug, Clone)]
pub struct BackupRef {
    pub name: String,
    pub meta: BackupMeta,
}

/// Every backup of `server` (or of every server), oldest first by stop time.
pub async fn list_backups(
    repo: &Repository,
    server: Option<&str>,
) -> Result<Vec<BackupRef>, RepoError> {
    let prefix = match server {
        Some(s) => backups_prefix(s),
        None => "backups/".to_string(),
    };
    let mut out = Vec::new();
    for name in repo.list_manifests(&prefix).await? {
        let meta = repo.manifest_meta(&name).await?;
        out.push(BackupRef {
            meta: from_value(&meta, &name)?,
            name,
        });
    }
    out.sort_by(|a, b| {
        a.meta
            .stop_time
            .cmp(&b.meta.stop_time)
            .then(a.meta.backup_id.cmp(&b.meta.backup_id))
    });
    Ok(out)
}
