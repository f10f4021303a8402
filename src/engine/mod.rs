//! The engine: backup and restore of PostgreSQL clusters, built on the
//! `pg` layer (what PostgreSQL is) and the `repo` layer (where bytes go).
//! Prints nothing; reports progress through [`Progress`].

pub mod archive;
pub mod backup;
pub mod catalog;
pub mod check;
mod filewriter;
pub mod restore;
pub mod retention;
pub mod spool;
pub mod verify;
pub mod walarchive;

use thiserror::Error;

use crate::pg::PgError;
use crate::repo::RepoError;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The operation refuses to go on; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Progress reports from long work; the command layer draws them.
pub trait Progress: Send + Sync {
    /// A new phase, with the bytes it will cover (0 if unknown).
    fn phase(&self, _name: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

/// For callers that show nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// `YYYYMMDDTHHMMSSZ` for a Unix time (UTC), without a date library.
pub fn utc_stamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(1_795_354_280), "20261122T133120Z");
        assert_eq!(super::utc_stamp(951_782_400), "20000229T000000Z");
    }
}
