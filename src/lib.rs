//! pgcairn: PostgreSQL backup and point-in-time recovery into a
//! content-addressed, deduplicating, encrypted repository.
//!
//! Layers point one way: `commands` use `repo` (and, later, `pg`); `repo`
//! stores streams and manifests and knows nothing of PostgreSQL; neither
//! library layer prints or parses arguments.

pub mod cli;
pub mod commands;
pub mod engine;
pub mod passphrase;
pub mod pg;
pub mod repo;
pub mod settings;
