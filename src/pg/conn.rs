//! The backup session: one dedicated connection for the whole backup (no
//! pool, no reconnect: the non-exclusive backup API ties the backup to this
//! session, so a broken session must fail the backup), `search_path` pinned,
//! statement and idle timeouts off, TCP keepalives on.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

use super::wal::Lsn;
use super::{PgError, Result};

pub struct Session {
    client: Client,
    conn: tokio::task::JoinHandle<std::result::Result<(), tokio_postgres::Error>>,
    pub version_num: i32,
}

/// Facts about the server a backup records and checks.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version_num: i32,
    pub version: String,
    pub system_identifier: u64,
    pub data_directory: String,
    pub wal_segment_size: u64,
    pub block_size: u32,
    pub data_checksums: bool,
    pub in_recovery: bool,
    pub archive_mode: String,
    pub archive_command: String,
    pub timeline: u32,
    /// Relation segment file size (`--with-segsize`; 1 GiB by default).
    pub segment_size: u64,
}

/// The timeline a backup started on, from its backup_label (recovery reads
/// the same line). Right after a promotion `pg_control_checkpoint()` still
/// names the old timeline until the end-of-recovery checkpoint is done.
pub fn label_start_timeline(backup_label: &str) -> Option<u32> {
    backup_label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|t| t.trim().parse().ok())
}

#[derive(Debug, Clone)]
pub struct Tablespace {
    pub oid: u32,
    pub name: String,
    pub location: String,
}

#[derive(Debug, Clone)]
pub struct BackupStop {
    pub lsn: Lsn,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
}

/// `conninfo` fit to print: a password (`password=...`, or in a URI's user
/// info or query) is shown as `***`, so `check`'s output and connection
/// errors in cron mail do not carry it.
pub fn redact(conninfo: &str) -> String {
    const MASK: &str = "***";
    let t = conninfo.trim_start();
    if let Some(rest) = t
        .strip_prefix("postgresql://")
        .or_else(|| t.strip_prefix("postgres://"))
    {
        let scheme = &t[..t.len() - rest.len()];
        let (main, query) = match rest.split_once('?') {
            Some((m, q)) => (m, Some(q)),
            None => (rest, None),
        };
        let auth_end = main.find('/').unwrap_or(main.len());
        let (auth, path) = main.split_at(auth_end);
        let auth = match auth.rsplit_once('@') {
            Some((user, hosts)) => match user.split_once(':') {
                Some((u, _)) => format!("{u}:{MASK}@{hosts}"),
                None => auth.to_string(),
            },
            None => auth.to_string(),
        };
        let mut out = format!("{scheme}{auth}{path}");
        if let Some(q) = query {
            let params: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "password" => format!("{k}={MASK}"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
        return out;
    }
    // key = value pairs; values may be single-quoted with backslash escapes.
    let mut out = String::new();
    let mut chars = conninfo.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            out.push(c);
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        out.push_str(&key);
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        out.push('=');
        chars.next();
        while let Some(&c) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            out.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            value.push('\'');
            chars.next();
            while let Some(c) = chars.next() {
                value.push(c);
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else if c == '\'' {
                    break;
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                }
            }
        }
        out.push_str(if key == "password" { MASK } else { &value });
    }
    out
}

/// libpq's password sources, which tokio-postgres does not read: with no
/// password in the conninfo, `PGPASSWORD`, then the password file
/// (`PGPASSFILE`, or `~/.pgpass`, ignored unless it is private, as libpq
/// does). A DBA's existing `.pgpass` works as it does for pgBackRest.
fn fill_password(cfg: &mut Config) -> Result<()> {
    if cfg.get_password().is_some() {
        return Ok(());
    }
    if let Some(pw) = std::env::var_os("PGPASSWORD").filter(|p| !p.is_empty()) {
        cfg.password(pw.as_encoded_bytes());
        return Ok(());
    }
    let path = match std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => std::path::PathBuf::from(h).join(".pgpass"),
            None => return Ok(()),
        },
    };
    // As libpq: a file that cannot be read, or that others can read, is
    // ignored (a connection that needs no password must not fail on it).
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
        return Ok(());
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    // tokio-postgres, like libpq, connects as the operating system's user
    // when the conninfo names none.
    let Some(user) = cfg.get_user().map(str::to_string).or_else(effective_user) else {
        return Ok(());
    };
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        // libpq reads a socket in the default directory as localhost.
        Some(tokio_postgres::config::Host::Unix(p))
            if !DEFAULT_SOCKET_DIRS
                .iter()
                .any(|d| p == std::path::Path::new(d)) =>
        {
            p.to_string_lossy().into_owned()
        }
        _ => "localhost".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = cfg.get_dbname().unwrap_or(&user).to_string();
    if let Some(pw) = pgpass_lookup(&text, &host, &port, &db, &user) {
        cfg.password(pw);
    }
    Ok(())
}

/// The effective user's name from the password database, the user
/// tokio-postgres and libpq connect as when the conninfo names none
/// (`$USER` may be unset, in a container, or someone else's, under sudo).
fn effective_user() -> Option<String> {
    let mut len = 16 * 1024;
    loop {
        let mut buf = vec![0u8; len];
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r
        // writes only into it and `buf` (whose length it is given), and
        // `result` points into `pw` or is null. The name is copied out
        // while `buf` lives.
        let (rc, name) = unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwuid_r(
                libc::geteuid(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            );
            let name = (rc == 0 && !result.is_null() && !pw.pw_name.is_null())
                .then(|| {
                    std::ffi::CStr::from_ptr(pw.pw_name)
                        .to_str()
                        .ok()
                        .map(str::to_string)
                })
                .flatten();
            (rc, name)
        };
        match rc {
            libc::ERANGE if len < 1 << 20 => len *= 4,
            _ => return name,
        }
    }
}

/// Where distributions' libpq looks for the server's socket by default.
const DEFAULT_SOCKET_DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// The first `.pgpass` line matching host, port, database and user (`*`
/// matches anything; `\:` and `\\` are escapes), as libpq reads it.
fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // Five fields split at unescaped colons (the password too ends at
        // one, as libpq reads it); `\\` escapes the next character.
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                ':' => break,
                _ => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let m = |f: &str, v: &str| f == "*" || f == v;
        if m(&fields[0], host) && m(&fields[1], port) && m(&fields[2], db) && m(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

fn q(what: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
    move |source| PgError::Query {
        what: what.to_string(),
        source,
    }
}

impl Session {
    pub async fn connect(conninfo: &str) -> Result<Session> {
        let mut cfg = Config::from_str(conninfo).map_err(|source| PgError::Connect {
            conninfo: redact(conninfo),
            source,
        })?;
        fill_password(&mut cfg)?;
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("pgcairn");
        let (client, connection) = cfg
            .connect(NoTls)
            .await
            .map_err(|source| PgError::Connect {
                conninfo: redact(conninfo),
                source,
            })?;
        let conn = tokio::spawn(connection);
        client
            .batch_execute(
                "SET search_path = pg_catalog; SET statement_timeout = 0; \
                 SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0;",
            )
            .await
            .map_err(q("session setup"))?;
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(q("server version"))?;
        let version_num: i32 = row.get(0);
        if version_num >= 140000 {
            client
                .batch_execute("SET idle_session_timeout = 0")
                .await
                .map_err(q("session setup"))?;
        }
        if version_num >= 170000 {
            // It also limits a single statement: pg_backup_start waiting
            // for a spread checkpoint.
            client
                .batch_execute("SET transaction_timeout = 0")
                .await
                .map_err(q("session setup"))?;
        }
        Ok(Session {
            client,
            conn,
            version_num,
        })
    }

    /// Fails once the connection has broken (so a backup cannot carry on
    /// as if its backup session were alive).
    pub fn is_broken(&self) -> bool {
        self.client.is_closed() || self.conn.is_finished()
    }

    pub async fn server_info(&self) -> Result<ServerInfo> {
        let c = &self.client;
        let row = c
            .query_one(
                "SELECT current_setting('server_version'), \
                        (SELECT system_identifier::text FROM pg_control_system()), \
                        current_setting('data_directory'), \
                        current_setting('wal_segment_size'), \
                        current_setting('block_size')::int, \
                        current_setting('data_checksums') = 'on', \
                        pg_is_in_recovery(), \
                        current_setting('archive_mode'), \
                        current_setting('archive_command'), \
                        (SELECT timeline_id FROM pg_control_checkpoint()), \
                        current_setting('segment_size')",
                &[],
            )
            .await
            .map_err(q("server facts"))?;
        let sysid: String = row.get(1);
        let seg: String = row.get(3);
        let segsize: String = row.get(10);
        Ok(ServerInfo {
            version_num: self.version_num,
            version: row.get(0),
            system_identifier: sysid
                .parse()
                .map_err(|_| PgError::Refused(format!("bad system identifier {sysid:?}")))?,
            data_directory: row.get(2),
            wal_segment_size: parse_size(&seg)
                .ok_or_else(|| PgError::Refused(format!("bad wal_segment_size {seg:?}")))?,
            block_size: row.get::<_, i32>(4) as u32,
            data_checksums: row.get(5),
            in_recovery: row.get(6),
            archive_mode: row.get(7),
            archive_command: row.get(8),
            timeline: row.get::<_, i32>(9) as u32,
            segment_size: parse_size(&segsize)
                .ok_or_else(|| PgError::Refused(format!("bad segment_size {segsize:?}")))?,
        })
    }

    pub async fn tablespaces(&self) -> Result<Vec<Tablespace>> {
        let rows = self
            .client
            .query(
                "SELECT oid::int8, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace \
                 WHERE pg_tablespace_location(oid) <> '' ORDER BY oid",
                &[],
            )
            .await
            .map_err(q("tablespaces"))?;
        Ok(rows
            .iter()
            .map(|r| Tablespace {
                oid: r.get::<_, i64>(0) as u32,
                name: r.get(1),
                location: r.get(2),
            })
            .collect())
    }

    /// A temporary physical slot reserving WAL from now on; it disappears
    /// with the session.
    pub async fn create_temp_slot(&self, name: &str) -> Result<()> {
        self.client
            .query_one(
                "SELECT pg_create_physical_replication_slot($1, true, true)",
                &[&name],
            )
            .await
            .map_err(q("create temporary replication slot"))?;
        Ok(())
    }

    /// Start a non-exclusive backup; returns the start LSN.
    pub async fn backup_start(&self, label: &str, fast: bool) -> Result<Lsn> {
        let sql = if self.version_num >= 150000 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        let row = self
            .client
            .query_one(sql, &[&label, &fast])
            .await
            .map_err(q("backup start"))?;
        let s: String = row.get(0);
        s.parse().map_err(PgError::Refused)
    }

    /// Stop the backup without waiting for archiving (the backup checks
    /// the WAL itself).
    pub async fn backup_stop(&self) -> Result<BackupStop> {
        let sql = if self.version_num >= 150000 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(q("backup stop"))?;
        let lsn: String = row.get(0);
        let map: Option<String> = row.get(2);
        Ok(BackupStop {
            lsn: lsn.parse().map_err(PgError::Refused)?,
            backup_label: row.get(1),
            tablespace_map: map.filter(|m| !m.is_empty()),
        })
    }

    /// `pg_walfile_name(lsn)`: the segment holding the byte before `lsn`.
    pub async fn walfile_name(&self, lsn: Lsn) -> Result<String> {
        let row = self
            .client
            .query_one(
                "SELECT pg_walfile_name($1::text::pg_lsn)",
                &[&lsn.to_string()],
            )
            .await
            .map_err(q("pg_walfile_name"))?;
        Ok(row.get(0))
    }

    /// The last WAL file the archiver archived successfully, if any, and
    /// whether archiving is failing now (a failure after that success, per
    /// `pg_stat_archiver`).
    pub async fn archiver_status(&self) -> Result<(Option<String>, bool)> {
        let row = self
            .client
            .query_one(
                "SELECT last_archived_wal, \
                        last_failed_time IS NOT NULL \
                        AND (last_archived_time IS NULL OR last_failed_time > last_archived_time) \
                 FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(q("pg_stat_archiver"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Commit a transaction that has an xid, so that there is WAL to switch
    /// away from.
    pub async fn commit_marker(&self) -> Result<()> {
        self.client
            .batch_execute("SELECT txid_current()")
            .await
            .map_err(q("txid_current"))
    }

    /// Force a WAL switch; returns the switch LSN.
    pub async fn switch_wal(&self) -> Result<Lsn> {
        let row = self
            .client
            .query_one("SELECT pg_switch_wal()::text", &[])
            .await
            .map_err(q("pg_switch_wal"))?;
        let s: String = row.get(0);
        s.parse().map_err(PgError::Refused)
    }
}

/// `16MB`, `1GB`, `8kB` as PostgreSQL prints sizes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mul = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1024,
        "MB" => 1024 * 1024,
        "GB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    Some(n * mul)
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        use super::redact;
        assert_eq!(
            redact("host=db user=backup password=s3cret dbname=postgres"),
            "host=db user=backup password=*** dbname=postgres"
        );
        assert_eq!(
            redact("host=db password = 'a b\\' c' port=5432"),
            "host=db password = *** port=5432"
        );
        assert_eq!(
            redact("postgresql://backup:s3cret@db:5432/postgres?sslmode=disable&password=x"),
            "postgresql://backup:***@db:5432/postgres?sslmode=disable&password=***"
        );
        assert_eq!(
            redact("postgres://backup@db/postgres"),
            "postgres://backup@db/postgres"
        );
        assert_eq!(redact("host=/tmp user=x"), "host=/tmp user=x");
    }

    #[test]
    fn the_effective_user_is_named() {
        assert!(super::effective_user().is_some_and(|u| !u.is_empty()));
    }

    #[test]
    fn pgpass_lines_match_as_libpq_reads_them() {
        use super::pgpass_lookup;
        let text = "# comment\n\
                    db:5432:other:backup:no\n\
                    db:*:postgres:backup:pa\\:ss:word\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db", "5433", "postgres", "backup").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            pgpass_lookup(text, "localhost", "5432", "x", "y").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("db:5432:d:u\n", "db", "5432", "d", "u"), None);
    }

    #[test]
    fn start_timeline_from_a_backup_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000020000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n\
                     BACKUP FROM: primary\nSTART TIME: 2026-11-24 09:00:00 UTC\n\
                     LABEL: x\nSTART TIMELINE: 2\n";
        assert_eq!(super::label_start_timeline(label), Some(2));
        assert_eq!(super::label_start_timeline("LABEL: x\n"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("16MB"), Some(16 << 20));
        assert_eq!(super::parse_size("1GB"), Some(1 << 30));
        assert_eq!(super::parse_size("8kB"), Some(8192));
        assert_eq!(super::parse_size("x"), None);
    }
}
