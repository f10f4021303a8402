//! Recovery settings for a restored data directory: `recovery.signal` and a
//! block appended to `postgresql.auto.conf` (earlier recovery settings there
//! are commented out, so the restore's own are the ones in force).

use std::io::Write;
use std::path::Path;

use super::{PgError, Result};

#[derive(Debug, Clone, Default)]
pub struct RecoverySettings {
    pub restore_command: String,
    /// One of recovery_target_time / _xid / _lsn / _name, or
    /// recovery_target = 'immediate', as (setting, value).
    pub target: Option<(String, String)>,
    pub inclusive: Option<bool>,
    pub timeline: Option<String>,
    pub action: Option<String>,
    /// Set archive_mode = off in the restored configuration.
    pub archive_mode_off: bool,
}

/// Settings a restore replaces.
const REPLACED: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "recovery_end_command",
    "archive_cleanup_command",
];

/// Quote a value for postgresql.conf.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quote an argument for the shell that runs restore_command.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn setting_name(line: &str) -> Option<String> {
    let l = line.trim_start();
    if l.starts_with('#') {
        return None;
    }
    let end = l
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(l.len());
    Some(l[..end].to_ascii_lowercase())
}

/// Write recovery.signal and the settings; returns the lines commented out.
pub fn write(pgdata: &Path, s: &RecoverySettings) -> Result<Vec<String>> {
    let auto = pgdata.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(PgError::io(format!("reading {}", auto.display()), e)),
    };
    let mut out = String::new();
    let mut commented = Vec::new();
    for line in old.lines() {
        let replace = setting_name(line).is_some_and(|n| {
            REPLACED.contains(&n.as_str()) || (s.archive_mode_off && n == "archive_mode")
        });
        if replace {
            commented.push(line.to_string());
            out.push_str("# pgcairn restore: ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("# Recovery settings written by pgcairn restore\n");
    out.push_str(&format!(
        "restore_command = {}\n",
        conf_quote(&s.restore_command)
    ));
    if let Some((k, v)) = &s.target {
        out.push_str(&format!("{k} = {}\n", conf_quote(v)));
    }
    if let Some(i) = s.inclusive {
        out.push_str(&format!(
            "recovery_target_inclusive = {}\n",
            if i { "on" } else { "off" }
        ));
    }
    if let Some(t) = &s.timeline {
        out.push_str(&format!("recovery_target_timeline = {}\n", conf_quote(t)));
    }
    if let Some(a) = &s.action {
        out.push_str(&format!("recovery_target_action = {}\n", conf_quote(a)));
    }
    if s.archive_mode_off {
        out.push_str("archive_mode = 'off'\n");
    }
    write_synced(&auto, out.as_bytes())?;
    write_synced(&pgdata.join("recovery.signal"), b"")?;
    Ok(commented)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("pgcairn-tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(|e| PgError::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(data)
        .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .and_then(|_| f.sync_all())
        .map_err(|e| PgError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| PgError::io(format!("renaming into {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_old_recovery_settings() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            "work_mem = '8MB'\nrestore_command = 'cp /x/%f %p'\narchive_mode = on\n# recovery_target_time = 'x'\n",
        )
        .unwrap();
        let s = RecoverySettings {
            restore_command: "pgcairn --repo 'it''s' archive-get %f %p".into(),
            target: Some((
                "recovery_target_time".into(),
                "2026-11-22 10:00:00+00".into(),
            )),
            action: Some("promote".into()),
            archive_mode_off: true,
            ..Default::default()
        };
        let commented = write(d.path(), &s).unwrap();
        assert_eq!(commented.len(), 2);
        let t = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert!(t.contains("work_mem = '8MB'\n"));
        assert!(t.contains("# pgcairn restore: restore_command = 'cp /x/%f %p'"));
        assert!(t.contains("restore_command = 'pgcairn --repo ''it''''s'' archive-get %f %p'"));
        assert!(t.contains("recovery_target_time = '2026-11-22 10:00:00+00'"));
        assert!(t.contains("archive_mode = 'off'"));
        assert!(d.path().join("recovery.signal").exists());
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }
}
