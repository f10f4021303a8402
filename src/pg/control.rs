//! `global/pg_control`: the cluster's identity and last checkpoint. A backup
//! copies it last and re-reads it until its CRC validates, because the
//! server may be rewriting it while we read.

use super::wal::Lsn;

/// Size PostgreSQL gives the file (only the first few hundred bytes are data).
pub const PG_CONTROL_FILE_SIZE: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: u64,
    pub pg_control_version: u32,
    pub catalog_version: u32,
    pub state: u32,
    /// Location of the latest checkpoint record.
    pub checkpoint: Lsn,
    /// Byte offset of the CRC (it differs between PostgreSQL versions).
    pub crc_offset: usize,
}

/// Parse pg_control, validating its CRC-32C. The CRC covers every byte
/// before it and sits at a version-dependent offset; rather than a table of
/// versions, find the 4-aligned offset whose preceding bytes hash to it.
pub fn parse(bytes: &[u8]) -> Option<ControlData> {
    if bytes.len() < 64 {
        return None;
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let limit = bytes.len().min(1024);
    let mut crc = crc32c::crc32c(&bytes[..40]);
    let mut off = 40;
    while off + 4 <= limit {
        if crc == u32_at(off) {
            return Some(ControlData {
                system_identifier: u64_at(0),
                pg_control_version: u32_at(8),
                catalog_version: u32_at(12),
                state: u32_at(16),
                checkpoint: Lsn(u64_at(32)),
                crc_offset: off,
            });
        }
        crc = crc32c::crc32c_append(crc, &bytes[off..off + 4]);
        off += 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_crc_and_rejects_damage() {
        let mut b = vec![0u8; PG_CONTROL_FILE_SIZE];
        b[..8].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        b[8..12].copy_from_slice(&1300u32.to_le_bytes());
        b[32..40].copy_from_slice(&0x0000_0001_2A00_0028u64.to_le_bytes());
        for (i, x) in b[40..200].iter_mut().enumerate() {
            *x = i as u8;
        }
        let crc = crc32c::crc32c(&b[..296]);
        b[296..300].copy_from_slice(&crc.to_le_bytes());
        let c = parse(&b).expect("valid");
        assert_eq!(c.system_identifier, 0x1234_5678_9abc_def0);
        assert_eq!(c.crc_offset, 296);
        assert_eq!(c.checkpoint.to_string(), "1/2A000028");
        b[100] ^= 1;
        assert!(parse(&b).is_none());
    }
}
