//! `restore`: write a backup into a directory on which PostgreSQL starts.
//! pg_control is written last (temporary name, fsync, rename), so an
//! aborted restore cannot start. Into an empty directory every other file
//! is created under its own name (no rename: each took the directory's
//! lock, and they contended for it); with `--delta`, a file is written
//! under a temporary name and renamed over the old one, so a symlink
//! planted there is replaced, never followed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::catalog::{attrs_of, from_value, BackupMeta};
use super::filewriter;
use super::{EngineError, Progress, Result};
use crate::repo::{durable, Entry, Repository};

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub target: PathBuf,
    pub jobs: usize,
    /// OLD=NEW tablespace relocations.
    pub tablespace_map: Vec<(String, String)>,
    /// Recovery settings to write (None: PostgreSQL replays pg_wal only).
    pub recovery: Option<crate::pg::recovery::RecoverySettings>,
    /// Set archive_mode = off in the restored configuration, so the copy
    /// never archives into the source's history.
    pub archive_mode_off: bool,
    /// Restore over an existing data directory: rewrite only files whose
    /// content differs, delete what the backup does not have, empty pg_wal.
    pub delta: bool,
}

#[derive(Debug, Clone)]
pub struct RestoreSummary {
    pub meta: BackupMeta,
    pub files: u64,
    pub bytes: u64,
    pub duration: Duration,
    /// Recovery settings found in the backup's postgresql.auto.conf and
    /// commented out.
    pub replaced_settings: Vec<String>,
    /// With `delta`: files already right, and files removed.
    pub unchanged: u64,
    pub removed: u64,
}

fn io(ctx: String) -> impl FnOnce(std::io::Error) -> EngineError {
    move |e| EngineError::io(ctx, e)
}

fn fsync_dir(p: &Path) -> Result<()> {
    durable::sync_dir(p).map_err(io(format!("fsync {}", p.display())))
}

/// A directory the restore creates is durable in its parent (the target,
/// a tablespace location): a restore reported done cannot lose it.
fn create_dirs_durably(p: &Path) -> Result<()> {
    durable::create_dirs(p).map_err(io(format!("creating {}", p.display())))
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(p)
        .map_err(io(format!("listing {}", p.display())))?
        .next()
        .is_none())
}

/// A file whose content is written, waiting to be closed (mode, mtime,
/// fsync, and the rename when written under a temporary name). Closing
/// runs apart from the writing, so a small file's fsync does not hold up
/// the next file's reading; a restore is mostly small files by count.
struct Written {
    file: std::fs::File,
    /// Where the content is, when that is not `path`.
    tmp: Option<PathBuf>,
    path: PathBuf,
    mode: u32,
    mtime: i64,
}

impl Written {
    fn close(self) -> Result<()> {
        let at = self.tmp.as_ref().unwrap_or(&self.path);
        self.file
            .set_permissions(std::fs::Permissions::from_mode(self.mode))
            .map_err(io(format!("chmod {}", at.display())))?;
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(self.mtime.max(0) as u64);
        self.file
            .set_modified(t)
            .map_err(io(format!("setting mtime of {}", at.display())))?;
        self.file
            .sync_all()
            .map_err(io(format!("fsync {}", at.display())))?;
        drop(self.file);
        match &self.tmp {
            Some(tmp) => std::fs::rename(tmp, &self.path)
                .map_err(io(format!("renaming into {}", self.path.display()))),
            None => Ok(()),
        }
    }
}

/// Closes outstanding at once. ext4 and XFS commit fsyncs that wait
/// together in one journal commit, so several in flight cost little more
/// than one.
const CLOSING: usize = 16;

/// Write one file's content: under its own name when `in_place` (a new
/// file, in a directory that was empty), else under a temporary name.
async fn write_content(
    repo: &Repository,
    e: &Entry,
    path: &Path,
    mode: u32,
    mtime: i64,
    in_place: bool,
) -> Result<Written> {
    let tmp = (!in_place).then(|| {
        path.with_file_name(format!(
            ".{}.pgcairn-tmp",
            path.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        ))
    });
    let at = tmp.clone().unwrap_or_else(|| path.to_path_buf());
    // Creating a file waits on the directory's lock: off the async workers.
    let a = at.clone();
    let (file, direct) = tokio::task::spawn_blocking(move || filewriter::create(&a, in_place))
        .await
        .map_err(joined)?
        .map_err(io(format!("creating {}", at.display())))?;
    let dup = file
        .try_clone()
        .map_err(io(format!("opening {}", at.display())))?;
    let mut w = filewriter::FileWriter::new(dup, direct);
    repo.restore_entry(e, &mut w)
        .await
        .map_err(|err| match err {
            // The writer's errors (a full disk) name the file written.
            crate::repo::RepoError::Io { source, .. } => {
                EngineError::io(format!("writing {}", at.display()), source)
            }
            other => other.into(),
        })?;
    w.finish()
        .map_err(io(format!("writing {}", at.display())))?;
    Ok(Written {
        file,
        tmp,
        path: path.to_path_buf(),
        mode,
        mtime,
    })
}

fn joined(e: tokio::task::JoinError) -> EngineError {
    EngineError::Refused(format!("restore task failed: {e}"))
}

/// Write one file: temporary name, content, mode, mtime, fsync, rename.
async fn write_file(
    repo: &Repository,
    e: &Entry,
    path: &Path,
    mode: u32,
    mtime: i64,
) -> Result<()> {
    let w = write_content(repo, e, path, mode, mtime, false).await?;
    // fsync can take a while on a large file: keep it off the async workers.
    tokio::task::spawn_blocking(move || w.close())
        .await
        .map_err(joined)?
}

pub async fn run(
    repo: &Repository,
    name: &str,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let m = repo.read_manifest(name).await?;
    let meta: BackupMeta = from_value(&m.meta, name)?;
    // Everything the restore will refuse is refused before anything is
    // written: entry paths, tablespace locations, a running server.
    let layout = Layout::plan(&m.entries, &opts.tablespace_map, &opts.target, name)?;
    let target = &opts.target;
    match std::fs::symlink_metadata(target) {
        Ok(_) => {
            let pid = target.join("postmaster.pid");
            match std::fs::symlink_metadata(&pid) {
                Ok(_) => {
                    return Err(EngineError::Refused(format!(
                        "{} has a postmaster.pid: a PostgreSQL server may be running there; stop it or \
                         choose another directory (if no server runs there, a crash left the file: remove {})",
                        target.display(),
                        pid.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io(format!("stat {}", pid.display()), e)),
            }
            if !opts.delta && !is_empty_dir(target)? {
                return Err(EngineError::Refused(format!(
                    "{} is not empty; restore into an empty or new directory, or use --delta to restore over it",
                    target.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_dirs_durably(target)?,
        Err(e) => return Err(EngineError::io(format!("stat {}", target.display()), e)),
    }
    // With --delta, only locations the target already links to are
    // restored over; any other must not hold this cluster's directory.
    let linked = if opts.delta {
        layout.linked_in(target)
    } else {
        Vec::new()
    };
    layout.check_tablespaces_empty(&linked)?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(layout.root_mode))
        .map_err(io(format!("chmod {}", target.display())))?;

    let mut removed = 0u64;
    if opts.delta {
        // First make the directory unstartable, then prune what the backup
        // does not have (pg_wal's segments included).
        let ctl = target.join("global/pg_control");
        match std::fs::remove_file(&ctl) {
            Ok(()) => fsync_dir(&target.join("global"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::io(format!("removing {}", ctl.display()), e)),
        }
        removed = prune(target, "", &layout)?;
        removed += layout.prune_tablespaces(&linked)?;
    }

    // Directories and tablespace links first (entries are sorted by path,
    // so parents come before children). Directory modes are set once the
    // files are in (a directory recorded read-only must still be filled).
    let mut dirs = vec![target.clone()];
    let mut modes = Vec::new();
    let mut map_lines = Vec::new();
    let mut files = Vec::new();
    for e in &m.entries {
        let a = attrs_of(e)?;
        let path = target.join(&e.path);
        match a.kind.as_str() {
            "dir" => {
                std::fs::create_dir_all(&path)
                    .map_err(io(format!("creating {}", path.display())))?;
                modes.push((path.clone(), a.mode));
                dirs.push(path);
            }
            "tablespace" => {
                let ts = layout.tablespace(&e.path)?;
                let locp = &ts.location;
                let linked = opts.delta && std::fs::read_link(&path).is_ok_and(|t| t == *locp);
                if !linked {
                    // Only a location the restore creates gets 0700: an
                    // existing one (a mount point, whatever a manifest
                    // names) keeps its mode.
                    let existed = std::fs::metadata(locp).is_ok();
                    create_dirs_durably(locp)?;
                    if !existed {
                        std::fs::set_permissions(locp, std::fs::Permissions::from_mode(0o700))
                            .map_err(io(format!("chmod {}", locp.display())))?;
                    }
                    std::os::unix::fs::symlink(locp, &path)
                        .map_err(io(format!("linking {}", path.display())))?;
                } else {
                    create_dirs_durably(locp)?;
                }
                map_lines.push(tablespace_map_line(&ts.oid, locp));
                dirs.push(locp.clone());
            }
            "file" => files.push((e, path, a.mode, a.mtime)),
            other => {
                return Err(EngineError::Refused(format!(
                    "{}: unknown entry kind {other:?}",
                    e.path
                )))
            }
        }
    }
    let (control, others): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|f| f.0.path == "global/pg_control");
    let total: u64 = others.iter().map(|f| f.0.size).sum();
    progress.phase("restoring files", total);
    // Each file is a task of its own, so one file's wait for the disk
    // does not hold up the others' hashing and hand-over (on one task,
    // `--jobs 2` kept the two cores about 80 % busy).
    let unchanged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut queue = others.iter();
    let mut running = tokio::task::JoinSet::new();
    let mut closing: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();
    let mut bytes: Vec<u64> = Vec::with_capacity(others.len());
    loop {
        while running.len() < opts.jobs.max(1) {
            let Some((e, path, mode, mtime)) = queue.next() else {
                break;
            };
            let (repo, e, path, mode, mtime) =
                (repo.clone(), (*e).clone(), path.clone(), *mode, *mtime);
            let (progress, unchanged, delta) = (progress.clone(), unchanged.clone(), opts.delta);
            running.spawn(async move {
                let kept = match delta {
                    // Hashing a large file blocks: off the async workers.
                    true => {
                        let (p, e2) = (path.clone(), e.clone());
                        tokio::task::spawn_blocking(move || keep_if_same(&p, &e2, mode, mtime))
                            .await
                            .map_err(joined)??
                    }
                    false => false,
                };
                let written = if kept {
                    unchanged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    None
                } else {
                    Some(write_content(&repo, &e, &path, mode, mtime, !delta).await?)
                };
                progress.advance(e.size);
                Ok::<_, EngineError>((e.size, written))
            });
        }
        // Returning early drops (and so aborts) the files still running;
        // closes already started finish, but nothing is reported done.
        let Some(done) = running.join_next().await else {
            break;
        };
        let (size, written) = done.map_err(joined)??;
        bytes.push(size);
        if let Some(w) = written {
            closing.spawn_blocking(move || w.close());
        }
        while closing.len() > CLOSING {
            if let Some(c) = closing.join_next().await {
                c.map_err(joined)??;
            }
        }
        while let Some(c) = closing.try_join_next() {
            c.map_err(joined)??;
        }
    }
    while let Some(c) = closing.join_next().await {
        c.map_err(joined)??;
    }

    // backup_label and tablespace_map tell PostgreSQL where recovery starts
    // and where the (possibly relocated) tablespaces are.
    write_small(&target.join("backup_label"), meta.backup_label.as_bytes())?;
    if !map_lines.is_empty() {
        write_small(
            &target.join("tablespace_map"),
            map_lines.concat().as_bytes(),
        )?;
    }
    let replaced_settings =
        crate::pg::recovery::write(target, opts.recovery.as_ref(), opts.archive_mode_off)?;
    for (d, mode) in &modes {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(*mode))
            .map_err(io(format!("chmod {}", d.display())))?;
    }
    for d in &dirs {
        fsync_dir(d)?;
    }
    // pg_control last: until it is there, the directory cannot start.
    let Some((ce, cpath, cmode, cmtime)) = control.into_iter().next() else {
        return Err(EngineError::Refused(format!(
            "backup {name} has no global/pg_control"
        )));
    };
    write_file(repo, ce, &cpath, cmode, cmtime).await?;
    if let Some(parent) = cpath.parent() {
        fsync_dir(parent)?;
    }
    Ok(RestoreSummary {
        files: bytes.len() as u64 + 1,
        bytes: bytes.iter().sum::<u64>() + ce.size,
        meta,
        duration: started.elapsed(),
        replaced_settings,
        unchanged: unchanged.load(std::sync::atomic::Ordering::Relaxed),
        removed,
    })
}

/// The backup a restore takes, and the timeline recovery follows.
#[derive(Debug)]
pub struct Selected {
    pub backup: super::catalog::BackupRef,
    /// None for a restore without recovery.
    pub timeline: Option<u32>,
    /// Newer backups passed over because they cannot reach the target
    /// timeline, each with the reason.
    pub passed_over: Vec<String>,
    /// Why the restore may not reach the target (for the caller to show).
    pub warning: Option<String>,
}

/// The backup to restore: the one named, or for `latest` the newest backup
/// (with a time or LSN target: the newest that ended before the target,
/// since recovery cannot stop before its backup's end, and from which the
/// target timeline can be reached).
/// `timeline`: None for a restore without recovery, else the requested
/// recovery_target_timeline (None: latest).
pub async fn select_backup(
    repo: &Repository,
    server: &str,
    id: &str,
    target_time: Option<f64>,
    target_lsn: Option<crate::pg::wal::Lsn>,
    timeline: Option<Option<&str>>,
) -> Result<Selected> {
    let all = super::catalog::list_backups(repo, Some(server)).await?;
    // PostgreSQL cannot stop before the backup is consistent (its end).
    let by_time =
        |b: &super::catalog::BackupRef| target_time.is_none_or(|t| b.meta.ended_by() <= t);
    let by_lsn = |b: &super::catalog::BackupRef| {
        target_lsn.is_none_or(|t| {
            b.meta
                .stop_lsn
                .parse::<crate::pg::wal::Lsn>()
                .is_ok_and(|s| s <= t)
        })
    };
    let ended_before = |b: &super::catalog::BackupRef| by_time(b) && by_lsn(b);
    let mut warning = None;
    let candidates: Vec<_> = if id == "latest" {
        let n = all.len();
        let mut c: Vec<_> = all.into_iter().rev().filter(ended_before).collect();
        // Without a time or LSN target, `latest` is the newest backup;
        // with a timeline number, the newest that can reach it (an older
        // timeline after a failover needs a backup taken on it).
        let numbered = timeline
            .flatten()
            .is_some_and(|t| t != "latest" && t != "current");
        if target_time.is_none() && target_lsn.is_none() && !numbered {
            c.truncate(1);
        }
        if c.is_empty() {
            return Err(EngineError::Refused(if n == 0 {
                format!("server {server} has no backups in {}", repo.location())
            } else {
                "no backup ended before the recovery target; choose a later target".to_string()
            }));
        }
        c
    } else {
        let b = all
            .into_iter()
            .find(|b| b.meta.backup_id == id)
            .ok_or_else(|| {
                EngineError::Refused(format!(
                    "no backup {id} of server {server} in {} (see `pgcairn list`)",
                    repo.location()
                ))
            })?;
        // Known now, not after the whole restore from PostgreSQL. An LSN
        // is exact; a time is not (recovery fails only if a transaction
        // ended between the target and the backup's end), so a warning.
        if !by_lsn(&b) {
            return Err(EngineError::Refused(format!(
                "backup {id} ended at LSN {}, after the recovery target, and recovery cannot stop \
                 before a backup's end: choose a backup that ended before the target, or `latest`",
                b.meta.stop_lsn
            )));
        }
        if !by_time(&b) {
            warning = Some(format!(
                "backup {id} ended after the recovery target time: PostgreSQL will refuse to stop \
                 there if a transaction ended between the target and the backup's end (`latest` \
                 picks a backup that ended before it)"
            ));
        }
        vec![b]
    };
    let Some(requested) = timeline else {
        let backup = candidates
            .into_iter()
            .next()
            .expect("at least one candidate");
        return Ok(Selected {
            backup,
            timeline: None,
            passed_over: Vec::new(),
            warning,
        });
    };
    let mut passed_over = Vec::new();
    let mut first_refusal = None;
    let mut histories: HashMap<u64, Histories> = HashMap::new();
    for backup in candidates {
        let h = histories
            .entry(backup.meta.system_identifier)
            .or_insert_with(|| Histories::of(&backup.meta));
        match check_timeline(repo, &backup.meta, requested, h).await {
            Ok(tl) => {
                return Ok(Selected {
                    backup,
                    timeline: Some(tl),
                    passed_over,
                    warning,
                })
            }
            // Only a refusal moves on to an older backup; a failed read is
            // no answer about reachability.
            Err(EngineError::Refused(why)) => {
                passed_over.push(format!("{}: {why}", backup.meta.backup_id));
                first_refusal.get_or_insert(why);
            }
            Err(e) => return Err(e),
        }
    }
    Err(EngineError::Refused(first_refusal.unwrap_or_else(|| {
        "no backup can reach the target timeline".into()
    })))
}

/// The archived history files of a backup's cluster, looked up one name at
/// a time as PostgreSQL probes them (listing the WAL archive to find them
/// read every archived segment's name before a restore started).
struct Histories {
    server: String,
    sysid: u64,
    known: BTreeMap<u32, Option<String>>,
}

impl Histories {
    fn of(meta: &BackupMeta) -> Histories {
        Histories {
            server: meta.server.clone(),
            sysid: meta.system_identifier,
            known: BTreeMap::new(),
        }
    }

    /// The manifest of timeline `tl`'s history file; `None` only when a
    /// direct lookup of that name answers "not found".
    async fn get(&mut self, repo: &Repository, tl: u32) -> Result<Option<String>> {
        if let Some(v) = self.known.get(&tl) {
            return Ok(v.clone());
        }
        let name =
            super::catalog::wal_name(&self.server, self.sysid, tl, &format!("{tl:08X}.history"));
        let v = match repo.manifest_meta(&name).await {
            Ok(_) => Some(name),
            Err(crate::repo::RepoError::NotFound { key }) if key.ends_with(&name) => None,
            Err(e) => return Err(e.into()),
        };
        self.known.insert(tl, v.clone());
        Ok(v)
    }
}

/// Check, before anything is written, that the recovery target timeline
/// can be reached from the backup: per the archived history files, the
/// target timeline must descend from the backup's and have forked after the
/// backup ended. Returns the timeline recovery will follow. `latest` is
/// found as PostgreSQL finds it: the backup's timeline, then each next one
/// for as long as its history file exists.
async fn check_timeline(
    repo: &Repository,
    meta: &BackupMeta,
    requested: Option<&str>,
    histories: &mut Histories,
) -> Result<u32> {
    use crate::pg::timeline::{parse_history, reachable};
    let target = match requested {
        None | Some("latest") => {
            let mut tl = meta.timeline;
            while histories.get(repo, tl + 1).await?.is_some() {
                tl += 1;
            }
            tl
        }
        Some("current") => meta.timeline,
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|t| *t >= 1 && !n.starts_with(['0', '+']))
            .ok_or_else(|| {
                EngineError::Refused(format!(
                    "--target-timeline {n:?}: use latest, current or a timeline number (decimal)"
                ))
            })?,
    };
    if target == meta.timeline {
        return Ok(target);
    }
    if target < meta.timeline {
        return Err(EngineError::Refused(format!(
            "the backup is on timeline {}, after timeline {target}: recovery never goes back to an \
             earlier timeline; restore a backup taken on timeline {target}",
            meta.timeline
        )));
    }
    let Some(name) = histories.get(repo, target).await? else {
        return Err(EngineError::Refused(format!(
            "timeline {target} has no history file in the repository; it cannot be recovered to"
        )));
    };
    let m = repo.read_manifest(&name).await?;
    let e = m
        .entries
        .first()
        .ok_or_else(|| EngineError::Refused(format!("{name}: empty history manifest")))?;
    let mut text = Vec::new();
    repo.restore_entry(e, &mut text).await?;
    let forks = parse_history(&String::from_utf8_lossy(&text))
        .map_err(|e| EngineError::Refused(format!("{name}: {e}")))?;
    let end: crate::pg::wal::Lsn = meta.stop_lsn.parse().map_err(EngineError::Refused)?;
    reachable(meta.timeline, end, target, &forks).map_err(EngineError::Refused)?;
    Ok(target)
}

/// If the file at `path` is already exactly the entry (size, then
/// BLAKE3), give it the entry's mode and mtime and fsync it, and say so.
/// The fsync matters: the file may be left from an aborted restore or a
/// copy that never reached the disk, and the restore about to report
/// success vouches for it. Mode and mtime go through the read-only handle,
/// so an entry without an owner write bit (a 0400 `server.key`) works too.
fn keep_if_same(path: &Path, e: &Entry, mode: u32, mtime: i64) -> Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(EngineError::io(format!("stat {}", path.display()), err)),
    };
    if !meta.is_file() || meta.len() != e.size {
        return Ok(false);
    }
    let f = std::fs::File::open(path).map_err(io(format!("reading {}", path.display())))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(&f)
        .map_err(io(format!("reading {}", path.display())))?;
    if h.finalize().as_bytes() != &e.hash.0 {
        return Ok(false);
    }
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime.max(0) as u64))
        .map_err(io(format!("setting mtime of {}", path.display())))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))?;
    f.sync_all()
        .map_err(io(format!("fsync {}", path.display())))?;
    Ok(true)
}

/// Where a backup's entries go, checked before anything is written: every
/// path plain and relative, every tablespace at `pg_tblspc/<oid>` with an
/// absolute location, no two locations overlapping each other or the
/// target. A manifest is sealed, but whoever holds the key (every host
/// that backs up) must not be able to make a restore write elsewhere.
struct Layout<'a> {
    /// Entry path → kind (`dir`, `file`, `tablespace`).
    kinds: HashMap<&'a str, &'static str>,
    /// By entry path (`pg_tblspc/<oid>`).
    tablespaces: BTreeMap<&'a str, Tablespace>,
    /// 0750 for a cluster made with group access (`global` is 0750), as
    /// PostgreSQL allows; else 0700.
    root_mode: u32,
}

impl Tablespace {
    /// Where the restore writes: the version directory in the location.
    fn ours(&self) -> PathBuf {
        self.owned
            .first()
            .map_or_else(|| self.location.clone(), |n| self.location.join(n))
    }
}

/// `PG_<major>_<catalog version>`, a tablespace's version directory.
fn is_version_dir(name: &str) -> bool {
    let mut parts = name.split('_');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    parts.next() == Some("PG")
        && digits(parts.next())
        && digits(parts.next())
        && parts.next().is_none()
}

struct Tablespace {
    oid: String,
    original: String,
    /// After `--tablespace-map`.
    location: PathBuf,
    /// What the backup has directly in the location: this server's
    /// `PG_<major>_<catversion>` directory. The rest of a location (another
    /// major version's tree, `lost+found`) is not this cluster's.
    owned: Vec<String>,
}

fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

impl<'a> Layout<'a> {
    fn plan(
        entries: &'a [Entry],
        map: &[(String, String)],
        target: &Path,
        name: &str,
    ) -> Result<Layout<'a>> {
        let bad = |path: &str, why: &str| {
            EngineError::Refused(format!(
                "backup {name}: entry {path:?} {why}; nothing was written (run pgcairn verify)"
            ))
        };
        let mut kinds = HashMap::new();
        let mut tablespaces = BTreeMap::new();
        let mut root_mode = 0o700;
        for e in entries {
            let a = attrs_of(e)?;
            if !is_plain_relative(&e.path) {
                return Err(bad(&e.path, "is not a plain relative path"));
            }
            let kind = match a.kind.as_str() {
                "dir" => "dir",
                "file" => "file",
                "tablespace" => "tablespace",
                other => {
                    return Err(EngineError::Refused(format!(
                    "backup {name}: {}: unknown entry kind {other:?} (written by a newer pgcairn?)",
                    e.path
                )))
                }
            };
            if kinds.insert(e.path.as_str(), kind).is_some() {
                return Err(bad(&e.path, "appears twice"));
            }
            if e.path == "global" && kind == "dir" && a.mode & 0o777 == 0o750 {
                root_mode = 0o750;
            }
            if kind != "tablespace" {
                continue;
            }
            let oid = match e.path.split_once('/') {
                Some(("pg_tblspc", oid))
                    if !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    oid
                }
                _ => return Err(bad(&e.path, "is a tablespace outside pg_tblspc/<oid>")),
            };
            let original = a.target.clone().unwrap_or_default();
            let location = map
                .iter()
                .find(|(old, _)| *old == original)
                .map_or_else(|| PathBuf::from(&original), |(_, new)| PathBuf::from(new));
            let loc = location.to_string_lossy();
            if !loc.starts_with('/') || loc.contains(['\n', '\r']) {
                return Err(bad(
                    &e.path,
                    &format!(
                        "has the tablespace location {original:?}, not an absolute path; \
                         relocate it with --tablespace-map {original}=NEW_DIRECTORY"
                    ),
                ));
            }
            tablespaces.insert(
                e.path.as_str(),
                Tablespace {
                    oid: oid.to_string(),
                    original,
                    location,
                    owned: Vec::new(),
                },
            );
        }
        // What lies under a tablespace link belongs to a tablespace.
        for e in entries {
            let mut parts = e.path.splitn(3, '/');
            let (Some("pg_tblspc"), Some(oid), Some(rest)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let ts_path = &e.path[..("pg_tblspc/".len() + oid.len())];
            match tablespaces.get_mut(ts_path) {
                // What a tablespace holds is the server's version
                // directory, nothing else: a manifest cannot name files in
                // an arbitrary directory through a tablespace link.
                Some(ts) if !rest.contains('/') => {
                    if kinds.get(e.path.as_str()) != Some(&"dir")
                        || !is_version_dir(rest)
                        || !ts.owned.is_empty()
                    {
                        return Err(bad(
                            &e.path,
                            "is not the one PG_<major>_<catalog version> directory of its tablespace",
                        ));
                    }
                    ts.owned.push(rest.to_string());
                }
                Some(_) => {}
                // An in-place tablespace (allow_in_place_tablespaces) is a
                // plain directory.
                None if kinds.get(ts_path) == Some(&"dir") => {}
                None => return Err(bad(&e.path, "lies in pg_tblspc outside any tablespace")),
            }
        }
        // And deeper entries lie inside that version directory.
        for e in entries {
            let mut parts = e.path.splitn(4, '/');
            let (Some("pg_tblspc"), Some(oid), Some(first), Some(_)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let ts_path = &e.path[..("pg_tblspc/".len() + oid.len())];
            if let Some(ts) = tablespaces.get(ts_path) {
                if !ts.owned.iter().any(|o| o == first) {
                    return Err(bad(
                        &e.path,
                        "lies in its tablespace outside the PG_<major>_<catalog version> directory",
                    ));
                }
            }
        }
        // Every relocation names one of the backup's tablespaces: a typo
        // must not restore a tablespace at its old place instead.
        for (old, new) in map {
            if !tablespaces.values().any(|t| t.original == *old) {
                let locations: Vec<&str> =
                    tablespaces.values().map(|t| t.original.as_str()).collect();
                let known = match locations.is_empty() {
                    true => "it has none".to_string(),
                    false => format!("its tablespaces are at {}", locations.join(", ")),
                };
                return Err(EngineError::Refused(format!(
                    "--tablespace-map {old}={new}: backup {name} has no tablespace at {old}; {known}"
                )));
            }
            if !new.starts_with('/') || new.contains(['\n', '\r']) {
                return Err(EngineError::Refused(format!(
                    "--tablespace-map {old}={new}: the new location must be an absolute path"
                )));
            }
        }
        let target =
            std::path::absolute(target).map_err(io(format!("resolving {}", target.display())))?;
        // What the restore writes in a location is its version directory;
        // those must not overlap each other or the target (PostgreSQL
        // allows nested locations, which are fine).
        let all: Vec<&Tablespace> = tablespaces.values().collect();
        for (i, t) in all.iter().enumerate() {
            let ours = t.ours();
            if ours.starts_with(&target) || target.starts_with(&ours) {
                return Err(EngineError::Refused(format!(
                    "tablespace {} would be restored at {}, which overlaps the target {}; \
                     relocate it with --tablespace-map {}=NEW_DIRECTORY",
                    t.oid,
                    ours.display(),
                    target.display(),
                    t.original
                )));
            }
            for u in &all[i + 1..] {
                let theirs = u.ours();
                if ours.starts_with(&theirs) || theirs.starts_with(&ours) {
                    return Err(EngineError::Refused(format!(
                        "tablespaces {} and {} would be restored at {} and {}, which overlap; \
                         give each its own directory with --tablespace-map",
                        t.oid,
                        u.oid,
                        ours.display(),
                        theirs.display()
                    )));
                }
            }
        }
        Ok(Layout {
            kinds,
            tablespaces,
            root_mode,
        })
    }

    fn tablespace(&self, path: &str) -> Result<&Tablespace> {
        self.tablespaces
            .get(path)
            .ok_or_else(|| EngineError::Refused(format!("{path}: not a planned tablespace")))
    }

    /// The tablespaces whose link in `target` already points at their
    /// final location: a `--delta` restore may restore over what is there.
    fn linked_in(&self, target: &Path) -> Vec<&'a str> {
        self.tablespaces
            .iter()
            .filter(|(p, t)| std::fs::read_link(target.join(p)).is_ok_and(|l| l == t.location))
            .map(|(p, _)| *p)
            .collect()
    }

    /// What the backup puts in each location must not be there yet (the
    /// rest of the location may hold anything), except where `linked`
    /// says the target's own link points there (`--delta`): a location
    /// this target never linked to may be another cluster's, even a
    /// running one's.
    fn check_tablespaces_empty(&self, linked: &[&str]) -> Result<()> {
        for (p, t) in &self.tablespaces {
            if linked.contains(p) {
                continue;
            }
            let loc = &t.location;
            match std::fs::metadata(loc) {
                Ok(m) if !m.is_dir() => {
                    return Err(EngineError::Refused(format!(
                        "tablespace location {} is not a directory",
                        loc.display()
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(EngineError::io(format!("stat {}", loc.display()), e)),
            }
            for n in &t.owned {
                let p = loc.join(n);
                let empty = match std::fs::symlink_metadata(&p) {
                    Ok(m) => m.is_dir() && is_empty_dir(&p)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => return Err(EngineError::io(format!("stat {}", p.display()), e)),
                };
                if !empty {
                    return Err(EngineError::Refused(format!(
                        "tablespace directory {} already holds {n}, which this restore did not \
                         put there (another cluster's?); relocate the tablespace with \
                         --tablespace-map {}=NEW_DIRECTORY, or remove {} if it is a stale copy",
                        loc.display(),
                        t.original,
                        p.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// With `--delta`: prune this cluster's directory in each location the
    /// target already links to, and nothing else.
    fn prune_tablespaces(&self, linked: &[&str]) -> Result<u64> {
        let mut removed = 0;
        for (ts_path, t) in &self.tablespaces {
            if !linked.contains(ts_path) {
                continue;
            }
            for n in &t.owned {
                let p = t.location.join(n);
                let rel = format!("{ts_path}/{n}");
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() && self.kinds.get(rel.as_str()) == Some(&"dir") => {
                        removed += prune(&p, &rel, self)?;
                    }
                    Ok(_) => {
                        remove_path(&p)?;
                        removed += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(EngineError::io(format!("stat {}", p.display()), e)),
                }
            }
        }
        Ok(removed)
    }
}

/// A tablespace_map line, with backslashes escaped as PostgreSQL writes
/// and reads them (newlines are refused earlier).
fn tablespace_map_line(oid: &str, location: &Path) -> String {
    let loc = location.to_string_lossy().replace('\\', "\\\\");
    format!("{oid} {loc}\n")
}

fn remove_path(p: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(p).map_err(io(format!("stat {}", p.display())))?;
    if m.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
    .map_err(io(format!("removing {}", p.display())))
}

/// Remove everything under `dir` that the backup does not have as the same
/// kind (a file where it has a directory goes, and the reverse). A
/// `pg_wal` that is a link (initdb --waldir) is kept and emptied; a
/// tablespace link is kept only if it already points at the tablespace's
/// final location (its content is pruned by `prune_tablespaces`), and any
/// other link is removed without touching what it points at. Returns how
/// many files and directories went.
fn prune(dir: &Path, rel: &str, layout: &Layout) -> Result<u64> {
    let mut removed = 0;
    for ent in std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
        let ent = ent.map_err(io(format!("listing {}", dir.display())))?;
        let name = ent.file_name().to_string_lossy().to_string();
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let path = ent.path();
        let meta =
            std::fs::symlink_metadata(&path).map_err(io(format!("stat {}", path.display())))?;
        let want = layout.kinds.get(child.as_str()).copied();
        let keep = if meta.file_type().is_symlink() {
            if child == "pg_wal" && want == Some("dir") {
                removed += prune(&path, &child, layout)?;
                true
            } else {
                want == Some("tablespace")
                    && layout
                        .tablespaces
                        .get(child.as_str())
                        .is_some_and(|t| std::fs::read_link(&path).is_ok_and(|l| l == t.location))
            }
        } else if meta.is_dir() {
            if want == Some("dir") {
                removed += prune(&path, &child, layout)?;
            }
            want == Some("dir")
        } else {
            want == Some("file")
        };
        if !keep {
            remove_path(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn write_small(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?;
    f.write_all(data)
        .map_err(io(format!("writing {}", path.display())))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    f.sync_all()
        .map_err(io(format!("fsync {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn entry(path: &str, data: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            size: data.len() as u64,
            hash: crate::repo::format::ChunkId(*blake3::hash(data).as_bytes()),
            chunks: Vec::new(),
            attrs: ciborium::Value::Null,
        }
    }

    fn layout(kinds: &[(&'static str, &'static str)]) -> Layout<'static> {
        Layout {
            kinds: kinds.iter().copied().collect(),
            tablespaces: BTreeMap::new(),
            root_mode: 0o700,
        }
    }

    #[test]
    fn delta_prune_empties_a_pg_wal_that_is_a_link() {
        let t = tempfile::tempdir().expect("tempdir");
        let (data, wal) = (t.path().join("data"), t.path().join("wal"));
        std::fs::create_dir_all(wal.join("archive_status")).expect("mkdir");
        std::fs::write(wal.join("000000010000000000000003"), b"old").expect("write");
        std::fs::write(
            wal.join("archive_status/000000010000000000000003.ready"),
            b"",
        )
        .expect("write");
        std::fs::create_dir_all(data.join("base")).expect("mkdir");
        std::fs::write(data.join("stray"), b"x").expect("write");
        std::os::unix::fs::symlink(&wal, data.join("pg_wal")).expect("link");
        let l = layout(&[
            ("base", "dir"),
            ("pg_wal", "dir"),
            ("pg_wal/archive_status", "dir"),
        ]);
        assert_eq!(prune(&data, "", &l).expect("prune"), 3);
        let left = |d: &Path| std::fs::read_dir(d).expect("list").count();
        assert_eq!(left(&wal), 1, "only archive_status stays in pg_wal");
        assert_eq!(left(&wal.join("archive_status")), 0);
        assert!(data
            .join("pg_wal")
            .symlink_metadata()
            .expect("link")
            .is_symlink());
        assert!(!data.join("stray").exists());
    }

    /// A file where the backup has a directory and the reverse are
    /// replaced; a link where it has a directory is removed, and what it
    /// points at is left alone.
    #[test]
    fn delta_prune_replaces_what_changed_kind() {
        let t = tempfile::tempdir().expect("tempdir");
        let (data, elsewhere) = (t.path().join("data"), t.path().join("elsewhere"));
        std::fs::create_dir_all(data.join("was_dir/sub")).expect("mkdir");
        std::fs::write(data.join("was_file"), b"x").expect("write");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        std::fs::write(elsewhere.join("keep_me"), b"x").expect("write");
        std::os::unix::fs::symlink(&elsewhere, data.join("linked")).expect("link");
        let l = layout(&[("was_dir", "file"), ("was_file", "dir"), ("linked", "dir")]);
        assert_eq!(prune(&data, "", &l).expect("prune"), 3);
        assert_eq!(std::fs::read_dir(&data).expect("list").count(), 0);
        assert!(elsewhere.join("keep_me").exists());
    }

    fn ts_entry(path: &str, kind: &str, target: Option<&str>) -> Entry {
        let mut attrs = vec![
            (
                ciborium::Value::Text("kind".into()),
                ciborium::Value::Text(kind.into()),
            ),
            (
                ciborium::Value::Text("mode".into()),
                ciborium::Value::Integer(0o700.into()),
            ),
            (
                ciborium::Value::Text("mtime".into()),
                ciborium::Value::Integer(0.into()),
            ),
        ];
        if let Some(t) = target {
            attrs.push((
                ciborium::Value::Text("target".into()),
                ciborium::Value::Text(t.into()),
            ));
        }
        Entry {
            attrs: ciborium::Value::Map(attrs),
            ..entry(path, b"")
        }
    }

    #[test]
    fn a_layout_refuses_paths_and_locations_that_leave_the_target() {
        let plan = |entries: &[Entry], map: &[(&str, &str)]| {
            let map: Vec<(String, String)> = map
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            Layout::plan(entries, &map, Path::new("/restore/data"), "b")
                .err()
                .map(|e| e.to_string())
        };
        let refused = |entries: &[Entry], map: &[(&str, &str)], what: &str| {
            let e = plan(entries, map).expect("refused");
            assert!(e.contains(what), "{e}");
        };
        refused(&[ts_entry("../etc/x", "file", None)], &[], "plain relative");
        refused(&[ts_entry("/etc/x", "file", None)], &[], "plain relative");
        refused(&[ts_entry("base/./x", "file", None)], &[], "plain relative");
        refused(
            &[ts_entry("base", "tablespace", Some("/ts"))],
            &[],
            "outside pg_tblspc",
        );
        refused(
            &[ts_entry("pg_tblspc/1", "tablespace", Some("ts"))],
            &[],
            "absolute",
        );
        refused(
            &[ts_entry("pg_tblspc/1/PG_15_1/x", "file", None)],
            &[],
            "outside any tablespace",
        );
        let two = [
            ts_entry("pg_tblspc/1", "tablespace", Some("/ts/a")),
            ts_entry("pg_tblspc/2", "tablespace", Some("/ts/b")),
        ];
        assert_eq!(plan(&two, &[]), None);
        refused(&two, &[("/ts/a", "/ts/b")], "overlap");
        refused(&two, &[("/ts/a", "/ts/b/inner")], "overlap");
        refused(
            &two,
            &[("/ts/a", "/restore/data/ts")],
            "overlaps the target",
        );
        refused(&two, &[("/ts/c", "/x")], "no tablespace at /ts/c");
        refused(&two, &[("/ts/a", "x")], "absolute");
        // A tablespace holds one version directory and nothing else.
        let with = |extra: Entry| {
            vec![
                ts_entry("pg_tblspc/1", "tablespace", Some("/home/pg/.ssh")),
                extra,
            ]
        };
        refused(
            &with(ts_entry("pg_tblspc/1/authorized_keys", "file", None)),
            &[],
            "PG_<major>",
        );
        refused(
            &with(ts_entry("pg_tblspc/1/ssh", "dir", None)),
            &[],
            "PG_<major>",
        );
        assert_eq!(
            plan(&with(ts_entry("pg_tblspc/1/PG_15_1", "dir", None)), &[]),
            None
        );
        refused(
            &with(ts_entry("pg_tblspc/1/.ssh/authorized_keys", "file", None)),
            &[],
            "outside the PG_<major>",
        );
        // Nested locations are fine: each version directory is apart.
        let nested = [
            ts_entry("pg_tblspc/1", "tablespace", Some("/ts/a")),
            ts_entry("pg_tblspc/1/PG_15_1", "dir", None),
            ts_entry("pg_tblspc/2", "tablespace", Some("/ts/a/b")),
            ts_entry("pg_tblspc/2/PG_15_1", "dir", None),
        ];
        assert_eq!(plan(&nested, &[]), None);
        refused(&nested, &[("/ts/a/b", "/ts/a")], "overlap");
        // A relative location is restorable once relocated.
        let rel = [ts_entry("pg_tblspc/3", "tablespace", Some("rel/ts"))];
        refused(&rel, &[], "--tablespace-map rel/ts=NEW_DIRECTORY");
        assert_eq!(plan(&rel, &[("rel/ts", "/abs/ts")]), None);
        let in_place = [
            ts_entry("pg_tblspc/5", "dir", None),
            ts_entry("pg_tblspc/5/PG_15_1", "dir", None),
        ];
        assert_eq!(plan(&in_place, &[]), None);
        assert_eq!(
            tablespace_map_line("16385", Path::new("/ts/a\\b")),
            "16385 /ts/a\\\\b\n"
        );
    }

    #[test]
    fn an_unchanged_file_gets_its_mode_and_mtime_even_read_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("server.key");
        std::fs::write(&p, b"secret").expect("write");
        assert!(keep_if_same(&p, &entry("server.key", b"secret"), 0o400, 1_000_000).expect("same"));
        let m = std::fs::metadata(&p).expect("stat");
        assert_eq!((m.mode() & 0o7777, m.mtime()), (0o400, 1_000_000));
        // A file that differs is left for rewriting, untouched.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(!keep_if_same(&p, &entry("server.key", b"secreT"), 0o400, 5).expect("differs"));
        assert!(!keep_if_same(&p, &entry("server.key", b"longer"), 0o400, 5).expect("differs"));
        assert_eq!(std::fs::metadata(&p).expect("stat").mode() & 0o7777, 0o600);
        assert!(
            !keep_if_same(&t.path().join("absent"), &entry("absent", b""), 0o600, 5)
                .expect("absent is not an error")
        );
    }
}
