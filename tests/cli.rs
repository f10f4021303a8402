//! The `pgcairn` binary as a user runs it: exit codes and messages.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn repo(&self) -> String {
        self.dir.path().join("repo").to_string_lossy().to_string()
    }
    fn cmd(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pgcairn"));
        c.args(args)
            .env_remove("PGCAIRN_PASSPHRASE")
            .env_remove("PGCAIRN_NEW_PASSPHRASE")
            .env_remove("PGCAIRN_PASSPHRASE_FILE")
            .env_remove("PGCAIRN_PASSPHRASE_COMMAND")
            .env("PGCAIRN_REPO", self.repo())
            .env("PGCAIRN_CACHE_DIR", self.dir.path().join("cache"))
            .env("PGCAIRN_KDF", "1024,1,1")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn init_info_and_wrong_passphrase() {
    let e = Env::new();
    let o = e.cmd(&["init"], &[("PGCAIRN_NEW_PASSPHRASE", "s3cret")]);
    assert!(o.status.success(), "{}", text(&o));
    let o = e.cmd(
        &["info", "--format", "json"],
        &[("PGCAIRN_PASSPHRASE", "s3cret")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format_version"], 2);
    assert_eq!(v["encryption"], "xchacha20poly1305");
    assert_eq!(v["keys"], 1);

    let o = e.cmd(&["info"], &[("PGCAIRN_PASSPHRASE", "wrong")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("wrong passphrase"), "{}", text(&o));
    assert!(
        text(&o).contains("passphrase from PGCAIRN_PASSPHRASE"),
        "{}",
        text(&o)
    );

    // No passphrase source and no terminal: a clear error, not a hang.
    let o = e.cmd(&["info"], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("PGCAIRN_PASSPHRASE"), "{}", text(&o));

    // A second init is refused.
    let o = e.cmd(&["init"], &[("PGCAIRN_NEW_PASSPHRASE", "x")]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already exists"), "{}", text(&o));
}

#[test]
fn passphrase_file_must_be_private() {
    let e = Env::new();
    let f = e.dir.path().join("pw");
    std::fs::write(&f, "filepass\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fp = f.to_string_lossy().to_string();
    let o = e.cmd(&["init", "--passphrase-file", &fp], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = e.cmd(&["init", "--passphrase-file", &fp], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = e.cmd(&["key", "list", "--passphrase-file", &fp], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(current)"));
}

#[test]
fn key_add_and_passwd() {
    let e = Env::new();
    assert!(e
        .cmd(&["init"], &[("PGCAIRN_NEW_PASSPHRASE", "one")])
        .status
        .success());
    let o = e.cmd(
        &["key", "add"],
        &[
            ("PGCAIRN_PASSPHRASE", "one"),
            ("PGCAIRN_NEW_PASSPHRASE", "two"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = e.cmd(
        &["key", "passwd"],
        &[
            ("PGCAIRN_PASSPHRASE", "one"),
            ("PGCAIRN_NEW_PASSPHRASE", "three"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!e
        .cmd(&["info"], &[("PGCAIRN_PASSPHRASE", "one")])
        .status
        .success());
    assert!(e
        .cmd(&["info"], &[("PGCAIRN_PASSPHRASE", "two")])
        .status
        .success());
    assert!(e
        .cmd(&["info"], &[("PGCAIRN_PASSPHRASE", "three")])
        .status
        .success());
}

#[test]
fn unencrypted_repository_says_it_is_readable() {
    let e = Env::new();
    let o = e.cmd(&["init", "--encryption", "none"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("NOT encrypted"), "{}", text(&o));
    let o = e.cmd(&["info"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("NOT encrypted"));
}

#[test]
fn missing_repository_is_named() {
    let e = Env::new();
    let o = e.cmd(&["info"], &[("PGCAIRN_PASSPHRASE", "x")]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&e.repo()) && text(&o).contains("pgcairn init"),
        "{}",
        text(&o)
    );
}

/// Recovery options that PostgreSQL ignores without a target are refused
/// rather than silently turned into a promotion.
#[test]
fn restore_options_that_need_a_target() {
    let e = Env::new();
    let t = e.dir.path().join("t");
    let t = t.to_str().unwrap();
    let o = e.cmd(
        &["restore", "latest", t, "--target-action", "shutdown"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("needs a recovery target"), "{}", text(&o));
    let o = e.cmd(&["restore", "latest", t, "--target-exclusive"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = e.cmd(
        &[
            "restore",
            "latest",
            t,
            "--target-name",
            "x",
            "--target-exclusive",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!e.dir.path().join("t").exists());
}

#[test]
fn config_file_and_passphrase_command() {
    let e = Env::new();
    let cfg = e.dir.path().join("pgcairn.toml");
    let other = e.dir.path().join("other-repo");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = {:?}\npassphrase_command = \"printf cmd-pass\"\n",
            other.to_string_lossy()
        ),
    )
    .unwrap();
    let c = cfg.to_string_lossy().to_string();
    // --repo from the environment would win over the file; drop it.
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcairn"));
        cmd.args(args)
            .env_remove("PGCAIRN_REPO")
            .env_remove("PGCAIRN_PASSPHRASE")
            .env_remove("PGCAIRN_NEW_PASSPHRASE")
            .env("PGCAIRN_CACHE_DIR", e.dir.path().join("cache"))
            .env("PGCAIRN_KDF", "1024,1,1")
            .stdin(std::process::Stdio::null());
        cmd.output().unwrap()
    };
    let o = run(&["--config", &c, "init"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        other.join("config").exists(),
        "repository created at the config file's url"
    );
    let o = run(&["--config", &c, "info", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    // The command's output is the passphrase: a wrong one fails.
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = {:?}\npassphrase_command = \"printf nope\"\n",
            other.to_string_lossy()
        ),
    )
    .unwrap();
    let o = run(&["--config", &c, "info"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong passphrase"), "{}", text(&o));
    assert!(
        text(&o).contains("passphrase_command in the config file (`printf nope`)"),
        "{}",
        text(&o)
    );
    // A relative script in the config's command runs beside the file,
    // wherever pgcairn runs (PostgreSQL runs archive_command in pgdata).
    let script = e.dir.path().join("pw.sh");
    std::fs::write(&script, "#!/bin/sh\nprintf cmd-pass\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = {:?}\npassphrase_command = \"./pw.sh\"\n",
            other.to_string_lossy()
        ),
    )
    .unwrap();
    let o = run(&["--config", &c, "info", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    // The environment beats the config file, as for every setting.
    let with_env = |k: &str, v: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcairn"));
        cmd.args(["--config", &c, "info"])
            .env_remove("PGCAIRN_REPO")
            .env_remove("PGCAIRN_PASSPHRASE")
            .env_remove("PGCAIRN_PASSPHRASE_FILE")
            .env_remove("PGCAIRN_PASSPHRASE_COMMAND")
            .env("PGCAIRN_CACHE_DIR", e.dir.path().join("cache"))
            .env(k, v)
            .stdin(std::process::Stdio::null());
        cmd.output().unwrap()
    };
    let o = with_env("PGCAIRN_PASSPHRASE_COMMAND", "printf cmd-pass");
    assert!(o.status.success(), "{}", text(&o));
    let pw = e.dir.path().join("pw");
    std::fs::write(&pw, "cmd-pass\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = with_env("PGCAIRN_PASSPHRASE_FILE", &pw.to_string_lossy());
    assert!(o.status.success(), "{}", text(&o));
    // A command that prints nothing is named, not called a wrong passphrase.
    let o = with_env("PGCAIRN_PASSPHRASE_COMMAND", "true");
    assert!(!o.status.success());
    assert!(text(&o).contains("printed nothing"), "{}", text(&o));
    // An unknown key in the file is an error that names the file.
    std::fs::write(&cfg, "[repository]\nurll = \"x\"\n").unwrap();
    let o = run(&["--config", &c, "info"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("pgcairn.toml"), "{}", text(&o));
}

#[test]
fn argument_errors_and_bad_levels() {
    let e = Env::new();
    // restore_command: any failure, a bad argument included, is 255, so
    // that PostgreSQL does not take it for "absent" and end recovery.
    let o = e.cmd(&["archive-get", "--no-such-flag", "a", "b"], &[]);
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));
    let o = e.cmd(&["list", "--no-such-flag"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(e.cmd(&["--version"], &[]).status.success());
    // A compression level zstd would clamp is refused, naming the fix.
    let o = e.cmd(
        &["init", "--compression", "50"],
        &[("PGCAIRN_NEW_PASSPHRASE", "x")],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("from 1 to 22"), "{}", text(&o));
    assert!(!e.dir.path().join("repo").join("config").exists());
}
