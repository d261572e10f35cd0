//! Typed sharding key values and their decoding from SQL literals and from
//! Postgres text/binary parameters.
//!
//! Values are kept in Postgres' internal representation (days / microseconds
//! since 2000-01-01) because that is what Postgres hashes.

use std::fmt;

use super::ShardingError;

/// Postgres type OIDs a sharding key may have.
pub mod oid {
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const INT8: u32 = 20;
    pub const TEXT: u32 = 25;
    pub const VARCHAR: u32 = 1043;
    pub const BPCHAR: u32 = 1042;
    pub const UUID: u32 = 2950;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
}

/// Days from 1970-01-01 to 2000-01-01 (Postgres' epoch for dates and timestamps).
const PG_EPOCH_DAYS_FROM_UNIX: i64 = 10_957;
const USECS_PER_DAY: i64 = 86_400_000_000;
/// Postgres' date range: Julian day 0 (4713-11-24 BC) up to 5874898-01-01, exclusive.
const DATE_MIN_DAYS: i64 = -2_451_545;
const DATE_END_DAYS: i64 = 2_145_031_949;
/// Postgres' timestamp range ends at 294277-01-01, exclusive.
const TIMESTAMP_END_DAYS: i64 = 106_751_983;

/// The type of a sharding key column, as far as sharding cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// int2, int4, int8 (they hash identically in Postgres).
    Int,
    /// text, varchar.
    Text,
    Uuid,
    Date,
    Timestamp,
}

impl KeyType {
    /// The key type for a Postgres type OID. bpchar is refused: its trailing-space
    /// semantics would make equal values hash differently.
    pub fn from_oid(type_oid: u32) -> Result<KeyType, ShardingError> {
        match type_oid {
            oid::INT2 | oid::INT4 | oid::INT8 => Ok(KeyType::Int),
            oid::TEXT | oid::VARCHAR => Ok(KeyType::Text),
            oid::UUID => Ok(KeyType::Uuid),
            oid::DATE => Ok(KeyType::Date),
            oid::TIMESTAMP | oid::TIMESTAMPTZ => Ok(KeyType::Timestamp),
            oid::BPCHAR => Err(ShardingError::UnsupportedType(
                "character(n) (bpchar) cannot be a sharding key: its padding makes equal values \
                 compare by different bytes; use text or varchar"
                    .to_string(),
            )),
            other => Err(ShardingError::UnsupportedType(format!(
                "type OID {other} cannot be a sharding key; supported: smallint, integer, bigint, \
                 text, varchar, uuid, date, timestamp, timestamptz"
            ))),
        }
    }

    /// Human name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Int => "integer",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
            KeyType::Date => "date",
            KeyType::Timestamp => "timestamp",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The typed value of a sharding key.
///
/// `Ord` is only meaningful between values of the same variant; for `Text` it is
/// byte order, i.e. the C collation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    /// int2/int4/int8 widened to i64: Postgres hashes them identically.
    Int(i64),
    /// text/varchar (deterministic collation: hashed as bytes).
    Text(String),
    Uuid([u8; 16]),
    /// Days since 2000-01-01 (Postgres' internal date).
    Date(i32),
    /// Microseconds since 2000-01-01 00:00:00 (Postgres' internal timestamp; UTC for timestamptz).
    Timestamp(i64),
}

impl KeyValue {
    /// The type of this value.
    pub fn key_type(&self) -> KeyType {
        match self {
            KeyValue::Int(_) => KeyType::Int,
            KeyValue::Text(_) => KeyType::Text,
            KeyValue::Uuid(_) => KeyType::Uuid,
            KeyValue::Date(_) => KeyType::Date,
            KeyValue::Timestamp(_) => KeyType::Timestamp,
        }
    }

    /// Parses a SQL text literal as `kind`, accepting Postgres' usual input forms.
    ///
    /// Timestamps: `2026-01-01`, `2026-01-01 12:00[:00[.123456]]`, `T` as separator,
    /// an optional UTC offset (ignored, as Postgres' `timestamp` input does; use
    /// [`KeyValue::from_text`] with the timestamptz OID to apply it) and `BC`.
    pub fn parse_as(kind: KeyType, text: &str) -> Result<KeyValue, ShardingError> {
        match kind {
            KeyType::Int => parse_int(text, "integer").map(KeyValue::Int),
            KeyType::Text => Ok(KeyValue::Text(text.to_string())),
            KeyType::Uuid => parse_uuid(text).map(KeyValue::Uuid),
            KeyType::Date => parse_date(text).map(KeyValue::Date),
            KeyType::Timestamp => parse_timestamp(text, false).map(KeyValue::Timestamp),
        }
    }

    /// Decodes a text-format parameter of Postgres type `type_oid`.
    pub fn from_text(type_oid: u32, bytes: &[u8]) -> Result<KeyValue, ShardingError> {
        let kind = KeyType::from_oid(type_oid)?;
        let text = std::str::from_utf8(bytes).map_err(|_| {
            invalid(
                &String::from_utf8_lossy(bytes),
                kind.name(),
                "not valid UTF-8",
            )
        })?;
        match type_oid {
            oid::INT2 => check_int_range(parse_int(text, "smallint")?, text, "smallint", 16),
            oid::INT4 => check_int_range(parse_int(text, "integer")?, text, "integer", 32),
            oid::TIMESTAMPTZ => parse_timestamp(text, true).map(KeyValue::Timestamp),
            _ => KeyValue::parse_as(kind, text),
        }
    }

    /// Decodes a binary-format parameter of Postgres type `type_oid` (network byte order).
    pub fn from_binary(type_oid: u32, bytes: &[u8]) -> Result<KeyValue, ShardingError> {
        let kind = KeyType::from_oid(type_oid)?;
        let wrong_len = |want: usize| {
            invalid(
                &format!("{} bytes", bytes.len()),
                kind.name(),
                &format!("binary value must be {want} bytes"),
            )
        };
        match type_oid {
            oid::INT2 => {
                let b: [u8; 2] = bytes.try_into().map_err(|_| wrong_len(2))?;
                Ok(KeyValue::Int(i16::from_be_bytes(b).into()))
            }
            oid::INT4 => {
                let b: [u8; 4] = bytes.try_into().map_err(|_| wrong_len(4))?;
                Ok(KeyValue::Int(i32::from_be_bytes(b).into()))
            }
            oid::INT8 => {
                let b: [u8; 8] = bytes.try_into().map_err(|_| wrong_len(8))?;
                Ok(KeyValue::Int(i64::from_be_bytes(b)))
            }
            oid::TEXT | oid::VARCHAR => match std::str::from_utf8(bytes) {
                Ok(s) => Ok(KeyValue::Text(s.to_string())),
                Err(_) => Err(invalid(
                    &String::from_utf8_lossy(bytes),
                    "text",
                    "not valid UTF-8",
                )),
            },
            oid::UUID => {
                let b: [u8; 16] = bytes.try_into().map_err(|_| wrong_len(16))?;
                Ok(KeyValue::Uuid(b))
            }
            oid::DATE => {
                let b: [u8; 4] = bytes.try_into().map_err(|_| wrong_len(4))?;
                Ok(KeyValue::Date(i32::from_be_bytes(b)))
            }
            _ => {
                // timestamp and timestamptz: int64 microseconds since 2000-01-01 (UTC).
                let b: [u8; 8] = bytes.try_into().map_err(|_| wrong_len(8))?;
                Ok(KeyValue::Timestamp(i64::from_be_bytes(b)))
            }
        }
    }

    /// The value for an error message: [`fmt::Display`] form, cut to 64
    /// characters so a huge text key cannot flood logs.
    pub fn shown(&self) -> String {
        let full = self.to_string();
        if full.chars().count() <= 64 {
            return full;
        }
        let cut: String = full.chars().take(64).collect();
        format!("{cut}…")
    }

    /// Returns this value as `kind`, parsing a `Text` value if needed (a quoted SQL
    /// literal such as `'2026-01-01'` arrives as text). Other mismatches are errors.
    pub fn coerce(
        &self,
        kind: KeyType,
        function: &'static str,
    ) -> Result<CoercedKey<'_>, ShardingError> {
        if self.key_type() == kind {
            return Ok(CoercedKey::Borrowed(self));
        }
        match self {
            KeyValue::Text(s) => KeyValue::parse_as(kind, s).map(CoercedKey::Owned),
            other => Err(ShardingError::KeyTypeMismatch {
                function,
                value: other.shown(),
                found: other.key_type().name(),
                expected: kind.name(),
            }),
        }
    }
}

/// A key value that is either the caller's (no allocation) or a parsed copy.
#[derive(Debug)]
pub enum CoercedKey<'a> {
    Borrowed(&'a KeyValue),
    Owned(KeyValue),
}

impl std::ops::Deref for CoercedKey<'_> {
    type Target = KeyValue;
    fn deref(&self) -> &KeyValue {
        match self {
            CoercedKey::Borrowed(v) => v,
            CoercedKey::Owned(v) => v,
        }
    }
}

/// Postgres-style output: integers plain, text quoted, dates and timestamps ISO.
impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            KeyValue::Uuid(b) => {
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
            KeyValue::Date(d) => write_date(f, i64::from(*d)),
            KeyValue::Timestamp(us) => {
                let days = us.div_euclid(USECS_PER_DAY);
                let tod = us.rem_euclid(USECS_PER_DAY);
                let (y, m, d) = civil_from_days(days + PG_EPOCH_DAYS_FROM_UNIX);
                let secs = tod / 1_000_000;
                let frac = tod % 1_000_000;
                write_ymd(f, y, m, d, false)?;
                write!(
                    f,
                    " {:02}:{:02}:{:02}",
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60
                )?;
                if frac != 0 {
                    let digits = format!("{frac:06}");
                    write!(f, ".{}", digits.trim_end_matches('0'))?;
                }
                if y <= 0 {
                    f.write_str(" BC")?;
                }
                Ok(())
            }
        }
    }
}

fn write_date(f: &mut fmt::Formatter<'_>, days: i64) -> fmt::Result {
    let (y, m, d) = civil_from_days(days + PG_EPOCH_DAYS_FROM_UNIX);
    write_ymd(f, y, m, d, true)
}

fn write_ymd(f: &mut fmt::Formatter<'_>, y: i64, m: u32, d: u32, era: bool) -> fmt::Result {
    // Postgres has no year 0: astronomical year 0 is 1 BC.
    let shown = if y <= 0 { 1 - y } else { y };
    write!(f, "{shown:04}-{m:02}-{d:02}")?;
    if era && y <= 0 {
        f.write_str(" BC")?;
    }
    Ok(())
}

/// Builds an "invalid value" error, shortening huge inputs so messages stay readable.
fn invalid(value: &str, expected: &'static str, reason: &str) -> ShardingError {
    const MAX: usize = 64;
    let shown = if value.chars().count() > MAX {
        let cut: String = value.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        value.to_string()
    };
    ShardingError::InvalidValue {
        value: shown,
        expected,
        reason: reason.to_string(),
    }
}

fn parse_int(text: &str, expected: &'static str) -> Result<i64, ShardingError> {
    // Postgres' int8in skips C `isspace` around the digits (not Unicode
    // spaces, which it rejects, and which `str::trim` would strip).
    let t = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r'));
    if t.is_empty() {
        return Err(invalid(text, expected, "empty string"));
    }
    t.parse::<i64>().map_err(|e| {
        let reason = match e.kind() {
            std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
                "out of range for a 64-bit integer"
            }
            _ => "not an integer",
        };
        invalid(text, expected, reason)
    })
}

fn check_int_range(
    v: i64,
    text: &str,
    expected: &'static str,
    bits: u32,
) -> Result<KeyValue, ShardingError> {
    let max = (1i64 << (bits - 1)) - 1;
    if v < -max - 1 || v > max {
        return Err(invalid(
            text,
            expected,
            &format!("out of range for {expected}"),
        ));
    }
    Ok(KeyValue::Int(v))
}

fn parse_uuid(text: &str) -> Result<[u8; 16], ShardingError> {
    let t = text.trim();
    let inner = match t.strip_prefix('{') {
        Some(rest) => rest
            .strip_suffix('}')
            .ok_or_else(|| invalid(text, "uuid", "unbalanced braces"))?,
        None => t,
    };
    let mut out = [0u8; 16];
    let mut nibbles = 0usize;
    let mut prev_hyphen = true; // a leading hyphen is invalid
    for ch in inner.chars() {
        if ch == '-' {
            if prev_hyphen || !nibbles.is_multiple_of(4) {
                return Err(invalid(text, "uuid", "misplaced hyphen"));
            }
            prev_hyphen = true;
            continue;
        }
        let v = ch
            .to_digit(16)
            .ok_or_else(|| invalid(text, "uuid", "expected 32 hexadecimal digits"))?;
        if nibbles >= 32 {
            return Err(invalid(text, "uuid", "more than 32 hexadecimal digits"));
        }
        // v < 16, so the cast cannot truncate.
        out[nibbles / 2] |= (v as u8) << if nibbles.is_multiple_of(2) { 4 } else { 0 };
        nibbles += 1;
        prev_hyphen = false;
    }
    if nibbles != 32 || prev_hyphen {
        return Err(invalid(text, "uuid", "expected 32 hexadecimal digits"));
    }
    Ok(out)
}

/// Fields of a parsed date/time literal.
struct DateTime {
    days: i64,
    /// Microseconds into the day (may reach one day for `24:00:00` or rounding).
    time_us: i64,
    /// UTC offset in seconds east of Greenwich, if written.
    offset_secs: Option<i64>,
}

fn parse_date(text: &str) -> Result<i32, ShardingError> {
    let dt = parse_datetime(text, "date")?;
    // Like Postgres' date input, a time of day is accepted and dropped.
    let days = dt.days;
    if !(DATE_MIN_DAYS..DATE_END_DAYS).contains(&days) {
        return Err(invalid(text, "date", "date out of range"));
    }
    i32::try_from(days).map_err(|_| invalid(text, "date", "date out of range"))
}

fn parse_timestamp(text: &str, with_tz: bool) -> Result<i64, ShardingError> {
    let expected = if with_tz { "timestamptz" } else { "timestamp" };
    let dt = parse_datetime(text, expected)?;
    if !(DATE_MIN_DAYS..TIMESTAMP_END_DAYS).contains(&dt.days) {
        return Err(invalid(text, expected, "timestamp out of range"));
    }
    let mut us = dt.days * USECS_PER_DAY + dt.time_us;
    if with_tz {
        let off = dt.offset_secs.ok_or_else(|| {
            invalid(
                text,
                expected,
                "timestamptz needs an explicit UTC offset (e.g. +00): without one its value \
                 depends on the session TimeZone",
            )
        })?;
        us -= off * 1_000_000;
    }
    Ok(us)
}

/// A cursor over ASCII input; every accessor is bounds-checked.
struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    /// Reads 1..=max_digits decimal digits.
    fn digits(&mut self, max_digits: usize) -> Option<(i64, usize)> {
        let start = self.pos;
        let mut v: i64 = 0;
        while let Some(c) = self.peek() {
            if !c.is_ascii_digit() || self.pos - start >= max_digits {
                break;
            }
            v = v * 10 + i64::from(c - b'0');
            self.pos += 1;
        }
        let n = self.pos - start;
        (n > 0).then_some((v, n))
    }
    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }
}

fn parse_datetime(text: &str, expected: &'static str) -> Result<DateTime, ShardingError> {
    let bad = |reason: &str| invalid(text, expected, reason);
    let mut c = Cursor {
        s: text.trim().as_bytes(),
        pos: 0,
    };
    let (year, _) = c.digits(7).ok_or_else(|| bad("expected YYYY-MM-DD"))?;
    if !c.eat(b'-') {
        return Err(bad("expected YYYY-MM-DD"));
    }
    let (month, mlen) = c.digits(2).ok_or_else(|| bad("expected YYYY-MM-DD"))?;
    if !c.eat(b'-') || mlen == 0 {
        return Err(bad("expected YYYY-MM-DD"));
    }
    let (day, _) = c.digits(2).ok_or_else(|| bad("expected YYYY-MM-DD"))?;

    let mut time_us = 0i64;
    let mut offset_secs = None;
    // Optional time: separated by 'T' or whitespace.
    let save = c.pos;
    let sep = c.eat(b'T') || c.eat(b't') || {
        let before = c.pos;
        c.skip_spaces();
        c.pos > before
    };
    if sep && c.peek().is_some_and(|b| b.is_ascii_digit()) {
        let (h, _) = c.digits(2).ok_or_else(|| bad("expected HH:MM[:SS]"))?;
        if !c.eat(b':') {
            return Err(bad("expected HH:MM[:SS]"));
        }
        let (mi, mlen) = c.digits(2).ok_or_else(|| bad("expected HH:MM[:SS]"))?;
        let mut s = 0;
        let mut frac_us = 0i64;
        if mlen != 2 {
            return Err(bad("expected two-digit minutes"));
        }
        if c.eat(b':') {
            let (sv, slen) = c
                .digits(2)
                .ok_or_else(|| bad("expected two-digit seconds"))?;
            if slen != 2 {
                return Err(bad("expected two-digit seconds"));
            }
            s = sv;
            if c.eat(b'.') {
                let start = c.pos;
                let mut digits = 0;
                let mut round_up = false;
                while let Some(d) = c.peek().filter(u8::is_ascii_digit) {
                    let d = i64::from(d - b'0');
                    if digits < 6 {
                        frac_us = frac_us * 10 + d;
                    } else if digits == 6 {
                        round_up = d >= 5;
                    }
                    digits += 1;
                    c.pos += 1;
                }
                if c.pos == start {
                    return Err(bad("expected digits after the decimal point"));
                }
                for _ in digits.min(6)..6 {
                    frac_us *= 10;
                }
                if round_up {
                    frac_us += 1;
                }
            }
        }
        let valid = (h < 24 && mi < 60 && s < 60) || (h == 24 && mi == 0 && s == 0 && frac_us == 0);
        if !valid {
            return Err(bad("time of day out of range"));
        }
        time_us = ((h * 60 + mi) * 60 + s) * 1_000_000 + frac_us;
        // Optional UTC offset: Z, +HH, +HH:MM, +HHMM.
        c.skip_spaces();
        if c.eat(b'Z') || c.eat(b'z') {
            offset_secs = Some(0);
        } else if matches!(c.peek(), Some(b'+') | Some(b'-')) {
            let neg = c.peek() == Some(b'-');
            c.pos += 1;
            let (oh, ohlen) = c
                .digits(2)
                .ok_or_else(|| bad("expected a UTC offset like +02"))?;
            let mut om = 0;
            if c.eat(b':') || (ohlen == 2 && c.peek().is_some_and(|b| b.is_ascii_digit())) {
                om = c
                    .digits(2)
                    .ok_or_else(|| bad("expected a UTC offset like +05:30"))?
                    .0;
            }
            if oh > 15 || om > 59 {
                return Err(bad("UTC offset out of range"));
            }
            let secs = (oh * 60 + om) * 60;
            offset_secs = Some(if neg { -secs } else { secs });
        }
    } else {
        c.pos = save;
    }
    // Optional era.
    c.skip_spaces();
    let mut bc = false;
    let rest = c.s.get(c.pos..).unwrap_or(&[]);
    if rest.eq_ignore_ascii_case(b"BC") {
        bc = true;
        c.pos += 2;
    } else if rest.eq_ignore_ascii_case(b"AD") {
        c.pos += 2;
    }
    if !c.at_end() {
        return Err(bad("unexpected trailing characters"));
    }
    if year == 0 {
        return Err(bad("there is no year 0 (1 BC is followed by 1 AD)"));
    }
    let astro_year = if bc { 1 - year } else { year };
    let month_ok = (1..=12).contains(&month);
    if !month_ok {
        return Err(bad("month out of range"));
    }
    let mdays = days_in_month(astro_year, month as u32);
    if day < 1 || day > i64::from(mdays) {
        return Err(bad("day out of range for the month"));
    }
    let days = days_from_civil(astro_year, month as u32, day as u32) - PG_EPOCH_DAYS_FROM_UNIX;
    Ok(DateTime {
        days,
        time_us,
        offset_secs,
    })
}

fn is_leap(y: i64) -> bool {
    y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year numbering).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::super::pg_golden;
    use super::*;

    #[test]
    fn integer_keys_skip_the_spaces_postgres_skips_and_no_others() {
        // int8in: C isspace around the digits is fine ...
        for text in [" 42", "42 ", "\t42\n", "\u{0B}\u{0C}42\r"] {
            assert_eq!(
                KeyValue::parse_as(KeyType::Int, text),
                Ok(KeyValue::Int(42)),
                "{text:?}"
            );
        }
        // ... a no-break space is not (Postgres: invalid input syntax).
        assert!(KeyValue::parse_as(KeyType::Int, "\u{A0}42").is_err());
        assert!(KeyValue::parse_as(KeyType::Int, "4 2").is_err());
    }

    #[test]
    fn golden_dates_parse_to_postgres_internal_values() {
        for &(text, days, _, _) in pg_golden::DATE {
            assert_eq!(
                KeyValue::parse_as(KeyType::Date, text),
                Ok(KeyValue::Date(days)),
                "{text}"
            );
            assert_eq!(KeyValue::Date(days).to_string(), text);
        }
    }

    #[test]
    fn golden_timestamps_parse_to_postgres_internal_values() {
        for &(text, us, _, _) in pg_golden::TIMESTAMP {
            assert_eq!(
                KeyValue::parse_as(KeyType::Timestamp, text),
                Ok(KeyValue::Timestamp(us)),
                "{text}"
            );
            let t_form = text.replacen(' ', "T", 1);
            assert_eq!(
                KeyValue::parse_as(KeyType::Timestamp, &t_form),
                Ok(KeyValue::Timestamp(us))
            );
            // Display round-trips (it drops ":00" nothing else).
            let shown = KeyValue::Timestamp(us).to_string();
            assert_eq!(
                KeyValue::parse_as(KeyType::Timestamp, &shown),
                Ok(KeyValue::Timestamp(us)),
                "{shown}"
            );
        }
    }

    #[test]
    fn timestamp_forms() {
        let ts = |s| KeyValue::parse_as(KeyType::Timestamp, s);
        let noon = Ok(KeyValue::Timestamp(820_584_000_000_000));
        assert_eq!(ts("2026-01-01 12:00:00"), noon);
        assert_eq!(ts("2026-01-01T12:00:00"), noon);
        assert_eq!(ts("2026-01-01 12:00"), noon);
        assert_eq!(ts(" 2026-01-01   12:00:00 "), noon);
        assert_eq!(
            ts("2026-01-01 12:00:00+02"),
            noon,
            "timestamp ignores offsets"
        );
        assert_eq!(
            ts("2026-01-01"),
            Ok(KeyValue::Timestamp(820_540_800_000_000))
        );
        assert_eq!(
            ts("2026-01-01 12:00:00.1234567"),
            Ok(KeyValue::Timestamp(820_584_000_123_457))
        );
        assert_eq!(
            ts("2025-12-31 24:00:00"),
            Ok(KeyValue::Timestamp(820_540_800_000_000))
        );
        let tz = |s: &str| KeyValue::from_text(oid::TIMESTAMPTZ, s.as_bytes());
        assert_eq!(tz("2026-01-01 14:00:00+02"), noon);
        assert_eq!(tz("2026-01-01 06:30:00-05:30"), noon);
        assert_eq!(tz("2026-01-01T12:00:00Z"), noon);
        assert!(tz("2026-01-01 12:00:00").is_err());
        for bad in [
            "2026-13-01",
            "2026-02-29",
            "2026-01-01 25:00",
            "2026-01-01x",
            "",
            "0000-01-01",
        ] {
            assert!(ts(bad).is_err(), "{bad}");
        }
        assert_eq!(
            KeyValue::parse_as(KeyType::Date, "2024-02-29 13:00:00"),
            Ok(KeyValue::Date(8825))
        );
    }

    #[test]
    fn uuid_forms() {
        let want =
            KeyValue::parse_as(KeyType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        for form in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(
                KeyValue::parse_as(KeyType::Uuid, form).as_ref(),
                Ok(&want),
                "{form}"
            );
        }
        assert_eq!(want.to_string(), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        for bad in [
            "a0eebc99",
            "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a1g",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11-",
        ] {
            assert!(KeyValue::parse_as(KeyType::Uuid, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn binary_decoding() {
        assert_eq!(
            KeyValue::from_binary(oid::INT2, &(-7i16).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(oid::INT4, &(-7i32).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(oid::INT8, &(-7i64).to_be_bytes()),
            Ok(KeyValue::Int(-7))
        );
        assert_eq!(
            KeyValue::from_binary(oid::VARCHAR, b"eu"),
            Ok(KeyValue::Text("eu".into()))
        );
        assert_eq!(
            KeyValue::from_binary(oid::DATE, &8825i32.to_be_bytes()),
            Ok(KeyValue::Date(8825))
        );
        assert_eq!(
            KeyValue::from_binary(oid::TIMESTAMPTZ, &5i64.to_be_bytes()),
            Ok(KeyValue::Timestamp(5))
        );
        assert_eq!(
            KeyValue::from_binary(oid::UUID, &[7; 16]),
            Ok(KeyValue::Uuid([7; 16]))
        );
        let err = KeyValue::from_binary(oid::INT4, &[0, 1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("integer") && err.contains("4 bytes"), "{err}");
        assert!(KeyValue::from_binary(oid::BPCHAR, b"x").is_err());
        assert!(KeyValue::from_binary(oid::TEXT, &[0xff]).is_err());
        assert!(KeyValue::from_binary(700, &[0; 4]).is_err());
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = KeyValue::Text("x".repeat(10_000));
        assert_eq!(long.shown().chars().count(), 65);
        let err = KeyValue::parse_as(KeyType::Int, &"9".repeat(10_000))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn text_format_and_errors_name_value_and_type() {
        assert_eq!(
            KeyValue::from_text(oid::INT2, b" 42 "),
            Ok(KeyValue::Int(42))
        );
        let err = KeyValue::from_text(oid::INT2, b"40000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("40000") && err.contains("smallint"), "{err}");
        let err = KeyValue::parse_as(KeyType::Int, "abc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("abc") && err.contains("integer"), "{err}");
        let err = KeyValue::parse_as(KeyType::Date, "2026-02-30")
            .unwrap_err()
            .to_string();
        assert!(err.contains("2026-02-30") && err.contains("date"), "{err}");
    }
}
