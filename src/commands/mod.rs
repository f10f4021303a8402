//! One file per CLI command, each a short script over the library. This is
//! the only layer that prints.

pub mod info;
pub mod init;
pub mod key;

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
        let passphrase = PassphraseSource::from_env(
            global
                .passphrase_file
                .clone()
                .or_else(|| settings.repository.passphrase_file.clone()),
            settings.repository.passphrase_command.clone(),
        );
        Ok(Ctx {
            global,
            settings,
            passphrase,
        })
    }

    pub fn repo_url(&self) -> Result<String> {
        self.global
            .repo
            .clone()
            .or_else(|| self.settings.repository.url.clone())
            .context("no repository: pass --repo, set PGCAIRN_REPO, or set [repository] url in the config file")
    }

    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            cache_dir: self
                .global
                .cache_dir
                .clone()
                .or_else(|| self.settings.repository.cache_dir.clone()),
            compression_level: self.settings.repository.compression,
            ..OpenOptions::default()
        }
    }

    pub async fn open(&self) -> Result<Repository> {
        let url = self.repo_url()?;
        let src = self.passphrase.clone();
        let get = move || src.get();
        Ok(Repository::open(&url, &get, self.open_options()).await?)
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx::new(cli.global)?;
    match cli.command {
        Command::Init(a) => init::run(&ctx, a).await,
        Command::Key(k) => key::run(&ctx, k).await,
        Command::Info => info::run(&ctx).await,
    }
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
