//! WAL positions, file names and timelines, as PostgreSQL spells them.

use std::fmt;
use std::str::FromStr;

/// A WAL position (`pg_lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN (X/Y)"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

/// What a file in the WAL archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`
    Segment { timeline: u32, segno: u64 },
    /// `...partial`: the last, incomplete segment of a timeline a promotion left.
    Partial { timeline: u32, segno: u64 },
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`
    BackupLabel {
        timeline: u32,
        segno: u64,
        offset: u32,
    },
    /// `TTTTTTTT.history`
    History { timeline: u32 },
}

fn hex8(s: &str) -> Option<u32> {
    if s.len() == 8 && s.bytes().all(|c| c.is_ascii_hexdigit()) {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

/// Segments per "xlogid" (the middle 8 hex digits count these).
pub fn segments_per_id(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size.clamp(1, 0x1_0000_0000)
}

/// The smallest segment size PostgreSQL allows. A name parsed with it is
/// accepted whatever the cluster's segment size, and its kind and timeline
/// are right; its segment number is right only with the real size.
pub const MIN_SEGMENT_SIZE: u64 = 1 << 20;

/// PostgreSQL's segment sizes: powers of two from 1 MiB to 1 GiB.
pub fn is_segment_size(s: u64) -> bool {
    s.is_power_of_two() && (MIN_SEGMENT_SIZE..=1 << 30).contains(&s)
}

/// The segment name of `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, seg_size: u64) -> String {
    let per = segments_per_id(seg_size);
    format!("{:08X}{:08X}{:08X}", timeline, segno / per, segno % per)
}

/// The segment holding `lsn` (like `pg_walfile_name`, which names the
/// previous segment when `lsn` is exactly on a boundary; this does not).
pub fn segno_of(lsn: Lsn, seg_size: u64) -> u64 {
    lsn.0 / seg_size
}

impl WalFile {
    /// Parse an archived file name; `None` if it is not a WAL archive name.
    pub fn parse(name: &str, seg_size: u64) -> Option<WalFile> {
        let per = segments_per_id(seg_size);
        let seg = |s: &str| -> Option<(u32, u64)> {
            if s.len() != 24 {
                return None;
            }
            let tl = hex8(&s[..8])?;
            let hi = hex8(&s[8..16])? as u64;
            let lo = hex8(&s[16..24])? as u64;
            if lo >= per {
                return None;
            }
            Some((tl, hi * per + lo))
        };
        if let Some(tl) = name.strip_suffix(".history") {
            return Some(WalFile::History {
                timeline: hex8(tl)?,
            });
        }
        if let Some(s) = name.strip_suffix(".partial") {
            let (timeline, segno) = seg(s)?;
            return Some(WalFile::Partial { timeline, segno });
        }
        if let Some(s) = name.strip_suffix(".backup") {
            let (segpart, off) = s.split_once('.')?;
            let (timeline, segno) = seg(segpart)?;
            return Some(WalFile::BackupLabel {
                timeline,
                segno,
                offset: hex8(off)?,
            });
        }
        let (timeline, segno) = seg(name)?;
        Some(WalFile::Segment { timeline, segno })
    }

    pub fn timeline(&self) -> u32 {
        match self {
            WalFile::Segment { timeline, .. }
            | WalFile::Partial { timeline, .. }
            | WalFile::BackupLabel { timeline, .. }
            | WalFile::History { timeline } => *timeline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 * 1024 * 1024;

    #[test]
    fn lsn_roundtrip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn names_for_default_and_other_segment_sizes() {
        let l: Lsn = "1/2A000028".parse().unwrap();
        let s = segno_of(l, MB16);
        assert_eq!(segment_name(1, s, MB16), "00000001000000010000002A");
        // 64 MiB segments: 64 per xlogid.
        let s64 = segno_of(l, 64 * 1024 * 1024);
        assert_eq!(
            segment_name(3, s64, 64 * 1024 * 1024),
            "00000003000000010000000A"
        );
        assert_eq!(
            WalFile::parse("00000001000000010000002A", MB16),
            Some(WalFile::Segment {
                timeline: 1,
                segno: s
            })
        );
        // The low part can't reach 0x100 with 16 MiB segments.
        assert_eq!(WalFile::parse("000000010000000100000100", MB16), None);
    }

    #[test]
    fn other_archive_names() {
        assert_eq!(
            WalFile::parse("00000002.history", MB16),
            Some(WalFile::History { timeline: 2 })
        );
        assert!(matches!(
            WalFile::parse("000000010000000000000003.partial", MB16),
            Some(WalFile::Partial {
                timeline: 1,
                segno: 3
            })
        ));
        assert!(matches!(
            WalFile::parse("000000010000000000000003.00000028.backup", MB16),
            Some(WalFile::BackupLabel { offset: 0x28, .. })
        ));
        assert_eq!(WalFile::parse("archive_status", MB16), None);
        assert_eq!(WalFile::parse("0000000G000000000000000A", MB16), None);
    }
}
