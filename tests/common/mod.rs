//! Helpers shared by the end-to-end tests: real repositories on the local
//! filesystem and on the S3-compatible server that scripts/test.sh starts.
#![allow(dead_code)]

pub mod pg;

use std::path::PathBuf;

use pgcairn::repo::crypto::KdfParams;
use pgcairn::repo::store::{entry, manifest};
use pgcairn::repo::{ChunkRef, InitOptions, OpenOptions, Repository, WriteStats};
use zeroize::Zeroizing;

pub const PASS: &[u8] = b"correct horse battery staple";

/// Cheap argon2id for tests: the KDF itself is tested in unit tests.
pub fn test_init() -> InitOptions {
    InitOptions {
        kdf: KdfParams {
            m_cost: 1024,
            t_cost: 1,
            p_cost: 1,
        },
        pack_target_size: 4 * 1024 * 1024,
        ..InitOptions::default()
    }
}

pub struct TestRepo {
    pub url: String,
    pub repo: Repository,
    _dirs: Vec<tempfile::TempDir>,
}

/// Open options with a private, fresh index cache.
pub fn fresh_opts() -> (OpenOptions, tempfile::TempDir) {
    let cache = tempfile::tempdir().expect("tempdir");
    let o = OpenOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        workers: 2,
        ..OpenOptions::default()
    };
    (o, cache)
}

pub async fn local_repo(init: InitOptions) -> TestRepo {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("repo").to_string_lossy().to_string();
    let (opts, cache) = fresh_opts();
    let repo = Repository::init(&url, &init, Some(PASS), opts)
        .await
        .expect("init");
    TestRepo {
        url,
        repo,
        _dirs: vec![dir, cache],
    }
}

/// The S3 URL base from scripts/test.sh. The S3 tests must run in CI, so a
/// missing server is a failure, not a skip.
pub fn s3_base() -> String {
    std::env::var("PGCAIRN_TEST_S3")
        .expect("PGCAIRN_TEST_S3 is not set: run the tests through scripts/test.sh, which starts the S3 server")
}

pub async fn s3_repo(init: InitOptions) -> TestRepo {
    let url = format!("{}/{}", s3_base(), unique("repo"));
    let (opts, cache) = fresh_opts();
    let repo = Repository::init(&url, &init, Some(PASS), opts)
        .await
        .expect("init s3");
    TestRepo {
        url,
        repo,
        _dirs: vec![cache],
    }
}

pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random");
    format!("{prefix}-{}", hex::encode(b))
}

pub async fn reopen(url: &str) -> (Repository, tempfile::TempDir) {
    let (opts, cache) = fresh_opts();
    let pw = || Ok(Zeroizing::new(PASS.to_vec()));
    let r = Repository::open(url, &pw, opts).await.expect("reopen");
    (r, cache)
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Bytes that compress about like database pages: random runs mixed with
/// repeated text and zeros.
pub fn db_like_bytes(n: usize, seed: u64) -> Vec<u8> {
    let rnd = random_bytes(n / 4 + 64, seed);
    let mut v = Vec::with_capacity(n);
    let mut i = 0usize;
    while v.len() < n {
        let r = rnd[i % rnd.len()] as usize;
        match r % 4 {
            0 => v.extend_from_slice(&rnd[i % rnd.len()..(i % rnd.len() + 16).min(rnd.len())]),
            1 => v.extend_from_slice(format!("customer-{:08} ", (i * 7919) % 100000).as_bytes()),
            2 => v.extend_from_slice(&[0u8; 24]),
            _ => v.extend_from_slice(&(i as u64).to_le_bytes()),
        }
        i += 1;
    }
    v.truncate(n);
    v
}

/// Total bytes of every object in the repository.
pub async fn repo_bytes(r: &Repository) -> u64 {
    let b = r.backend();
    b.list("").await.expect("list").iter().map(|o| o.size).sum()
}

/// A real file on every machine the tests run on: the PostgreSQL server binary
/// if present, else the test binary itself.
pub fn real_file() -> PathBuf {
    let pg = PathBuf::from("/usr/lib/postgresql/15/bin/postgres");
    if pg.exists() {
        pg
    } else {
        std::env::current_exe().expect("exe")
    }
}

/// Store `data` as one file of fixed `block`-byte chunks (changed blocks as
/// deltas when `previous`, its last version's chunk list, is given) in a
/// writer session of its own and commit it as manifest `name`. Returns the
/// session's counters and the file's chunk list.
pub async fn commit_blocks(
    repo: &Repository,
    name: &str,
    data: &[u8],
    block: usize,
    previous: Option<Vec<ChunkRef>>,
) -> (WriteStats, Vec<ChunkRef>) {
    let w = repo.writer("test").await.expect("writer");
    let s = w
        .store_blocks_after(
            std::io::Cursor::new(data.to_vec()),
            block,
            previous.map(std::sync::Arc::new),
        )
        .await
        .expect("store");
    let chunks = s.chunks.clone();
    w.commit(&manifest(
        name,
        ciborium::Value::Null,
        vec![entry("f", s, ciborium::Value::Null)],
    ))
    .await
    .expect("commit");
    (w.finish().await.expect("finish"), chunks)
}
