//! Command-line definitions (clap). `main.rs` parses these and hands them to
//! [`crate::commands::run`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "pgcairn",
    version,
    about = "PostgreSQL backup and point-in-time recovery into a deduplicating, encrypted repository"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Repository location: a path, file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix.
    #[arg(long, global = true, env = "PGCAIRN_REPO")]
    pub repo: Option<String>,
    /// TOML configuration file [default: /etc/pgcairn/pgcairn.toml if present].
    #[arg(long, global = true, env = "PGCAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// File holding the passphrase (mode 0600, owned by you).
    #[arg(long, global = true)]
    pub passphrase_file: Option<PathBuf>,
    /// Directory for cached index objects [default: ~/.cache/pgcairn].
    #[arg(long, global = true, env = "PGCAIRN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Manage the passphrases that unlock the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Show the repository's format, size and deduplication.
    Info,
    /// Back up a running PostgreSQL cluster.
    Backup(BackupArgs),
    /// List backups.
    List(ServerArg),
    /// Show one backup (an id or `latest`).
    Show(ShowArgs),
    /// Restore a backup (an id or `latest`) into a directory.
    Restore(RestoreArgs),
    /// Check repository, connection, archiving and the newest backup's WAL.
    Check(CheckArgs),
    /// Prove backups restorable: every referenced chunk indexed and stored,
    /// every backup's WAL archived; `--read-data` re-hashes stored data.
    Verify(VerifyArgs),
    /// Apply the retention policy: remove obsolete backups, then the WAL no
    /// retained backup or the promised recovery window needs.
    Expire(ExpireArgs),
    /// Remove one backup (an id or `latest`), and WAL only it needed.
    Delete(DeleteArgs),
    /// Pin a backup so no retention policy removes it (`--release` unpins).
    Keep(KeepArgs),
    /// Collect garbage: delete what no backup or WAL file references
    /// (two-phase, safe while backups and archiving run).
    Gc(GcArgs),
    /// archive_command: store one WAL file (`pgcairn archive-push %p`).
    ArchivePush(ArchivePushArgs),
    /// restore_command: fetch one WAL file (`pgcairn archive-get %f %p`).
    /// Exits 1 only when the file is confirmed absent, 255 on any failure.
    ArchiveGet(ArchiveGetArgs),
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Compute and print what a run would do; write and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Lengthen the repository's grace period (seconds) for this run. It
    /// cannot be shortened: running backups rely on the configured one.
    #[arg(long, value_name = "SECS")]
    pub grace_period: Option<i64>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Verify only this backup (an id or `latest`); default: every backup.
    pub id: Option<String>,
    /// Also download, authenticate, decompress and re-hash stored data:
    /// all of it, or PERCENT of the pack bytes per run, continuing where the
    /// last run stopped so that repeated runs cover everything.
    #[arg(long, value_name = "PERCENT", num_args = 0..=1, default_missing_value = "100",
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub read_data: Option<u8>,
}

#[derive(Debug, Args)]
pub struct ExpireArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the N newest complete backups (overrides retention_policy;
    /// REDUNDANCY N).
    #[arg(long, value_name = "N", conflicts_with = "keep_within",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_last: Option<u32>,
    /// Keep what recovery to any point in this window needs: 7d, 2w, 3m (a
    /// month is 31 days; overrides retention_policy).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Overrides minimum_redundancy.
    #[arg(long, value_name = "N")]
    pub minimum_redundancy: Option<u32>,
    /// Then run one garbage collection (`pgcairn gc`), so cron runs one
    /// command.
    #[arg(long, conflicts_with = "dry_run")]
    pub gc: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Backup id, or `latest`.
    pub id: String,
    /// Delete even if fewer than minimum_redundancy complete backups remain.
    #[arg(long)]
    pub force: bool,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct KeepArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Backup id, or `latest`.
    pub id: String,
    /// Unpin instead.
    #[arg(long)]
    pub release: bool,
    /// Why it is kept (shown by `show`).
    #[arg(long, conflicts_with = "release")]
    pub note: Option<String>,
    /// What is kept besides the backup (Barman's `keep --target`):
    /// `standalone`, its own WAL (restorable to its end); `full`, every WAL
    /// file from its start on (restorable to any later point).
    #[arg(long, value_enum, default_value_t = KeepTarget::Standalone, conflicts_with = "release")]
    pub target: KeepTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeepTarget {
    Standalone,
    Full,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub server: ServerArg,
    #[arg(long, env = "PGCAIRN_CONNINFO")]
    pub conninfo: Option<String>,
    /// Seconds to wait for a switched WAL file to arrive.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ArchivePushArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// The file, as PostgreSQL's %p (relative to the data directory).
    pub path: std::path::PathBuf,
    /// Also push up to N other `.ready` WAL files in parallel, so that
    /// PostgreSQL's later calls for them return at once (0 turns it off).
    #[arg(long, default_value_t = 4)]
    pub lookahead: usize,
}

#[derive(Debug, Args)]
pub struct ArchiveGetArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// The file name PostgreSQL asks for (%f).
    pub file: String,
    /// Where to put it (%p).
    pub dest: std::path::PathBuf,
    /// Fetch the next N segments (at most 32) into a local spool in the
    /// background while PostgreSQL replays, so that recovery does not wait
    /// for one repository round trip per segment (0 turns it off).
    #[arg(long, default_value_t = 8)]
    pub prefetch: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArg {
    /// Server name (a `[server.NAME]` table); may be omitted with one server.
    #[arg(long, env = "PGCAIRN_SERVER")]
    pub server: Option<String>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Data directory of the cluster.
    #[arg(long, env = "PGCAIRN_PGDATA")]
    pub pgdata: Option<std::path::PathBuf>,
    /// libpq-style connection string, e.g. "host=/var/run/postgresql user=postgres".
    #[arg(long, env = "PGCAIRN_CONNINFO")]
    pub conninfo: Option<String>,
    #[arg(long)]
    pub label: Option<String>,
    /// Ask for an immediate checkpoint instead of a spread one.
    #[arg(long)]
    pub fast_checkpoint: bool,
    /// Files read and stored in parallel.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Carry the WAL needed for consistency inside the backup (self-contained).
    #[arg(long)]
    pub include_wal: bool,
    /// Read every file. By default a file whose size, mtime, ctime and
    /// inode match the previous backup's record, and that had not changed
    /// for 2 s before that backup started, is taken from it unread (as
    /// pgBackRest's incremental backups do by timestamp).
    #[arg(long)]
    pub read_all: bool,
    /// Seconds to wait for the backup's WAL to be archived.
    #[arg(long, default_value_t = 600)]
    pub wal_timeout: u64,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Backup id, or `latest`.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Backup id, or `latest`.
    pub id: String,
    /// Directory to restore into (new or empty).
    pub target: std::path::PathBuf,
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Restore over an existing data directory: rewrite only files whose
    /// content differs, delete files the backup lacks, empty pg_wal.
    #[arg(long)]
    pub delta: bool,
    /// Relocate a tablespace: OLD_DIRECTORY=NEW_DIRECTORY (repeatable).
    #[arg(long = "tablespace-map", value_name = "OLD=NEW")]
    pub tablespace_map: Vec<String>,
    /// Recover to this time (e.g. "2026-11-22 14:05:00+00").
    #[arg(long, group = "recovery_target")]
    pub target_time: Option<String>,
    /// Recover to this transaction id.
    #[arg(long, group = "recovery_target")]
    pub target_xid: Option<String>,
    /// Recover to this WAL position.
    #[arg(long, group = "recovery_target")]
    pub target_lsn: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "recovery_target")]
    pub target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "recovery_target")]
    pub target_immediate: bool,
    /// Stop just before the target instead of just after it (with a time,
    /// xid or LSN target; PostgreSQL ignores it for the others).
    #[arg(long, requires = "recovery_target", conflicts_with_all = ["target_name", "target_immediate"])]
    pub target_exclusive: bool,
    /// latest, current, or a timeline id.
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// What to do at the target: pause, promote or shutdown (pause and
    /// shutdown need a target: recovery to the end of the archive always
    /// promotes).
    #[arg(long, value_parser = ["pause", "promote", "shutdown"])]
    pub target_action: Option<String>,
    /// Keep the backup's archive_mode (by default it is set to off, so a
    /// test restore never archives into the production history).
    #[arg(long)]
    pub keep_archive_mode: bool,
    /// Write no recovery settings: PostgreSQL then replays only the WAL in
    /// pg_wal (a backup taken with --include-wal). archive_mode is still
    /// turned off unless --keep-archive-mode.
    #[arg(long, conflicts_with_all = ["recovery_target", "target_exclusive", "target_timeline", "target_action"])]
    pub no_recovery: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncryptionArg {
    /// XChaCha20-Poly1305; the master key is wrapped by an argon2id passphrase key.
    Repokey,
    /// No encryption: anyone who can read the storage can read your data.
    None,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[arg(long, value_enum, default_value_t = EncryptionArg::Repokey)]
    pub encryption: EncryptionArg,
    /// Default zstd level for new data.
    #[arg(long)]
    pub compression: Option<i32>,
    /// Average chunk size in bytes (min = avg/4, max = avg*4).
    #[arg(long)]
    pub chunk_avg: Option<u32>,
    /// Target pack size in bytes.
    #[arg(long)]
    pub pack_size: Option<u64>,
    /// Garbage collection's grace period in seconds [default: 172800, 48 h]:
    /// must exceed the longest backup and the longest restore.
    #[arg(long)]
    pub gc_grace_secs: Option<i64>,
    /// A backup or archive-push running longer than this many seconds
    /// aborts instead of committing [default: 86400, 24 h]; shorter than
    /// the grace period.
    #[arg(long)]
    pub gc_max_writer_secs: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the key objects.
    List,
    /// Add a passphrase (read from PGCAIRN_NEW_PASSPHRASE[_FILE] or a prompt).
    Add,
    /// Remove a key object by id.
    Remove { id: String },
    /// Replace the passphrase that unlocked this session with a new one.
    Passwd,
}
