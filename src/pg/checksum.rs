//! PostgreSQL's data page checksum (FNV-1a based, 32 interleaved sums), so
//! that a backup can verify pages as it reads them. The parameters are part
//! of PostgreSQL's on-disk format; the block number mixed in is the absolute
//! block number within the relation (segment number × blocks per segment +
//! block within the segment file).

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;

/// Initial states of the 32 parallel sums (fixed by PostgreSQL's format).
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline]
fn mix(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// Offset of `pd_checksum` in the page header (after the 8-byte LSN).
pub const CHECKSUM_OFFSET: usize = 8;

/// The checksum PostgreSQL would store in `page` as block `blkno`.
/// `page.len()` must be a multiple of 128 bytes (any PostgreSQL block size).
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    for (row_no, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, w) in row.chunks_exact(4).enumerate() {
            let mut v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            // pd_checksum (bytes 8..10 of the first row) counts as zero.
            if row_no == 0 && j == CHECKSUM_OFFSET / 4 {
                v &= 0xFFFF_0000;
            }
            sums[j] = mix(sums[j], v);
        }
    }
    let mut result = 0u32;
    for s in sums.iter_mut() {
        *s = mix(mix(*s, 0), 0);
        result ^= *s;
    }
    ((result ^ blkno) % 65535 + 1) as u16
}

/// The checksum stored in the page header.
pub fn stored_checksum(page: &[u8]) -> u16 {
    u16::from_le_bytes([page[CHECKSUM_OFFSET], page[CHECKSUM_OFFSET + 1]])
}

/// A page PostgreSQL never wrote (all zeros) carries no checksum.
pub fn is_all_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// What a page read tells: fine, never written, or a mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Valid,
    New,
    Mismatch { stored: u16, computed: u16 },
}

pub fn check_page(page: &[u8], blkno: u32) -> PageState {
    if is_all_zero(page) {
        return PageState::New;
    }
    let stored = stored_checksum(page);
    let computed = page_checksum(page, blkno);
    if stored == computed {
        PageState::Valid
    } else {
        PageState::Mismatch { stored, computed }
    }
}
