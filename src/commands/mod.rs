//! One file per CLI command, each a short script over the library. This is
//! the only layer that prints.

/// `println!` that fails the command with an error instead of panicking
/// (exit 101) when standard output is closed, as in `pgcairn list | head`.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))?;
    }};
}

/// `print!` likewise.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($t)*)
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))?;
    }};
}

/// `eprintln!` for warnings, which must not panic when standard error
/// cannot be written (a full log disk): the command's outcome stands.
macro_rules! warnln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

pub mod archive_get;
pub mod archive_push;
pub mod backup;
pub mod check;
pub mod delete;
pub mod expire;
pub mod gc;
pub mod info;
pub mod init;
pub mod keep;
pub mod key;
pub mod list;
pub mod progress;
pub mod restore;
pub mod show;
pub mod verify;

use anyhow::{Context, Result};

use crate::cli::{Cli, Command, Global};
use crate::passphrase::PassphraseSource;
use crate::repo::{OpenOptions, Repository};
use crate::settings::Settings;

/// Everything a command needs before it touches the repository.
pub struct Ctx {
    pub global: Global,
    pub settings: Settings,
    pub passphrase: PassphraseSource,
}

impl Ctx {
    pub fn new(global: Global) -> Result<Ctx> {
        let settings = Settings::load(global.config.as_deref()).map_err(anyhow::Error::msg)?;
        if let Some(level) = settings.repository.compression {
            crate::repo::Compression::validate_level(level)
                .context("[repository] compression in the config file")?;
        }
        let passphrase = PassphraseSource::resolve(
            global.passphrase_file.clone(),
            settings.repository.passphrase_file.clone(),
            settings.repository.passphrase_command.clone(),
            settings.dir.clone(),
        );
        Ok(Ctx {
            global,
            settings,
            passphrase,
        })
    }

    /// The repository URL; a relative local path is made absolute, as it
    /// is also written into a restored cluster's restore_command, which
    /// PostgreSQL runs in its data directory.
    pub fn repo_url(&self) -> Result<String> {
        let url = self
            .global
            .repo
            .clone()
            .or_else(|| self.settings.repository.url.clone())
            .context("no repository: pass --repo, set PGCAIRN_REPO, or set [repository] url in the config file")?;
        if url.contains("://") || std::path::Path::new(&url).is_absolute() {
            return Ok(url);
        }
        Ok(std::path::absolute(&url)
            .with_context(|| format!("resolving the repository path {url}"))?
            .to_string_lossy()
            .into_owned())
    }

    /// The cache directory pgcairn uses (index objects, key cache,
    /// look-ahead records).
    pub fn cache_root(&self) -> std::path::PathBuf {
        self.global
            .cache_dir
            .clone()
            .or_else(|| self.settings.repository.cache_dir.clone())
            .unwrap_or_else(crate::repo::default_cache_root)
    }

    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            cache_dir: self
                .global
                .cache_dir
                .clone()
                .or_else(|| self.settings.repository.cache_dir.clone()),
            compression_level: self.settings.repository.compression,
            index_flush_secs: std::env::var("PGCAIRN_INDEX_FLUSH_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(OpenOptions::default().index_flush_secs),
            expect_encrypted: self.passphrase.is_set(),
            ..OpenOptions::default()
        }
    }

    /// The server a command is about: the flag, or the only configured one.
    pub fn server_name(&self, arg: &crate::cli::ServerArg) -> Result<String> {
        let name = match (&arg.server, self.settings.server.len()) {
            (Some(s), _) => s.clone(),
            (None, 1) => self
                .settings
                .server
                .keys()
                .next()
                .cloned()
                .unwrap_or_default(),
            (None, 0) => {
                anyhow::bail!("no server: pass --server NAME (or configure a [server.NAME] table)")
            }
            (None, _) => anyhow::bail!(
                "several servers are configured ({}); pass --server NAME",
                self.settings
                    .server
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        crate::engine::catalog::validate_server(&name).map_err(anyhow::Error::msg)?;
        Ok(name)
    }

    pub fn server_settings(&self, name: &str) -> crate::settings::ServerSettings {
        self.settings.server.get(name).cloned().unwrap_or_default()
    }

    /// Resolve `latest` or an id to a backup manifest name.
    pub async fn resolve_backup(
        &self,
        repo: &Repository,
        server: &str,
        id: &str,
    ) -> Result<String> {
        if id == "latest" {
            let all = crate::engine::catalog::list_backups(repo, Some(server)).await?;
            return all
                .last()
                .map(|b| b.name.clone())
                .with_context(|| format!("server {server} has no backups in {}", repo.location()));
        }
        let name = crate::engine::catalog::backup_name(server, id);
        let names = repo
            .list_manifests(&crate::engine::catalog::backups_prefix(server))
            .await?;
        if !names.contains(&name) {
            anyhow::bail!(
                "no backup {id} of server {server} in {} (see `pgcairn list`)",
                repo.location()
            );
        }
        Ok(name)
    }

    /// Open for the commands PostgreSQL runs once per WAL file: the master
    /// key comes from the key cache after the first unlock.
    pub async fn open_cached(&self) -> Result<Repository> {
        let url = self.repo_url()?;
        let src = self.passphrase.clone();
        let get = move || src.get();
        let opts = OpenOptions {
            key_cache: std::env::var_os("PGCAIRN_NO_KEY_CACHE").is_none(),
            ..self.open_options()
        };
        Repository::open(&url, &get, opts)
            .await
            .map_err(|e| self.name_passphrase(e))
    }

    pub async fn open(&self) -> Result<Repository> {
        let url = self.repo_url()?;
        let src = self.passphrase.clone();
        let get = move || src.get();
        Repository::open(&url, &get, self.open_options())
            .await
            .map_err(|e| self.name_passphrase(e))
    }

    /// A rejected passphrase names the setting it came from.
    fn name_passphrase(&self, e: crate::repo::RepoError) -> anyhow::Error {
        match e {
            crate::repo::RepoError::WrongPassphrase { .. } => {
                let src = self.passphrase.describe();
                anyhow::Error::new(e).context(format!(
                    "the passphrase from {src} opens no key of the repository; check that setting \
                     (flags beat PGCAIRN_* variables, which beat the config file)"
                ))
            }
            other => other.into(),
        }
    }
}

/// Run a command; returns the process exit code on success.
pub async fn run(cli: Cli) -> Result<u8> {
    let ctx = Ctx::new(cli.global)?;
    if let Command::ArchiveGet(a) = cli.command {
        return archive_get::run(&ctx, a).await;
    }
    match cli.command {
        Command::ArchiveGet(_) => unreachable!("handled above"),
        Command::ArchivePush(a) => archive_push::run(&ctx, a).await,
        Command::Init(a) => init::run(&ctx, a).await,
        Command::Key(k) => key::run(&ctx, k).await,
        Command::Info => info::run(&ctx).await,
        Command::Backup(a) => backup::run(&ctx, a).await,
        Command::Check(a) => check::run(&ctx, a).await,
        Command::List(a) => list::run(&ctx, a).await,
        Command::Show(a) => show::run(&ctx, a).await,
        Command::Restore(a) => restore::run(&ctx, a).await,
        Command::Verify(a) => return verify::run(&ctx, a).await,
        Command::Expire(a) => expire::run(&ctx, a).await,
        Command::Delete(a) => delete::run(&ctx, a).await,
        Command::Keep(a) => keep::run(&ctx, a).await,
        Command::Gc(a) => gc::run(&ctx, a).await,
    }?;
    Ok(0)
}

/// Bytes for people: 1.5 GiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
