//! Scalar value syntaxes of the shard map: durations, sizes, range/list bounds.

use std::time::Duration;

/// The type of range bounds and list values, inferred from the map or set by `type:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundType {
    Int,
    Text,
    Date,
    Timestamp,
}

impl BoundType {
    pub fn name(self) -> &'static str {
        match self {
            BoundType::Int => "int",
            BoundType::Text => "text",
            BoundType::Date => "date",
            BoundType::Timestamp => "timestamp",
        }
    }

    pub fn parse_name(name: &str) -> Option<BoundType> {
        match name {
            "int" | "integer" | "bigint" => Some(BoundType::Int),
            "text" | "varchar" => Some(BoundType::Text),
            "date" => Some(BoundType::Date),
            "timestamp" => Some(BoundType::Timestamp),
            _ => None,
        }
    }
}

/// A range bound or list value. Dates and timestamps are kept in a canonical
/// text form (`YYYY-MM-DD`, `YYYY-MM-DD HH:MM:SS.ffffff`) that sorts like the
/// values themselves, so the map can be checked for gaps without a calendar.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BoundValue {
    Int(i64),
    Text(String),
    Date(String),
    Timestamp(String),
}

impl BoundValue {
    pub fn bound_type(&self) -> BoundType {
        match self {
            BoundValue::Int(_) => BoundType::Int,
            BoundValue::Text(_) => BoundType::Text,
            BoundValue::Date(_) => BoundType::Date,
            BoundValue::Timestamp(_) => BoundType::Timestamp,
        }
    }

    /// Parses `text` as a value of `bound_type`; the error says what was expected.
    pub fn parse(bound_type: BoundType, text: &str) -> Result<BoundValue, String> {
        match bound_type {
            BoundType::Int => text
                .trim()
                .parse::<i64>()
                .map(BoundValue::Int)
                .map_err(|_| format!("`{text}` is not an integer")),
            BoundType::Text => Ok(BoundValue::Text(text.to_string())),
            BoundType::Date => canonical_date(text)
                .map(BoundValue::Date)
                .ok_or_else(|| format!("`{text}` is not a date (expected YYYY-MM-DD)")),
            BoundType::Timestamp => canonical_timestamp(text)
                .map(BoundValue::Timestamp)
                .ok_or_else(|| {
                    format!(
                        "`{text}` is not a timestamp (expected YYYY-MM-DD[ HH:MM[:SS[.ffffff]]])"
                    )
                }),
        }
    }

    /// The type a bare YAML scalar most plausibly has: plain integers are
    /// `int`, `YYYY-MM-DD` is `date`, a date with a time is `timestamp`,
    /// anything else `text`.
    pub fn infer_type(text: &str, plain: bool) -> BoundType {
        if plain && text.trim().parse::<i64>().is_ok() {
            BoundType::Int
        } else if canonical_date(text).is_some() {
            BoundType::Date
        } else if canonical_timestamp(text).is_some() {
            BoundType::Timestamp
        } else {
            BoundType::Text
        }
    }
}

impl std::fmt::Display for BoundValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundValue::Int(v) => write!(f, "{v}"),
            BoundValue::Text(v) | BoundValue::Date(v) | BoundValue::Timestamp(v) => {
                write!(f, "{v}")
            }
        }
    }
}

fn digits(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY-MM-DD` with a real calendar date, years 1..=9999.
fn canonical_date(text: &str) -> Option<String> {
    let mut parts = text.trim().split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (year, month, day) = (digits(y)?, digits(m)?, digits(d)?);
    if year == 0 || !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    Some(format!("{year:04}-{month:02}-{day:02}"))
}

/// A date followed by ` ` or `T` and `HH:MM[:SS[.fraction]]`; no time zone.
fn canonical_timestamp(text: &str) -> Option<String> {
    let text = text.trim();
    let split = text.find([' ', 'T'])?;
    let date = canonical_date(&text[..split])?;
    let time = text[split + 1..].trim();
    let (clock, fraction) = match time.split_once('.') {
        Some((clock, fraction)) => (clock, fraction),
        None => (time, ""),
    };
    let mut parts = clock.split(':');
    let hour = digits(parts.next()?)?;
    let minute = digits(parts.next()?)?;
    let second = match parts.next() {
        Some(s) => digits(s)?,
        None => 0,
    };
    if parts.next().is_some() || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    if fraction.len() > 6 || (!fraction.is_empty() && digits(fraction).is_none()) {
        return None;
    }
    let micros = format!("{fraction:0<6}");
    Some(format!("{date} {hour:02}:{minute:02}:{second:02}.{micros}"))
}

/// `500ms`, `5s`, `2m`, `1h`, `1d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a duration; write a whole number with a unit: ms, s, m, h or d (e.g. 5s)")
    })?;
    let millis = match unit.trim() {
        "ms" => Some(value),
        "" | "s" => value.checked_mul(1_000),
        "m" | "min" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        "d" => value.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}`; allowed units: ms, s, m, h, d"
            ))
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration `{text}` is too large"))
}

/// `256MiB`, `1GiB`, `512kB`, `1048576`; binary and decimal units.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a size; write a whole number with a unit: B, kB, MB, GB, KiB, MiB, GiB (e.g. 256MiB)")
    })?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
            "unknown size unit `{other}` in `{text}`; allowed units: B, kB, MB, GB, KiB, MiB, GiB"
        ))
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("allowed units"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1kB"), Ok(1000));
        assert!(parse_size("12 furlongs").is_err());
    }

    #[test]
    fn dates_and_timestamps_sort_canonically() {
        let a = BoundValue::parse(BoundType::Date, "2025-12-31").unwrap();
        let b = BoundValue::parse(BoundType::Date, "2026-01-01").unwrap();
        assert!(a < b);
        assert!(BoundValue::parse(BoundType::Date, "2026-02-30").is_err());
        assert!(BoundValue::parse(BoundType::Date, "2024-02-29").is_ok());
        let t1 = BoundValue::parse(BoundType::Timestamp, "2026-01-01T00:00").unwrap();
        let t2 = BoundValue::parse(BoundType::Timestamp, "2026-01-01 00:00:00.5").unwrap();
        assert!(t1 < t2);
        assert_eq!(t1.to_string(), "2026-01-01 00:00:00.000000");
    }

    #[test]
    fn inference() {
        assert_eq!(BoundValue::infer_type("42", true), BoundType::Int);
        assert_eq!(BoundValue::infer_type("42", false), BoundType::Text);
        assert_eq!(BoundValue::infer_type("2026-01-01", false), BoundType::Date);
        assert_eq!(
            BoundValue::infer_type("2026-01-01 10:00", false),
            BoundType::Timestamp
        );
        assert_eq!(BoundValue::infer_type("eu", true), BoundType::Text);
    }
}
