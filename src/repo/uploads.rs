//! Uploads a killed writer leaves behind, which no listing shows: staging
//! files on local disk (`object_store` writes `<key>#<n>` and renames it
//! into place; a killed process leaves it) and multipart uploads on S3
//! (pgcairn writes single-part objects, but anything else writing under the
//! repository's prefix may start one, and a started upload is billed until
//! aborted). The collector lists them and aborts those older than the grace
//! period, by the store's clock, so an upload still in progress is never
//! touched.
//!
//! `object_store` lists neither: local staging files are filtered out of
//! its listings, and it has no call for S3's ListMultipartUploads. The S3
//! listing here is one signed GET with `object_store`'s own SigV4
//! authorizer, credentials and HTTP client; the abort is `object_store`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{ClientOptions, HttpClient, HttpConnector, ReqwestConnector};
use object_store::multipart::MultipartStore;
use object_store::path::Path as StorePath;
use object_store::ClientConfigKey;
use serde::Deserialize;

use super::backend::{BResult, BackendError};

/// An upload begun and never completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteUpload {
    /// The key it would have created, relative to the repository root.
    pub key: String,
    /// The store's name for the upload (S3 upload id, local staging suffix).
    pub id: String,
    /// Its last activity, Unix seconds by the store's clock: the later of
    /// its start and its newest part (S3), or the file's mtime (local). A
    /// long upload still adding parts is young however early it began.
    pub started: i64,
    /// Bytes it holds.
    pub size: Option<u64>,
}

/// What a store says about its incomplete uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadListing {
    Listed(Vec<IncompleteUpload>),
    /// The store cannot list them; why, for the report.
    Unsupported(String),
}

/// How a backend finds incomplete uploads.
#[derive(Debug, Clone)]
pub enum Uploads {
    /// Staging files under this repository directory.
    Local(PathBuf),
    S3(S3Uploads),
    /// The store offers no listing; the reason is reported as is.
    Unsupported(&'static str),
}

fn permanent(msg: String) -> BackendError {
    BackendError::Permanent(msg.into())
}

fn transient(msg: String) -> BackendError {
    BackendError::Transient(msg.into())
}

impl Uploads {
    /// Every incomplete upload in the repository. Complete or an error,
    /// like `Backend::list`.
    pub async fn list(&self) -> BResult<UploadListing> {
        match self {
            Uploads::Local(root) => {
                let root = root.clone();
                tokio::task::spawn_blocking(move || local_staging_files(&root))
                    .await
                    .map_err(|e| transient(format!("listing staging files: {e}")))?
                    .map(UploadListing::Listed)
            }
            Uploads::S3(s3) => s3.list().await.map(UploadListing::Listed),
            Uploads::Unsupported(why) => Ok(UploadListing::Unsupported((*why).to_string())),
        }
    }

    pub async fn abort(&self, u: &IncompleteUpload) -> BResult<()> {
        match self {
            Uploads::Local(root) => {
                let path = root.join(format!("{}#{}", u.key, u.id));
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(BackendError::NotFound)
                    }
                    Err(e) => Err(permanent(format!("removing {}: {e}", path.display()))),
                }
            }
            Uploads::S3(s3) => s3.abort(u).await,
            Uploads::Unsupported(why) => Err(permanent((*why).to_string())),
        }
    }
}

/// A staging file is `<name>#<digits>` (object_store's `new_staged_upload`).
fn staging_parts(file_name: &str) -> Option<(&str, &str)> {
    let (name, suffix) = file_name.rsplit_once('#')?;
    if name.is_empty() || suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, suffix))
}

fn local_staging_files(root: &Path) -> BResult<Vec<IncompleteUpload>> {
    let io = |what: &Path, e: std::io::Error| permanent(format!("{}: {e}", what.display()));
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Renamed into place or removed since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path, e)),
            };
            if meta.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = entry.file_name();
            let Some((base, id)) = name.to_str().and_then(staging_parts) else {
                continue;
            };
            let rel = path
                .parent()
                .and_then(|p| p.strip_prefix(root).ok())
                .map(|p| p.join(base))
                .ok_or_else(|| {
                    permanent(format!("{} is outside the repository", path.display()))
                })?;
            let started = meta
                .modified()
                .map_err(|e| io(&path, e))?
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            out.push(IncompleteUpload {
                key: rel.to_string_lossy().replace('\\', "/"),
                id: id.to_string(),
                started,
                size: Some(meta.len()),
            });
        }
    }
    out.sort_by(|a, b| (&a.key, &a.id).cmp(&(&b.key, &b.id)));
    Ok(out)
}

/// ListMultipartUploads over the repository's prefix of one bucket.
#[derive(Debug, Clone)]
pub struct S3Uploads {
    store: Arc<AmazonS3>,
    client: HttpClient,
    /// `https://host/bucket` or `https://bucket.host`, as object_store builds it.
    bucket_url: String,
    region: String,
    /// The repository's key prefix in the bucket, empty or ending in `/`.
    prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListResult {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<S3Upload>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PartsResult {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_part_number_marker: Option<u64>,
    #[serde(default, rename = "Part")]
    parts: Vec<S3Part>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3Part {
    last_modified: String,
    #[serde(default)]
    size: u64,
}

fn timestamp(what: &str, t: &str) -> BResult<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.timestamp())
        .map_err(|e| permanent(format!("{what}: bad timestamp {t:?}: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct S3Upload {
    key: String,
    upload_id: String,
    initiated: String,
}

impl S3Uploads {
    /// From the builder the store was built with (so endpoint, region and
    /// credentials are the same), before `build` consumed it.
    pub fn new(
        builder: &AmazonS3Builder,
        store: Arc<AmazonS3>,
        prefix: &str,
    ) -> std::result::Result<Self, String> {
        let cfg = |k: AmazonS3ConfigKey| builder.get_config_value(&k);
        let bucket = cfg(AmazonS3ConfigKey::Bucket).ok_or("no bucket name")?;
        let region = cfg(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = cfg(AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // As object_store resolves it: the S3-specific endpoint first.
        let endpoint =
            cfg(AmazonS3ConfigKey::S3Endpoint).or_else(|| cfg(AmazonS3ConfigKey::Endpoint));
        let bucket_url = match (endpoint, virtual_hosted) {
            (Some(e), true) => e.trim_end_matches('/').to_string(),
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        // The store's own client settings (certificates, proxy, timeouts).
        let mut options = ClientOptions::new().with_allow_http(bucket_url.starts_with("http://"));
        for k in [
            ClientConfigKey::AllowInvalidCertificates,
            ClientConfigKey::NoSystemCertificates,
            ClientConfigKey::ConnectTimeout,
            ClientConfigKey::Timeout,
            ClientConfigKey::Http1Only,
            ClientConfigKey::Http2Only,
            ClientConfigKey::ProxyUrl,
            ClientConfigKey::ProxyCaCertificate,
            ClientConfigKey::ProxyExcludes,
        ] {
            if let Some(v) = cfg(AmazonS3ConfigKey::Client(k)) {
                options = options.with_config(k, v);
            }
        }
        let client = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| e.to_string())?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.trim_matches('/'))
        };
        Ok(S3Uploads {
            store,
            client,
            bucket_url,
            region,
            prefix,
        })
    }

    async fn list(&self) -> BResult<Vec<IncompleteUpload>> {
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let page = self.list_page(marker.as_ref()).await?;
            for u in page.uploads {
                // Some servers ignore `prefix`; other repositories in the
                // bucket are not ours to abort.
                let Some(key) = u.key.strip_prefix(&self.prefix) else {
                    continue;
                };
                let initiated = timestamp(
                    &format!("ListMultipartUploads: upload {} of {}", u.upload_id, u.key),
                    &u.initiated,
                )?;
                let Some((newest_part, size)) = self.parts(&u.key, &u.upload_id).await? else {
                    continue; // completed or aborted since the listing
                };
                out.push(IncompleteUpload {
                    key: key.to_string(),
                    id: u.upload_id,
                    started: newest_part.map_or(initiated, |p| p.max(initiated)),
                    size: Some(size),
                });
            }
            if !page.is_truncated {
                return Ok(out);
            }
            match (page.next_key_marker, page.next_upload_id_marker) {
                (Some(k), Some(u)) if Some((&k, &u)) != marker.as_ref().map(|(a, b)| (a, b)) => {
                    marker = Some((k, u))
                }
                // A truncated page without a way on is an incomplete
                // listing, an error rather than a short answer.
                _ => {
                    return Err(transient(
                        "ListMultipartUploads: truncated page without a next marker".into(),
                    ))
                }
            }
        }
    }

    async fn list_page(&self, marker: Option<&(String, String)>) -> BResult<ListResult> {
        let mut url = self.url(None)?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("uploads", "");
            if !self.prefix.is_empty() {
                q.append_pair("prefix", &self.prefix);
            }
            if let Some((k, u)) = marker {
                q.append_pair("key-marker", k);
                q.append_pair("upload-id-marker", u);
            }
        }
        match self.signed_get("ListMultipartUploads", url).await? {
            Some(r) => Ok(r),
            None => Err(permanent(format!(
                "ListMultipartUploads: bucket of {} not found",
                self.bucket_url
            ))),
        }
    }

    /// The newest part's time and the bytes of every part (ListParts), or
    /// `None` when the upload no longer exists.
    async fn parts(&self, full_key: &str, upload_id: &str) -> BResult<Option<(Option<i64>, u64)>> {
        let mut newest: Option<i64> = None;
        let mut size = 0u64;
        let mut marker: Option<u64> = None;
        loop {
            let mut url = self.url(Some(full_key))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("uploadId", upload_id);
                if let Some(m) = marker {
                    q.append_pair("part-number-marker", &m.to_string());
                }
            }
            let Some(page): Option<PartsResult> = self.signed_get("ListParts", url).await? else {
                return Ok(None);
            };
            for p in &page.parts {
                let t = timestamp(&format!("ListParts of {full_key}"), &p.last_modified)?;
                newest = Some(newest.map_or(t, |n| n.max(t)));
                size += p.size;
            }
            if !page.is_truncated {
                return Ok(Some((newest, size)));
            }
            match page.next_part_number_marker {
                Some(m) if Some(m) != marker => marker = Some(m),
                _ => {
                    return Err(transient(format!(
                        "ListParts of {full_key}: truncated page without a next marker"
                    )))
                }
            }
        }
    }

    /// The bucket's URL, or an object's (each key segment escaped).
    fn url(&self, key: Option<&str>) -> BResult<url::Url> {
        let bad = |e: String| permanent(format!("S3 bucket URL {}: {e}", self.bucket_url));
        let mut url = url::Url::parse(&self.bucket_url).map_err(|e| bad(e.to_string()))?;
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|()| bad("cannot be a base".into()))?;
            segs.pop_if_empty();
            match key {
                Some(k) => {
                    segs.extend(k.split('/'));
                }
                None => {
                    segs.push("");
                }
            }
        }
        Ok(url)
    }

    /// A GET signed with object_store's SigV4 authorizer, its XML answer
    /// parsed; `None` on 404 (the thing asked about is gone).
    async fn signed_get<T: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        url: url::Url,
    ) -> BResult<Option<T>> {
        let cred = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| permanent(format!("S3 credentials: {e}")))?;
        let mut req = http::Request::builder()
            .method(http::Method::GET)
            .uri(url.as_str())
            .body(object_store::client::HttpRequestBody::empty())
            .map_err(|e| permanent(format!("{op} request: {e}")))?;
        AwsAuthorizer::new(&cred, "s3", &self.region)
            .try_authorize(&mut req, None)
            .map_err(|e| permanent(format!("signing {op}: {e}")))?;
        let resp = self
            .client
            .execute(req)
            .await
            .map_err(|e| transient(format!("{op} {url}: {e}")))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .bytes()
            .await
            .map_err(|e| transient(format!("{op} {url}: {e}")))?;
        let text = String::from_utf8_lossy(&body);
        if status.as_u16() == 404 {
            return Ok(None);
        }
        if !status.is_success() {
            let msg = format!("{op} {url}: HTTP {status}: {text}");
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                transient(msg)
            } else {
                permanent(msg)
            });
        }
        quick_xml::de::from_str(&text)
            .map(Some)
            .map_err(|e| permanent(format!("{op} {url}: unreadable answer: {e}")))
    }

    async fn abort(&self, u: &IncompleteUpload) -> BResult<()> {
        let path = StorePath::parse(format!("{}{}", self.prefix, u.key))
            .map_err(|e| permanent(e.to_string()))?;
        self.store
            .abort_multipart(&path, &u.id)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => BackendError::NotFound,
                other => permanent(other.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names() {
        assert_eq!(staging_parts("abc#1"), Some(("abc", "1")));
        assert_eq!(staging_parts("abc#12"), Some(("abc", "12")));
        assert_eq!(staging_parts("abc"), None);
        assert_eq!(staging_parts("abc#"), None);
        assert_eq!(staging_parts("abc#x1"), None);
        assert_eq!(staging_parts("#1"), None);
    }

    #[test]
    fn local_listing_finds_staging_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("packs/ab")).unwrap();
        std::fs::write(root.join("packs/ab/p1"), b"done").unwrap();
        std::fs::write(root.join("packs/ab/p2#1"), b"half").unwrap();
        std::fs::write(root.join("config#3"), b"x").unwrap();
        let found = local_staging_files(root).unwrap();
        let keys: Vec<_> = found
            .iter()
            .map(|u| (u.key.as_str(), u.id.as_str()))
            .collect();
        assert_eq!(keys, vec![("config", "3"), ("packs/ab/p2", "1")]);
        assert_eq!(found[1].size, Some(4));
    }

    #[test]
    fn list_result_parses() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>r/packs/b</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <MaxUploads>1000</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>r/packs/a</Key><UploadId>u1</UploadId><Initiated>2026-11-22T10:00:00.000Z</Initiated></Upload>
  <Upload><Key>r/packs/b</Key><UploadId>u2</UploadId><Initiated>2026-11-22T10:00:01.000Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let r: ListResult = quick_xml::de::from_str(xml).unwrap();
        assert!(r.is_truncated);
        assert_eq!(r.uploads.len(), 2);
        assert_eq!(r.uploads[1].upload_id, "u2");
        assert_eq!(r.next_key_marker.as_deref(), Some("r/packs/b"));
        let empty: ListResult = quick_xml::de::from_str(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        )
        .unwrap();
        assert!(empty.uploads.is_empty());
    }
}
