//! The `pgcairn` binary: parse arguments, run the command, report errors.

use std::io::Write;

use clap::Parser;

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = match pgcairn::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let _ = e.print();
            // A restore_command this binary cannot parse (a flag from a
            // newer pgcairn) must not read as "absent" to PostgreSQL.
            let archive_get = std::env::args_os().skip(1).any(|a| a == "archive-get");
            return std::process::ExitCode::from(if archive_get { 255 } else { 2 });
        }
    };
    // restore_command must exit 255 on failure: 1..125 means "absent" to
    // PostgreSQL, which would end recovery early.
    let failure = if matches!(cli.command, pgcairn::cli::Command::ArchiveGet(_)) {
        // A panic would exit 101, which also reads as "absent".
        std::panic::set_hook(Box::new(|info| {
            let _ = writeln!(std::io::stderr(), "pgcairn: internal error: {info}");
            std::process::exit(255);
        }));
        255
    } else {
        1
    };
    // Errors are reported with writeln, not eprintln, which panics when
    // stderr cannot be written (a full disk under PostgreSQL's log).
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pgcairn: cannot start the runtime: {e}");
            return std::process::ExitCode::from(failure);
        }
    };
    match rt.block_on(pgcairn::commands::run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pgcairn: error: {}", one_line(&e));
            std::process::ExitCode::from(failure)
        }
    }
}

/// One malloc arena per core. glibc gives threads up to 8 arenas per
/// core, and memory freed into an arena mostly stays mapped: a restore's
/// window buffers (made on decoding threads, freed on writer threads)
/// left its peak RSS at 340-380 MB on the 5.6 GB bench cluster, against
/// 145 MB with one arena per core and no slower.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: called before any other thread starts; mallopt only
        // sets a limit for arenas created later.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// The error and its causes on one line, each cause only if the message so
/// far does not already say it (storage errors repeat their sources).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
