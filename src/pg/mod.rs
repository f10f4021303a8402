//! What pgcairn knows of PostgreSQL: the server connection and the backup
//! API, the data directory and what a base backup leaves out, pg_control,
//! page checksums, WAL names and timelines. Knows nothing of repositories.

pub mod checksum;
pub mod conn;
pub mod control;
pub mod datadir;
pub mod recovery;
pub mod timeline;
pub mod wal;
pub mod walfile;

use thiserror::Error;

pub type Result<T, E = PgError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL ({conninfo}): {source}; is the server running, and is --conninfo right?")]
    Connect {
        conninfo: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL query failed ({what}): {source}")]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl PgError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PgError::Io {
            context: context.into(),
            source,
        }
    }
}
