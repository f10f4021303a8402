//! The first page header of a WAL segment (`XLogLongPageHeaderData`): what
//! archive-push checks before it accepts a segment, and archive-get before
//! it hands one to PostgreSQL.

use super::wal::{is_segment_size, WalFile};

/// Long page header: magic u16, info u16, timeline u32, page address u64,
/// remaining length u32, padding, system identifier u64, segment size u32,
/// block size u32.
pub const LONG_HEADER_LEN: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalHeader {
    pub magic: u16,
    pub info: u16,
    pub timeline: u32,
    pub page_address: u64,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

/// WAL page magic numbers of the PostgreSQL majors pgcairn supports
/// (14 to 18; 0xD10D, 0xD110 and 0xD118 are checked against real servers
/// by the tests).
pub fn major_of_magic(magic: u16) -> Option<u32> {
    match magic {
        0xD10D => Some(14),
        0xD110 => Some(15),
        0xD113 => Some(16),
        0xD116 => Some(17),
        0xD118 => Some(18),
        _ => None,
    }
}

pub fn parse_header(b: &[u8]) -> Option<WalHeader> {
    if b.len() < LONG_HEADER_LEN {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    Some(WalHeader {
        magic: u16_at(0),
        info: u16_at(2),
        timeline: u32_at(4),
        page_address: u64_at(8),
        system_identifier: u64_at(24),
        segment_size: u32_at(32),
        block_size: u32_at(36),
    })
}

/// Check a segment (or `.partial`) against its name: long header, known
/// magic, size equal to the segment size the header states, page address
/// of the segment the name means at that size, and (if known) the
/// cluster's system identifier. Returns the header.
pub fn check_segment(
    name: &str,
    data: &[u8],
    system_identifier: Option<u64>,
) -> Result<WalHeader, String> {
    let h = parse_header(data).ok_or_else(|| {
        format!(
            "{name}: too short to be a WAL segment ({} bytes)",
            data.len()
        )
    })?;
    if major_of_magic(h.magic).is_none() {
        return Err(format!(
            "{name}: not a WAL segment of PostgreSQL 14 to 18 (page magic {:#06x})",
            h.magic
        ));
    }
    if h.info & XLP_LONG_HEADER == 0 {
        return Err(format!(
            "{name}: the first page lacks the long header of a segment start"
        ));
    }
    let seg = h.segment_size as u64;
    if !is_segment_size(seg) || data.len() as u64 != seg {
        return Err(format!(
            "{name}: {} bytes, but its header says segments are {} bytes (a truncated or padded copy?)",
            data.len(),
            seg
        ));
    }
    // The segment number a name means depends on the segment size.
    let (timeline, segno) = match WalFile::parse(name, seg) {
        Some(WalFile::Segment { timeline, segno } | WalFile::Partial { timeline, segno }) => {
            (timeline, segno)
        }
        _ => {
            return Err(format!(
                "{name}: not a WAL segment name for the {seg}-byte segments its header states"
            ))
        }
    };
    if h.page_address != segno * seg {
        return Err(format!(
            "{name}: the first page belongs at WAL position {:X}/{:X}, not at this file name's {:X}/{:X}",
            h.page_address >> 32,
            h.page_address & 0xFFFF_FFFF,
            (segno * seg) >> 32,
            (segno * seg) & 0xFFFF_FFFF
        ));
    }
    if h.timeline > timeline {
        return Err(format!(
            "{name}: page timeline {} is beyond the name's timeline {timeline}",
            h.timeline
        ));
    }
    if let Some(id) = system_identifier {
        if h.system_identifier != id {
            return Err(format!(
                "{name}: belongs to cluster {} but this server is cluster {id}",
                h.system_identifier
            ));
        }
    }
    Ok(h)
}
