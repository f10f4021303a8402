//! Content-defined chunking (FastCDC 2020). The gear table is seeded from the
//! master key, so chunk boundaries, like chunk ids, reveal nothing about the
//! content to someone who sees only chunk sizes.

use std::io::Read;

use fastcdc::v2020::{Normalization, StreamCDC};

use super::config::ChunkerParams;

pub fn stream_chunker<R: Read>(source: R, p: &ChunkerParams, seed: u64) -> StreamCDC<R> {
    StreamCDC::with_level_and_seed(
        source,
        p.min_size as usize,
        p.avg_size as usize,
        p.max_size as usize,
        Normalization::Level1,
        seed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuts(data: &[u8], seed: u64) -> Vec<u64> {
        let p = ChunkerParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        };
        stream_chunker(data, &p, seed)
            .map(|c| c.unwrap().offset)
            .collect()
    }

    #[test]
    fn seed_changes_boundaries_and_chunks_cover_input() {
        let mut data = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let a = cuts(&data, 1);
        let b = cuts(&data, 2);
        assert_ne!(a, b);
        let total: usize = stream_chunker(&data[..], &ChunkerParams::DEFAULT, 7)
            .map(|c| c.unwrap().length)
            .sum();
        assert_eq!(total, data.len());
    }
}
