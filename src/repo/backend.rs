//! Storage backends. One small trait, implemented once over `object_store`
//! (local disk, S3, GCS, Azure) and layered with decorators the way
//! `rustic_core` does: [`Retrying`] adds bounded retries with backoff for
//! transient failures; tests add fault injection on top of a real store.
//!
//! Semantics every caller relies on:
//! - `NotFound` is returned only when the store answered "not found"; every
//!   other failure is `Storage`, never "absent".
//! - `list` returns the complete listing or an error, never a partial one.
//! - `put(Create)` is a single-part create-if-absent write; `put_immutable`
//!   resolves "already exists" by reading the object back and comparing.
//! - Local writes are atomic (staged file, then link/rename) and durable
//!   (file and directory fsync) before success is reported.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

#[cfg(target_os = "linux")]
use super::direct::LocalDirect;
use super::error::{RepoError, Result};
use super::uploads::{IncompleteUpload, S3Uploads, UploadListing, Uploads};

/// What a listing or `head` tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root, `/`-separated.
    pub key: String,
    pub size: u64,
    /// Last-modified time by the object store's clock, in Unix seconds.
    /// All ages in the garbage-collection scheme come from here.
    pub modified: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail with `Conflict`-able `AlreadyExists` if the object exists.
    Create,
    /// Replace the object atomically.
    Overwrite,
}

/// Outcome of a create-if-absent write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The object was already there with identical content.
    AlreadyPresent,
}

#[derive(Debug)]
pub enum BackendError {
    NotFound,
    AlreadyExists,
    /// Worth retrying: network trouble, throttling, a 5xx.
    Transient(Box<dyn std::error::Error + Send + Sync>),
    /// Not worth retrying: permissions, bad configuration, unsupported call.
    Permanent(Box<dyn std::error::Error + Send + Sync>),
}

impl BackendError {
    /// Turn into the repository error, naming the operation and key.
    pub fn into_repo(self, op: &'static str, key: &str) -> RepoError {
        match self {
            BackendError::NotFound => RepoError::NotFound { key: key.into() },
            BackendError::AlreadyExists => RepoError::Conflict { key: key.into() },
            BackendError::Transient(source) | BackendError::Permanent(source) => {
                RepoError::Storage {
                    op,
                    key: key.into(),
                    source,
                }
            }
        }
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::NotFound => write!(f, "not found"),
            BackendError::AlreadyExists => write!(f, "already exists"),
            BackendError::Transient(e) => write!(f, "transient: {e}"),
            BackendError::Permanent(e) => write!(f, "{e}"),
        }
    }
}

pub type BResult<T> = std::result::Result<T, BackendError>;

/// The storage abstraction. Keys are relative to the repository root.
#[async_trait]
pub trait Backend: Send + Sync + Debug {
    /// A human-readable location, for messages.
    fn location(&self) -> String;
    async fn put(&self, key: &str, data: Bytes, mode: WriteMode) -> BResult<()>;
    async fn get(&self, key: &str) -> BResult<Bytes>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Bytes>;
    async fn head(&self, key: &str) -> BResult<ObjectInfo>;
    /// Every object whose key starts with `prefix` (a directory-like prefix
    /// ending in `/`, or empty). Complete or an error.
    async fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>>;
    async fn delete(&self, key: &str) -> BResult<()>;
    /// Uploads begun and never completed (see `uploads`), or `None` with
    /// the reason when the store cannot list them.
    async fn incomplete_uploads(&self) -> BResult<UploadListing> {
        Ok(UploadListing::Unsupported(
            "this backend cannot list incomplete uploads".into(),
        ))
    }
    async fn abort_upload(&self, _upload: &IncompleteUpload) -> BResult<()> {
        Err(BackendError::Permanent(
            "this backend cannot abort incomplete uploads".into(),
        ))
    }
}

pub type DynBackend = Arc<dyn Backend>;

/// `object_store` behind the [`Backend`] trait.
#[derive(Debug)]
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    location: String,
    uploads: Uploads,
}

/// Remote stores report network trouble as `Generic`: worth retrying. A
/// local file system reports its I/O errors (EIO, ENOSPC, a failed
/// directory fsync after the object was linked) the same way; retrying
/// those would turn a write whose durability failed into "already there".
fn classify(e: object_store::Error, local: bool) -> BackendError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => BackendError::NotFound,
        E::AlreadyExists { .. } => BackendError::AlreadyExists,
        E::Generic { .. } if local => BackendError::Permanent(Box::new(e)),
        E::Generic { .. } | E::JoinError { .. } => BackendError::Transient(Box::new(e)),
        other => BackendError::Permanent(Box::new(other)),
    }
}

fn store_path(key: &str) -> BResult<StorePath> {
    StorePath::parse(key).map_err(|e| BackendError::Permanent(Box::new(e)))
}

impl ObjectStoreBackend {
    fn classify(&self, e: object_store::Error) -> BackendError {
        classify(e, matches!(self.uploads, Uploads::Local(_)))
    }

    /// The directory of a local repository.
    pub fn local_root(&self) -> Option<std::path::PathBuf> {
        match &self.uploads {
            Uploads::Local(root) => Some(root.clone()),
            _ => None,
        }
    }

    pub fn new(store: Arc<dyn ObjectStore>, location: String, uploads: Uploads) -> Self {
        ObjectStoreBackend {
            store,
            location,
            uploads,
        }
    }

    /// Open a repository location: `file:///path`, a plain path,
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`.
    /// Object-store credentials and endpoints come from the usual environment
    /// variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`). `create` makes a local
    /// directory that does not exist yet (for `init`).
    pub fn open(url: &str, create: bool) -> Result<Self> {
        let bad = |reason: String| RepoError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r.to_string()),
            None => ("file".to_string(), url.to_string()),
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b.to_string(), p.trim_matches('/').to_string()),
            None => (rest.clone(), String::new()),
        };
        let mut uploads = Uploads::Unsupported(
            "not listed: object_store offers no listing of this store's incomplete uploads; pgcairn writes single-part objects and starts none (Azure discards uncommitted blocks after 7 days; on GCS an AbortIncompleteMultipartUpload lifecycle rule covers other writers)",
        );
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            "file" => {
                let path = if url.contains("://") {
                    let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
                    parsed
                        .to_file_path()
                        .map_err(|_| bad("not a local file URL".into()))?
                } else {
                    std::path::PathBuf::from(&rest)
                };
                if path.as_os_str().is_empty() {
                    return Err(bad("empty path".into()));
                }
                if create {
                    // Durable in its parent, as everything written into it.
                    super::durable::create_dirs(&path)
                        .map_err(|e| RepoError::io(format!("creating {}", path.display()), e))?;
                } else {
                    match std::fs::metadata(&path) {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => return Err(bad("not a directory".into())),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            return Err(RepoError::NoRepository {
                                url: url.to_string(),
                                reason: "directory does not exist".into(),
                            })
                        }
                        // EACCES is not "no repository": that would point at init.
                        Err(e) => {
                            return Err(RepoError::io(
                                format!("opening the repository directory {}", path.display()),
                                e,
                            ))
                        }
                    }
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)
                    .map_err(|e| bad(e.to_string()))?
                    .with_fsync(true);
                return Ok(ObjectStoreBackend::new(
                    Arc::new(fs),
                    format!("file://{}", path.display()),
                    Uploads::Local(path),
                ));
            }
            "s3" | "s3a" => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_retry(retry_config());
                if std::env::var_os("AWS_TIMEOUT").is_none() {
                    builder = builder.with_config(
                        object_store::aws::AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        REQUEST_TIMEOUT,
                    );
                }
                let s3 = Arc::new(builder.clone().build().map_err(|e| bad(e.to_string()))?);
                uploads = Uploads::S3(S3Uploads::new(&builder, s3.clone(), &prefix).map_err(bad)?);
                s3
            }
            "gs" => {
                let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&bucket)
                    .with_retry(retry_config());
                if std::env::var_os("GOOGLE_TIMEOUT").is_none() {
                    builder = builder.with_config(
                        object_store::gcp::GoogleConfigKey::Client(ClientConfigKey::Timeout),
                        REQUEST_TIMEOUT,
                    );
                }
                let gcs = builder.build().map_err(|e| bad(e.to_string()))?;
                Arc::new(gcs)
            }
            "az" | "azure" => {
                let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&bucket)
                    .with_retry(retry_config());
                if std::env::var_os("AZURE_TIMEOUT").is_none() {
                    builder = builder.with_config(
                        object_store::azure::AzureConfigKey::Client(ClientConfigKey::Timeout),
                        REQUEST_TIMEOUT,
                    );
                }
                let az = builder.build().map_err(|e| bad(e.to_string()))?;
                Arc::new(az)
            }
            other => {
                return Err(bad(format!(
                    "unknown scheme {other:?} (use file://, s3://, gs:// or az://)"
                )))
            }
        };
        if bucket.is_empty() {
            return Err(bad("missing bucket or container name".into()));
        }
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix.as_str()))
        };
        Ok(ObjectStoreBackend::new(store, url.to_string(), uploads))
    }
}

/// The limit on one whole request to object storage. object_store's
/// default (30 s, connect to end of body) fails every 32 MiB pack upload
/// on a link slower than about 10 Mbit/s, and a create that timed out is
/// not retried. `AWS_TIMEOUT`, `GOOGLE_TIMEOUT` or `AZURE_TIMEOUT` override it.
const REQUEST_TIMEOUT: &str = "10m";

/// HTTP-level retries inside `object_store`, for up to
/// `PGCAIRN_STORAGE_RETRY_SECS` (default 120): a storage restart or a burst
/// of 503 SlowDown must not fail an hours-long backup or a restore (with
/// object_store's 4 quick retries, about 3 s did). [`Retrying`] adds one
/// more around whole operations.
fn retry_config() -> object_store::RetryConfig {
    let secs = std::env::var("PGCAIRN_STORAGE_RETRY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        // Enough retries that the time limit is what ends them.
        max_retries: usize::try_from(secs / 2 + 10).unwrap_or(usize::MAX),
        retry_timeout: Duration::from_secs(secs),
    }
}

fn info(meta: object_store::ObjectMeta) -> ObjectInfo {
    ObjectInfo {
        key: meta.location.to_string(),
        size: meta.size,
        modified: meta.last_modified.timestamp(),
    }
}

#[async_trait]
impl Backend for ObjectStoreBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn put(&self, key: &str, data: Bytes, mode: WriteMode) -> BResult<()> {
        let path = store_path(key)?;
        let opts = PutOptions {
            mode: match mode {
                WriteMode::Create => PutMode::Create,
                WriteMode::Overwrite => PutMode::Overwrite,
            },
            ..Default::default()
        };
        self.store
            .put_opts(&path, PutPayload::from_bytes(data), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e))
    }

    async fn get(&self, key: &str) -> BResult<Bytes> {
        let path = store_path(key)?;
        let res = self.store.get(&path).await.map_err(|e| self.classify(e))?;
        res.bytes().await.map_err(|e| self.classify(e))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Bytes> {
        let path = store_path(key)?;
        let want = range.end - range.start;
        let b = self
            .store
            .get_range(&path, range)
            .await
            .map_err(|e| self.classify(e))?;
        if b.len() as u64 != want {
            return Err(BackendError::Transient(
                format!("short read: wanted {want} bytes, got {}", b.len()).into(),
            ));
        }
        Ok(b)
    }

    async fn head(&self, key: &str) -> BResult<ObjectInfo> {
        let path = store_path(key)?;
        self.store
            .head(&path)
            .await
            .map(info)
            .map_err(|e| self.classify(e))
    }

    async fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
        let p = if prefix.is_empty() {
            None
        } else {
            Some(store_path(prefix.trim_end_matches('/'))?)
        };
        let mut out: Vec<ObjectInfo> = self
            .store
            .list(p.as_ref())
            .map_ok(info)
            .try_collect()
            .await
            .map_err(|e| self.classify(e))?;
        // A "folder" marker (`keys/`, made by a console, s3fs or rclone)
        // lists as an empty object named like a directory: it is no object
        // of the repository.
        let dirs: std::collections::HashSet<&str> = out
            .iter()
            .flat_map(|o| o.key.match_indices('/').map(move |(i, _)| &o.key[..i]))
            .collect();
        let markers: std::collections::HashSet<String> = out
            .iter()
            .filter(|o| {
                o.size == 0
                    && (dirs.contains(o.key.as_str())
                        || p.as_ref().is_some_and(|p| o.key == p.as_ref()))
            })
            .map(|o| o.key.clone())
            .collect();
        out.retain(|o| !markers.contains(&o.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> BResult<()> {
        let path = store_path(key)?;
        self.store.delete(&path).await.map_err(|e| self.classify(e))
    }

    async fn incomplete_uploads(&self) -> BResult<UploadListing> {
        self.uploads.list().await
    }

    async fn abort_upload(&self, upload: &IncompleteUpload) -> BResult<()> {
        self.uploads.abort(upload).await
    }
}

/// Retries transient failures with exponential backoff. A create that fails
/// with "already exists" after a retry is passed up unchanged: the caller
/// (`put_immutable`) reads the object back and compares.
#[derive(Debug)]
pub struct Retrying<B> {
    inner: B,
    attempts: u32,
    first_delay: Duration,
}

impl<B: Backend> Retrying<B> {
    pub fn new(inner: B) -> Self {
        Retrying {
            inner,
            // object_store already retries HTTP requests; one more attempt
            // around the whole operation covers what it does not.
            attempts: 2,
            first_delay: Duration::from_millis(200),
        }
    }

    async fn run<T, F, Fut>(&self, mut op: F) -> BResult<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = BResult<T>> + Send,
    {
        let mut delay = self.first_delay;
        let mut attempt = 1;
        loop {
            match op().await {
                Err(BackendError::Transient(e)) if attempt < self.attempts => {
                    let _ = e;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl<B: Backend> Backend for Retrying<B> {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, data: Bytes, mode: WriteMode) -> BResult<()> {
        self.run(|| self.inner.put(key, data.clone(), mode)).await
    }
    async fn get(&self, key: &str) -> BResult<Bytes> {
        self.run(|| self.inner.get(key)).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Bytes> {
        self.run(|| self.inner.get_range(key, range.clone())).await
    }
    async fn head(&self, key: &str) -> BResult<ObjectInfo> {
        self.run(|| self.inner.head(key)).await
    }
    async fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
        self.run(|| self.inner.list(prefix)).await
    }
    async fn delete(&self, key: &str) -> BResult<()> {
        self.run(|| self.inner.delete(key)).await
    }
    async fn incomplete_uploads(&self) -> BResult<UploadListing> {
        self.run(|| self.inner.incomplete_uploads()).await
    }
    async fn abort_upload(&self, upload: &IncompleteUpload) -> BResult<()> {
        self.run(|| self.inner.abort_upload(upload)).await
    }
}

/// Open a location with the standard decorator stack.
pub fn open(url: &str, create: bool) -> Result<DynBackend> {
    let b = ObjectStoreBackend::open(url, create)?;
    Ok(match b.local_root() {
        #[cfg(target_os = "linux")]
        Some(root) => Arc::new(Retrying::new(LocalDirect::new(b, root))),
        _ => Arc::new(Retrying::new(b)),
    })
}

/// Write an object that must never be overwritten. If it already exists
/// (a retried request that did land, or another writer storing the same
/// content-addressed object), read it back: identical content is success,
/// different content is a `Conflict` and nothing is overwritten. S3 answers
/// 409 to a create that races another write of the key still in progress,
/// which reads back as absent: ask again a few times, and never report
/// "not found" from a write.
pub async fn put_immutable(b: &dyn Backend, key: &str, data: Bytes) -> Result<PutOutcome> {
    const ATTEMPTS: u32 = 5;
    for attempt in 0..ATTEMPTS {
        match b.put(key, data.clone(), WriteMode::Create).await {
            Ok(()) => return Ok(PutOutcome::Created),
            Err(BackendError::AlreadyExists) => match b.get(key).await {
                Ok(existing) if existing == data => return Ok(PutOutcome::AlreadyPresent),
                Ok(_) => return Err(RepoError::Conflict { key: key.into() }),
                Err(BackendError::NotFound) if attempt + 1 < ATTEMPTS => {
                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await
                }
                Err(BackendError::NotFound) => break,
                Err(e) => return Err(e.into_repo("read-back", key)),
            },
            Err(e) => return Err(e.into_repo("create", key)),
        }
    }
    Err(RepoError::Storage {
        op: "create",
        key: key.into(),
        source: "the store refused the create as a conflict, yet the object cannot be read: \
                 another write of it may still be in progress; rerun the command"
            .into(),
    })
}

/// Check that the store refuses to overwrite on a create-if-absent write
/// (S3's `If-None-Match: *`): a store that ignores the condition would let
/// two writers both "win" and nothing stored would be immutable. Writes
/// and then removes `probe/<random>`.
pub async fn probe_create_if_absent(b: &dyn Backend) -> Result<()> {
    let mut r = [0u8; 16];
    super::crypto::random(&mut r)?;
    let key = format!("probe/{}", hex::encode(r));
    // AlreadyExists here can only be a retried request that had landed:
    // the key is random.
    match b
        .put(&key, Bytes::from_static(b"first"), WriteMode::Create)
        .await
    {
        Ok(()) | Err(BackendError::AlreadyExists) => {}
        // Object stores answer 404 to a write when the bucket is missing.
        Err(BackendError::NotFound) => {
            return Err(RepoError::invalid(
                "storage",
                format!(
                    "{}: the bucket or container does not exist (or is not at this endpoint or region); create it first",
                    b.location()
                ),
            ))
        }
        Err(e) => return Err(e.into_repo("create", &key)),
    }
    let second = b
        .put(&key, Bytes::from_static(b"second"), WriteMode::Create)
        .await;
    // A store that refuses deletes (no delete permission, a retention
    // lock) keeps the probe object; nothing reads `probe/`.
    let _ = b.delete(&key).await;
    match second {
        Err(BackendError::AlreadyExists) => Ok(()),
        Ok(()) => Err(RepoError::invalid(
                "storage",
                format!(
                    "{key}: the store overwrote an object written create-if-absent (it ignores If-None-Match: *); \
                     pgcairn needs conditional writes to keep objects immutable: use a store (or version) that supports them"
                ),
            )),
        Err(e) => Err(e.into_repo("create", &key)),
    }
}

pub async fn get(b: &dyn Backend, key: &str) -> Result<Bytes> {
    b.get(key).await.map_err(|e| e.into_repo("read", key))
}

pub async fn list(b: &dyn Backend, prefix: &str) -> Result<Vec<ObjectInfo>> {
    b.list(prefix)
        .await
        .map_err(|e| e.into_repo("list", prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_create_if_absent_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path().to_str().unwrap(), false).unwrap();
        let d = Bytes::from_static(b"hello");
        assert_eq!(
            put_immutable(&*b, "a/b/c", d.clone()).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            put_immutable(&*b, "a/b/c", d.clone()).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        let err = put_immutable(&*b, "a/b/c", Bytes::from_static(b"other"))
            .await
            .unwrap_err();
        assert!(matches!(err, RepoError::Conflict { .. }), "{err}");
        assert_eq!(get(&*b, "a/b/c").await.unwrap(), d);
        let l = list(&*b, "a/").await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].key, "a/b/c");
        assert_eq!(l[0].size, 5);
        assert!(list(&*b, "zzz/").await.unwrap().is_empty());
        let e = get(&*b, "missing").await.unwrap_err();
        assert!(e.is_not_found());
    }

    /// A real local store that fails its first `n` calls transiently.
    #[derive(Debug)]
    struct Flaky {
        inner: ObjectStoreBackend,
        failures: std::sync::atomic::AtomicU32,
    }

    impl Flaky {
        fn fail(&self) -> BResult<()> {
            let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                self.failures
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                return Err(BackendError::Transient("injected fault".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Backend for Flaky {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn put(&self, key: &str, data: Bytes, mode: WriteMode) -> BResult<()> {
            self.fail()?;
            self.inner.put(key, data, mode).await
        }
        async fn get(&self, key: &str) -> BResult<Bytes> {
            self.fail()?;
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Bytes> {
            self.fail()?;
            self.inner.get_range(key, range).await
        }
        async fn head(&self, key: &str) -> BResult<ObjectInfo> {
            self.fail()?;
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
            self.fail()?;
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> BResult<()> {
            self.fail()?;
            self.inner.delete(key).await
        }
    }

    /// A real local store whose first `n` creates answer "exists" without
    /// writing, as S3's 409 to a create racing a write in progress.
    #[derive(Debug)]
    struct Racing {
        inner: ObjectStoreBackend,
        conflicts: std::sync::atomic::AtomicU32,
    }

    #[async_trait]
    impl Backend for Racing {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn put(&self, key: &str, data: Bytes, mode: WriteMode) -> BResult<()> {
            use std::sync::atomic::Ordering::SeqCst;
            if mode == WriteMode::Create && self.conflicts.load(SeqCst) > 0 {
                self.conflicts.fetch_sub(1, SeqCst);
                return Err(BackendError::AlreadyExists);
            }
            self.inner.put(key, data, mode).await
        }
        async fn get(&self, key: &str) -> BResult<Bytes> {
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Bytes> {
            self.inner.get_range(key, range).await
        }
        async fn head(&self, key: &str) -> BResult<ObjectInfo> {
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> BResult<()> {
            self.inner.delete(key).await
        }
    }

    #[tokio::test]
    async fn a_create_conflict_that_reads_back_absent_is_never_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let r = Racing {
            inner: ObjectStoreBackend::open(dir.path().to_str().unwrap(), false).unwrap(),
            conflicts: std::sync::atomic::AtomicU32::new(2),
        };
        // The racing write went away: asked again, the create lands.
        let out = put_immutable(&r, "k", Bytes::from_static(b"v"))
            .await
            .unwrap();
        assert_eq!(out, PutOutcome::Created);
        assert_eq!(get(&r, "k").await.unwrap(), Bytes::from_static(b"v"));
        // It never settles: a storage error naming the object, not NotFound.
        r.conflicts.store(100, std::sync::atomic::Ordering::SeqCst);
        let e = put_immutable(&r, "k2", Bytes::from_static(b"v"))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::Storage { .. }), "{e}");
        assert!(e.to_string().contains("k2"), "{e}");
    }

    #[tokio::test]
    async fn transient_faults_are_retried_then_reported() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Flaky {
            inner: ObjectStoreBackend::open(dir.path().to_str().unwrap(), false).unwrap(),
            failures: std::sync::atomic::AtomicU32::new(1),
        };
        let r = Retrying::new(flaky);
        // One fault: absorbed by the retry.
        put_immutable(&r, "k", Bytes::from_static(b"v"))
            .await
            .unwrap();
        r.inner
            .failures
            .store(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(list(&r, "").await.unwrap().len(), 1);
        // More faults than attempts: an error, never "absent" or "empty".
        r.inner
            .failures
            .store(10, std::sync::atomic::Ordering::SeqCst);
        let e = get(&r, "k").await.unwrap_err();
        assert!(matches!(e, RepoError::Storage { .. }), "{e}");
        r.inner
            .failures
            .store(10, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(
            list(&r, "").await.unwrap_err(),
            RepoError::Storage { .. }
        ));
    }

    #[test]
    fn rejects_unknown_scheme_and_missing_dir() {
        assert!(matches!(
            ObjectStoreBackend::open("ftp://x/y", false),
            Err(RepoError::BadUrl { .. })
        ));
        assert!(matches!(
            ObjectStoreBackend::open("/nonexistent/pgcairn/repo", false),
            Err(RepoError::NoRepository { .. })
        ));
    }

    /// A store that ignores create-if-absent (overwrites instead).
    #[derive(Debug)]
    struct Careless(ObjectStoreBackend);

    #[async_trait]
    impl Backend for Careless {
        fn location(&self) -> String {
            self.0.location()
        }
        async fn put(&self, key: &str, data: Bytes, _: WriteMode) -> BResult<()> {
            self.0.put(key, data, WriteMode::Overwrite).await
        }
        async fn get(&self, key: &str) -> BResult<Bytes> {
            self.0.get(key).await
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> BResult<Bytes> {
            self.0.get_range(key, range).await
        }
        async fn head(&self, key: &str) -> BResult<ObjectInfo> {
            self.0.head(key).await
        }
        async fn list(&self, prefix: &str) -> BResult<Vec<ObjectInfo>> {
            self.0.list(prefix).await
        }
        async fn delete(&self, key: &str) -> BResult<()> {
            self.0.delete(key).await
        }
    }

    #[tokio::test]
    async fn a_store_that_overwrites_on_create_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = || ObjectStoreBackend::open(dir.path().to_str().unwrap(), false).unwrap();
        probe_create_if_absent(&open()).await.unwrap();
        let e = probe_create_if_absent(&Careless(open())).await.unwrap_err();
        assert!(e.to_string().contains("If-None-Match"), "{e}");
        assert!(list(&open(), "probe/").await.unwrap().is_empty());
    }
}
