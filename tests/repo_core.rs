//! End-to-end scenarios for the repository core, on the local filesystem and
//! on a real S3-compatible server (moto, started by scripts/test.sh).

mod common;

use std::io::Cursor;

use bytes::Bytes;
use ciborium::Value;
use common::*;
use pgcairn::repo::backend::{self, WriteMode};
use pgcairn::repo::lease::{CondemnedPack, GcMark};
use pgcairn::repo::pack::pack_id_from_key;
use pgcairn::repo::store::{entry, manifest};
use pgcairn::repo::{Encryption, GcParams, InitOptions, RepoConfig, RepoError, Repository};
use zeroize::Zeroizing;

/// Store several streams, commit, reopen with a cold cache, restore, compare.
async fn roundtrip(t: &TestRepo) {
    let inputs: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("tiny".into(), b"x".to_vec()),
        ("random-9MiB".into(), random_bytes(9 * 1024 * 1024 + 17, 1)),
        ("dblike-6MiB".into(), db_like_bytes(6 * 1024 * 1024, 2)),
        (
            "real".into(),
            std::fs::read(real_file()).expect("read real file"),
        ),
    ];
    let w = t.repo.writer("test").await.expect("writer");
    let mut entries = Vec::new();
    for (name, data) in &inputs {
        let s = w
            .store_reader(Cursor::new(data.clone()))
            .await
            .expect("store");
        assert_eq!(s.size, data.len() as u64);
        assert_eq!(s.hash.0, *blake3::hash(data).as_bytes());
        entries.push(entry(
            name.clone(),
            s,
            Value::Text(format!("attrs of {name}")),
        ));
    }
    let m = manifest("backups/srv/b1", Value::Text("meta".into()), entries);
    w.commit(&m).await.expect("commit");
    w.finish().await.expect("finish");

    let (r2, _cache) = reopen(&t.url).await;
    assert_eq!(
        r2.list_manifests("backups/").await.unwrap(),
        vec!["backups/srv/b1".to_string()]
    );
    let back = r2
        .read_manifest("backups/srv/b1")
        .await
        .expect("read manifest");
    assert_eq!(back, m);
    for (e, (_, data)) in back.entries.iter().zip(&inputs) {
        let mut out = Vec::new();
        r2.restore_entry(e, &mut out).await.expect("restore");
        assert!(out == *data, "restored bytes differ for {}", e.path);
    }
    let info = r2.info().await.unwrap();
    assert_eq!(info.manifests, 1);
    assert!(info.packs >= 2, "data and metadata packs: {info:?}");
    let total: u64 = inputs.iter().map(|(_, d)| d.len() as u64).sum();
    assert_eq!(info.logical_bytes, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_roundtrip_random_and_real_data() {
    let t = local_repo(test_init()).await;
    roundtrip(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_roundtrip_random_and_real_data() {
    let t = s3_repo(test_init()).await;
    roundtrip(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_create_if_absent_is_enforced_by_the_server() {
    let url = format!("{}/{}", s3_base(), unique("cond"));
    let b = backend::open(&url, false).expect("open s3");
    let first = Bytes::from_static(b"first");
    assert_eq!(
        backend::put_immutable(&*b, "x/obj", first.clone())
            .await
            .unwrap(),
        backend::PutOutcome::Created
    );
    // Same content again (a retried request): success, nothing rewritten.
    assert_eq!(
        backend::put_immutable(&*b, "x/obj", first.clone())
            .await
            .unwrap(),
        backend::PutOutcome::AlreadyPresent
    );
    // Different content: refused by the server's If-None-Match check.
    let e = backend::put_immutable(&*b, "x/obj", Bytes::from_static(b"second"))
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::Conflict { .. }), "{e}");
    assert_eq!(backend::get(&*b, "x/obj").await.unwrap(), first);
    // A missing object is NotFound; an empty prefix lists as empty.
    assert!(backend::get(&*b, "x/none")
        .await
        .unwrap_err()
        .is_not_found());
    assert!(backend::list(&*b, "nothing/").await.unwrap().is_empty());
}

async fn store_twice_grows_under_one_percent(t: &TestRepo) {
    let data = db_like_bytes(100 * 1024 * 1024, 7);
    let w = t.repo.writer("t").await.unwrap();
    let s = w.store_bytes(data.clone()).await.unwrap();
    w.commit(&manifest(
        "m/one",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    w.finish().await.unwrap();
    let after_one = repo_bytes(&t.repo).await;

    let w = t.repo.writer("t").await.unwrap();
    let s = w.store_bytes(data).await.unwrap();
    let st = w.stats();
    assert_eq!(st.chunks_new, 0, "{st:?}");
    w.commit(&manifest(
        "m/two",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    w.finish().await.unwrap();
    let after_two = repo_bytes(&t.repo).await;
    let growth = (after_two - after_one) as f64 / after_one as f64;
    println!(
        "same 100 MiB twice: {after_one} -> {after_two} bytes, growth {:.4}%",
        growth * 100.0
    );
    assert!(growth < 0.01, "grew by {:.3}%", growth * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_same_100mib_twice_grows_under_one_percent() {
    let t = local_repo(test_init()).await;
    store_twice_grows_under_one_percent(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_change_in_100mib_stores_about_one_chunk() {
    let t = local_repo(test_init()).await;
    let mut data = random_bytes(100 * 1024 * 1024, 11);
    let w = t.repo.writer("t").await.unwrap();
    let first = w.store_bytes(data.clone()).await.unwrap();
    assert!(w.unindexed_new_chunks() > 0);
    w.flush().await.unwrap();
    // Indexed now: the session forgets them and deduplicates the second
    // copy through the index.
    assert_eq!(w.unindexed_new_chunks(), 0);
    let before = w.stats();
    data[50 * 1024 * 1024 + 12345] ^= 0xff;
    let second = w.store_bytes(data).await.unwrap();
    let after = w.stats();
    w.finish().await.unwrap();
    let new_chunks = after.chunks_new - before.chunks_new;
    let new_bytes = after.bytes_new_raw - before.bytes_new_raw;
    println!(
        "1-byte change: {new_chunks} new chunks, {new_bytes} new bytes of {} chunks",
        second.chunks.len()
    );
    assert!((1..=2).contains(&new_chunks), "{new_chunks} new chunks");
    assert!(new_bytes <= 2 * t.repo.config().chunker.max_size as u64);
    let differing = first
        .chunks
        .iter()
        .zip(&second.chunks)
        .filter(|(a, b)| a != b)
        .count();
    assert!(differing <= 2 && first.chunks.len() == second.chunks.len());
}

/// Commit one manifest and return everything needed to damage it.
async fn committed(t: &TestRepo) -> Vec<u8> {
    let data = db_like_bytes(3 * 1024 * 1024, 5);
    let w = t.repo.writer("t").await.unwrap();
    let s = w.store_bytes(data.clone()).await.unwrap();
    w.commit(&manifest(
        "backups/x/1",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    w.finish().await.unwrap();
    data
}

async fn flip_byte(url: &str, key: &str, at: usize) {
    let b = backend::open(url, false).unwrap();
    let mut v = backend::get(&*b, key).await.unwrap().to_vec();
    let i = at.min(v.len() - 1);
    v[i] ^= 0x01;
    b.put(key, Bytes::from(v), WriteMode::Overwrite)
        .await
        .unwrap();
}

async fn restore_all(url: &str) -> Result<Vec<u8>, RepoError> {
    let (opts, _cache) = fresh_opts();
    let pw = || Ok(Zeroizing::new(PASS.to_vec()));
    let r = Repository::open(url, &pw, opts).await?;
    restore_first(&r, "backups/x/1").await
}

/// The bytes of the first entry of manifest `name`.
async fn restore_first(r: &Repository, name: &str) -> Result<Vec<u8>, RepoError> {
    let m = r.read_manifest(name).await?;
    let mut out = Vec::new();
    r.restore_entry(&m.entries[0], &mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flipped_byte_in_each_object_kind_is_named() {
    // For each kind: a fresh repository, one flipped byte, and the error must
    // name the damaged object.
    for kind in ["config", "keys/", "packs/", "index/", "manifests/"] {
        let t = local_repo(test_init()).await;
        let data = committed(&t).await;
        assert_eq!(restore_all(&t.url).await.unwrap(), data);
        let key = if kind == "config" {
            "config".to_string()
        } else {
            // The data pack is the larger one.
            let b = backend::open(&t.url, false).unwrap();
            let mut objs = backend::list(&*b, kind).await.unwrap();
            objs.sort_by_key(|o| std::cmp::Reverse(o.size));
            objs[0].key.clone()
        };
        for at in [9usize, 100, 4000] {
            flip_byte(&t.url, &key, at).await;
            let err = restore_all(&t.url)
                .await
                .expect_err(&format!("{key} flipped at {at}"));
            let msg = err.to_string();
            let named = if kind == "packs/" {
                let id = pack_id_from_key(&key).unwrap();
                msg.contains(&id.to_hex())
            } else {
                msg.contains(&key)
            };
            assert!(named, "error for {key} does not name it: {msg}");
            flip_byte(&t.url, &key, at).await; // undo
        }
        assert_eq!(
            restore_all(&t.url).await.unwrap(),
            data,
            "after undo of {kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passphrase_is_refused_clearly() {
    let t = local_repo(test_init()).await;
    let (opts, _c) = fresh_opts();
    let pw = || Ok(Zeroizing::new(b"not it".to_vec()));
    let e = Repository::open(&t.url, &pw, opts)
        .await
        .err()
        .expect("must fail");
    assert!(matches!(e, RepoError::WrongPassphrase { .. }), "{e}");
    assert!(e.to_string().contains("wrong passphrase"));
}

/// Someone with write access to the storage but not the key replaces the
/// config (MAC under a master key of theirs) and adds that key in the
/// clear. An encrypted repository must not open with it, and a cached key
/// that no longer authenticates the config is an alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_config_and_clear_key_do_not_open_an_encrypted_repository() {
    use pgcairn::repo::crypto::{KdfParams, MasterKey};
    use pgcairn::repo::keys::KeyFile;
    let t = local_repo(test_init()).await;
    let (mut cached, _c) = fresh_opts();
    cached.key_cache = true;
    let right = || Ok(Zeroizing::new(PASS.to_vec()));
    Repository::open(&t.url, &right, cached.clone())
        .await
        .expect("opens, and caches its key");

    let root = std::path::Path::new(&t.url);
    let (cfg, _, _) = RepoConfig::decode(&std::fs::read(root.join("config")).unwrap()).unwrap();
    let theirs = MasterKey::generate().unwrap();
    let forged = cfg.encode(&theirs.derive().mac).unwrap();
    std::fs::remove_file(root.join("config")).unwrap();
    std::fs::write(root.join("config"), forged).unwrap();
    let id = "0".repeat(32);
    let key = KeyFile::wrap(
        &cfg.repo_id(),
        &theirs,
        None,
        KdfParams::DEFAULT,
        id.clone(),
        0,
    )
    .unwrap();
    std::fs::write(root.join("keys").join(&id), key.encode().unwrap()).unwrap();

    let wrong = || Ok(Zeroizing::new(b"not it".to_vec()));
    let e = Repository::open(&t.url, &wrong, fresh_opts().0)
        .await
        .err()
        .expect("the clear key must not open it");
    assert!(matches!(e, RepoError::WrongPassphrase { .. }), "{e}");
    let e = Repository::open(&t.url, &right, fresh_opts().0)
        .await
        .err()
        .expect("the real key does not authenticate the forged config");
    assert!(e.to_string().contains("MAC"), "{e}");
    let e = Repository::open(&t.url, &right, cached)
        .await
        .err()
        .expect("the cached key is an alarm");
    assert!(e.to_string().contains("replaced"), "{e}");

    // The same with a config that says "unencrypted": refused when the
    // caller has a passphrase for the repository.
    let plain = RepoConfig {
        encryption: Encryption::None,
        ..cfg.clone()
    };
    std::fs::remove_file(root.join("config")).unwrap();
    std::fs::write(
        root.join("config"),
        plain.encode(&theirs.derive().mac).unwrap(),
    )
    .unwrap();
    let (mut expecting, _c2) = fresh_opts();
    expecting.expect_encrypted = true;
    let e = Repository::open(&t.url, &right, expecting)
        .await
        .err()
        .expect("an unencrypted config must not open when a passphrase is configured");
    assert!(e.to_string().contains("not encrypted"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_keys_open_the_same_repository() {
    let t = local_repo(test_init()).await;
    committed(&t).await;
    let kdf = test_init().kdf;
    let second = t.repo.add_key(b"second passphrase", kdf).await.unwrap();
    let (opts, _c) = fresh_opts();
    let pw = || Ok(Zeroizing::new(b"second passphrase".to_vec()));
    let r2 = Repository::open(&t.url, &pw, opts)
        .await
        .expect("second key opens");
    assert_eq!(r2.current_key(), second);
    assert_eq!(
        r2.read_manifest("backups/x/1").await.unwrap().entries.len(),
        1
    );
    let first = t.repo.current_key().to_string();
    // r2 unlocked with the second key and cannot tell that the first one
    // opens this repository: it keeps the key it can vouch for.
    let e = r2.remove_key(&second).await.unwrap_err();
    assert!(e.to_string().contains("another key's passphrase"), "{e}");
    r2.remove_key(&first).await.unwrap();
    assert!(matches!(
        Repository::open(
            &t.url,
            &|| Ok(Zeroizing::new(PASS.to_vec())),
            fresh_opts().0
        )
        .await,
        Err(RepoError::WrongPassphrase { .. })
    ));
    let e = r2.remove_key(&second).await.unwrap_err();
    assert!(e.to_string().contains("last key"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unencrypted_repository_needs_no_passphrase_and_says_so() {
    let init = InitOptions {
        encryption: Encryption::None,
        ..test_init()
    };
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("plain").to_string_lossy().to_string();
    let (opts, _c) = fresh_opts();
    let r = Repository::init(&url, &init, None, opts).await.unwrap();
    let data = db_like_bytes(1 << 20, 3);
    let w = r.writer("t").await.unwrap();
    let s = w.store_bytes(data.clone()).await.unwrap();
    w.commit(&manifest(
        "backups/x/1",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    w.finish().await.unwrap();
    let never = || -> Result<Zeroizing<Vec<u8>>, String> { Err("must not ask".into()) };
    let r2 = Repository::open(&url, &never, fresh_opts().0)
        .await
        .unwrap();
    assert_eq!(r2.info().await.unwrap().encryption, "none");
    assert_eq!(restore_all(&url).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_never_overwritten() {
    let t = local_repo(test_init()).await;
    committed(&t).await;
    let w = t.repo.writer("t").await.unwrap();
    let s = w.store_bytes(b"different".to_vec()).await.unwrap();
    let e = w
        .commit(&manifest(
            "backups/x/1",
            Value::Null,
            vec![entry("g", s, Value::Null)],
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::Conflict { .. }), "{e}");
    w.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_rescues_chunks_in_condemned_packs() {
    let t = local_repo(test_init()).await;
    let data = committed(&t).await;
    let b = t.repo.backend();
    let data_packs: Vec<String> = {
        let mut v = backend::list(&*b, "packs/").await.unwrap();
        v.sort_by_key(|o| std::cmp::Reverse(o.size));
        vec![v[0].key.clone()]
    };
    let old_pack = pack_id_from_key(&data_packs[0]).unwrap();
    // A collector condemns the data pack, listing every chunk of it as garbage
    // (as if backups/x/1 had been expired).
    let m1 = t.repo.read_manifest("backups/x/1").await.unwrap();
    let mark = GcMark {
        id: "m1".into(),
        created_local: 0,
        packs: vec![CondemnedPack {
            pack: old_pack,
            garbage: m1.entries[0].chunks.iter().map(|c| c.0).collect(),
        }],
    };
    let (opts, _c) = fresh_opts();
    let pw = || Ok(Zeroizing::new(PASS.to_vec()));
    let r = Repository::open(&t.url, &pw, opts).await.unwrap();
    // A writer whose session began before the mark deduplicates against the
    // condemned pack; commit must rescue those chunks.
    let w = r.writer("t").await.unwrap();
    r.write_mark(&mark).await.unwrap();
    let s = w.store_bytes(data.clone()).await.unwrap();
    w.commit(&manifest(
        "backups/x/2",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    let st = w.finish().await.unwrap();
    assert_eq!(
        st.chunks_rescued as usize,
        m1.entries[0].chunks.len(),
        "{st:?}"
    );
    // A writer that starts after the mark relies only on copies outside the
    // condemned pack (which may be swept during its session): the rescued ones.
    let w = r.writer("t").await.unwrap();
    let s3 = w.store_bytes(data.clone()).await.unwrap();
    w.commit(&manifest(
        "backups/x/3",
        Value::Null,
        vec![entry("f", s3, Value::Null)],
    ))
    .await
    .unwrap();
    let st3 = w.finish().await.unwrap();
    assert_eq!(st3.chunks_rescued, 0, "{st3:?}");
    assert_eq!(st3.chunks_new, 0, "{st3:?}");
    assert_eq!(st3.chunks_reused, st.chunks_reused, "{st3:?} vs {st:?}");

    // The sweep deletes the condemned pack; the new backup still restores
    // (the reader meets the missing pack and uses the rescued copy).
    b.delete(&data_packs[0]).await.unwrap();
    let (opts, _c2) = fresh_opts();
    let r3 = Repository::open(&t.url, &pw, opts).await.unwrap();
    let m2 = r3.read_manifest("backups/x/2").await.unwrap();
    let mut out = Vec::new();
    r3.restore_entry(&m2.entries[0], &mut out).await.unwrap();
    assert!(out == data);
    // The expired backup does not, and says which pack is missing.
    let e = r3.restore_entry(&m1.entries[0], &mut Vec::new()).await;
    assert!(e.is_ok(), "same chunks, rescued copies serve both: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_past_its_lease_aborts_without_committing() {
    let init = InitOptions {
        gc: GcParams {
            grace_period_secs: 4,
            max_writer_secs: 1,
            ..GcParams::DEFAULT
        },
        ..test_init()
    };
    let t = local_repo(init).await;
    let w = t.repo.writer("t").await.unwrap();
    let s = w.store_bytes(b"abc".to_vec()).await.unwrap();
    // What is tested is the passing of time itself: the writer outlives its
    // 1 s limit (store timestamps have whole seconds).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let e = w
        .commit(&manifest(
            "backups/x/late",
            Value::Null,
            vec![entry("f", s, Value::Null)],
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::LeaseExpired { .. }), "{e}");
    assert!(t.repo.list_manifests("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_deduplicate_and_both_restore() {
    let t = local_repo(test_init()).await;
    let data = db_like_bytes(8 * 1024 * 1024, 9);
    let run = |name: &'static str| {
        let repo = t.repo.clone();
        let data = data.clone();
        async move {
            let w = repo.writer(name).await.unwrap();
            let s = w.store_bytes(data).await.unwrap();
            w.commit(&manifest(
                format!("backups/c/{name}"),
                Value::Null,
                vec![entry("f", s, Value::Null)],
            ))
            .await
            .unwrap();
            w.finish().await.unwrap();
        }
    };
    tokio::join!(run("a"), run("b"));
    let (r, _c) = reopen(&t.url).await;
    for n in ["backups/c/a", "backups/c/b"] {
        assert!(restore_first(&r, n).await.unwrap() == data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_reloads_the_index_once_when_a_pack_is_gone() {
    let t = local_repo(test_init()).await;
    let data = committed(&t).await;
    let b = t.repo.backend();
    let old_index = backend::list(&*b, "index/").await.unwrap();
    assert_eq!(old_index.len(), 1);
    let mut packs = backend::list(&*b, "packs/").await.unwrap();
    packs.sort_by_key(|o| std::cmp::Reverse(o.size));
    let data_pack = packs[0].key.clone();

    // A reader loads the index now, before the repack below.
    let (reader, _c) = reopen(&t.url).await;
    let m1 = reader.read_manifest("backups/x/1").await.unwrap();

    // "Repack": condemn the data pack, let a writer rescue its chunks into a
    // new pack and index, then delete the old pack and the old index object.
    let mark = GcMark {
        id: "repack".into(),
        created_local: 0,
        packs: vec![CondemnedPack {
            pack: pack_id_from_key(&data_pack).unwrap(),
            garbage: m1.entries[0].chunks.iter().map(|c| c.0).collect(),
        }],
    };
    t.repo.write_mark(&mark).await.unwrap();
    let w = t.repo.writer("t").await.unwrap();
    let s = w.store_bytes(data.clone()).await.unwrap();
    w.commit(&manifest(
        "backups/x/2",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    w.finish().await.unwrap();
    b.delete(&data_pack).await.unwrap();
    b.delete(&old_index[0].key).await.unwrap();

    // The reader's index still points at the deleted pack: it must reload
    // once and find the new copy.
    let mut out = Vec::new();
    reader
        .restore_entry(&m1.entries[0], &mut out)
        .await
        .expect("restore after reload");
    assert!(out == data);
}

/// After incremental backups a file's blocks alternate between the packs
/// of different sessions. The reader groups a window's chunks by pack, so
/// restoring such a file costs a few ranged reads per window, not one per
/// block (which, on object storage, is one request per 32 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_blocks_restore_with_few_reads() {
    const BLOCK: usize = 32 * 1024;
    let t = local_repo(test_init()).await;
    let mut data = db_like_bytes(16 * 1024 * 1024, 21);
    commit_blocks(&t.repo, "backups/x/1", &data, BLOCK, None).await;
    // Day 2: every other block changes, so the file alternates packs.
    let blocks = data.len() / BLOCK;
    for b in (0..blocks).step_by(2) {
        data[b * BLOCK + 100] ^= 0x5a;
    }
    let w = t.repo.writer("t").await.unwrap();
    let s = w
        .store_blocks(Cursor::new(data.clone()), BLOCK)
        .await
        .unwrap();
    assert_eq!(w.stats().chunks_new as usize, blocks / 2);
    w.commit(&manifest(
        "backups/x/2",
        Value::Null,
        vec![entry("f", s, Value::Null)],
    ))
    .await
    .unwrap();
    w.finish().await.unwrap();

    let (r, _c) = reopen(&t.url).await;
    let m = r.read_manifest("backups/x/2").await.unwrap();
    let before = r.pack_reads();
    let mut out = Vec::new();
    r.restore_entry(&m.entries[0], &mut out).await.unwrap();
    let reads = r.pack_reads() - before;
    println!("{blocks} blocks from two sessions' packs restored with {reads} ranged reads");
    assert!(out == data, "restored bytes differ");
    // Four 4 MiB windows, each reading one range from each session's pack.
    assert!(reads <= 16, "{reads} ranged reads for {blocks} blocks");
}

/// A file whose blocks repeat (all-zero pages, copies of one page) and
/// whose second version is stored partly as deltas restores byte for byte:
/// each window is decoded into one buffer, a repeated block copied from
/// its first place in it, a delta decoded against its base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_blocks_and_deltas_restore_exactly() {
    const BLOCK: usize = 32 * 1024;
    let t = local_repo(test_init()).await;
    let blocks = 300;
    let mut data = db_like_bytes(blocks * BLOCK, 33);
    let copy = data[3 * BLOCK..4 * BLOCK].to_vec();
    for b in 0..blocks {
        match b % 5 {
            0 => data[b * BLOCK..(b + 1) * BLOCK].fill(0),
            1 => data[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&copy),
            _ => {}
        }
    }
    let (_, first) = commit_blocks(&t.repo, "backups/x/1", &data, BLOCK, None).await;
    // Day 2: a few bytes change in every third block (zero blocks too).
    for b in (0..blocks).step_by(3) {
        data[b * BLOCK + 999] ^= 0x77;
    }
    let (r, _c) = reopen(&t.url).await;
    let (stats, _) = commit_blocks(&r, "backups/x/2", &data, BLOCK, Some(first)).await;
    assert!(stats.chunks_delta > 0, "no deltas: {stats:?}");
    let (r, _c) = reopen(&t.url).await;
    let out = restore_first(&r, "backups/x/2").await.unwrap();
    assert!(out == data, "restored bytes differ");
}

/// A backup's changed blocks are stored as deltas against their previous
/// versions, which the writer must read. The bases of a batch sit next to
/// each other in the previous backup's packs, so they are read with
/// grouped requests, not one request per changed block (on object
/// storage, one GET per 32 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bases_are_read_with_few_requests() {
    const BLOCK: usize = 32 * 1024;
    let t = local_repo(test_init()).await;
    let mut data = db_like_bytes(16 * 1024 * 1024, 33);
    let (_, first) = commit_blocks(&t.repo, "backups/x/1", &data, BLOCK, None).await;
    let blocks = data.len() / BLOCK;
    for b in (0..blocks).step_by(2) {
        data[b * BLOCK + 200] ^= 0x33;
    }
    let (r, _c) = reopen(&t.url).await;
    let before = r.pack_reads();
    let (stats, _) = commit_blocks(&r, "backups/x/2", &data, BLOCK, Some(first)).await;
    let reads = r.pack_reads() - before;
    println!(
        "{} changed blocks stored as {} deltas with {reads} ranged reads of their bases",
        blocks / 2,
        stats.chunks_delta
    );
    assert_eq!(stats.chunks_delta as usize, blocks / 2);
    assert!(
        reads * 4 <= blocks as u64 / 2,
        "{reads} reads for {} bases",
        blocks / 2
    );
    let out = restore_first(&r, "backups/x/2").await.unwrap();
    assert!(out == data, "restored bytes differ");
}

/// A writer that makes deltas against blocks a collector condemns during
/// its session rescues those bases at commit, though no manifest
/// references them: after the condemned pack is swept, the new backup
/// still restores. (Without the bases in the rescue it cannot: the
/// changed blocks' old versions exist only in the swept pack.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_rescues_delta_bases_in_condemned_packs() {
    const BLOCK: usize = 32 * 1024;
    let t = local_repo(test_init()).await;
    let v1 = db_like_bytes(4 << 20, 5);
    let blocks = v1.len() / BLOCK;
    let (_, c1) = commit_blocks(&t.repo, "backups/x/1", &v1, BLOCK, None).await;
    let b = t.repo.backend();
    let data_packs: Vec<String> = backend::list(&*b, "packs/")
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.size > 64 * 1024)
        .map(|o| o.key)
        .collect();
    assert!(!data_packs.is_empty());
    let mark = GcMark {
        id: "m1".into(),
        created_local: 0,
        packs: data_packs
            .iter()
            .map(|k| CondemnedPack {
                pack: pack_id_from_key(k).unwrap(),
                garbage: c1.iter().map(|c| c.0).collect(),
            })
            .collect(),
    };
    let (opts, _c) = fresh_opts();
    let pw = || Ok(Zeroizing::new(PASS.to_vec()));
    let r = Repository::open(&t.url, &pw, opts).await.unwrap();
    // The session starts, then the collector marks backups/x/1's blocks.
    let w = r.writer("t").await.unwrap();
    r.write_mark(&mark).await.unwrap();
    let mut v2 = v1.clone();
    for blk in (0..blocks).step_by(2) {
        v2[blk * BLOCK + 300..blk * BLOCK + 308].copy_from_slice(b"day two!");
    }
    let s2 = w
        .store_blocks_after(
            Cursor::new(v2.clone()),
            BLOCK,
            Some(std::sync::Arc::new(c1)),
        )
        .await
        .unwrap();
    w.commit(&manifest(
        "backups/x/2",
        Value::Null,
        vec![entry("f", s2, Value::Null)],
    ))
    .await
    .unwrap();
    let st = w.finish().await.unwrap();
    println!("{st:?}");
    assert_eq!(st.chunks_delta as usize, blocks / 2, "{st:?}");
    // Unchanged blocks (referenced) and the changed blocks' bases.
    assert_eq!(st.chunks_rescued as usize, blocks, "{st:?}");
    for k in &data_packs {
        b.delete(k).await.unwrap();
    }
    let (opts, _c2) = fresh_opts();
    let r2 = Repository::open(&t.url, &pw, opts).await.unwrap();
    let m2 = r2.read_manifest("backups/x/2").await.unwrap();
    let mut out = Vec::new();
    r2.restore_entry(&m2.entries[0], &mut out).await.unwrap();
    assert!(out == v2, "restored bytes differ");
}
