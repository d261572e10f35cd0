//! Wall-clock times as UTC calendar text, without a date crate: the
//! migrator's history and `pg_prepared_statements.prepare_time` both need
//! it, and one copy of the calendar arithmetic is enough.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC wall-clock time split into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: i64,
    pub day: i64,
    pub hour: u64,
    pub minute: u64,
    pub second: u64,
    pub micros: u32,
}

impl CivilTime {
    /// 1970-01-01 00:00:00 UTC.
    pub const EPOCH: CivilTime = CivilTime {
        year: 1970,
        month: 1,
        day: 1,
        hour: 0,
        minute: 0,
        second: 0,
        micros: 0,
    };

    /// The calendar fields of `at`; `None` before 1970.
    pub fn of(at: SystemTime) -> Option<CivilTime> {
        let since = at.duration_since(UNIX_EPOCH).ok()?;
        let secs = since.as_secs();
        let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
        // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Some(CivilTime {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rest / 3_600,
            minute: rest % 3_600 / 60,
            second: rest % 60,
            micros: since.subsec_micros(),
        })
    }

    /// `YYYY-MM-DD`.
    pub fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `HH:MM:SS`.
    pub fn time(&self) -> String {
        format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_instants_split_into_their_calendar_fields() {
        let at = |micros: u64| CivilTime::of(UNIX_EPOCH + Duration::from_micros(micros));
        let t = at(1_765_134_000_123_456).expect("after 1970");
        assert_eq!(
            (t.date(), t.time(), t.micros),
            ("2025-12-07".into(), "19:00:00".into(), 123_456)
        );
        // A leap day and the first instant.
        let leap = at(951_782_400_000_000).expect("after 1970");
        assert_eq!(leap.date(), "2000-02-29");
        assert_eq!(at(0).map(|t| t.date()), Some("1970-01-01".into()));
        assert_eq!(CivilTime::of(UNIX_EPOCH - Duration::from_secs(1)), None);
    }
}
