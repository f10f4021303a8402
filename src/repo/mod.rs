//! The repository: a content-addressed, deduplicating, encrypted store of
//! byte streams and the manifests that name them. This layer knows nothing of
//! PostgreSQL. The layout is specified in `repo-format.md`.
//!
//! Modules, bottom up: [`backend`] (storage), [`format`] (object framing),
//! [`crypto`] (keys, sealing), [`config`] and [`keys`] (the objects that open
//! a repository), [`chunker`], [`pack`], [`index`], [`manifest`], [`lease`]
//! (the writer's half of garbage collection), and [`store`] (the pipeline).

pub mod backend;
pub mod chunker;
pub mod config;
pub mod crypto;
#[cfg(target_os = "linux")]
pub mod direct;
pub mod durable;
pub mod error;
pub mod format;
pub mod gc;
pub mod index;
pub mod keys;
pub mod lease;
pub mod manifest;
pub mod pack;
pub mod pagebuf;
pub mod read;
pub mod store;
pub mod uploads;
pub mod verify;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use zeroize::Zeroizing;

use backend::{DynBackend, PutOutcome};
pub use config::{ChunkerParams, Compression, Encryption, GcParams, RepoConfig, FORMAT_VERSION};
use crypto::{DerivedKeys, KdfParams, MasterKey, Sealer};
pub use error::{RepoError, Result};
use format::{now_unix, Kind};
use index::IndexSet;
use keys::{key_object, KeyFile, KEYS_PREFIX};
use lease::{open_doc, LEASES_PREFIX};
use manifest::{manifest_object, ManifestDoc, MANIFESTS_PREFIX};
pub use manifest::{ChunkRef, Entry, Manifest};
pub use pagebuf::PageBuf;
pub use read::WindowSink;
pub use store::{StoredStream, WriteStats, Writer};

/// Supplies the passphrase only when one is needed (an unencrypted
/// repository never asks).
pub type PassphraseFn<'a> =
    &'a (dyn Fn() -> std::result::Result<Zeroizing<Vec<u8>>, String> + Sync);

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub encryption: Encryption,
    pub chunker: ChunkerParams,
    pub compression: Compression,
    pub kdf: KdfParams,
    pub pack_target_size: u64,
    pub gc: GcParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            encryption: Encryption::Xchacha20poly1305,
            chunker: ChunkerParams::DEFAULT,
            compression: Compression::DEFAULT,
            kdf: KdfParams::DEFAULT,
            pack_target_size: 32 * 1024 * 1024,
            gc: GcParams::DEFAULT,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Where immutable index objects are cached; default
    /// `$PGCAIRN_CACHE_DIR`, `$XDG_CACHE_HOME/pgcairn`, `~/.cache/pgcairn`.
    pub cache_dir: Option<PathBuf>,
    /// CPU workers for hashing, compression and sealing.
    pub workers: usize,
    /// Concurrent uploads and downloads.
    pub io_depth: usize,
    /// Decrypted index entries kept in memory (about 56 bytes each; the
    /// default, 512 Ki, is ~28 MiB: the whole index of ~16 GiB of unique
    /// data at 32 KiB chunks).
    pub index_cache_entries: usize,
    /// A writer indexes its uploaded packs at least this often, so that a
    /// writer killed mid-way leaves its packs findable for the next run.
    pub index_flush_secs: u64,
    /// Override the repository's default compression level.
    pub compression_level: Option<i32>,
    /// Keep the unlocked master key in `<cache>/<repo-id>/master.key`
    /// (mode 0600) and use it instead of deriving it from the passphrase.
    /// For archive-push and archive-get, which run once per WAL file: see
    /// repo-format.md, "Key cache", for what this trades.
    pub key_cache: bool,
    /// The caller has a passphrase for this repository: a config that says
    /// "unencrypted" is then refused, since anyone who can write the
    /// storage can replace the config, and must not be able to switch
    /// pgcairn to reading and writing in the clear.
    pub expect_encrypted: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache_dir: None,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            io_depth: 4,
            index_cache_entries: 512 * 1024,
            index_flush_secs: 60,
            compression_level: None,
            key_cache: false,
            expect_encrypted: false,
        }
    }
}

pub(crate) struct Inner {
    pub backend: DynBackend,
    pub config: RepoConfig,
    pub repo_id: [u8; 16],
    pub keys: DerivedKeys,
    pub sealer: Sealer,
    pub index: Arc<IndexSet>,
    pub key_id: String,
    /// Keys this process added: with `key_id`, the keys known to open
    /// this repository.
    pub added_keys: std::sync::Mutex<Vec<String>>,
    pub master: MasterKey,
    pub opts: OpenOptions,
    /// Ranged pack reads issued by restores and manifest reads: what a
    /// restore costs in object-store requests.
    pub pack_reads: std::sync::atomic::AtomicU64,
}

impl Inner {
    /// What opening a chunk needs, borrowed from the open repository.
    pub(crate) fn chunk_keys(&self) -> pack::ChunkKeys<'_> {
        pack::ChunkKeys {
            sealer: &self.sealer,
            repo_id: &self.repo_id,
            id_key: Some(&self.keys.chunk_id),
        }
    }

    /// Keys that re-hash each chunk, or (`rehash` false, for readers that
    /// check a whole-stream hash) only authenticate it; see
    /// [`pack::ChunkKeys::id_key`].
    pub(crate) fn keys_for(&self, rehash: bool) -> pack::ChunkKeys<'_> {
        pack::ChunkKeys {
            id_key: rehash.then_some(&self.keys.chunk_id),
            ..self.chunk_keys()
        }
    }
}

/// An open, unlocked repository.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<Inner>,
}

fn validate_mark_id(id: &str) -> Result<()> {
    if id.is_empty() || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
        return Err(RepoError::BadName {
            name: id.into(),
            reason: "mark ids are letters, digits and '-'".into(),
        });
    }
    Ok(())
}

/// `$PGCAIRN_CACHE_DIR`, `$XDG_CACHE_HOME/pgcairn`, `~/.cache/pgcairn`.
pub fn default_cache_root() -> PathBuf {
    if let Ok(d) = std::env::var("PGCAIRN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("pgcairn");
    }
    if let Ok(h) = std::env::var("HOME") {
        return PathBuf::from(h).join(".cache").join("pgcairn");
    }
    std::env::temp_dir().join("pgcairn-cache")
}

fn cache_root(opts: &OpenOptions) -> PathBuf {
    opts.cache_dir.clone().unwrap_or_else(default_cache_root)
}

fn key_cache_path(opts: &OpenOptions, cfg: &RepoConfig) -> PathBuf {
    cache_root(opts).join(cfg.repo_id_hex()).join("master.key")
}

/// The cached master key, if present and private to us. A master key never
/// changes for a repository id, so a cached one that the config's MAC does
/// not accept means the config was replaced by someone without the key:
/// that is an error, not a reason to fall back to the key objects (which
/// whoever replaced the config may have replaced too).
fn read_key_cache(
    opts: &OpenOptions,
    cfg: &RepoConfig,
    body: &[u8],
    mac: &[u8],
) -> Result<Option<MasterKey>> {
    use std::os::unix::fs::MetadataExt;
    let path = key_cache_path(opts, cfg);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return Ok(None);
    };
    // SAFETY: geteuid has no preconditions.
    if !meta.is_file() || meta.mode() & 0o077 != 0 || meta.uid() != unsafe { libc::geteuid() } {
        return Ok(None);
    }
    let Ok(bytes) = std::fs::read(&path).map(Zeroizing::new) else {
        return Ok(None);
    };
    let Some(master) = MasterKey::from_bytes(&bytes) else {
        return Ok(None);
    };
    match RepoConfig::authenticate(body, mac, &master.derive().mac) {
        Ok(()) => Ok(Some(master)),
        Err(_) => Err(RepoError::invalid(
            "config",
            format!(
                "the repository's master key cached in {} does not authenticate its config: \
                 the config was replaced by someone without the key. Investigate before using this repository; \
                 if the cache file is the stale one, delete it",
                path.display()
            ),
        )),
    }
}

/// Write the key cache. Its directory must be ours and private (a cache
/// root another user can write to must not get to read the key), and the
/// temporary file is created new under a random name, never through a link
/// someone planted.
fn write_key_cache(opts: &OpenOptions, cfg: &RepoConfig, master: &MasterKey) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let path = key_cache_path(opts, cfg);
    let dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| RepoError::io(format!("creating {}", dir.display()), e))?;
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| RepoError::io(format!("reading {}", dir.display()), e))?;
    // SAFETY: geteuid has no preconditions.
    if !meta.is_dir() || meta.uid() != unsafe { libc::geteuid() } {
        return Err(RepoError::invalid(
            "key cache",
            format!(
                "{} is not a directory of this user; choose another --cache-dir (or PGCAIRN_NO_KEY_CACHE=1)",
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| RepoError::io(format!("chmod 0700 {}", dir.display()), e))?;
    }
    let mut nonce = [0u8; 8];
    crypto::random(&mut nonce)?;
    let tmp = dir.join(format!(".master.key.{}", hex::encode(nonce)));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| RepoError::io(format!("creating {}", tmp.display()), e))?;
    let written = f
        .write_all(master.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| RepoError::io(format!("writing {}", tmp.display()), e))
        .and_then(|_| {
            std::fs::rename(&tmp, &path)
                .map_err(|e| RepoError::io(format!("renaming into {}", path.display()), e))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A summary for `pgcairn info`.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInfo {
    pub location: String,
    pub format_version: u32,
    pub repository_id: String,
    pub encryption: &'static str,
    pub chunker: ChunkerParams,
    pub compression_level: i32,
    pub keys: usize,
    pub packs: usize,
    pub stored_bytes: u64,
    pub index_objects: usize,
    pub index_entries: u64,
    pub manifests: usize,
    pub logical_bytes: u64,
    pub dedup_ratio: f64,
    pub leases: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub created: i64,
    pub hostname: String,
    pub username: String,
    pub kdf: String,
    pub current: bool,
}

impl Repository {
    /// Create a new repository. Writes the first key, then `config` (the
    /// object whose presence makes a location a repository).
    pub async fn init(
        url: &str,
        init: &InitOptions,
        passphrase: Option<&[u8]>,
        opts: OpenOptions,
    ) -> Result<Repository> {
        init.chunker.validate()?;
        init.gc.validate()?;
        config::validate_pack_target(init.pack_target_size)?;
        Compression::validate_level(init.compression.level)?;
        let backend = backend::open(url, true)?;
        match backend.head(config::CONFIG_KEY).await {
            Ok(_) => return Err(RepoError::AlreadyInitialized { url: url.into() }),
            Err(backend::BackendError::NotFound) => {}
            Err(e) => return Err(e.into_repo("head", config::CONFIG_KEY)),
        }
        if init.encryption.is_encrypted() && passphrase.is_none() {
            return Err(RepoError::invalid(
                "init",
                "an encrypted repository needs a passphrase",
            ));
        }
        backend::probe_create_if_absent(&*backend).await?;
        let mut repo_id = [0u8; 16];
        crypto::random(&mut repo_id)?;
        let master = MasterKey::generate()?;
        let keys = master.derive();
        let cfg = RepoConfig {
            format_version: FORMAT_VERSION,
            repo_id: repo_id.to_vec(),
            created: now_unix(),
            encryption: init.encryption,
            chunker: init.chunker,
            compression: init.compression,
            pack_target_size: init.pack_target_size,
            index_page_entries: 1024,
            gc: init.gc,
        };
        let key_id = crypto::random_id()?;
        let pw = if init.encryption.is_encrypted() {
            passphrase
        } else {
            None
        };
        let kf = KeyFile::wrap(&repo_id, &master, pw, init.kdf, key_id.clone(), now_unix())?;
        backend::put_immutable(&*backend, &key_object(&key_id), Bytes::from(kf.encode()?)).await?;
        let cfg_bytes = cfg.encode(&keys.mac)?;
        match backend::put_immutable(&*backend, config::CONFIG_KEY, Bytes::from(cfg_bytes)).await {
            // The same bytes (a fresh repository id) can only be this
            // init's own create, retried after it landed.
            Ok(PutOutcome::Created) | Ok(PutOutcome::AlreadyPresent) => {}
            Err(RepoError::Conflict { .. }) => {
                return Err(RepoError::AlreadyInitialized { url: url.into() })
            }
            Err(e) => return Err(e),
        }
        Ok(Self::assemble(backend, cfg, master, key_id, opts))
    }

    fn assemble(
        backend: DynBackend,
        config: RepoConfig,
        master: MasterKey,
        key_id: String,
        opts: OpenOptions,
    ) -> Repository {
        let keys = master.derive();
        let repo_id = config.repo_id();
        let sealer = Sealer::new(config.encryption.is_encrypted(), &keys.seal);
        let cache = cache_root(&opts).join(config.repo_id_hex()).join("index");
        let index = Arc::new(IndexSet::new(
            backend.clone(),
            sealer.clone(),
            repo_id,
            cache,
            opts.index_cache_entries,
        ));
        Repository {
            inner: Arc::new(Inner {
                backend,
                config,
                repo_id,
                keys,
                sealer,
                index,
                key_id,
                added_keys: std::sync::Mutex::new(Vec::new()),
                master,
                opts,
                pack_reads: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Open and unlock a repository.
    pub async fn open(
        url: &str,
        passphrase: PassphraseFn<'_>,
        opts: OpenOptions,
    ) -> Result<Repository> {
        if let Some(level) = opts.compression_level {
            Compression::validate_level(level)?;
        }
        let backend = backend::open(url, false)?;
        let cfg_bytes = match backend.get(config::CONFIG_KEY).await {
            Ok(b) => b,
            Err(backend::BackendError::NotFound) => {
                return Err(RepoError::NoRepository {
                    url: url.into(),
                    reason: "no config object".into(),
                })
            }
            Err(e) => return Err(e.into_repo("read", config::CONFIG_KEY)),
        };
        let (cfg, body, mac) = RepoConfig::decode(&cfg_bytes)?;
        if opts.expect_encrypted && !cfg.encryption.is_encrypted() {
            return Err(RepoError::invalid(
                "config",
                format!(
                    "{url} says it is not encrypted, but a passphrase is configured for it: \
                     if it was created with --encryption none, remove the passphrase setting; \
                     otherwise its config was replaced by someone without the key (investigate before using it)"
                ),
            ));
        }
        let repo_id = cfg.repo_id();
        if opts.key_cache {
            if let Some(master) = read_key_cache(&opts, &cfg, &body, &mac)? {
                return Ok(Self::assemble(
                    backend,
                    cfg,
                    master,
                    "(cached)".into(),
                    opts,
                ));
            }
        }
        let listed = backend::list(&*backend, KEYS_PREFIX).await?;
        if listed.is_empty() {
            return Err(RepoError::corrupt(
                KEYS_PREFIX,
                "the repository has no key objects",
            ));
        }
        let mut key_files = Vec::new();
        let mut first_corrupt = None;
        for o in &listed {
            let bytes = backend::get(&*backend, &o.key).await?;
            match KeyFile::decode(&bytes, &o.key) {
                Ok(k) => key_files.push(k),
                Err(e) => {
                    first_corrupt.get_or_insert(e);
                }
            }
        }
        let needs_pw = cfg.encryption.is_encrypted();
        let pw = if needs_pw && !key_files.is_empty() {
            Some(passphrase().map_err(|reason| RepoError::invalid("passphrase", reason))?)
        } else {
            None
        };
        // Each key on its own: one bad key object (forged parameters, a
        // leftover of an interrupted init) must not lock out the others.
        let (mut mac_error, mut key_error) = (None, None);
        for k in &key_files {
            // An encrypted repository's master key is only ever stored
            // wrapped; one stored in the clear was put there by someone
            // else (or left by an interrupted unencrypted init): ignored.
            if needs_pw && matches!(k.kdf, keys::Kdf::None) {
                continue;
            }
            let master = match k.unwrap_with(&repo_id, pw.as_ref().map(|p| p.as_slice())) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    key_error.get_or_insert(e);
                    continue;
                }
            };
            if let Err(e) = RepoConfig::authenticate(&body, &mac, &master.derive().mac) {
                mac_error.get_or_insert(e);
                continue;
            }
            if opts.key_cache {
                write_key_cache(&opts, &cfg, &master)?;
            }
            return Ok(Self::assemble(backend, cfg, master, k.id.clone(), opts));
        }
        if let Some(e) = mac_error.or(first_corrupt).or(key_error) {
            return Err(e);
        }
        Err(RepoError::WrongPassphrase { repo: url.into() })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    pub fn location(&self) -> String {
        self.inner.backend.location()
    }

    pub fn backend(&self) -> DynBackend {
        self.inner.backend.clone()
    }

    /// Start a writer session (registers a lease).
    /// The lease is registered before the writer's first index lookup.
    pub async fn writer(&self, purpose: &str) -> Result<Writer> {
        let w = Writer::new(self.inner.clone(), purpose).await?;
        self.inner.index.refresh().await?;
        Ok(w)
    }

    /// Names of manifests under `prefix` (relative to `manifests/`).
    pub async fn list_manifests(&self, prefix: &str) -> Result<Vec<String>> {
        let full = format!("{MANIFESTS_PREFIX}{prefix}");
        let mut names: Vec<String> = backend::list(&*self.inner.backend, &full)
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(MANIFESTS_PREFIX).map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    pub(crate) async fn read_manifest_doc(&self, name: &str) -> Result<ManifestDoc> {
        manifest::validate_name(name)?;
        let object = manifest_object(name);
        let bytes = backend::get(&*self.inner.backend, &object).await?;
        let doc: ManifestDoc = open_doc(
            &self.inner.sealer,
            &self.inner.repo_id,
            Kind::Manifest,
            &object,
            &bytes,
        )?;
        if doc.name != name {
            return Err(RepoError::corrupt(
                &object,
                format!("names itself {:?}", doc.name),
            ));
        }
        Ok(doc)
    }

    /// A manifest's application payload, without reading its entry list.
    pub async fn manifest_meta(&self, name: &str) -> Result<ciborium::Value> {
        Ok(self.read_manifest_doc(name).await?.meta)
    }

    /// Read a manifest and its entry list.
    pub async fn read_manifest(&self, name: &str) -> Result<Manifest> {
        let doc = self.read_manifest_doc(name).await?;
        self.inner.index.refresh().await?;
        self.read_entries(name, doc).await
    }

    /// The entry list of an opened manifest document, with the index as
    /// currently loaded.
    pub(crate) async fn read_entries(&self, name: &str, doc: ManifestDoc) -> Result<Manifest> {
        // A capacity hint only: the length is checked once read.
        let mut body = Vec::with_capacity((doc.body_len as usize).min(64 << 20));
        read::read_refs(&self.inner, &doc.body, &mut body).await?;
        let object = manifest_object(name);
        if body.len() as u64 != doc.body_len || blake3::hash(&body).as_bytes() != &doc.body_hash.0 {
            return Err(RepoError::corrupt(
                &object,
                "entry list does not match its hash",
            ));
        }
        let entries: Vec<Entry> = format::from_cbor(&body, &object)?;
        if entries.len() as u64 != doc.entry_count {
            return Err(RepoError::corrupt(&object, "entry count mismatch"));
        }
        Ok(Manifest {
            name: doc.name,
            created: doc.created,
            meta: doc.meta,
            entries,
        })
    }

    /// Write one entry's bytes to `out`, verifying size and whole-stream hash.
    /// The index is as loaded by `read_manifest` (or `writer`); a chunk it
    /// lacks triggers one reload.
    pub async fn restore_entry<W: WindowSink + Send>(
        &self,
        entry: &Entry,
        out: &mut W,
    ) -> Result<()> {
        let mut hasher = blake3::Hasher::new();
        let mut tee = read::HashingSink {
            inner: out,
            hasher: &mut hasher,
            written: 0,
        };
        read::read_refs(&self.inner, &entry.chunks, &mut tee).await?;
        let written = tee.written;
        if written != entry.size || hasher.finalize().as_bytes() != &entry.hash.0 {
            return Err(RepoError::corrupt(
                format!("entry {}", entry.path),
                "restored bytes do not match the recorded size and hash",
            ));
        }
        Ok(())
    }

    /// Ranged pack reads this handle has issued to read chunks.
    pub fn pack_reads(&self) -> u64 {
        self.inner
            .pack_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn info(&self) -> Result<RepoInfo> {
        let b = &*self.inner.backend;
        self.inner.index.refresh().await?;
        let packs = backend::list(b, pack::PACKS_PREFIX).await?;
        let keys = backend::list(b, KEYS_PREFIX).await?;
        let leases = backend::list(b, LEASES_PREFIX).await?;
        let names = self.list_manifests("").await?;
        // One small read per manifest (one per archived WAL file too):
        // many at once, as on object storage each is a round trip.
        let logical: u64 = {
            use futures::{StreamExt as _, TryStreamExt as _};
            futures::stream::iter(names.iter().map(|n| self.read_manifest_doc(n)))
                .buffer_unordered(32)
                .map_ok(|d| d.logical_bytes)
                .try_fold(0u64, |acc, b| async move { Ok(acc + b) })
                .await?
        };
        let stored: u64 = packs.iter().map(|p| p.size).sum();
        let (index_objects, index_entries, _, _) = self.inner.index.stats();
        let c = &self.inner.config;
        Ok(RepoInfo {
            location: self.location(),
            format_version: c.format_version,
            repository_id: c.repo_id_hex(),
            encryption: c.encryption.name(),
            chunker: c.chunker,
            compression_level: c.compression.level,
            keys: keys.len(),
            packs: packs.len(),
            stored_bytes: stored,
            index_objects,
            index_entries,
            manifests: names.len(),
            logical_bytes: logical,
            dedup_ratio: if stored == 0 {
                0.0
            } else {
                logical as f64 / stored as f64
            },
            leases: leases.len(),
        })
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let b = &*self.inner.backend;
        let mut out = Vec::new();
        for o in backend::list(b, KEYS_PREFIX).await? {
            let k = KeyFile::decode(&backend::get(b, &o.key).await?, &o.key)?;
            out.push(KeyInfo {
                current: k.id == self.inner.key_id,
                kdf: match &k.kdf {
                    keys::Kdf::Argon2id { params, .. } => {
                        format!(
                            "argon2id m={}KiB t={} p={}",
                            params.m_cost, params.t_cost, params.p_cost
                        )
                    }
                    keys::Kdf::None => "none (unencrypted repository)".into(),
                },
                id: k.id,
                created: k.created,
                hostname: k.hostname,
                username: k.username,
            });
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Wrap the master key under another passphrase; returns the new key id.
    pub async fn add_key(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        if !self.inner.config.encryption.is_encrypted() {
            return Err(RepoError::invalid(
                "key add",
                "this repository is not encrypted; it has no passphrases",
            ));
        }
        let id = crypto::random_id()?;
        let kf = KeyFile::wrap(
            &self.inner.repo_id,
            &self.inner.master,
            Some(passphrase),
            kdf,
            id.clone(),
            now_unix(),
        )?;
        backend::put_immutable(
            &*self.inner.backend,
            &key_object(&id),
            Bytes::from(kf.encode()?),
        )
        .await?;
        self.inner
            .added_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.clone());
        Ok(id)
    }

    /// Remove a key object. Refuses to remove the last key, and the key
    /// this process unlocked with unless it added another: any other key
    /// may be one an interrupted `init` left, wrapping another master key,
    /// and nothing here can tell without its passphrase. Removal revokes
    /// nothing already copied (see repo-format.md).
    pub async fn remove_key(&self, id: &str) -> Result<()> {
        let keys = self.list_keys().await?;
        if !keys.iter().any(|k| k.id == id) {
            return Err(RepoError::NotFound {
                key: key_object(id),
            });
        }
        // Only a key of the repository's own kind opens it (an encrypted
        // one ignores a key stored in the clear).
        let usable = |k: &&KeyInfo| {
            k.kdf.starts_with("argon2id") == self.inner.config.encryption.is_encrypted()
        };
        if !keys.iter().filter(usable).any(|k| k.id != id) {
            return Err(RepoError::invalid(
                "key remove",
                "refusing to remove the repository's last key",
            ));
        }
        let mut proven = self
            .inner
            .added_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        proven.push(self.inner.key_id.clone());
        if !proven
            .iter()
            .any(|p| p != id && keys.iter().any(|k| &k.id == p))
        {
            return Err(RepoError::invalid(
                "key remove",
                format!(
                    "key {id} is the key this command opened the repository with, and no other key \
                     is known to open it (a key left by an interrupted init does not); run key remove \
                     with another key's passphrase, which proves that key works"
                ),
            ));
        }
        let object = key_object(id);
        self.inner
            .backend
            .delete(&object)
            .await
            .map_err(|e| e.into_repo("delete", &object))
    }

    /// Remove a manifest's name. Its chunks stay until `gc` finds them
    /// unreferenced. A store that answers "not found" gives
    /// `RepoError::NotFound`; any other failure is an error, never taken for
    /// success.
    pub async fn delete_manifest(&self, name: &str) -> Result<()> {
        manifest::validate_name(name)?;
        let object = manifest_object(name);
        self.inner
            .backend
            .delete(&object)
            .await
            .map_err(|e| e.into_repo("delete", &object))
    }

    /// A manifest object's stored bytes, to put back with
    /// [`Self::put_back_manifest`] if removing it turns out to be wrong.
    pub async fn manifest_bytes(&self, name: &str) -> Result<Bytes> {
        manifest::validate_name(name)?;
        backend::get(&*self.inner.backend, &manifest_object(name)).await
    }

    /// Store a manifest object's bytes again under its name (create if
    /// absent). Its chunks are still there: the collector deletes only what
    /// no manifest in a listing taken after its grace period references.
    pub async fn put_back_manifest(&self, name: &str, bytes: Bytes) -> Result<()> {
        manifest::validate_name(name)?;
        backend::put_immutable(&*self.inner.backend, &manifest_object(name), bytes)
            .await
            .map(|_| ())
    }

    /// Record a collector's mark (`gc/marks/<id>`): the first phase of
    /// two-phase deletion. Writers read marks before they commit.
    pub async fn write_mark(&self, mark: &lease::GcMark) -> Result<String> {
        validate_mark_id(&mark.id)?;
        let key = format!("{}{}", lease::MARKS_PREFIX, mark.id);
        let bytes = lease::seal_doc(
            &self.inner.sealer,
            &self.inner.repo_id,
            Kind::GcMark,
            &key,
            mark,
        )?;
        backend::put_immutable(&*self.inner.backend, &key, Bytes::from(bytes)).await?;
        Ok(key)
    }

    /// Id of the key that unlocked this session.
    pub fn current_key(&self) -> &str {
        &self.inner.key_id
    }
}
