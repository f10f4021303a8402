//! The fsyncs that make local writes survive a power cut: a file's own
//! fsync covers its bytes, but its name (and a new directory's) lives in
//! the parent directory, which needs one of its own. Shared by local packs
//! and restored data directories.

use std::io;
use std::path::Path;

/// fsync a directory, making the names in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// `create_dir_all`, then fsync the parent of every directory it made (a
/// relative path's top goes into the working directory). The new
/// directories' own entries are the caller's to sync once filled.
pub fn create_dirs(path: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
        .collect();
    std::fs::create_dir_all(path)?;
    for d in missing {
        match d.parent() {
            Some(up) if !up.as_os_str().is_empty() => sync_dir(up)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nested_new_directories_are_created() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("a/b/c");
        super::create_dirs(&p).expect("create");
        assert!(p.is_dir());
        super::create_dirs(&p).expect("existing is fine");
    }
}
