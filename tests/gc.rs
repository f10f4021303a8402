//! The garbage collector end to end, on real repositories (local disk and
//! the moto S3 server scripts/test.sh starts) with a grace period of a few
//! seconds set at `init`. Ages come from the store's clock, whose
//! granularity is one second: tests wait (polling, bounded) until the
//! store's clock has passed a deadline, never for a fixed time.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Cursor;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ciborium::Value;
use common::*;
use pgcairn::repo::backend::{self, WriteMode};
use pgcairn::repo::gc::{GcOptions, GcReport, GcStep};
use pgcairn::repo::store::{entry, manifest};
use pgcairn::repo::uploads::UploadListing;
use pgcairn::repo::verify::VerifyOptions;
use pgcairn::repo::{ChunkerParams, GcParams, InitOptions, RepoError, Repository};

/// Small chunks and packs, so that a few MiB make many of each, and a
/// grace period of `grace` seconds.
fn gc_init(grace: i64) -> InitOptions {
    InitOptions {
        chunker: ChunkerParams {
            min_size: 4 * 1024,
            avg_size: 16 * 1024,
            max_size: 64 * 1024,
        },
        pack_target_size: 256 * 1024,
        gc: GcParams {
            grace_period_secs: grace,
            max_writer_secs: grace - 1,
            max_clock_skew_secs: 300,
        },
        ..test_init()
    }
}

/// The store's clock now: write a probe object and read its timestamp.
async fn store_now(r: &Repository) -> i64 {
    let b = r.backend();
    b.put(
        "test-clock-probe",
        Bytes::from_static(b"x"),
        WriteMode::Overwrite,
    )
    .await
    .expect("probe");
    b.head("test-clock-probe")
        .await
        .expect("head probe")
        .modified
}

/// Wait until the store's clock is past `t` (bounded).
async fn wait_store_past(r: &Repository, t: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while store_now(r).await <= t {
        assert!(Instant::now() < deadline, "store clock never passed {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until everything written so far is older than the grace period.
async fn wait_grace(r: &Repository) {
    let grace = r.config().gc.grace_period_secs;
    let now = store_now(r).await;
    wait_store_past(r, now + grace).await;
}

async fn gc(r: &Repository) -> GcReport {
    r.gc(&GcOptions::default(), &()).await.expect("gc")
}

/// Several files stored and committed as one manifest.
async fn commit(r: &Repository, name: &str, files: &[Vec<u8>]) {
    let w = r.writer("test").await.expect("writer");
    let mut entries = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let s = w.store_reader(Cursor::new(f.clone())).await.expect("store");
        entries.push(entry(format!("f{i}"), s, Value::Null));
    }
    w.commit(&manifest(name, Value::Null, entries))
        .await
        .expect("commit");
    w.finish().await.expect("finish");
}

/// Every expected manifest restores byte-exact from a fresh cache, no
/// other manifest exists, and verify (with every pack read) is clean.
async fn assert_sound(url: &str, expected: &BTreeMap<String, Vec<Vec<u8>>>) {
    let (r, _cache) = reopen(url).await;
    let names = r.list_manifests("").await.expect("list");
    assert_eq!(
        names,
        expected.keys().cloned().collect::<Vec<_>>(),
        "manifests"
    );
    for (name, files) in expected {
        let m = r.read_manifest(name).await.expect("read manifest");
        assert_eq!(m.entries.len(), files.len(), "{name}");
        for (e, data) in m.entries.iter().zip(files) {
            let mut out = Vec::new();
            r.restore_entry(e, &mut out)
                .await
                .unwrap_or_else(|err| panic!("restore {name}/{}: {err}", e.path));
            assert!(out == *data, "{name}/{} differs", e.path);
        }
    }
    let v = r
        .verify(
            &VerifyOptions {
                manifests: None,
                read_data_percent: Some(100),
            },
            &(),
        )
        .await
        .expect("verify");
    assert!(v.is_clean(), "verify: {:#?}", v.problems);
}

/// Bytes of packs in the repository.
async fn pack_bytes(r: &Repository) -> u64 {
    backend::list(&*r.backend(), "packs/")
        .await
        .expect("list")
        .iter()
        .map(|o| o.size)
        .sum()
}

/// Generation `g` of a churning "database": a constant file, a table whose
/// 64 KiB regions change a quarter at a time, and 1 MiB of new "WAL".
fn generation(g: u64) -> Vec<Vec<u8>> {
    let base = random_bytes(1 << 20, 1);
    let mut table = Vec::with_capacity(32 << 16);
    for region in 0..32u64 {
        let changed = (0..=g).rev().find(|x| (region + x) % 4 == 0).unwrap_or(0);
        table.extend(random_bytes(1 << 16, 1000 + region * 100 + changed));
    }
    let wal = random_bytes(1 << 20, 50_000 + g);
    vec![base, table, wal]
}

/// N backups with churn; the oldest are deleted (as `expire` would); two
/// collections a grace period apart reclaim their space. The result is
/// compared with a repository that only ever held the retained backups.
async fn reclaim(t: &TestRepo, fresh: &TestRepo) {
    let n = 6;
    let keep = 2;
    let mut expected = BTreeMap::new();
    for g in 0..n {
        let name = format!("backups/db/{g:02}");
        commit(&t.repo, &name, &generation(g)).await;
        if g >= n - keep {
            commit(&fresh.repo, &name, &generation(g)).await;
            expected.insert(name, generation(g));
        }
    }
    let before = pack_bytes(&t.repo).await;
    let needed = pack_bytes(&fresh.repo).await;
    for g in 0..n - keep {
        t.repo
            .delete_manifest(&format!("backups/db/{g:02}"))
            .await
            .expect("delete");
    }
    wait_grace(&t.repo).await;
    let first = gc(&t.repo).await;
    println!("first run (mark): {first:#?}");
    assert!(first.mark.is_some(), "garbage must be marked");
    assert!(first.packs_condemned > 0);
    assert_eq!(
        first.packs_swept, 0,
        "nothing is deleted before a grace period"
    );
    assert_eq!(pack_bytes(&t.repo).await, first.pack_bytes_after);
    assert_sound(&t.url, &expected).await;
    wait_grace(&t.repo).await;
    let second = gc(&t.repo).await;
    println!("second run (sweep): {second:#?}");
    assert_eq!(second.marks_swept, 1);
    assert!(second.bytes_reclaimed > 0);
    let after = pack_bytes(&t.repo).await;
    assert_sound(&t.url, &expected).await;
    println!(
        "STORAGE: {n} backups with churn: {before} bytes of packs; {keep} retained need {needed} \
         (a repository that only ever held them); after expire + gc: {after} ({:+.1} % of needed)",
        (after as f64 / needed as f64 - 1.0) * 100.0
    );
    assert!(after < before, "nothing reclaimed");
    assert!(
        after as f64 <= needed as f64 * 1.20,
        "after gc {after} bytes, the retained backups need {needed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_gc_returns_size_to_what_retained_backups_need() {
    let t = local_repo(gc_init(2)).await;
    let fresh = local_repo(gc_init(2)).await;
    reclaim(&t, &fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_gc_returns_size_to_what_retained_backups_need() {
    let t = s3_repo(gc_init(5)).await;
    let fresh = s3_repo(gc_init(5)).await;
    reclaim(&t, &fresh).await;
}

/// A writer deduplicates against a pack that a collector condemns while
/// the writer runs: at commit it sees the new mark and rescues the chunks
/// (stores them again), and the sweep keeps what it needs. A writer that
/// starts after the mark stores them anew instead.
async fn reused_chunk_survives(t: &TestRepo) {
    let old = vec![random_bytes(700 * 1024, 7), random_bytes(300 * 1024, 8)];
    commit(&t.repo, "backups/a/1", &old).await;
    t.repo.delete_manifest("backups/a/1").await.unwrap();
    wait_grace(&t.repo).await;

    let w = t.repo.writer("test").await.unwrap();
    let s = w.store_bytes(old[0].clone()).await.unwrap();
    let mark = gc(&t.repo).await;
    assert!(mark.packs_condemned > 0, "{mark:#?}");
    w.commit(&manifest(
        "backups/a/2",
        Value::Null,
        vec![entry("f0", s, Value::Null)],
    ))
    .await
    .unwrap();
    let st = w.finish().await.unwrap();
    assert!(st.chunks_reused > 0 && st.chunks_rescued > 0, "{st:?}");

    let w = t.repo.writer("test").await.unwrap();
    let s = w.store_bytes(old[1].clone()).await.unwrap();
    w.commit(&manifest(
        "backups/a/3",
        Value::Null,
        vec![entry("f0", s, Value::Null)],
    ))
    .await
    .unwrap();
    let st = w.finish().await.unwrap();
    assert!(st.chunks_new > 0 && st.chunks_rescued == 0, "{st:?}");

    wait_grace(&t.repo).await;
    let sweep = gc(&t.repo).await;
    assert_eq!(sweep.marks_swept, 1, "{sweep:#?}");
    assert!(sweep.packs_swept > 0, "{sweep:#?}");
    let expected = BTreeMap::from([
        ("backups/a/2".to_string(), vec![old[0].clone()]),
        ("backups/a/3".to_string(), vec![old[1].clone()]),
    ]);
    assert_sound(&t.url, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_chunk_reused_during_grace_period_survives() {
    let t = local_repo(gc_init(4)).await;
    reused_chunk_survives(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_chunk_reused_during_grace_period_survives() {
    let t = s3_repo(gc_init(5)).await;
    reused_chunk_survives(&t).await;
}

/// A mark older than a writer's session falls due while the writer runs
/// (the session starts late in the mark's grace period): the writer did
/// not deduplicate against the condemned pack, so the sweep deleting it
/// mid-session breaks nothing, and the commit succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_swept_during_a_writer_session_breaks_nothing() {
    let t = local_repo(gc_init(6)).await;
    let old = vec![random_bytes(600 * 1024, 31)];
    commit(&t.repo, "backups/a/1", &old).await;
    t.repo.delete_manifest("backups/a/1").await.unwrap();
    wait_grace(&t.repo).await;
    let mark = gc(&t.repo).await;
    let key = mark.mark.clone().expect("a mark");
    let marked_at = t.repo.backend().head(&key).await.unwrap().modified;
    wait_store_past(&t.repo, marked_at + 4).await;

    let w = t.repo.writer("test").await.unwrap();
    let s = w.store_bytes(old[0].clone()).await.unwrap();
    wait_store_past(&t.repo, marked_at + 6).await;
    let sweep = gc(&t.repo).await;
    assert_eq!(sweep.marks_swept, 1, "{sweep:#?}");
    assert!(sweep.packs_swept > 0, "{sweep:#?}");
    w.commit(&manifest(
        "backups/a/2",
        Value::Null,
        vec![entry("f0", s, Value::Null)],
    ))
    .await
    .expect("commit after the sweep");
    let st = w.finish().await.unwrap();
    assert!(st.chunks_new > 0 && st.chunks_rescued == 0, "{st:?}");
    let expected = BTreeMap::from([("backups/a/2".to_string(), old)]);
    assert_sound(&t.url, &expected).await;
}

/// A writer that read the marks before the mark existed and committed
/// after it (simulated: the mark is hidden during the commit, then put
/// back as it was): the sweep finds the reference and keeps the packs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_that_missed_the_mark_keeps_its_packs() {
    let t = local_repo(gc_init(2)).await;
    let old = vec![random_bytes(600 * 1024, 21)];
    commit(&t.repo, "backups/a/1", &old).await;
    t.repo.delete_manifest("backups/a/1").await.unwrap();
    wait_grace(&t.repo).await;
    let mark = gc(&t.repo).await;
    let key = mark.mark.clone().expect("a mark");
    let b = t.repo.backend();
    let saved = backend::get(&*b, &key).await.unwrap();
    b.delete(&key).await.unwrap();
    let w = t.repo.writer("test").await.unwrap();
    let s = w.store_bytes(old[0].clone()).await.unwrap();
    w.commit(&manifest(
        "backups/a/2",
        Value::Null,
        vec![entry("f0", s, Value::Null)],
    ))
    .await
    .unwrap();
    assert_eq!(w.finish().await.unwrap().chunks_rescued, 0);
    b.put(&key, saved, WriteMode::Create).await.unwrap();

    wait_grace(&t.repo).await;
    let sweep = gc(&t.repo).await;
    println!("{sweep:#?}");
    assert_eq!(sweep.marks_swept, 1);
    assert!(!sweep.packs_kept.is_empty(), "{sweep:#?}");
    let expected = BTreeMap::from([("backups/a/2".to_string(), old)]);
    assert_sound(&t.url, &expected).await;
}

/// A pack in no index is a writer's work in progress until it is older
/// than the grace period; after that it is condemned, then swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn young_unindexed_pack_is_left_alone() {
    let t = local_repo(gc_init(2)).await;
    commit(&t.repo, "backups/a/1", &[random_bytes(100 * 1024, 3)]).await;
    let bytes = random_bytes(50_000, 99);
    let id = blake3::hash(&bytes).to_hex().to_string();
    let key = format!("packs/{}/{id}", &id[..2]);
    let b = t.repo.backend();
    b.put(&key, Bytes::from(bytes), WriteMode::Create)
        .await
        .unwrap();
    let r = gc(&t.repo).await;
    assert_eq!(r.packs_condemned, 0, "{r:#?}");
    assert!(b.head(&key).await.is_ok(), "a young pack was deleted");

    wait_grace(&t.repo).await;
    let r = gc(&t.repo).await;
    assert_eq!(r.packs_condemned_unindexed, 1, "{r:#?}");
    assert_eq!(r.packs_condemned, 1, "{r:#?}");
    assert!(b.head(&key).await.is_ok(), "deleted before the sweep");
    wait_grace(&t.repo).await;
    let r = gc(&t.repo).await;
    assert_eq!(r.packs_swept, 1, "{r:#?}");
    assert!(matches!(
        b.head(&key).await,
        Err(backend::BackendError::NotFound)
    ));
    let expected = BTreeMap::from([("backups/a/1".to_string(), vec![random_bytes(100 * 1024, 3)])]);
    assert_sound(&t.url, &expected).await;
}

/// What a killed local writer leaves: object_store stages every write in
/// `<key>#<n>` and renames it into place, and its listings hide staging
/// files. The collector finds them, removes those older than the grace
/// period and leaves younger ones (a running writer's) alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_staging_files_of_killed_writers_are_removed() {
    let t = local_repo(gc_init(2)).await;
    commit(&t.repo, "backups/a/1", &[random_bytes(100 * 1024, 3)]).await;
    let root = std::path::Path::new(&t.url);
    let old = root.join("packs/ab/leftover#1");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, random_bytes(300_000, 5)).unwrap();
    let listed = backend::list(&*t.repo.backend(), "packs/").await.unwrap();
    assert!(
        listed.iter().all(|o| !o.key.contains("leftover")),
        "object_store lists staging files now: {listed:?}"
    );
    wait_grace(&t.repo).await;
    let young = root.join("index/leftover#2");
    std::fs::write(&young, b"in progress").unwrap();

    let dry = t
        .repo
        .gc(
            &GcOptions {
                dry_run: true,
                ..Default::default()
            },
            &(),
        )
        .await
        .expect("dry run");
    assert_eq!(dry.incomplete_uploads.aborted, 1, "{dry:#?}");
    assert!(old.exists(), "a dry run removed a staging file");

    let r = gc(&t.repo).await;
    let u = &r.incomplete_uploads;
    assert!(u.checked, "{r:#?}");
    assert_eq!((u.found, u.aborted, u.young), (2, 1, 1), "{r:#?}");
    assert_eq!(u.bytes_aborted, 300_000);
    assert!(!old.exists(), "the old staging file is still there");
    assert!(young.exists(), "a young staging file was removed");
    let expected = BTreeMap::from([("backups/a/1".to_string(), vec![random_bytes(100 * 1024, 3)])]);
    assert_sound(&t.url, &expected).await;
}

/// S3 multipart uploads left incomplete under the repository's prefix are
/// aborted once their last activity is older than the grace period; a
/// younger one and one under another prefix of the same bucket are left
/// alone. (moto reports every upload as initiated in 2010, so this also
/// shows that a recent part keeps an upload young.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_leftover_multipart_uploads_are_aborted() {
    use object_store::multipart::MultipartStore;
    use object_store::path::Path as StorePath;
    let t = s3_repo(gc_init(3)).await;
    commit(&t.repo, "backups/a/1", &[random_bytes(100 * 1024, 3)]).await;
    let base = s3_base();
    let bucket = base.trim_start_matches("s3://").trim_end_matches('/');
    let prefix = t.url.trim_start_matches(&format!("{base}/"));
    let s3 = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .expect("s3 store");
    let start = |key: String| {
        let s3 = &s3;
        async move {
            let path = StorePath::parse(&key).unwrap();
            let id = s3.create_multipart(&path).await.expect("create multipart");
            s3.put_part(&path, &id, 0, vec![7u8; 1024].into())
                .await
                .expect("upload part");
            id
        }
    };
    let old_id = start(format!("{prefix}/packs/ab/leftover")).await;
    let other_url = format!("{base}/{}", unique("other"));
    let other_prefix = other_url.trim_start_matches(&format!("{base}/"));
    start(format!("{other_prefix}/packs/ab/leftover")).await;
    wait_grace(&t.repo).await;
    let young_id = start(format!("{prefix}/packs/cd/in-progress")).await;

    let b = t.repo.backend();
    let ids = |l: UploadListing| match l {
        UploadListing::Listed(v) => v.into_iter().map(|u| (u.key, u.id)).collect::<Vec<_>>(),
        UploadListing::Unsupported(why) => panic!("S3 uploads not listed: {why}"),
    };
    let mut before = ids(b.incomplete_uploads().await.expect("list uploads"));
    before.sort();
    assert_eq!(
        before,
        vec![
            ("packs/ab/leftover".to_string(), old_id),
            ("packs/cd/in-progress".to_string(), young_id.clone())
        ]
    );
    let r = gc(&t.repo).await;
    let u = &r.incomplete_uploads;
    assert_eq!((u.found, u.aborted, u.young), (2, 1, 1), "{r:#?}");
    assert_eq!(u.bytes_aborted, 1024, "{r:#?}");
    assert!(r.refused.is_empty(), "{r:#?}");
    let after = ids(b.incomplete_uploads().await.expect("list uploads"));
    assert_eq!(after, vec![("packs/cd/in-progress".to_string(), young_id)]);
    let other = backend::open(&other_url, false).expect("open other prefix");
    assert_eq!(
        ids(other.incomplete_uploads().await.expect("list other")).len(),
        1,
        "an upload under another prefix was aborted"
    );
    let expected = BTreeMap::from([("backups/a/1".to_string(), vec![random_bytes(100 * 1024, 3)])]);
    assert_sound(&t.url, &expected).await;
}

/// A collector killed after each step (the test hook stops it there and
/// leaves its lease behind): the repository verifies clean and restores
/// after every run, and later runs finish the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_collector_at_each_step_then_rerun_finishes() {
    for step in GcStep::ALL {
        let t = local_repo(gc_init(2)).await;
        // One writer session: X (garbage) and Y (live) share packs, so
        // those packs are mostly garbage and get repacked; Z is all garbage.
        let x = random_bytes(190 * 1024, 31);
        let y = vec![random_bytes(40 * 1024, 32)];
        let z = vec![random_bytes(400 * 1024, 33)];
        let keep = vec![random_bytes(100 * 1024, 34)];
        let w = t.repo.writer("test").await.unwrap();
        let sx = w.store_bytes(x.clone()).await.unwrap();
        let sy = w.store_bytes(y[0].clone()).await.unwrap();
        for (name, s) in [("x", sx), ("y", sy)] {
            w.commit(&manifest(
                format!("backups/k/{name}"),
                Value::Null,
                vec![entry("f0", s, Value::Null)],
            ))
            .await
            .unwrap();
        }
        w.finish().await.unwrap();
        commit(&t.repo, "backups/k/z", &z).await;
        commit(&t.repo, "backups/k/keep", &keep).await;
        t.repo.delete_manifest("backups/k/x").await.unwrap();
        t.repo.delete_manifest("backups/k/z").await.unwrap();
        let expected = BTreeMap::from([
            ("backups/k/keep".to_string(), keep.clone()),
            ("backups/k/y".to_string(), y.clone()),
        ]);
        let before = pack_bytes(&t.repo).await;

        let mut stops = 0;
        let mut settled = false;
        for round in 0..8 {
            wait_grace(&t.repo).await;
            let opts = GcOptions {
                stop_after: (round < 3).then_some(step),
                ..GcOptions::default()
            };
            match t.repo.gc(&opts, &()).await {
                Ok(r) => {
                    if round >= 3
                        && r.mark.is_none()
                        && r.marks_pending.is_empty()
                        && r.marks_swept == 0
                    {
                        settled = true;
                    }
                }
                Err(RepoError::Task(m)) if m.contains("stopped after") => stops += 1,
                Err(e) => panic!("{step:?} round {round}: {e}"),
            }
            assert_sound(&t.url, &expected).await;
            if settled {
                break;
            }
        }
        assert!(stops > 0, "{step:?} was never reached");
        assert!(settled, "{step:?}: the collection never finished");
        let after = pack_bytes(&t.repo).await;
        let (r, _c) = reopen(&t.url).await;
        let info = r.info().await.unwrap();
        let live = gc(&r).await.live_chunks;
        println!("{step:?}: stopped {stops}x, packs {before} -> {after} bytes, {info:?}");
        assert_eq!(
            info.index_entries, live,
            "{step:?}: every indexed chunk is live once the job is done"
        );
        assert!(after < before / 2, "{step:?}: {before} -> {after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_collector_is_refused_and_dry_run_writes_nothing() {
    let t = local_repo(gc_init(2)).await;
    commit(&t.repo, "backups/a/1", &[random_bytes(200 * 1024, 5)]).await;
    t.repo.delete_manifest("backups/a/1").await.unwrap();
    wait_grace(&t.repo).await;
    let listing = |r: Repository| async move {
        let mut v: Vec<(String, u64)> = backend::list(&*r.backend(), "")
            .await
            .unwrap()
            .into_iter()
            .filter(|o| o.key != "test-clock-probe")
            .map(|o| (o.key, o.size))
            .collect();
        v.sort();
        v
    };
    let before = listing(t.repo.clone()).await;
    let dry = t
        .repo
        .gc(
            &GcOptions {
                dry_run: true,
                ..GcOptions::default()
            },
            &(),
        )
        .await
        .unwrap();
    assert!(dry.packs_condemned > 0, "{dry:#?}");
    assert!(dry.mark.is_none());
    assert_eq!(listing(t.repo.clone()).await, before, "a dry run wrote");

    // A killed collector's lease makes the next one refuse until it is a
    // grace period old.
    let stop = GcOptions {
        stop_after: Some(GcStep::Locked),
        ..GcOptions::default()
    };
    assert!(t.repo.gc(&stop, &()).await.is_err());
    let e = t.repo.gc(&GcOptions::default(), &()).await.unwrap_err();
    assert!(e.to_string().contains("another collector"), "{e}");
    let shorter = GcOptions {
        grace_period_secs: Some(1),
        ..GcOptions::default()
    };
    let e = t.repo.gc(&shorter, &()).await.unwrap_err();
    assert!(e.to_string().contains("only be lengthened"), "{e}");
    wait_grace(&t.repo).await;
    let r = gc(&t.repo).await;
    assert!(r.mark.is_some());
    assert!(r.leases_removed >= 1, "the dead collector's lease: {r:#?}");
}

/// Run by `killed_collector_on_this_machine_does_not_block` as a separate
/// process (this test binary again, this test selected): it takes a
/// collector's lease through the real code path, says so, and waits to be
/// killed. Does nothing when run on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for killed_collector_on_this_machine_does_not_block"]
async fn collector_lease_holder() {
    let Ok(url) = std::env::var("PGCAIRN_TEST_LEASE_HOLDER_REPO") else {
        return;
    };
    let (r, _cache) = reopen(&url).await;
    let stop = GcOptions {
        stop_after: Some(GcStep::Locked),
        ..GcOptions::default()
    };
    assert!(r.gc(&stop, &()).await.is_err(), "stopped after locking");
    println!("lease-held");
    std::future::pending::<()>().await;
}

/// A collector killed on this machine does not block the next one for a
/// grace period: its lease names a process that has ended. While that
/// process lives, the next collector is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_collector_on_this_machine_does_not_block() {
    use tokio::io::AsyncBufReadExt;
    let t = local_repo(gc_init(600)).await;
    commit(&t.repo, "backups/a/1", &[random_bytes(64 * 1024, 9)]).await;
    let mut holder = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "collector_lease_holder",
            "--ignored",
            "--nocapture",
        ])
        .env("PGCAIRN_TEST_LEASE_HOLDER_REPO", &t.url)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the lease holder");
    let mut lines = tokio::io::BufReader::new(holder.stdout.take().expect("stdout")).lines();
    loop {
        let line = lines.next_line().await.expect("read holder");
        match line {
            Some(l) if l.trim() == "lease-held" => break,
            Some(_) => continue,
            None => panic!("the lease holder exited: {:?}", holder.wait().await),
        }
    }
    let e = t.repo.gc(&GcOptions::default(), &()).await.unwrap_err();
    assert!(e.to_string().contains("still running on this host"), "{e}");
    holder.kill().await.expect("kill the holder");
    // A grace period of 600 s has not passed: only the ended process frees it.
    let r = gc(&t.repo).await;
    assert!(
        r.leases_removed >= 1,
        "the killed collector's lease: {r:#?}"
    );
    let leases = backend::list(&*t.repo.backend(), "leases/").await.unwrap();
    assert!(leases.is_empty(), "{leases:?}");
}

async fn write_one(repo: &Repository, name: &str, files: &[Vec<u8>]) -> Result<(), RepoError> {
    let w = repo.writer("test").await?;
    let mut entries = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let s = w.store_bytes(f.clone()).await?;
        entries.push(entry(format!("f{i}"), s, Value::Null));
    }
    w.commit(&manifest(name, Value::Null, entries)).await?;
    w.finish().await?;
    Ok(())
}

/// Torture: writers store and commit manifests (some reusing data whose
/// manifests were deleted), a deleter removes old manifests, and the
/// `pgcairn gc` binary runs again and again, killed at random moments.
/// Afterwards every remaining manifest restores byte-exact and verify
/// (every pack read) is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_writers_and_killed_collectors() {
    let t = local_repo(gc_init(4)).await;
    let cache = tempfile::tempdir().unwrap();
    let expected: Arc<Mutex<BTreeMap<String, Vec<Vec<u8>>>>> = Arc::default();
    let deleted_data: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let run_for = Duration::from_secs(60);
    let start = Instant::now();

    // Writer futures hold non-Send state across awaits: run them on this
    // task, concurrently, instead of spawning them.
    let mut tasks: Vec<Pin<Box<dyn Future<Output = ()> + '_>>> = Vec::new();
    for k in 0..2u64 {
        let repo = t.repo.clone();
        let (expected, deleted_data, failures) =
            (expected.clone(), deleted_data.clone(), failures.clone());
        tasks.push(Box::pin(async move {
            let mut n = 0u64;
            while start.elapsed() < run_for {
                n += 1;
                let fresh = random_bytes(150 * 1024, k * 1_000_000 + n);
                let reused = {
                    let d = deleted_data.lock().unwrap();
                    (!d.is_empty()).then(|| d[(n as usize * 7 + k as usize) % d.len()].clone())
                };
                let files: Vec<Vec<u8>> = std::iter::once(fresh).chain(reused).collect();
                let name = format!("t/w{k}/{n:04}");
                // Pacing, not synchronisation: a few hundred manifests
                // are plenty, and the final check reads them all.
                tokio::time::sleep(Duration::from_millis(150)).await;
                match write_one(&repo, &name, &files).await {
                    Ok(()) => {
                        expected.lock().unwrap().insert(name, files);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{name}: {e}")),
                }
            }
        }));
    }
    {
        let repo = t.repo.clone();
        let (expected, deleted_data) = (expected.clone(), deleted_data.clone());
        tasks.push(Box::pin(async move {
            let mut i = 0usize;
            while start.elapsed() < run_for {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let victim = {
                    let e = expected.lock().unwrap();
                    (e.len() > 4).then(|| {
                        let names: Vec<&String> = e.keys().collect();
                        names[i % (names.len() - 2)].clone()
                    })
                };
                i += 3;
                if let Some(v) = victim {
                    let files = expected.lock().unwrap().remove(&v).unwrap();
                    repo.delete_manifest(&v).await.expect("delete manifest");
                    deleted_data.lock().unwrap().push(files[0].clone());
                }
            }
        }));
    }

    // Collectors: the binary, killed after a random delay, or left to finish.
    let gc_bin = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgcairn"));
        c.args(["--repo", &t.url, "--cache-dir"])
            .arg(cache.path())
            .args(args)
            .env("PGCAIRN_PASSPHRASE", std::str::from_utf8(PASS).unwrap())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let collectors = async {
        let (mut killed, mut finished, mut refused, mut expired) = (0, 0, 0, 0);
        let mut seed = 0x9e3779b97f4a7c15u64;
        while start.elapsed() < run_for {
            let mut child = gc_bin(&["gc"]).spawn().expect("spawn gc");
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let delay = Duration::from_millis(seed % 1500);
            let limit = Instant::now() + delay;
            let mut exited = None;
            while Instant::now() < limit {
                if let Some(s) = child.try_wait().unwrap() {
                    exited = Some(s);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match exited {
                None if seed % 4 != 0 => {
                    child.kill().await.unwrap();
                    killed += 1;
                    // Its lease names a process that has ended: the next
                    // collector takes over at once.
                }
                _ => {
                    let out = child.wait_with_output().await.unwrap();
                    let err = String::from_utf8_lossy(&out.stderr).to_string();
                    if out.status.success() {
                        finished += 1;
                    } else if err.contains("another collector") {
                        refused += 1;
                    } else if err.contains("longer than the grace period") {
                        // Ran longer than the (4 s) grace period on a busy
                        // machine: it stops before deleting, by design.
                        expired += 1;
                    } else {
                        panic!("gc failed: {err}");
                    }
                }
            }
        }
        (killed, finished, refused, expired)
    };
    let (_, (killed, finished, refused, expired)) =
        tokio::join!(futures::future::join_all(tasks), collectors);
    let failures = failures.lock().unwrap().clone();
    let expected = expected.lock().unwrap().clone();
    println!(
        "torture: {} manifests kept, {} writer failures, gc killed {killed}x, finished {finished}x, refused {refused}x, expired {expired}x",
        expected.len(),
        failures.len()
    );
    for f in &failures {
        println!("  writer failure: {f}");
    }
    assert!(killed > 5, "too few kills");
    // Collectors run one after another here, and a killed one has ended.
    assert_eq!(refused, 0, "a killed collector's lease blocked the next");
    assert!(expected.len() > 10, "too few commits");
    assert_sound(&t.url, &expected).await;

    // Let the collection finish: dead collectors' leases age out, marks are
    // swept; then every indexed chunk is live.
    let mut last = None;
    for _ in 0..8 {
        wait_grace(&t.repo).await;
        let o = gc_bin(&["--format", "json", "gc"]).output().await.unwrap();
        if String::from_utf8_lossy(&o.stderr).contains("longer than the grace period") {
            println!("a settling run took longer than the grace period; again");
            continue;
        }
        assert!(
            o.status.success(),
            "settling gc failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let done = r["mark"].is_null() && r["marks_pending"].as_array().unwrap().is_empty();
        last = Some(r);
        if done {
            break;
        }
    }
    let last = last.unwrap();
    println!("last run: {last:#}");
    assert_sound(&t.url, &expected).await;
    assert!(
        last["mark"].is_null() && last["marks_pending"].as_array().unwrap().is_empty(),
        "the collection did not settle"
    );
}

/// Changed blocks stored as deltas keep their bases alive: after the
/// backups that stored the bases whole expire and gc marks and sweeps,
/// the latest backup still restores byte-exact and verify (reading every
/// pack) is clean. Without the collector following bases, the old
/// versions of the changed blocks are unreferenced and get swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bases_survive_expire_and_gc() {
    const BLOCK: usize = 32 * 1024;
    let t = local_repo(gc_init(2)).await;
    let v1 = db_like_bytes(4 << 20, 7);
    let blocks = v1.len() / BLOCK;
    let (_, c1) = commit_blocks(&t.repo, "backups/db/1", &v1, BLOCK, None).await;
    // Day 2: a few bytes change in every other block.
    let mut v2 = v1.clone();
    for b in (0..blocks).step_by(2) {
        v2[b * BLOCK + 200..b * BLOCK + 216].copy_from_slice(b"changed on day 2");
    }
    let (st2, c2) = commit_blocks(&t.repo, "backups/db/2", &v2, BLOCK, Some(c1)).await;
    println!(
        "day 2: {} new chunks, {} as deltas, {} bytes stored for {} raw",
        st2.chunks_new, st2.chunks_delta, st2.bytes_new_stored, st2.bytes_new_raw
    );
    // (The other new chunk is the manifest's entry list.)
    assert_eq!(
        st2.chunks_delta as usize,
        blocks / 2,
        "every changed block is a delta"
    );
    assert!(
        st2.bytes_new_stored * 20 < st2.bytes_new_raw,
        "deltas of 16 changed bytes per block must be small"
    );
    // Day 3: the changed blocks change again; their deltas are against
    // day 1's whole blocks (a chain stays one long).
    let mut v3 = v2.clone();
    for b in (0..blocks).step_by(4) {
        v3[b * BLOCK + 9000..b * BLOCK + 9016].copy_from_slice(b"changed on day 3");
    }
    let (st3, _) = commit_blocks(&t.repo, "backups/db/3", &v3, BLOCK, Some(c2)).await;
    assert_eq!(st3.chunks_delta as usize, blocks / 4);
    for name in ["backups/db/1", "backups/db/2"] {
        t.repo.delete_manifest(name).await.expect("delete");
    }
    let mut expected = BTreeMap::new();
    expected.insert("backups/db/3".to_string(), vec![v3]);
    wait_grace(&t.repo).await;
    let first = gc(&t.repo).await;
    println!("mark: {first:#?}");
    wait_grace(&t.repo).await;
    let second = gc(&t.repo).await;
    println!("sweep: {second:#?}");
    assert!(
        second.bytes_reclaimed > 0,
        "day 2's superseded deltas are garbage"
    );
    assert_sound(&t.url, &expected).await;
}
