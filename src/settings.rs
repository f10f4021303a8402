//! The TOML configuration file (`--config`, `PGCAIRN_CONFIG`, default
//! `/etc/pgcairn/pgcairn.toml` when it exists). Command-line flags and
//! `PGCAIRN_*` variables override it. Server tables come with the backup
//! commands.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub repository: RepositorySettings,
    #[serde(default)]
    pub server: std::collections::BTreeMap<String, ServerSettings>,
    /// The directory of the file loaded: a config `passphrase_command`
    /// runs there, so that a relative script path in it is relative to the
    /// file like every other path in it.
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

/// `[server.NAME]`: one PostgreSQL cluster.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub pgdata: Option<PathBuf>,
    pub conninfo: Option<String>,
    /// `"REDUNDANCY n"` or `"RECOVERY WINDOW OF n DAYS|WEEKS|MONTHS"`
    /// (Barman's syntax); `expire` applies it, `list` and `show` report it.
    pub retention_policy: Option<String>,
    /// Never let retention or `delete` leave fewer complete backups.
    pub minimum_redundancy: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySettings {
    pub url: Option<String>,
    pub passphrase_file: Option<PathBuf>,
    pub passphrase_command: Option<String>,
    pub compression: Option<i32>,
    pub cache_dir: Option<PathBuf>,
}

pub const DEFAULT_CONFIG: &str = "/etc/pgcairn/pgcairn.toml";

impl Settings {
    /// Load `path` if given (it must exist), else the default if it exists.
    pub fn load(path: Option<&Path>) -> Result<Settings, String> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Settings::default())
            }
            Err(e) => return Err(format!("cannot read config file {}: {e}", path.display())),
        };
        let mut s: Settings =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        // Relative paths in the file are relative to the file, not to
        // wherever a command runs (PostgreSQL runs archive_command in its
        // data directory).
        let base = std::path::absolute(&path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let r = &mut s.repository;
        if let Some(u) = r.url.as_mut().filter(|u| !u.contains("://")) {
            let mut p = PathBuf::from(&*u);
            anchor(&mut p);
            *u = p.to_string_lossy().into_owned();
        }
        r.passphrase_file.as_mut().map(anchor);
        r.cache_dir.as_mut().map(anchor);
        for srv in s.server.values_mut() {
            srv.pgdata.as_mut().map(anchor);
        }
        s.dir = Some(base).filter(|b| !b.as_os_str().is_empty());
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("pgcairn.toml");
        std::fs::write(
            &f,
            "[repository]\nurl = \"repo\"\npassphrase_file = \"/abs/pw\"\ncache_dir = \"c\"\n\
             [server.main]\npgdata = \"data\"\n",
        )
        .expect("write");
        let s = super::Settings::load(Some(&f)).expect("load");
        let under = |p: &str| t.path().join(p);
        assert_eq!(
            s.repository.url.as_deref(),
            Some(&*under("repo").to_string_lossy())
        );
        assert_eq!(
            s.repository.passphrase_file.as_deref(),
            Some(std::path::Path::new("/abs/pw"))
        );
        assert_eq!(s.repository.cache_dir, Some(under("c")));
        assert_eq!(s.server["main"].pgdata, Some(under("data")));
    }
}
