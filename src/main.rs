//! The `pgcairn` binary: parse arguments, run the command, report errors.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pgcairn::cli::Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgcairn: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(pgcairn::commands::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgcairn: error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
