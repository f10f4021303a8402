//! The repository layer's one error type. Every variant names the object or
//! location it concerns, so that a message printed at the binary edge tells the
//! operator what broke and where.

use thiserror::Error;

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum RepoError {
    /// The object does not exist. Only ever produced from a direct, successful
    /// lookup that answered "not found"; never from a failed request.
    #[error("object {key} not found in the repository")]
    NotFound { key: String },

    /// A create-if-absent write met an object with different content.
    #[error("object {key} already exists with different content; nothing was overwritten")]
    Conflict { key: String },

    /// The storage service failed (after retries). This is never "absent".
    #[error("storage error during {op} of {key}: {source}")]
    Storage {
        op: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// An object's bytes are damaged, truncated, or fail authentication.
    #[error("object {object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },

    /// An object carries a format this build does not understand.
    #[error("object {object} has unsupported format: {reason}")]
    Unsupported { object: String, reason: String },

    /// No key file accepted the passphrase.
    #[error("wrong passphrase: no key in {repo} opens with it")]
    WrongPassphrase { repo: String },

    #[error("no repository at {url}: {reason} (create one with `pgcairn init`)")]
    NoRepository { url: String, reason: String },

    #[error("a repository already exists at {url}; refusing to overwrite it")]
    AlreadyInitialized { url: String },

    #[error("invalid repository URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },

    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },

    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    /// A writer ran past its lease; committing now could race a collector.
    #[error("writer lease {lease} expired after {age_secs}s (limit {limit_secs}s); nothing was committed, rerun the command")]
    LeaseExpired {
        lease: String,
        age_secs: i64,
        limit_secs: i64,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("internal task failed: {0}")]
    Task(String),
}

impl RepoError {
    pub fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        RepoError::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RepoError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        RepoError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, RepoError::NotFound { .. })
    }
}

impl From<tokio::task::JoinError> for RepoError {
    fn from(e: tokio::task::JoinError) -> Self {
        RepoError::Task(e.to_string())
    }
}
