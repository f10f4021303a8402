//! The store pipeline's throughput (1 and 2 CPU workers) beside the
//! single-core speed of each stage, on the same machine and data.
//!
//!     cargo bench --bench store_pipeline
//!
//! The data compresses about like PostgreSQL heap pages (random runs, text,
//! zeros). The pipeline stores into a fresh local repository each iteration
//! (fsync'd writes included), so nothing is deduplicated away.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgcairn::repo::crypto::{chunk_id, KdfParams, MasterKey, Sealer};
use pgcairn::repo::{ChunkerParams, InitOptions, OpenOptions, Repository};

const MIB: usize = 1024 * 1024;

fn db_like(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut v = Vec::with_capacity(n);
    let mut i = 0u64;
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 4 {
            0 => v.extend_from_slice(&x.to_le_bytes()),
            1 => v.extend_from_slice(format!("customer-{:08} ", (i * 7919) % 100000).as_bytes()),
            2 => v.extend_from_slice(&[0u8; 24]),
            _ => v.extend_from_slice(&i.to_le_bytes()),
        }
        i += 1;
    }
    v.truncate(n);
    v
}

fn stages(c: &mut Criterion) {
    let data = db_like(32 * MIB);
    let mk = MasterKey::generate().expect("key");
    let keys = mk.derive();
    let p = ChunkerParams::DEFAULT;
    let mut g = c.benchmark_group("stage (1 core)");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("fastcdc", |b| {
        b.iter(|| {
            pgcairn::repo::chunker::stream_chunker(&data[..], &p, keys.gear_seed)
                .map(|c| c.expect("chunk").length)
                .sum::<usize>()
        })
    });
    g.bench_function("blake3 keyed", |b| {
        b.iter(|| chunk_id(&keys.chunk_id, black_box(&data)))
    });
    for level in [1, 3] {
        g.bench_function(format!("zstd -{level}"), |b| {
            b.iter(|| {
                data.chunks(256 * 1024)
                    .map(|c| zstd::bulk::compress(c, level).expect("zstd").len())
                    .sum::<usize>()
            })
        });
    }
    let sealer = Sealer::new(true, &keys.seal);
    g.bench_function("xchacha20poly1305 seal", |b| {
        b.iter(|| {
            data.chunks(256 * 1024)
                .map(|c| sealer.seal(c, b"aad").expect("seal").len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let data = db_like(64 * MIB);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut g = c.benchmark_group("store pipeline");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    for workers in [1usize, 2] {
        g.bench_function(format!("{workers} worker(s)"), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let url = dir.path().join("r").to_string_lossy().to_string();
                    let init = InitOptions {
                        kdf: KdfParams {
                            m_cost: 1024,
                            t_cost: 1,
                            p_cost: 1,
                        },
                        ..InitOptions::default()
                    };
                    let opts = OpenOptions {
                        cache_dir: Some(dir.path().join("cache")),
                        workers,
                        ..OpenOptions::default()
                    };
                    let repo = rt
                        .block_on(Repository::init(&url, &init, Some(b"pw"), opts))
                        .expect("init");
                    (dir, repo, data.clone())
                },
                |(dir, repo, data)| {
                    rt.block_on(async {
                        let w = repo.writer("bench").await.expect("writer");
                        let s = w.store_bytes(data).await.expect("store");
                        w.finish().await.expect("finish");
                        s.size
                    });
                    drop(dir);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, stages, pipeline);
criterion_main!(benches);
