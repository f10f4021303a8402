//! The `pgcairn` binary: parse arguments, run the command, report errors.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pgcairn::cli::Cli::parse();
    // restore_command must exit 255 on failure: 1..125 means "absent" to
    // PostgreSQL, which would end recovery early.
    let failure = if matches!(cli.command, pgcairn::cli::Command::ArchiveGet(_)) {
        255
    } else {
        1
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgcairn: cannot start the runtime: {e}");
            return std::process::ExitCode::from(failure);
        }
    };
    match rt.block_on(pgcairn::commands::run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("pgcairn: error: {}", one_line(&e));
            std::process::ExitCode::from(failure)
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
