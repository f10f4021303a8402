//! Where a passphrase comes from, the first that is set: the
//! `--passphrase-file` flag; the environment (`PGCAIRN_PASSPHRASE`,
//! `PGCAIRN_PASSPHRASE_FILE`, `PGCAIRN_PASSPHRASE_COMMAND`); the config
//! file (`passphrase_file`, then `passphrase_command`); a prompt when
//! standard input is a terminal. Flags beat the environment, which beats the
//! config file, as for every other setting. Never a command-line value:
//! `archive_command` shows in `ps` and in `pg_settings`.
//!
//! Files must be mode 0600 (or stricter) and owned by the invoking user.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

#[derive(Debug, Clone, Default)]
pub struct PassphraseSource {
    /// `PGCAIRN_PASSPHRASE` holds it.
    pub env_value: bool,
    pub file: Option<PathBuf>,
    pub command: Option<String>,
    /// Where `command` runs: the config file's directory for the config's
    /// command (a relative script path in it is relative to the file, as
    /// PostgreSQL runs archive_command in the data directory), else here.
    pub command_dir: Option<PathBuf>,
    /// Which setting it is, for messages: a stray `PGCAIRN_PASSPHRASE`
    /// beats the config file without a word otherwise.
    pub origin: &'static str,
}

/// Refuse secret files that others can read or that someone else owns.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}; a passphrase file must be readable by its owner only (chmod 600 {})",
            path.display(),
            mode,
            path.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by the user running pgcairn (uid {me})",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

fn trim_newline(mut v: Vec<u8>) -> Zeroizing<Vec<u8>> {
    while matches!(v.last(), Some(b'\n') | Some(b'\r')) {
        v.pop();
    }
    Zeroizing::new(v)
}

impl PassphraseSource {
    /// The one source that applies (see the module comment).
    pub fn resolve(
        flag_file: Option<PathBuf>,
        config_file: Option<PathBuf>,
        config_command: Option<String>,
        config_dir: Option<PathBuf>,
    ) -> Self {
        let env_file = || std::env::var_os("PGCAIRN_PASSPHRASE_FILE").map(PathBuf::from);
        let env_command = || std::env::var("PGCAIRN_PASSPHRASE_COMMAND").ok();
        let mut command_dir = None;
        let (file, command, origin) = if flag_file.is_some() {
            (flag_file, None, "--passphrase-file")
        } else if std::env::var_os("PGCAIRN_PASSPHRASE").is_some() {
            return PassphraseSource {
                env_value: true,
                origin: "PGCAIRN_PASSPHRASE",
                ..PassphraseSource::default()
            };
        } else if let Some(f) = env_file() {
            (Some(f), None, "PGCAIRN_PASSPHRASE_FILE")
        } else if let Some(c) = env_command() {
            (None, Some(c), "PGCAIRN_PASSPHRASE_COMMAND")
        } else if config_file.is_some() {
            (config_file, None, "passphrase_file in the config file")
        } else if config_command.is_some() {
            command_dir = config_dir;
            (
                None,
                config_command,
                "passphrase_command in the config file",
            )
        } else {
            (None, None, "the prompt")
        };
        PassphraseSource {
            env_value: false,
            file,
            command,
            command_dir,
            origin,
        }
    }

    /// Where the passphrase came from, for an error that rejects it.
    pub fn describe(&self) -> String {
        match (&self.file, &self.command) {
            (Some(f), _) => format!("{} ({})", self.origin, f.display()),
            (None, Some(c)) => format!("{} (`{c}`)", self.origin),
            _ => self.origin.to_string(),
        }
    }

    fn describe_dir(&self) -> String {
        match &self.command_dir {
            Some(d) => format!("{}, run in {}", self.origin, d.display()),
            None => self.origin.to_string(),
        }
    }

    /// Whether any source but the prompt is set.
    pub fn is_set(&self) -> bool {
        self.env_value || self.file.is_some() || self.command.is_some()
    }

    /// The repository passphrase. An empty one is an error naming where it
    /// came from: no key has an empty passphrase, and "wrong passphrase"
    /// would send the user to the wrong place.
    pub fn get(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        if self.env_value {
            let p = std::env::var("PGCAIRN_PASSPHRASE")
                .map_err(|e| format!("PGCAIRN_PASSPHRASE: {e}"))?;
            return non_empty(Zeroizing::new(p.into_bytes()))
                .map_err(|_| "PGCAIRN_PASSPHRASE is empty".into());
        }
        if let Some(f) = &self.file {
            check_secret_file(f)?;
            let v = std::fs::read(f)
                .map_err(|e| format!("cannot read passphrase file {}: {e}", f.display()))?;
            return non_empty(trim_newline(v))
                .map_err(|_| format!("passphrase file {} is empty", f.display()));
        }
        if let Some(c) = &self.command {
            let mut cmd = std::process::Command::new("sh");
            cmd.arg("-c").arg(c).stderr(std::process::Stdio::inherit());
            if let Some(d) = &self.command_dir {
                cmd.current_dir(d);
            }
            let out = cmd.output().map_err(|e| {
                format!(
                    "cannot run passphrase command `{c}` ({}): {e}",
                    self.describe_dir()
                )
            })?;
            if !out.status.success() {
                return Err(format!(
                    "passphrase command `{c}` ({}) failed with {}",
                    self.describe_dir(),
                    out.status
                ));
            }
            return non_empty(trim_newline(out.stdout))
                .map_err(|_| format!("passphrase command `{c}` printed nothing"));
        }
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            let p =
                rpassword::prompt_password("Repository passphrase: ").map_err(|e| e.to_string())?;
            return non_empty(Zeroizing::new(p.into_bytes()))
                .map_err(|_| "the passphrase entered is empty".into());
        }
        Err("no passphrase: set PGCAIRN_PASSPHRASE, PGCAIRN_PASSPHRASE_FILE (mode 0600) or PGCAIRN_PASSPHRASE_COMMAND, or run on a terminal".into())
    }
}

/// A new passphrase (for `init`, `key add`, `key passwd`): from
/// `PGCAIRN_NEW_PASSPHRASE`, `PGCAIRN_NEW_PASSPHRASE_FILE`, or a prompt
/// asked twice. `init` falls back to the ordinary sources.
pub fn new_passphrase(fallback: Option<&PassphraseSource>) -> Result<Zeroizing<Vec<u8>>, String> {
    if let Ok(p) = std::env::var("PGCAIRN_NEW_PASSPHRASE") {
        return non_empty(Zeroizing::new(p.into_bytes()));
    }
    if let Some(f) = std::env::var_os("PGCAIRN_NEW_PASSPHRASE_FILE").map(PathBuf::from) {
        check_secret_file(&f)?;
        let v = std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        return non_empty(trim_newline(v));
    }
    if let Some(src) = fallback.filter(|s| s.is_set()) {
        return src.get();
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let a = Zeroizing::new(
            rpassword::prompt_password("New passphrase: ").map_err(|e| e.to_string())?,
        );
        let b = Zeroizing::new(
            rpassword::prompt_password("Repeat passphrase: ").map_err(|e| e.to_string())?,
        );
        if a != b {
            return Err("the passphrases differ".into());
        }
        return non_empty(Zeroizing::new(a.as_bytes().to_vec()));
    }
    Err("no new passphrase: set PGCAIRN_NEW_PASSPHRASE or PGCAIRN_NEW_PASSPHRASE_FILE (mode 0600), or run on a terminal".into())
}

fn non_empty(p: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, String> {
    if p.is_empty() {
        Err("the passphrase is empty".into())
    } else {
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_group_readable_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pw");
        std::fs::write(&f, "x\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_secret_file(&f).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_secret_file(&f).is_ok());
    }
}
