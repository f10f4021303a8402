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
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}
