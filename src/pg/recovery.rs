//! Recovery settings for a restored data directory: `recovery.signal` and a
//! block appended to `postgresql.auto.conf` (earlier recovery settings there
//! are commented out, and every one is given a value, so the restore's own
//! are the ones in force).

use std::io::Write;
use std::path::Path;

use super::{PgError, Result};

/// The recovery configuration a restore writes. Every setting in
/// [`REPLACED`] gets an explicit value, so a stale one in the restored
/// `postgresql.conf` (where PostgreSQL's documentation tells users to put
/// them) cannot change where recovery stops.
#[derive(Debug, Clone)]
pub struct RecoverySettings {
    pub restore_command: String,
    /// One of recovery_target_time / _xid / _lsn / _name, or
    /// recovery_target = 'immediate', as (setting, value).
    pub target: Option<(String, String)>,
    pub inclusive: bool,
    /// `latest`, `current` or a timeline number in decimal.
    pub timeline: String,
    pub action: String,
}

/// The recovery target settings; PostgreSQL refuses more than one non-empty.
const TARGETS: &[&str] = &[
    "recovery_target",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_name",
];

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
    // Honoured in archive recovery too: a promoted delayed standby's
    // '4h' would hold a PITR back by hours.
    "recovery_min_apply_delay",
];

/// Quote a value for postgresql.conf. PostgreSQL's configuration lexer
/// reads a backslash in a quoted string as an escape, so backslashes are
/// doubled as well as quotes, and line breaks are written as escapes.
pub fn conf_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quote an argument for the shell that runs restore_command.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Quote a literal argument of restore_command: for the shell, and with
/// `%` doubled, since PostgreSQL replaces `%f`, `%p` and `%r` anywhere in
/// the command (and from version 16 refuses any other `%x`).
pub fn command_arg(s: &str) -> String {
    sh_quote(s).replace('%', "%%")
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

/// Write the restore's settings into `postgresql.auto.conf`: with
/// `recovery`, recovery.signal and the recovery settings; with
/// `archive_mode_off`, archive_mode = off (also for a restore without
/// recovery, whose copy would otherwise archive on the source's timeline).
/// Earlier lines for the same settings are commented out; returns them.
pub fn write(
    pgdata: &Path,
    recovery: Option<&RecoverySettings>,
    archive_mode_off: bool,
) -> Result<Vec<String>> {
    if recovery.is_none() && !archive_mode_off {
        return Ok(Vec::new());
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let old = read_conf(&auto)?.unwrap_or_default();
    let mut out = Vec::new();
    let mut commented = Vec::new();
    for line in conf_lines(&old) {
        let text = String::from_utf8_lossy(line);
        let replace = setting_name(&text).is_some_and(|n| {
            (recovery.is_some() && REPLACED.contains(&n.as_str()))
                || (archive_mode_off && n == "archive_mode")
        });
        if replace {
            commented.push(text.into_owned());
            out.extend_from_slice(b"# pgcairn restore: ");
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    let mut out = Out(out);
    out.push_str("# Settings written by pgcairn restore\n");
    if let Some(s) = recovery {
        let mut set = |k: &str, v: &str| out.push_str(&format!("{k} = {}\n", conf_quote(v)));
        set("restore_command", &s.restore_command);
        // The unused targets first, emptied: PostgreSQL applies settings in
        // order and refuses a second target while one is set.
        let chosen = s.target.as_ref().map(|(k, _)| k.as_str());
        for t in TARGETS.iter().filter(|t| Some(**t) != chosen) {
            set(t, "");
        }
        if let Some((k, v)) = &s.target {
            set(k, v);
        }
        set(
            "recovery_target_inclusive",
            if s.inclusive { "on" } else { "off" },
        );
        set("recovery_target_timeline", &s.timeline);
        set("recovery_target_action", &s.action);
        set("recovery_end_command", "");
        set("archive_cleanup_command", "");
        set("recovery_min_apply_delay", "0");
    }
    if archive_mode_off {
        out.push_str("archive_mode = 'off'\n");
    }
    write_synced(&auto, &out.0)?;
    if recovery.is_some() {
        commented.extend(comment_out_mixed_case_targets(pgdata)?);
        write_synced(&pgdata.join("recovery.signal"), b"")?;
    }
    Ok(commented)
}

/// PostgreSQL drops an earlier line for a setting only when a later one is
/// spelled the same (case included); `Recovery_Target_Time` in
/// postgresql.conf would stay in force beside the restore's lowercase
/// lines, and two targets stop the server. Such lines are commented out.
fn comment_out_mixed_case_targets(pgdata: &Path) -> Result<Vec<String>> {
    let conf = pgdata.join("postgresql.conf");
    let Some(text) = read_conf(&conf)? else {
        return Ok(Vec::new());
    };
    let mixed = |line: &[u8]| {
        let line = String::from_utf8_lossy(line);
        setting_name(&line).is_some_and(|n| {
            TARGETS.contains(&n.as_str()) && !line.trim_start().starts_with(n.as_str())
        })
    };
    if !conf_lines(&text).any(mixed) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut commented = Vec::new();
    for line in conf_lines(&text) {
        if mixed(line) {
            commented.push(format!(
                "{} (postgresql.conf)",
                String::from_utf8_lossy(line)
            ));
            out.extend_from_slice(b"# pgcairn restore: ");
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    write_synced(&conf, &out)?;
    Ok(commented)
}

/// A configuration file's bytes, `None` if it does not exist. PostgreSQL
/// reads them as bytes: a Latin-1 comment or value is not an error, and
/// lines not rewritten are kept byte for byte.
fn read_conf(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PgError::io(format!("reading {}", path.display()), e)),
    }
}

/// The lines of a file, without their line feeds (a final line without
/// one is a line; nothing after the last line feed is not).
fn conf_lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    text.split(|&b| b == b'\n')
        .filter(move |_| !text.is_empty())
}

/// Text appended to a byte buffer.
struct Out(Vec<u8>);

impl Out {
    fn push_str(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }
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

    /// PostgreSQL's configuration lexer, for quoted values: `''` is a
    /// quote, a backslash escapes the next character (`\n` a line feed).
    fn unquote(v: &str) -> Option<String> {
        let mut out = String::new();
        let mut it = v.strip_prefix('\'')?.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\'' if it.peek() == Some(&'\'') => {
                    it.next();
                    out.push('\'');
                }
                '\'' => return it.next().is_none().then_some(out),
                '\\' => match it.next()? {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    c => out.push(c),
                },
                '\n' => return None,
                c => out.push(c),
            }
        }
        None
    }

    fn value_of(conf: &str, key: &str) -> Option<String> {
        let line = conf
            .lines()
            .rfind(|l| setting_name(l).as_deref() == Some(key))?;
        unquote(line.split_once(" = ")?.1)
    }

    fn settings(target: Option<(&str, &str)>) -> RecoverySettings {
        RecoverySettings {
            restore_command: format!(
                "pgcairn --repo {} archive-get %f %p",
                command_arg("/srv/bob's 100% \\ backups")
            ),
            target: target.map(|(k, v)| (k.to_string(), v.to_string())),
            inclusive: true,
            timeline: "latest".into(),
            action: "promote".into(),
        }
    }

    #[test]
    fn replaces_old_recovery_settings() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            "work_mem = '8MB'\nrestore_command = 'cp /x/%f %p'\narchive_mode = on\n# recovery_target_time = 'x'\n",
        )
        .unwrap();
        let s = settings(Some(("recovery_target_time", "2026-11-22 10:00:00+00")));
        let commented = write(d.path(), Some(&s), true).unwrap();
        assert_eq!(commented.len(), 2);
        let t = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert!(t.contains("work_mem = '8MB'\n"));
        assert!(t.contains("# pgcairn restore: restore_command = 'cp /x/%f %p'"));
        assert_eq!(value_of(&t, "restore_command").unwrap(), s.restore_command);
        assert_eq!(
            value_of(&t, "recovery_target_time").unwrap(),
            "2026-11-22 10:00:00+00"
        );
        assert!(t.contains("archive_mode = 'off'"));
        assert!(d.path().join("recovery.signal").exists());
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    /// Every replaced setting gets a value, so one left in postgresql.conf
    /// cannot add a second target or change where recovery stops; the
    /// unused targets come before the chosen one.
    #[test]
    fn every_replaced_setting_is_given_a_value() {
        let d = tempfile::tempdir().unwrap();
        let s = settings(Some(("recovery_target_name", "pre\\migration 'x'\nnext")));
        write(d.path(), Some(&s), false).unwrap();
        let t = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        for k in REPLACED {
            assert!(value_of(&t, k).is_some(), "{k} missing in {t}");
        }
        assert_eq!(
            value_of(&t, "recovery_target_name").unwrap(),
            "pre\\migration 'x'\nnext"
        );
        assert_eq!(value_of(&t, "recovery_target_xid").unwrap(), "");
        let pos = |k: &str| t.find(&format!("\n{k} = ")).unwrap();
        for k in TARGETS.iter().filter(|k| **k != "recovery_target_name") {
            assert!(pos(k) < pos("recovery_target_name"), "{k} after the target");
        }
        assert_eq!(value_of(&t, "recovery_target_inclusive").unwrap(), "on");
        assert_eq!(value_of(&t, "archive_cleanup_command").unwrap(), "");
        assert!(!t.contains("archive_mode"));
    }

    /// A target in postgresql.conf spelled in other capitals is commented
    /// out there; lowercase ones are overridden by the explicit values.
    #[test]
    fn mixed_case_targets_in_postgresql_conf_are_commented_out() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postgresql.conf"),
            "Recovery_Target_Time = 'x'\nrecovery_target_name = 'y'\nwork_mem = '4MB'\n",
        )
        .unwrap();
        let commented = write(d.path(), Some(&settings(None)), false).unwrap();
        assert_eq!(
            commented,
            vec!["Recovery_Target_Time = 'x' (postgresql.conf)".to_string()]
        );
        let t = std::fs::read_to_string(d.path().join("postgresql.conf")).unwrap();
        assert_eq!(
            t,
            "# pgcairn restore: Recovery_Target_Time = 'x'\nrecovery_target_name = 'y'\nwork_mem = '4MB'\n"
        );
    }

    /// Configuration files are bytes to PostgreSQL: Latin-1 in a comment
    /// or a value is kept byte for byte, never an error after a restore.
    #[test]
    fn latin1_configuration_files_are_kept_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let conf = b"# Einstellungen f\xfcr den Server\nRecovery_Target_Time = 'x'\ncluster_name = 'M\xfcnchen'".to_vec();
        let auto =
            b"# f\xfcr\nrecovery_min_apply_delay = '4h'\napplication_name = '\xe9t\xe9'\n".to_vec();
        std::fs::write(d.path().join("postgresql.conf"), &conf).unwrap();
        std::fs::write(d.path().join("postgresql.auto.conf"), &auto).unwrap();
        let commented = write(d.path(), Some(&settings(None)), true).unwrap();
        assert_eq!(commented.len(), 2, "{commented:?}");
        let c = std::fs::read(d.path().join("postgresql.conf")).unwrap();
        assert_eq!(
            c,
            b"# Einstellungen f\xfcr den Server\n# pgcairn restore: Recovery_Target_Time = 'x'\ncluster_name = 'M\xfcnchen'\n"
        );
        let a = std::fs::read(d.path().join("postgresql.auto.conf")).unwrap();
        assert!(a.starts_with(
            b"# f\xfcr\n# pgcairn restore: recovery_min_apply_delay = '4h'\napplication_name = '\xe9t\xe9'\n"
        ));
        let t = String::from_utf8_lossy(&a);
        assert_eq!(value_of(&t, "recovery_min_apply_delay").unwrap(), "0");
        assert_eq!(value_of(&t, "archive_mode").unwrap(), "off");
    }

    /// Without recovery, only archive_mode is written, and no signal file.
    #[test]
    fn archive_mode_off_without_recovery() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            "archive_mode = 'on'\nrestore_command = 'x'\n",
        )
        .unwrap();
        let commented = write(d.path(), None, true).unwrap();
        assert_eq!(commented, vec!["archive_mode = 'on'".to_string()]);
        let t = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert_eq!(value_of(&t, "archive_mode").unwrap(), "off");
        assert_eq!(value_of(&t, "restore_command").unwrap(), "x");
        assert!(!d.path().join("recovery.signal").exists());
        let e = tempfile::tempdir().unwrap();
        assert!(write(e.path(), None, false).unwrap().is_empty());
        assert!(!e.path().join("postgresql.auto.conf").exists());
    }

    #[test]
    fn restore_command_arguments_keep_percent_signs() {
        assert_eq!(command_arg("/a%b"), "'/a%%b'");
    }
}
