//! `backup`: copy a running cluster into the repository with PostgreSQL's
//! non-exclusive low-level API, verifying page checksums as it reads.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use super::catalog::{
    backup_name, from_value, server_record, to_value, wal_name, BackupMeta, BadPage, FileAttrs,
    ServerRecord, TablespaceMeta,
};
use super::{utc_stamp, EngineError, Progress, Result};
use crate::pg::checksum::{check_page, PageState};
use crate::pg::conn::Session;
use crate::pg::control;
use crate::pg::datadir::{self, Item, Kind};
use crate::pg::wal::{segment_name, segno_of};
use crate::repo::format::now_unix;
use crate::repo::store::{entry, manifest, StoredStream};
use crate::repo::{ChunkRef, Entry, RepoError, Repository, WriteStats};

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub server: String,
    pub pgdata: PathBuf,
    pub conninfo: String,
    pub label: Option<String>,
    pub fast_checkpoint: bool,
    pub jobs: usize,
    /// Carry the WAL the backup needs inside it (self-contained).
    pub include_wal: bool,
    /// How long to wait for the backup's WAL to reach the archive.
    pub wal_timeout: Duration,
    /// Read every file, even those whose size and timestamps say they are
    /// unchanged since the previous backup.
    pub read_all: bool,
}

#[derive(Debug, Clone)]
pub struct BackupSummary {
    pub name: String,
    pub meta: BackupMeta,
    pub stats: WriteStats,
    /// The backup whose relation blocks changed blocks were stored as
    /// deltas against, if any.
    pub deltas_against: Option<String>,
    /// Files unchanged since that backup (size and timestamps), referenced
    /// without being read, and their bytes.
    pub unchanged_files: u64,
    pub unchanged_bytes: u64,
    /// Things the user should know that did not stop the backup.
    pub warnings: Vec<String>,
}

/// A file as the server's latest backup stored it.
struct PrevFile {
    chunks: Arc<Vec<ChunkRef>>,
    size: u64,
    hash: crate::repo::format::ChunkId,
    attrs: FileAttrs,
}

/// The server's latest backup: its files by path (for relation files, the
/// previous version of every block), and what decides whether a file is
/// unchanged since.
#[derive(Default)]
struct Previous {
    id: Option<String>,
    start_time: i64,
    timeline: u32,
    files: HashMap<String, PrevFile>,
    bad_pages: Vec<BadPage>,
}

impl Previous {
    /// The previous backup's copy of `it`, when the file cannot have
    /// changed since that backup read it (pgBackRest's incremental rule,
    /// with status change time and inode added): same timeline, same size,
    /// mtime, ctime and inode, and a ctime at least [`SETTLED_SECS`] before
    /// the previous backup started. Any write after that start moves ctime
    /// to the start or later (file timestamps come from a clock at most a
    /// tick behind), so an equal ctime means no write since the file was
    /// read. Files whose ctime is newer are read again.
    fn unchanged(&self, it: &Item, timeline: u32) -> Option<&PrevFile> {
        if self.id.is_none() || self.timeline != timeline {
            return None;
        }
        let p = self.files.get(&it.rel)?;
        let a = &p.attrs;
        let settled = a
            .ctime_ns
            .is_some_and(|c| c <= (self.start_time - SETTLED_SECS).saturating_mul(1_000_000_000));
        (settled
            && p.size == it.size
            && a.mtime == it.mtime
            && a.ctime_ns == Some(it.ctime_ns)
            && a.ino == Some(it.ino))
        .then_some(p)
    }
}

/// How long before the previous backup's start a file must have last
/// changed to count as unchanged by its timestamps.
const SETTLED_SECS: i64 = 2;

/// The server's latest backup with the same block size. One that cannot be
/// read costs only the saving (as pgBackRest falls back to a full backup
/// when its prior backup is unusable): the reason comes back as a warning.
async fn previous_backup(
    repo: &Repository,
    server: &str,
    block_size: u32,
) -> (Previous, Option<String>) {
    let found = async {
        let all = super::catalog::list_backups(repo, Some(server)).await?;
        let Some(last) = all
            .into_iter()
            .rev()
            .find(|b| b.meta.block_size == block_size)
        else {
            return Ok::<_, RepoError>(Previous::default());
        };
        let m = repo.read_manifest(&last.name).await?;
        let mut files = HashMap::new();
        for e in m.entries {
            let Ok(attrs) = from_value::<FileAttrs>(&e.attrs, &e.path) else {
                continue;
            };
            if attrs.kind == "file" && !e.chunks.is_empty() {
                files.insert(
                    e.path,
                    PrevFile {
                        chunks: Arc::new(e.chunks),
                        size: e.size,
                        hash: e.hash,
                        attrs,
                    },
                );
            }
        }
        Ok(Previous {
            id: Some(last.meta.backup_id),
            start_time: last.meta.start_time,
            timeline: last.meta.timeline,
            files,
            bad_pages: last.meta.bad_pages,
        })
    };
    match found.await {
        Ok(p) => (p, None),
        Err(e) => (
            Previous::default(),
            Some(format!(
                "the previous backup could not be read ({e}); every file was read and changed blocks were stored whole (run `pgcairn verify`)"
            )),
        ),
    }
}

/// Pages per chunk of a relation file. One page per chunk dedups best but
/// compresses worse and multiplies metadata; four pages (32 KiB) kept the
/// full as small as FastCDC's while a churn day stored 13 % less
/// (repo-format.md, "Defaults and how they were chosen").
const RELATION_CHUNK_PAGES: usize = 4;

/// Reads a file as it is, verifying the checksum of every whole page of a
/// relation file on the way (pgBackRest's rule: a mismatching page is read
/// again, and reported only if it reads back unchanged; all-zero pages are
/// fine). The bytes passed on are always exactly the bytes read.
struct VerifyingReader {
    file: std::fs::File,
    rel: String,
    offset: u64,
    /// (block size, first absolute block number of this segment file)
    verify: Option<(usize, u64)>,
    page: Vec<u8>,
    bad: Arc<Mutex<Vec<BadPage>>>,
    progress: Arc<dyn Progress>,
}

impl VerifyingReader {
    fn check_pending_page(&mut self) -> std::io::Result<()> {
        let Some((bs, first_block)) = self.verify else {
            return Ok(());
        };
        if self.page.len() < bs {
            return Ok(());
        }
        let page_offset = self.offset - bs as u64;
        let blkno = first_block + page_offset / bs as u64;
        if let PageState::Mismatch { stored, computed } = check_page(&self.page, blkno as u32) {
            let mut again = vec![0u8; bs];
            // A page the server rewrote, or cut off (the file shrank), is
            // not damage; a failed re-read is an error, not "changed".
            let unchanged = match self.file.read_exact_at(&mut again, page_offset) {
                Ok(()) => again == self.page,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
                Err(e) => return Err(e),
            };
            if unchanged {
                let mut bad = self.bad.lock().unwrap_or_else(|p| p.into_inner());
                bad.push(BadPage {
                    path: self.rel.clone(),
                    block: blkno,
                    stored,
                    computed,
                });
            }
        }
        self.page.clear();
        Ok(())
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        if let Some((bs, _)) = self.verify {
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let take = (bs - self.page.len()).min(rest.len());
                self.page.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                self.offset += take as u64;
                self.check_pending_page()?;
            }
        } else {
            self.offset += n as u64;
        }
        self.progress.advance(n as u64);
        Ok(n)
    }
}

fn attrs(it: &Item) -> Result<ciborium::Value> {
    let (kind, target) = match &it.kind {
        Kind::File => ("file", None),
        Kind::Dir => ("dir", None),
        Kind::TablespaceLink(t) => ("tablespace", Some(t.to_string_lossy().to_string())),
    };
    // Only files are compared by the next backup's unchanged-file check.
    let file = kind == "file";
    Ok(to_value(&FileAttrs {
        kind: kind.into(),
        mode: it.mode,
        mtime: it.mtime,
        target,
        ctime_ns: file.then_some(it.ctime_ns),
        ino: file.then_some(it.ino),
    })?)
}

fn empty_entry(path: &str, a: ciborium::Value) -> Entry {
    Entry {
        path: path.to_string(),
        size: 0,
        hash: crate::repo::format::ChunkId(*blake3::hash(b"").as_bytes()),
        chunks: Vec::new(),
        attrs: a,
    }
}

/// Register `server` as this cluster, or check that it is.
pub async fn register_server(repo: &Repository, server: &str, sysid: u64) -> Result<()> {
    let name = server_record(server);
    match repo.manifest_meta(&name).await {
        Ok(v) => {
            let rec: ServerRecord = super::catalog::from_value(&v, &name)?;
            if rec.system_identifier != sysid {
                return Err(EngineError::Refused(format!(
                    "server {server:?} in this repository is the cluster with system identifier {}, \
                     but this cluster has {sysid}; use another server name for a different cluster",
                    rec.system_identifier
                )));
            }
            Ok(())
        }
        Err(RepoError::NotFound { key }) if key.ends_with(&name) => {
            let w = repo.writer("register server").await?;
            let rec = ServerRecord {
                server: server.into(),
                system_identifier: sysid,
                registered: now_unix(),
            };
            let r = w.commit(&manifest(name, to_value(&rec)?, Vec::new())).await;
            w.finish().await?;
            match r {
                // Registered by someone else at the same moment: check it.
                Err(RepoError::Conflict { .. }) => {
                    Box::pin(register_server(repo, server, sysid)).await
                }
                other => Ok(other?),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the server's data directory is `pgdata`; a path that cannot be
/// resolved is an error naming it (ENOENT, EACCES), not "another directory".
fn same_dir(server_dir: &Path, pgdata: &Path) -> Result<bool> {
    let p = pgdata
        .canonicalize()
        .map_err(|e| EngineError::io(format!("cannot access --pgdata {}", pgdata.display()), e))?;
    // The server's path may not be visible from here (another host).
    Ok(server_dir.canonicalize().is_ok_and(|s| s == p))
}

/// Read pg_control until its CRC validates (the server may be writing it).
fn read_pg_control(pgdata: &Path) -> Result<Vec<u8>> {
    let path = pgdata.join("global/pg_control");
    let mut last_invalid: Option<Vec<u8>> = None;
    for _ in 0..20 {
        let b = std::fs::read(&path)
            .map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
        if control::parse(&b).is_some() {
            return Ok(b);
        }
        if last_invalid.as_ref() == Some(&b) {
            return Err(EngineError::Refused(format!(
                "{} fails its CRC check twice with identical contents: the control file is damaged",
                path.display()
            )));
        }
        last_invalid = Some(b);
    }
    Err(EngineError::Refused(format!(
        "{} never read back with a valid CRC",
        path.display()
    )))
}

pub async fn run(
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<dyn Progress>,
) -> Result<BackupSummary> {
    let started = Instant::now();
    let start_time = now_unix();
    let session = Session::connect(&opts.conninfo).await?;
    let mut info = session.server_info().await?;
    if info.in_recovery {
        return Err(EngineError::Refused(
            "the server is a standby (in recovery); back up the primary (standby backups are not supported yet)".into(),
        ));
    }
    if !same_dir(Path::new(&info.data_directory), &opts.pgdata)? {
        return Err(EngineError::Refused(format!(
            "--pgdata {} is not the data directory of the server behind the connection ({}); fix --pgdata or --conninfo",
            opts.pgdata.display(),
            info.data_directory
        )));
    }
    let ctl = control::parse(&read_pg_control(&opts.pgdata)?)
        .ok_or_else(|| EngineError::Refused("pg_control is invalid".into()))?;
    if ctl.system_identifier != info.system_identifier {
        return Err(EngineError::Refused(format!(
            "{} belongs to cluster {}, the server is cluster {}",
            opts.pgdata.display(),
            ctl.system_identifier,
            info.system_identifier
        )));
    }
    register_server(repo, &opts.server, info.system_identifier).await?;
    let tablespaces = session.tablespaces().await?;
    let seg_size = info.wal_segment_size;
    // --include-wal takes the WAL from the archive when this server
    // archives into this repository (its chunks are stored already), else
    // from pg_wal under a temporary slot, so no needed segment is recycled.
    let wal_from_archive =
        opts.include_wal && archives_here(repo, &opts.server, &session, &info).await?;
    if opts.include_wal && !wal_from_archive {
        session
            .create_temp_slot(&format!("pgcairn_{}", std::process::id()))
            .await?;
    }
    let (mut previous, warning) = previous_backup(repo, &opts.server, info.block_size).await;
    let deltas_against = previous.id.clone();
    let backup_id = free_backup_id(repo, &opts.server, start_time).await?;
    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| format!("pgcairn {}", backup_id));
    let writer = repo
        .writer(&format!("backup {}/{}", opts.server, backup_id))
        .await?;
    let start_lsn = session.backup_start(&label, opts.fast_checkpoint).await?;

    // Copy the data directory, pg_control last.
    let items = datadir::walk(
        &opts.pgdata,
        &datadir::tablespace_version_dir(info.version_num, ctl.catalog_version),
    )?;
    let total: u64 = items.iter().map(|i| i.size).sum();
    progress.phase("copying files", total);
    let bad = Arc::new(Mutex::new(Vec::new()));
    let blocks_per_seg = info.segment_size / info.block_size as u64;
    let mut entries: Vec<Entry> = Vec::with_capacity(items.len());
    let mut files: Vec<&Item> = Vec::new();
    for it in &items {
        match it.kind {
            Kind::File if it.rel != "global/pg_control" => files.push(it),
            Kind::File => {}
            _ => entries.push(empty_entry(&it.rel, attrs(it)?)),
        }
    }
    // Each stored file, and whether it was taken unread.
    let stored: Vec<Option<(Entry, bool)>> = futures::stream::iter(files.into_iter().map(|it| {
        let writer = &writer;
        let previous = &previous;
        let bad = bad.clone();
        let progress = progress.clone();
        let checksums = info.data_checksums;
        let bs = info.block_size as usize;
        async move {
            if let Some(p) = previous
                .unchanged(it, info.timeline)
                .filter(|_| !opts.read_all)
            {
                if writer.reuse(p.chunks.clone()).await? {
                    progress.advance(it.size);
                    let s = StoredStream {
                        chunks: p.chunks.to_vec(),
                        size: p.size,
                        hash: p.hash,
                    };
                    return Ok(Some((entry(it.rel.clone(), s, attrs(it)?), true)));
                }
            }
            let file = match std::fs::File::open(&it.abs) {
                Ok(f) => f,
                // Vanished after listing (a dropped table): skip it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(EngineError::io(format!("opening {}", it.abs.display()), e)),
            };
            let verify = match (checksums, it.relation_segment) {
                (true, Some(seg)) => Some((bs, seg as u64 * blocks_per_seg)),
                _ => None,
            };
            let reader = VerifyingReader {
                file,
                rel: it.rel.clone(),
                offset: 0,
                verify,
                page: Vec::with_capacity(bs),
                bad,
                progress,
            };
            // Relation files change a page at a time, scattered: cut them at
            // page-aligned fixed offsets (measured in repo-format.md).
            let s = match it.relation_segment {
                Some(_) => {
                    let prev = previous.files.get(&it.rel).map(|p| p.chunks.clone());
                    writer
                        .store_blocks_after(reader, RELATION_CHUNK_PAGES * bs, prev)
                        .await?
                }
                None => writer.store_reader(reader).await?,
            };
            Ok::<_, EngineError>(Some((entry(it.rel.clone(), s, attrs(it)?), false)))
        }
    }))
    .buffer_unordered(opts.jobs.max(1))
    .try_collect()
    .await?;
    let mut unchanged_paths = std::collections::HashSet::new();
    let mut unchanged_bytes = 0u64;
    for (e, unread) in stored.into_iter().flatten() {
        if unread {
            unchanged_bytes += e.size;
            unchanged_paths.insert(e.path.clone());
        }
        entries.push(e);
    }
    let unchanged_files = unchanged_paths.len() as u64;
    // Only the previous backup's bad pages are needed from here on; its
    // chunk lists (as large as this backup's) go before the commit.
    let previous_bad_pages = std::mem::take(&mut previous.bad_pages);
    drop(previous);
    let ctl_bytes = read_pg_control(&opts.pgdata)?;
    let ctl_now = control::parse(&ctl_bytes)
        .ok_or_else(|| EngineError::Refused("pg_control is invalid".into()))?;
    let ctl_item = items
        .iter()
        .find(|i| i.rel == "global/pg_control")
        .ok_or_else(|| {
            EngineError::Refused("the data directory has no global/pg_control".into())
        })?;
    let s = writer.store_bytes(ctl_bytes).await?;
    entries.push(entry("global/pg_control", s, attrs(ctl_item)?));

    if session.is_broken() {
        return Err(EngineError::Refused(
            "the backup session to PostgreSQL broke; the backup is void".into(),
        ));
    }
    let stop = session.backup_stop().await?;
    let stopped = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    if ctl_now.checkpoint < start_lsn {
        return Err(EngineError::Refused(format!(
            "pg_control's checkpoint {} is before the backup's start {start_lsn}: the copy is not usable",
            ctl_now.checkpoint
        )));
    }
    let timeline = crate::pg::conn::label_start_timeline(&stop.backup_label).ok_or_else(|| {
        EngineError::Refused("the backup_label from pg_backup_stop has no START TIMELINE".into())
    })?;
    info.timeline = timeline;
    let start_wal = segment_name(timeline, segno_of(start_lsn, seg_size), seg_size);
    let stop_wal = session.walfile_name(stop.lsn).await?;

    // The WAL that makes the copy consistent.
    let mut included = Vec::new();
    if opts.include_wal && !wal_from_archive {
        progress.phase("copying WAL", 0);
        let first = segno_of(start_lsn, seg_size);
        // A name that does not parse is an error, not a one-segment range:
        // the backup would claim WAL it lacks.
        let Some(crate::pg::wal::WalFile::Segment { segno: last, .. }) =
            crate::pg::wal::WalFile::parse(&stop_wal, seg_size)
        else {
            return Err(EngineError::Refused(format!(
                "the server named the backup's last WAL file {stop_wal:?}, which is not a WAL segment name"
            )));
        };
        let mut names: Vec<String> = (first..=last)
            .map(|s| segment_name(timeline, s, seg_size))
            .collect();
        for ent in std::fs::read_dir(opts.pgdata.join("pg_wal"))
            .map_err(|e| EngineError::io("listing pg_wal", e))?
        {
            let ent = ent.map_err(|e| EngineError::io("listing pg_wal", e))?;
            let n = ent.file_name().to_string_lossy().to_string();
            if n.ends_with(".history") {
                names.push(n);
            }
        }
        for n in names {
            let path = opts.pgdata.join("pg_wal").join(&n);
            let f = std::fs::File::open(&path)
                .map_err(|e| EngineError::io(format!("reading WAL {}", path.display()), e))?;
            let m = f
                .metadata()
                .map_err(|e| EngineError::io(format!("stat {}", path.display()), e))?;
            use std::os::unix::fs::MetadataExt;
            let s = writer.store_reader(f).await?;
            let a = to_value(&FileAttrs {
                kind: "file".into(),
                mode: m.mode() & 0o7777,
                mtime: m.mtime(),
                target: None,
                ctime_ns: None,
                ino: None,
            })?;
            entries.push(entry(format!("pg_wal/{n}"), s, a));
            included.push(n);
        }
    } else {
        wait_for_archive(
            repo,
            &opts.server,
            &info,
            &start_wal,
            &stop_wal,
            opts.wal_timeout,
        )
        .await?;
        if wal_from_archive {
            for (n, e) in archived_wal(repo, &opts.server, &info, &start_wal, &stop_wal).await? {
                entries.push(e);
                included.push(n);
            }
        }
    }
    drop(session);

    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let st = writer.stats();
    let mut bad_pages = bad.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // A damaged page in a file not read again is still there.
    bad_pages.extend(
        previous_bad_pages
            .into_iter()
            .filter(|b| unchanged_paths.contains(&b.path)),
    );
    let meta = BackupMeta {
        server: opts.server.clone(),
        backup_id: backup_id.clone(),
        label,
        start_time,
        stop_time: stopped.as_secs() as i64,
        stop_time_ns: Some(stopped.subsec_nanos()),
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop.lsn.to_string(),
        start_wal,
        stop_wal,
        timeline,
        pg_version: info.version.clone(),
        pg_version_num: info.version_num,
        system_identifier: info.system_identifier,
        wal_segment_size: seg_size,
        block_size: info.block_size,
        data_checksums: info.data_checksums,
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces: tablespaces
            .into_iter()
            .map(|t| TablespaceMeta {
                oid: t.oid,
                name: t.name,
                location: t.location,
            })
            .collect(),
        bad_pages,
        files: entries.len() as u64,
        logical_bytes: entries.iter().map(|e| e.size).sum(),
        new_bytes_stored: st.bytes_new_stored,
        new_bytes_raw: st.bytes_new_raw,
        reused_bytes: st.bytes_reused,
        unchanged_files,
        unchanged_bytes,
        duration_secs: started.elapsed().as_secs_f64(),
        included_wal: included,
    };
    let name = backup_name(&opts.server, &backup_id);
    progress.phase("committing", 0);
    writer
        .commit(&manifest(name.clone(), to_value(&meta)?, entries))
        .await?;
    let stats = writer.finish().await?;
    Ok(BackupSummary {
        name,
        meta,
        stats,
        deltas_against,
        unchanged_files,
        unchanged_bytes,
        warnings: warning.into_iter().collect(),
    })
}

/// The backup id: its start time to the second, or the next second without
/// a backup of this server (two backups that start within one second, one
/// after the other, must not collide at commit). Existence is asked of the
/// store: a failed lookup is an error, never "free".
async fn free_backup_id(repo: &Repository, server: &str, start_time: i64) -> Result<String> {
    for t in start_time..start_time + 60 {
        let id = utc_stamp(t);
        let name = backup_name(server, &id);
        match repo.manifest_meta(&name).await {
            Ok(_) => continue,
            Err(RepoError::NotFound { key }) if key.ends_with(&name) => return Ok(id),
            Err(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Refused(format!(
        "server {server} has a backup for every second of the minute after {}; is a loop starting backups?",
        utc_stamp(start_time)
    )))
}

/// Whether the server's WAL is archived into this repository under this
/// server name: archive_mode is on and the last file the archiver archived
/// is here, with no failure since. A server that archives elsewhere
/// (another repository, a self-contained copy for an air-gapped disk), or
/// whose archiving fails, gets its WAL from pg_wal instead.
async fn archives_here(
    repo: &Repository,
    server: &str,
    session: &Session,
    info: &crate::pg::conn::ServerInfo,
) -> Result<bool> {
    if info.archive_mode == "off" {
        return Ok(false);
    }
    let (Some(last), false) = session.archiver_status().await? else {
        return Ok(false);
    };
    let Some(kind) = crate::pg::wal::WalFile::parse(&last, info.wal_segment_size) else {
        return Ok(false);
    };
    let name = wal_name(server, info.system_identifier, kind.timeline(), &last);
    match repo.manifest_meta(&name).await {
        Ok(_) => Ok(true),
        Err(RepoError::NotFound { key }) if key.ends_with(&name) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The archived segments `start..=stop` and every archived history file of
/// the cluster, as entries under `pg_wal/` that reference the archived
/// chunks: a self-contained backup for no new data. The commit's check of
/// condemned chunks covers these references as any other.
async fn archived_wal(
    repo: &Repository,
    server: &str,
    info: &crate::pg::conn::ServerInfo,
    start: &str,
    stop: &str,
) -> Result<Vec<(String, Entry)>> {
    use crate::pg::wal::WalFile;
    let (sysid, timeline, seg_size) =
        (info.system_identifier, info.timeline, info.wal_segment_size);
    let (Some(WalFile::Segment { segno: a, .. }), Some(WalFile::Segment { segno: b, .. })) = (
        WalFile::parse(start, seg_size),
        WalFile::parse(stop, seg_size),
    ) else {
        return Err(EngineError::Refused(format!(
            "unexpected WAL range {start}..{stop}"
        )));
    };
    let mut names: Vec<(String, String)> = (a..=b)
        .map(|s| {
            let n = segment_name(timeline, s, seg_size);
            (wal_name(server, sysid, timeline, &n), n)
        })
        .collect();
    for m in repo
        .list_manifests(&super::catalog::wal_prefix(server, sysid))
        .await?
    {
        if let Some(file) = m.rsplit('/').next().filter(|f| f.ends_with(".history")) {
            let file = file.to_string();
            names.push((m, file));
        }
    }
    let mut out = Vec::new();
    for (manifest, file) in names {
        let m = repo.read_manifest(&manifest).await?;
        let [e] = &m.entries[..] else {
            return Err(EngineError::Refused(format!(
                "{manifest}: {} entries in an archived WAL file's manifest (run pgcairn verify)",
                m.entries.len()
            )));
        };
        let mut e = e.clone();
        e.path = format!("pg_wal/{file}");
        out.push((file, e));
    }
    Ok(out)
}

/// Wait until every WAL segment from `start` to `stop` is in the archive.
async fn wait_for_archive(
    repo: &Repository,
    server: &str,
    info: &crate::pg::conn::ServerInfo,
    start: &str,
    stop: &str,
    timeout: Duration,
) -> Result<()> {
    let (sysid, timeline, seg_size) =
        (info.system_identifier, info.timeline, info.wal_segment_size);
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    let first = crate::pg::wal::WalFile::parse(start, seg_size);
    let last = crate::pg::wal::WalFile::parse(stop, seg_size);
    let (
        Some(crate::pg::wal::WalFile::Segment { segno: a, .. }),
        Some(crate::pg::wal::WalFile::Segment { segno: b, .. }),
    ) = (first, last)
    else {
        return Err(EngineError::Refused(format!(
            "unexpected WAL range {start}..{stop}"
        )));
    };
    let prefix = wal_name(server, sysid, timeline, "");
    loop {
        let have: std::collections::HashSet<String> =
            repo.list_manifests(&prefix).await?.into_iter().collect();
        let missing: Vec<String> = (a..=b)
            .map(|s| segment_name(timeline, s, seg_size))
            .filter(|n| !have.contains(&wal_name(server, sysid, timeline, n)))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(EngineError::Refused(format!(
                "the backup's WAL did not reach the repository within {}s (missing {}); check archive_command \
                 (it must call `pgcairn archive-push %p` into this repository) and the server log \
                 (pg_stat_archiver); a backup with --include-wal of a server that does not archive here \
                 copies its WAL from pg_wal instead",
                timeout.as_secs(),
                missing.join(", ")
            )));
        }
        // Poll quickly at first (the segment is usually moments away),
        // then back off to once a second.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1_000_000_000;

    fn item(size: u64, mtime: i64, ctime_ns: i64, ino: u64) -> Item {
        Item {
            rel: "base/1/1259".into(),
            abs: PathBuf::from("/nonexistent/base/1/1259"),
            kind: Kind::File,
            mode: 0o600,
            size,
            mtime,
            ctime_ns,
            ino,
            relation_segment: Some(0),
        }
    }

    fn previous(ctime_ns: Option<i64>) -> Previous {
        let attrs = FileAttrs {
            kind: "file".into(),
            mode: 0o600,
            mtime: 1000,
            target: None,
            ctime_ns,
            ino: Some(7),
        };
        let mut files = HashMap::new();
        files.insert(
            "base/1/1259".to_string(),
            PrevFile {
                chunks: Arc::new(vec![ChunkRef(crate::repo::format::ChunkId([1; 32]), 8192)]),
                size: 8192,
                hash: crate::repo::format::ChunkId([2; 32]),
                attrs,
            },
        );
        Previous {
            id: Some("20260101T000000Z".into()),
            start_time: 2000,
            timeline: 1,
            files,
            bad_pages: Vec::new(),
        }
    }

    /// Only a file that matches on every count, and had settled before
    /// the previous backup started, is taken unread.
    #[test]
    fn unchanged_needs_every_stamp_and_a_settled_ctime() {
        let p = previous(Some(1000 * NS));
        assert!(p.unchanged(&item(8192, 1000, 1000 * NS, 7), 1).is_some());
        // Another timeline (a restore and recovery came between).
        assert!(p.unchanged(&item(8192, 1000, 1000 * NS, 7), 2).is_none());
        // Size, mtime, ctime, inode: each one differing means "read it".
        assert!(p.unchanged(&item(16384, 1000, 1000 * NS, 7), 1).is_none());
        assert!(p.unchanged(&item(8192, 1001, 1000 * NS, 7), 1).is_none());
        assert!(p
            .unchanged(&item(8192, 1000, 1000 * NS + 1, 7), 1)
            .is_none());
        assert!(p.unchanged(&item(8192, 1000, 1000 * NS, 8), 1).is_none());
        // Changed within 2 s of the previous backup's start: a write just
        // after it read the file could have left the stamps as they were.
        let close = previous(Some((2000 - 1) * NS));
        assert!(close
            .unchanged(&item(8192, 1000, (2000 - 1) * NS, 7), 1)
            .is_none());
        let edge = previous(Some((2000 - SETTLED_SECS) * NS));
        assert!(edge
            .unchanged(&item(8192, 1000, (2000 - SETTLED_SECS) * NS, 7), 1)
            .is_some());
        // A manifest from before the check recorded no ctime.
        let old = previous(None);
        assert!(old.unchanged(&item(8192, 1000, 1000 * NS, 7), 1).is_none());
        // No previous backup.
        assert!(Previous::default()
            .unchanged(&item(8192, 1000, 1000 * NS, 7), 1)
            .is_none());
    }
}
