//! The data directory: which files a base backup copies, with the same
//! exclusions as PostgreSQL's own base backup, and which of them carry page
//! checksums. Tablespaces are followed through `pg_tblspc/<oid>` links and
//! recorded under that path.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{PgError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    /// A tablespace link `pg_tblspc/<oid>` and where it points.
    TablespaceLink(PathBuf),
}

/// One thing to back up.
#[derive(Debug, Clone)]
pub struct Item {
    /// Path relative to the data directory, `/`-separated.
    pub rel: String,
    pub abs: PathBuf,
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
    /// Status change time in nanoseconds, and inode: with size and mtime,
    /// what tells a file unchanged since an earlier backup (`ctime` cannot
    /// be set back by tools that preserve mtime, such as `rsync -a`).
    pub ctime_ns: i64,
    pub ino: u64,
    /// A relation file whose pages carry checksums: its segment number.
    pub relation_segment: Option<u32>,
}

/// Directories whose contents a base backup leaves out (the directory itself
/// is kept, and recreated empty on restore).
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Top-level files a base backup leaves out.
const EXCLUDED_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// `pg_wal` subdirectories kept (empty).
const WAL_KEPT_DIRS: &[&str] = &["archive_status", "summaries"];

fn is_temp_name(name: &str) -> bool {
    name.starts_with("pgsql_tmp")
}

/// `NNN`, `NNN.N`, `NNN_fsm`, `NNN_vm`, `NNN_init`, with their segment.
/// Returns (relfilenode, fork, segment).
pub fn parse_relation_file(name: &str) -> Option<(&str, &str, u32)> {
    let (base, seg) = match name.split_once('.') {
        Some((b, s)) => (
            b,
            s.parse::<u32>()
                .ok()
                .filter(|_| s.bytes().all(|c| c.is_ascii_digit()))?,
        ),
        None => (name, 0),
    };
    let (node, fork) = match base.split_once('_') {
        Some((n, f)) if matches!(f, "fsm" | "vm" | "init") => (n, f),
        Some(_) => return None,
        None => (base, ""),
    };
    if node.is_empty() || !node.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((node, fork, seg))
}

/// `tNNN_NNN...`: a temporary relation.
fn is_temp_relation(name: &str) -> bool {
    name.strip_prefix('t')
        .and_then(|r| r.split_once('_'))
        .is_some_and(|(a, b)| {
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.starts_with(|c: char| c.is_ascii_digit())
        })
}

fn meta_item(rel: String, abs: PathBuf, kind: Kind, m: &std::fs::Metadata) -> Item {
    Item {
        rel,
        abs,
        kind,
        mode: m.mode() & 0o7777,
        size: if m.is_file() { m.len() } else { 0 },
        mtime: m.mtime(),
        ctime_ns: m
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.ctime_nsec()),
        ino: m.ino(),
        relation_segment: None,
    }
}

/// Everything to back up, directories before their contents, sorted.
/// `version_dir` is this server's directory inside each tablespace
/// (`PG_<major>_<catalog version>`, see [`tablespace_version_dir`]): as
/// PostgreSQL's base backup, only it is copied, not an older major
/// version's tree left by pg_upgrade or whatever else shares the location.
pub fn walk(pgdata: &Path, version_dir: &str) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    let meta = std::fs::symlink_metadata(pgdata)
        .map_err(|e| PgError::io(format!("reading data directory {}", pgdata.display()), e))?;
    if !meta.is_dir() {
        return Err(PgError::Invalid {
            path: pgdata.display().to_string(),
            reason: "not a directory".into(),
        });
    }
    walk_dir(pgdata, "", 0, version_dir, &mut out, &mut HashSet::new())?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// `depth_class`: 0 = the data directory itself; 1 = inside a tablespace
/// version directory or base/ or global/ (relation-file rules apply).
/// The name of a server's directory inside its tablespaces.
pub fn tablespace_version_dir(version_num: i32, catalog_version: u32) -> String {
    format!("PG_{}_{catalog_version}", version_num / 10000)
}

/// Deeper than any data directory: only a link loop gets here.
const MAX_DEPTH: usize = 64;

fn walk_dir(
    dir: &Path,
    rel: &str,
    depth: usize,
    version_dir: &str,
    out: &mut Vec<Item>,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<()> {
    // Links are followed into directories: one reached twice is a loop (or
    // two links to one directory), an error before it walks the cluster
    // again and again.
    match std::fs::metadata(dir) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            if !seen.insert((m.dev(), m.ino())) {
                return Err(PgError::Invalid {
                    path: dir.display().to_string(),
                    reason:
                        "this directory is reached twice: a symbolic link that loops, two links \
                             to one directory, or a tablespace located inside the data directory; \
                             fix the link, or move the tablespace out of the data directory"
                            .into(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && depth > 0 => return Ok(()),
        Err(e) => return Err(PgError::io(format!("stat {}", dir.display()), e)),
    }
    if depth > MAX_DEPTH {
        return Err(PgError::Invalid {
            path: dir.display().to_string(),
            reason: format!(
                "more than {MAX_DEPTH} directories deep: a symbolic link that loops? Remove the link"
            ),
        });
    }
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        // A directory removed after it was listed (a dropped database).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && depth > 0 => return Ok(()),
        Err(e) => return Err(PgError::io(format!("listing {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| PgError::io(format!("listing {}", dir.display()), e))?;
        match ent.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => {
                return Err(PgError::Invalid {
                    path: dir.join(n).display().to_string(),
                    reason: "file name is not UTF-8, which backups cannot record yet; \
                             rename the file or move it out of the data directory"
                        .into(),
                })
            }
        }
    }
    names.sort();
    let in_relation_dir = is_relation_dir(rel);
    // Unlogged relations: a relfilenode with an _init fork is backed up as
    // its init fork only.
    let unlogged: HashSet<String> = if in_relation_dir {
        names
            .iter()
            .filter_map(|n| parse_relation_file(n))
            .filter(|(_, fork, _)| *fork == "init")
            .map(|(node, _, _)| node.to_string())
            .collect()
    } else {
        HashSet::new()
    };
    for name in names {
        let abs = dir.join(&name);
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if is_temp_name(&name) {
            continue;
        }
        if rel.is_empty() && EXCLUDED_FILES.contains(&name.as_str()) {
            continue;
        }
        if name.starts_with("pg_internal.init") {
            continue;
        }
        let m = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // vanished
            Err(e) => return Err(PgError::io(format!("stat {}", abs.display()), e)),
        };
        if in_relation_dir && m.is_file() {
            if is_temp_relation(&name) {
                continue;
            }
            if let Some((node, fork, seg)) = parse_relation_file(&name) {
                if fork != "init" && unlogged.contains(node) {
                    continue;
                }
                let mut it = meta_item(child, abs, Kind::File, &m);
                it.relation_segment = Some(seg);
                out.push(it);
                continue;
            }
        }
        if m.file_type().is_symlink() {
            if rel == "pg_tblspc" {
                let target = std::fs::read_link(&abs)
                    .map_err(|e| PgError::io(format!("reading link {}", abs.display()), e))?;
                let tm = std::fs::metadata(&abs)
                    .map_err(|e| PgError::io(format!("tablespace {}", abs.display()), e))?;
                out.push(meta_item(
                    child.clone(),
                    abs.clone(),
                    Kind::TablespaceLink(target),
                    &tm,
                ));
                let ours = abs.join(version_dir);
                match std::fs::metadata(&ours) {
                    Ok(vm) if vm.is_dir() => {
                        let vrel = format!("{child}/{version_dir}");
                        out.push(meta_item(vrel.clone(), ours.clone(), Kind::Dir, &vm));
                        walk_dir(&ours, &vrel, depth + 1, version_dir, out, seen)?;
                    }
                    // A tablespace this server has not written into yet.
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(PgError::io(format!("tablespace {}", ours.display()), e)),
                }
            } else if rel.is_empty() && name == "pg_wal" {
                // pg_wal may be a link elsewhere: keep it as a directory.
                let tm = std::fs::metadata(&abs)
                    .map_err(|e| PgError::io(format!("stat {}", abs.display()), e))?;
                out.push(meta_item(child.clone(), abs.clone(), Kind::Dir, &tm));
                add_wal_dirs(&abs, &child, out)?;
            } else {
                // Other links (e.g. configuration files placed elsewhere) are
                // copied as what they point to.
                let tm = match std::fs::metadata(&abs) {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(PgError::io(format!("stat {}", abs.display()), e)),
                };
                if tm.is_file() {
                    out.push(meta_item(child, abs, Kind::File, &tm));
                } else if tm.is_dir() {
                    // A directory moved to another disk (pg_xact, a
                    // database's base/<oid>) is backed up through the link
                    // and restored as a directory, as pgBackRest does. An
                    // excluded one (pg_stat_tmp on tmpfs) is the empty
                    // directory PostgreSQL needs, as in its base backup.
                    out.push(meta_item(child.clone(), abs.clone(), Kind::Dir, &tm));
                    if !(rel.is_empty() && EMPTY_DIRS.contains(&name.as_str())) {
                        walk_dir(&abs, &child, depth + 1, version_dir, out, seen)?;
                    }
                }
            }
            continue;
        }
        if m.is_dir() {
            out.push(meta_item(child.clone(), abs.clone(), Kind::Dir, &m));
            if rel.is_empty() && name == "pg_wal" {
                add_wal_dirs(&abs, &child, out)?;
            } else if rel.is_empty() && EMPTY_DIRS.contains(&name.as_str()) {
                // contents excluded
            } else {
                walk_dir(&abs, &child, depth + 1, version_dir, out, seen)?;
            }
        } else if m.is_file() {
            out.push(meta_item(child, abs, Kind::File, &m));
        }
    }
    Ok(())
}

fn add_wal_dirs(wal: &Path, rel: &str, out: &mut Vec<Item>) -> Result<()> {
    for d in WAL_KEPT_DIRS {
        let abs = wal.join(d);
        if let Ok(m) = std::fs::metadata(&abs) {
            if m.is_dir() {
                out.push(meta_item(format!("{rel}/{d}"), abs, Kind::Dir, &m));
            }
        }
    }
    Ok(())
}

/// Directories whose numeric files are relation files: `global`,
/// `base/<db>`, `pg_tblspc/<oid>/<version>/<db>`.
fn is_relation_dir(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        ["global"] => true,
        ["base", db] => db.bytes().all(|c| c.is_ascii_digit()),
        ["pg_tblspc", _, _, db] => db.bytes().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_names() {
        assert_eq!(parse_relation_file("16396"), Some(("16396", "", 0)));
        assert_eq!(parse_relation_file("16396.12"), Some(("16396", "", 12)));
        assert_eq!(parse_relation_file("16396_fsm"), Some(("16396", "fsm", 0)));
        assert_eq!(
            parse_relation_file("16396_init"),
            Some(("16396", "init", 0))
        );
        assert_eq!(parse_relation_file("16396_vm.1"), Some(("16396", "vm", 1)));
        assert_eq!(parse_relation_file("pg_filenode.map"), None);
        assert_eq!(parse_relation_file("PG_VERSION"), None);
        assert_eq!(parse_relation_file("16396_x"), None);
        assert!(is_temp_relation("t3_16400"));
        assert!(is_temp_relation("t3_16400_fsm"));
        assert!(!is_temp_relation("16400"));
    }

    #[test]
    fn tablespace_version_directory_name() {
        assert_eq!(tablespace_version_dir(150018, 202209061), "PG_15_202209061");
        assert_eq!(tablespace_version_dir(180001, 202506291), "PG_18_202506291");
    }

    #[test]
    fn exclusions_like_pg_basebackup() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in [
            "base/5",
            "base/5/pgsql_tmp",
            "global",
            "pg_wal/archive_status",
            "pg_replslot/slot",
            "pg_stat_tmp",
            "pg_xact",
        ] {
            std::fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "backup_label",
            "postgresql.conf",
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16390",
            "base/5/16390_init",
            "base/5/16390_fsm",
            "base/5/t3_16400",
            "base/5/pg_internal.init",
            "base/5/pgsql_tmp/pgsql_tmp1.0",
            "global/pg_control",
            "global/1262",
            "pg_wal/000000010000000000000001",
            "pg_replslot/slot/state",
            "pg_stat_tmp/x",
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        // A tablespace holding this server's directory and an older major
        // version's (pg_upgrade), and pg_notify linked elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        let ts = elsewhere.path().join("ts");
        for dir in ["PG_15_1/5", "PG_14_0/5", "lost+found"] {
            std::fs::create_dir_all(ts.join(dir)).unwrap();
        }
        std::fs::write(ts.join("PG_15_1/5/16500"), b"x").unwrap();
        std::fs::write(ts.join("PG_14_0/5/16500"), b"x").unwrap();
        std::fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(&ts, p.join("pg_tblspc/16400")).unwrap();
        let notify = elsewhere.path().join("notify");
        std::fs::create_dir_all(&notify).unwrap();
        std::fs::write(notify.join("0000"), b"x").unwrap();
        std::os::unix::fs::symlink(&notify, p.join("pg_notify")).unwrap();
        // pg_xact and a database moved to another disk: backed up through
        // the links, as directories.
        let xact = elsewhere.path().join("xact");
        std::fs::create_dir_all(&xact).unwrap();
        std::fs::write(xact.join("0000"), b"x").unwrap();
        std::fs::remove_dir_all(p.join("pg_xact")).unwrap();
        std::os::unix::fs::symlink(&xact, p.join("pg_xact")).unwrap();
        let db6 = elsewhere.path().join("db6");
        std::fs::create_dir_all(&db6).unwrap();
        std::fs::write(db6.join("16384"), b"x").unwrap();
        std::os::unix::fs::symlink(&db6, p.join("base/6")).unwrap();
        let items = walk(p, "PG_15_1").unwrap();
        let rels: Vec<&str> = items.iter().map(|i| i.rel.as_str()).collect();
        let want = [
            "PG_VERSION",
            "base",
            "base/5",
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16390_init",
            "base/6",
            "base/6/16384",
            "global",
            "global/1262",
            "global/pg_control",
            "pg_notify",
            "pg_replslot",
            "pg_stat_tmp",
            "pg_tblspc",
            "pg_tblspc/16400",
            "pg_tblspc/16400/PG_15_1",
            "pg_tblspc/16400/PG_15_1/5",
            "pg_tblspc/16400/PG_15_1/5/16500",
            "pg_wal",
            "pg_wal/archive_status",
            "pg_xact",
            "pg_xact/0000",
            "postgresql.conf",
        ];
        assert_eq!(rels, want);
        let seg = |r: &str| items.iter().find(|i| i.rel == r).unwrap().relation_segment;
        assert_eq!(seg("base/5/16384.1"), Some(1));
        assert_eq!(seg("global/1262"), Some(0));
        assert_eq!(seg("global/pg_control"), None);
        assert_eq!(seg("pg_xact/0000"), None);
        assert_eq!(seg("pg_tblspc/16400/PG_15_1/5/16500"), Some(0));
        let kind = |r: &str| &items.iter().find(|i| i.rel == r).unwrap().kind;
        assert!(matches!(kind("pg_notify"), Kind::Dir));
        assert!(matches!(kind("pg_xact"), Kind::Dir));
        assert!(matches!(kind("base/6"), Kind::Dir));
        assert_eq!(seg("base/6/16384"), Some(0));
        // A link that loops is an error naming it, not a hang.
        std::os::unix::fs::symlink(p, p.join("base/loop")).unwrap();
        let e = walk(p, "PG_15_1").unwrap_err().to_string();
        assert!(e.contains("loops") && e.contains("base/loop"), "{e}");
        assert!(matches!(kind("pg_tblspc/16400"), Kind::TablespaceLink(_)));
    }
}
