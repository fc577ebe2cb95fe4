//! UTC calendar arithmetic for event-time bucketing: days since the Unix epoch,
//! months and years, and the periods a UsageRecord can cover.
//!
//! Hand-written (Howard Hinnant's civil-date algorithms) because the hot path turns
//! every CDR timestamp into a day number, and this is a few integer operations.

use std::fmt;

/// A UTC calendar day, as days since 1970-01-01.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Day(pub i32);

/// A UTC calendar month, as `year * 12 + (month - 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Month(pub i32);

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = (y - era * 400) as u32;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i32 - 719_468
}

/// The date of a day number.
pub fn civil_from_days(z: i32) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u32;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i32 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

impl Day {
    pub fn from_unix(secs: i64) -> Day {
        Day(secs.div_euclid(86_400) as i32)
    }
    pub fn from_ymd(y: i32, m: u32, d: u32) -> Day {
        Day(days_from_civil(y, m, d))
    }
    pub fn ymd(self) -> (i32, u32, u32) {
        civil_from_days(self.0)
    }
    pub fn month(self) -> Month {
        let (y, m, _) = self.ymd();
        Month(y * 12 + m as i32 - 1)
    }
    pub fn year(self) -> i32 {
        self.ymd().0
    }
    pub fn today() -> Day {
        Day::from_unix(chrono::Utc::now().timestamp())
    }
    /// Parses `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Day> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let y = digits(&b[0..4])? as i32;
        let m = digits(&b[5..7])?;
        let d = digits(&b[8..10])?;
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        Some(Day::from_ymd(y, m, d))
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl Month {
    pub fn year(self) -> i32 {
        self.0.div_euclid(12)
    }
    /// 1-based month of the year.
    pub fn month_of_year(self) -> u32 {
        self.0.rem_euclid(12) as u32 + 1
    }
    pub fn first_day(self) -> Day {
        Day::from_ymd(self.year(), self.month_of_year(), 1)
    }
    pub fn last_day(self) -> Day {
        let (y, m) = (self.year(), self.month_of_year());
        Day::from_ymd(y, m, days_in_month(y, m))
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year(), self.month_of_year())
    }
}

/// The interval a stored UsageRecord covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day(Day),
    Month(Month),
    Year(i32),
    AllTime,
}

impl Period {
    /// Short stable name used in the store (`day`, `month`, `year`, `all`).
    pub fn kind(self) -> &'static str {
        match self {
            Period::Day(_) => "day",
            Period::Month(_) => "month",
            Period::Year(_) => "year",
            Period::AllTime => "all",
        }
    }
    /// First day of the period (`AllTime` uses 1970-01-01 as its key).
    pub fn start(self) -> Day {
        match self {
            Period::Day(d) => d,
            Period::Month(m) => m.first_day(),
            Period::Year(y) => Day::from_ymd(y, 1, 1),
            Period::AllTime => Day(0),
        }
    }
    /// The four periods a usage event on `day` counts in.
    pub fn containing(day: Day) -> [Period; 4] {
        let month = day.month();
        [
            Period::Day(day),
            Period::Month(month),
            Period::Year(month.year()),
            Period::AllTime,
        ]
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

/// Unix seconds as an RFC 3339 UTC timestamp to the second
/// (`2025-01-09T13:45:00Z`); out of range, the epoch. (Written directly, not
/// through a format string parsed per call: every hold answer has two.)
pub fn format_rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Parses an RFC 3339 timestamp (`2025-01-09T13:45:00Z`, `…+02:00`, fractional
/// seconds allowed, `t`/space separator allowed) into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    parse_rfc3339_bytes(s.as_bytes())
}

/// [`parse_rfc3339`] on bytes (the CDR decoder's fast path holds bytes).
pub fn parse_rfc3339_bytes(b: &[u8]) -> Option<i64> {
    if b.len() < 20 {
        return None;
    }
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let y = digits(&b[0..4])? as i32;
    let mo = digits(&b[5..7])?;
    let d = digits(&b[8..10])?;
    let h = digits(&b[11..13])?;
    let mi = digits(&b[14..16])?;
    let se = digits(&b[17..19])?;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || se > 60
    {
        return None;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), oh1, oh2, b':', om1, om2] => {
            let oh = digits(&[*oh1, *oh2])?;
            let om = digits(&[*om1, *om2])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 3600 + om * 60) as i64;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // A leap second (:60) is folded into the next second, as chrono and most systems do.
    let secs = days_from_civil(y, mo, d) as i64 * 86_400 + (h * 3600 + mi * 60 + se) as i64;
    Some(secs - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for z in [-1_000_000, -1, 0, 1, 59, 365, 10_957, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(Day::from_ymd(2000, 3, 1).to_string(), "2000-03-01");
        assert_eq!(Day(0).to_string(), "1970-01-01");
    }

    #[test]
    fn rfc3339_matches_chrono() {
        for s in [
            "2025-01-09T13:45:00Z",
            "2025-01-09T23:59:59.999-05:00",
            "2024-02-29t00:00:00+14:00",
            "1999-12-31 23:59:59Z",
        ] {
            let ours = parse_rfc3339(s).unwrap();
            let theirs = chrono::DateTime::parse_from_rfc3339(&s.replace('t', "T"))
                .unwrap()
                .timestamp();
            assert_eq!(ours, theirs, "{s}");
        }
    }

    #[test]
    fn rfc3339_rejects_nonsense() {
        for s in [
            "",
            "2025-01-09",
            "2025-13-09T13:45:00Z",
            "2023-02-29T00:00:00Z",
            "2025-01-09T24:00:00Z",
            "2025-01-09T13:45:00",
            "2025-01-09T13:45:00+5",
            "2025-01-09T13:45:00.Z",
            "2025-01-09T13:45:00Zjunk",
            "yesterday at noon!!",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn event_time_is_bucketed_in_utc() {
        let t = parse_rfc3339("2025-01-09T23:30:00-02:00").unwrap();
        assert_eq!(Day::from_unix(t).to_string(), "2025-01-10");
        let m = Day::parse("2024-02-10").unwrap().month();
        assert_eq!(m.to_string(), "2024-02");
        assert_eq!(m.last_day().to_string(), "2024-02-29");
        assert_eq!(Day::parse("2023-02-29"), None);
    }
}
