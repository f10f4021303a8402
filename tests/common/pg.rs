//! Real PostgreSQL clusters for end-to-end tests: initdb, pg_ctl, psql, run
//! as a non-root user when the tests run as root (PostgreSQL refuses root).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const TEST_USER: &str = "pgcairn-test";

pub fn pg_bin() -> PathBuf {
    PathBuf::from(
        std::env::var("PGCAIRN_TEST_PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as the cluster's OS user.
pub fn as_user(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg(TEST_USER).arg("--").arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn run_ok(c: &mut Command) -> String {
    let o = c.stdin(Stdio::null()).output().expect("spawn");
    assert!(o.status.success(), "{:?} failed: {}", c, text(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A directory the cluster's user owns (so PostgreSQL and pgcairn, run as
/// that user, can use it).
pub fn user_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("pgcairn-t")
        .tempdir_in("/tmp")
        .expect("tempdir");
    chown(d.path());
    d
}

pub fn chown(p: &Path) {
    if is_root() {
        let s = Command::new("chown")
            .arg("-R")
            .arg(format!("{TEST_USER}:"))
            .arg(p)
            .status()
            .expect("chown");
        assert!(s.success());
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub struct Cluster {
    pub pgdata: PathBuf,
    pub sockdir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    running: bool,
}

impl Cluster {
    /// initdb with data checksums into `dir/name`.
    pub fn init(dir: &Path, name: &str, extra: &[&str]) -> Cluster {
        let pgdata = dir.join(name);
        let sockdir = dir.join(format!("{name}-sock"));
        std::fs::create_dir_all(&sockdir).expect("sockdir");
        chown(&sockdir);
        let mut c = as_user(pg_bin().join("initdb"));
        c.args(["-k", "-A", "trust", "-U", "postgres", "-D"])
            .arg(&pgdata)
            .args(extra);
        run_ok(&mut c);
        Cluster {
            log: dir.join(format!("{name}.log")),
            pgdata,
            sockdir,
            port: free_port(),
            running: false,
        }
    }

    /// A cluster around an existing (restored) data directory.
    pub fn existing(pgdata: &Path, dir: &Path, name: &str) -> Cluster {
        let sockdir = dir.join(format!("{name}-sock"));
        std::fs::create_dir_all(&sockdir).expect("sockdir");
        chown(&sockdir);
        Cluster {
            log: dir.join(format!("{name}.log")),
            pgdata: pgdata.to_path_buf(),
            sockdir,
            port: free_port(),
            running: false,
        }
    }

    pub fn append_conf(&self, lines: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.pgdata.join("postgresql.conf"))
            .expect("conf");
        f.write_all(lines.as_bytes()).expect("write conf");
    }

    pub fn try_start(&mut self) -> Output {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=''",
            self.port,
            self.sockdir.display()
        );
        let o = as_user(pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-w", "-t", "300", "-o", &opts, "-l"])
            .arg(&self.log)
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl");
        if o.status.success() {
            self.running = true;
        }
        o
    }

    pub fn start(&mut self) {
        let o = self.try_start();
        assert!(
            o.status.success(),
            "pg_ctl start failed: {}\nlog:\n{}",
            text(&o),
            self.log_text()
        );
    }

    pub fn stop(&mut self) {
        run_ok(
            as_user(pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(&self.pgdata)
                .args(["-w", "-m", "fast", "stop"]),
        );
        self.running = false;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sockdir.display(),
            self.port
        )
    }

    pub fn psql(&self, sql: &str) -> String {
        run_ok(
            as_user(pg_bin().join("psql"))
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(&self.sockdir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                    sql,
                ]),
        )
        .trim()
        .to_string()
    }

    pub fn pgbench(&self, args: &[&str]) -> Command {
        let mut c = as_user(pg_bin().join("pgbench"));
        c.arg("-h")
            .arg(&self.sockdir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres");
        c
    }
}

impl Cluster {
    /// Poll (bounded) until PostgreSQL reports `segment` archived.
    pub fn wait_archived(&self, segment: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let last = self.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            if last.as_str() >= segment {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{segment} not archived (last {last}):\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Switch to a new WAL segment and wait until the old one is archived.
    pub fn switch_and_wait(&self) {
        let seg = self.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
        self.psql("SELECT pg_switch_wal()");
        self.wait_archived(&seg);
    }
}

impl Cairn {
    /// A passphrase file PostgreSQL's archive_command can read (0600, the
    /// cluster user's).
    pub fn passphrase_file(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let pw = dir.join("passphrase");
        std::fs::write(&pw, "test-pass\n").expect("passphrase file");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        chown(&pw);
        pw
    }

    /// `pgcairn ... archive-push --server main` (without `%p`), as
    /// PostgreSQL runs it.
    pub fn archive_push_command(&self, dir: &Path) -> String {
        format!(
            "{} --repo {} --cache-dir {} --passphrase-file {} archive-push --server main",
            env!("CARGO_BIN_EXE_pgcairn"),
            self.repo,
            self.cache.display(),
            self.passphrase_file(dir).display()
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_user(pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(&self.pgdata)
                .args(["-w", "-m", "immediate", "stop"])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// pgcairn, run as the cluster's user, with a test repository.
pub struct Cairn {
    pub repo: String,
    pub cache: PathBuf,
}

impl Cairn {
    pub fn new(dir: &Path) -> Cairn {
        Cairn::with_init(dir, &[])
    }

    pub fn with_init(dir: &Path, init_args: &[&str]) -> Cairn {
        let c = Cairn {
            repo: dir.join("repo").to_string_lossy().to_string(),
            cache: dir.join("cache"),
        };
        let mut args = vec!["init"];
        args.extend_from_slice(init_args);
        let o = c.run(&args, &[("PGCAIRN_NEW_PASSPHRASE", "test-pass")]);
        assert!(o.status.success(), "init: {}", text(&o));
        c
    }

    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env).output().expect("pgcairn")
    }

    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = as_user(env!("CARGO_BIN_EXE_pgcairn"));
        c.args(args)
            .env("PGCAIRN_REPO", &self.repo)
            .env("PGCAIRN_CACHE_DIR", &self.cache)
            .env("PGCAIRN_PASSPHRASE", "test-pass")
            .env("PGCAIRN_KDF", "1024,1,1")
            .env_remove("PGCAIRN_CONFIG")
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        if is_root() {
            // runuser resets nothing we set, but HOME must be the user's.
            c.env("HOME", "/tmp");
        }
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args, &[]);
        assert!(o.status.success(), "pgcairn {args:?} failed: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// `backup --server SERVER --pgdata --conninfo` of cluster `c`, then `extra`.
    pub fn backup_args(c: &Cluster, server: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "backup".into(),
            "--server".into(),
            server.into(),
            "--pgdata".into(),
            c.pgdata.to_string_lossy().into(),
            "--conninfo".into(),
            c.conninfo(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// A backup of `c` as `server` that must succeed; its output.
    pub fn backup(&self, c: &Cluster, server: &str, extra: &[&str]) -> String {
        let args = Cairn::backup_args(c, server, extra);
        self.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}
