//! Timeline history files (`TTTTTTTT.history`) and timestamps as
//! PostgreSQL prints them, for choosing a backup and checking that a
//! recovery target timeline can be reached from it.

use super::wal::Lsn;

/// One line of a history file: timeline `parent` ended at `switch` and the
/// next timeline began there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fork {
    pub parent: u32,
    pub switch: Lsn,
}

/// Parse a history file ("parentTLI<TAB>switchpoint<TAB>reason" lines,
/// comments and blank lines ignored).
pub fn parse_history(text: &str) -> Result<Vec<Fork>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut parts = l.split_whitespace();
        let tli = parts.next().and_then(|t| t.parse::<u32>().ok());
        let lsn = parts.next().and_then(|t| t.parse::<Lsn>().ok());
        match (tli, lsn) {
            (Some(parent), Some(switch)) => out.push(Fork { parent, switch }),
            _ => return Err(format!("unreadable history line {l:?}")),
        }
    }
    Ok(out)
}

/// Can recovery that starts on `from` (with consistency reached at
/// `backup_end`) follow the history of timeline `target`? `history` is the
/// target timeline's history file.
pub fn reachable(from: u32, backup_end: Lsn, target: u32, history: &[Fork]) -> Result<(), String> {
    if target == from {
        return Ok(());
    }
    match history.iter().find(|f| f.parent == from) {
        None => Err(format!("timeline {target} does not descend from timeline {from}, the backup's")),
        Some(f) if f.switch < backup_end => Err(format!(
            "timeline {target} left timeline {from} at {}, before the backup ended at {backup_end}; \
             it cannot be reached from this backup (choose an earlier backup, or --target-timeline current)",
            f.switch
        )),
        Some(_) => Ok(()),
    }
}

/// Unix time (seconds, fractional) of a timestamp as PostgreSQL prints or
/// accepts them: `YYYY-MM-DD HH:MM:SS[.frac]` with `+HH[:MM]`, `-HH[:MM]`
/// or `Z`; `T` may separate date and time. A zone is required: without one
/// PostgreSQL would read the time in the restored server's TimeZone.
pub fn parse_timestamp(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?}: expected a time like '2026-11-22 14:05:00+00'");
    let t = s.trim();
    // ASCII only: the byte offsets below must fall on characters.
    if t.len() < 19 || !t.is_ascii() {
        return Err(bad());
    }
    let (date, rest) = t.split_at(10);
    let rest = rest
        .strip_prefix(' ')
        .or_else(|| rest.strip_prefix('T'))
        .ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let [y, mo, da] = d.as_slice() else {
        return Err(bad());
    };
    let zone_at = rest
        .find(['+', '-', 'Z'])
        .ok_or_else(|| format!("{s:?}: add a time zone, e.g. +00"))?;
    let (time, zone) = rest.split_at(zone_at);
    let tp: Vec<&str> = time.trim().split(':').collect();
    let [h, mi, sec] = tp.as_slice() else {
        return Err(bad());
    };
    let h: i64 = h.parse().map_err(|_| bad())?;
    let mi: i64 = mi.parse().map_err(|_| bad())?;
    let sec: f64 = sec.parse().map_err(|_| bad())?;
    // PostgreSQL refuses what does not exist (but takes 24:00:00 and a
    // leap second); so does pgcairn, rather than choose a backup by it.
    let valid_date = u32::try_from(*mo)
        .ok()
        .zip(u32::try_from(*da).ok())
        .zip(i32::try_from(*y).ok())
        .is_some_and(|((m, d), y)| chrono::NaiveDate::from_ymd_opt(y, m, d).is_some());
    let valid_time = (0..=23).contains(&h) && (0..=59).contains(&mi) && (0.0..61.0).contains(&sec)
        || (h == 24 && mi == 0 && sec == 0.0);
    if !valid_date || !valid_time {
        return Err(format!("{s:?}: no such date or time"));
    }
    let offset = if zone == "Z" {
        0
    } else {
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let z = &zone[1..];
        // As PostgreSQL reads zones: +HH:MM, or digits run together, where
        // three or more (+530, +0530) end in the minutes.
        let (zh, zm) = match z.split_once(':') {
            Some((a, b)) => (a, b),
            None if z.len() >= 3 => z.split_at(z.len() - 2),
            None => (z, "0"),
        };
        let zh: i64 = zh.parse().map_err(|_| bad())?;
        let zm: i64 = zm.parse().map_err(|_| bad())?;
        if zh > 15 || !(0..60).contains(&zm) || zh < 0 {
            return Err(format!("{s:?}: no such time zone offset"));
        }
        sign * (zh * 3600 + zm * 60)
    };
    // Days from civil (proleptic Gregorian).
    let (y, m) = if *mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (*y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok((days * 86_400 + h * 3600 + mi * 60 - offset) as f64 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_and_reachability() {
        let h =
            parse_history("1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tafter x\n")
                .unwrap();
        assert_eq!(h.len(), 2);
        let end: Lsn = "0/2000000".parse().unwrap();
        assert!(reachable(1, end, 3, &h).is_ok());
        assert!(reachable(2, end, 3, &h).is_ok());
        let late: Lsn = "0/4000000".parse().unwrap();
        let e = reachable(1, late, 3, &h).unwrap_err();
        assert!(e.contains("before the backup ended"), "{e}");
        assert!(reachable(7, end, 3, &h).is_err());
        assert!(parse_history("garbage").is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00+00").unwrap(), 0.0);
        assert_eq!(
            parse_timestamp("2026-11-22 13:31:20+00").unwrap(),
            1_795_354_280.0
        );
        assert_eq!(
            parse_timestamp("2026-11-22T14:31:20+01:00").unwrap(),
            1_795_354_280.0
        );
        assert_eq!(
            parse_timestamp("2026-11-22 08:31:20-0500").unwrap(),
            1_795_354_280.0
        );
        assert!(
            (parse_timestamp("2026-11-22 13:31:20.25Z").unwrap() - 1_795_354_280.25).abs() < 1e-6
        );
        assert!(parse_timestamp("2026-11-22 13:31:20")
            .unwrap_err()
            .contains("time zone"));
        // Run-together zones end in the minutes, as PostgreSQL reads them.
        assert_eq!(
            parse_timestamp("2026-11-22 19:01:20+530").unwrap(),
            1_795_354_280.0
        );
        assert_eq!(
            parse_timestamp("2026-11-22 19:01:20+0530").unwrap(),
            1_795_354_280.0
        );
        for bad in [
            "2026-02-30 10:00:00+00",
            "2026-11-22 25:00:00+00",
            "2026-11-22 10:61:00+00",
            "2026-11-22 10:00:00+16",
            // Multi-byte characters where the parser splits: an error,
            // not a panic.
            "2026-11-2½ 14:00:00+00",
            "2026-11-22 14:00:00+é0",
        ] {
            assert!(parse_timestamp(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_timestamp("2024-02-29 24:00:00+00").is_ok());
    }
}
