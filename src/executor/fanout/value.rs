//! Type-aware sort keys for merging shard results, from text or binary
//! result format, with Postgres' ordering: NaN above every number for
//! floats and numeric, `-0 = 0`, bpchar ignoring trailing spaces, text
//! compared bytewise (exact only under C / POSIX / C.UTF-8 collations, which
//! the planner checks), timestamps with time zone compared in UTC.

use std::cmp::Ordering;

/// Type OIDs the merge understands.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

/// A decoded sort key value (never NULL; NULLs are handled by the caller).
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    Int(i64),
    Float(f64),
    Numeric(Num),
    Bytes(Vec<u8>),
}

/// Whether a type can be merge-sorted, and whether it is a collatable text type.
pub fn sortable(type_oid: u32) -> Option<bool> {
    use oid::*;
    match type_oid {
        TEXT | VARCHAR | BPCHAR | UNKNOWN => Some(true),
        BOOL | BYTEA | CHAR | NAME | INT2 | INT4 | INT8 | OID | FLOAT4 | FLOAT8 | DATE | TIME
        | TIMESTAMP | TIMESTAMPTZ | NUMERIC | UUID => Some(false),
        _ => None,
    }
}

/// Decodes one value; `None` when the bytes are not a valid value of the
/// type (the caller reports an error rather than guessing an order).
pub fn decode(type_oid: u32, binary: bool, v: &[u8]) -> Option<Key> {
    use oid::*;
    if binary {
        return match type_oid {
            INT2 => Some(Key::Int(i16::from_be_bytes(v.try_into().ok()?) as i64)),
            INT4 | DATE => Some(Key::Int(i32::from_be_bytes(v.try_into().ok()?) as i64)),
            OID => Some(Key::Int(u32::from_be_bytes(v.try_into().ok()?) as i64)),
            INT8 | TIME | TIMESTAMP | TIMESTAMPTZ => {
                Some(Key::Int(i64::from_be_bytes(v.try_into().ok()?)))
            }
            FLOAT4 => Some(Key::Float(f32::from_be_bytes(v.try_into().ok()?) as f64)),
            FLOAT8 => Some(Key::Float(f64::from_be_bytes(v.try_into().ok()?))),
            NUMERIC => Num::from_binary(v).map(Key::Numeric),
            BOOL => Some(Key::Int(i64::from(*v.first()? != 0))),
            BPCHAR => Some(Key::Bytes(trim_spaces(v).to_vec())),
            _ => Some(Key::Bytes(v.to_vec())),
        };
    }
    let text = std::str::from_utf8(v).ok()?;
    match type_oid {
        INT2 | INT4 | INT8 | OID => text.trim().parse::<i64>().ok().map(Key::Int),
        FLOAT4 | FLOAT8 => parse_float(text).map(Key::Float),
        NUMERIC => Num::from_text(text).map(Key::Numeric),
        BOOL => match text {
            "t" => Some(Key::Int(1)),
            "f" => Some(Key::Int(0)),
            _ => None,
        },
        DATE => parse_date(text).map(Key::Int),
        TIME => parse_time(text).map(Key::Int),
        TIMESTAMP => parse_timestamp(text, false).map(Key::Int),
        TIMESTAMPTZ => parse_timestamp(text, true).map(Key::Int),
        BPCHAR => Some(Key::Bytes(trim_spaces(v).to_vec())),
        _ => Some(Key::Bytes(v.to_vec())),
    }
}

fn trim_spaces(v: &[u8]) -> &[u8] {
    let end = v.iter().rposition(|b| *b != b' ').map_or(0, |p| p + 1);
    &v[..end]
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse::<f64>().ok(),
    }
}

/// Postgres float order: NaN equals NaN and is above everything; -0 = 0.
fn cmp_float(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// Compares two keys of the same column.
pub fn compare(a: &Key, b: &Key) -> Ordering {
    match (a, b) {
        (Key::Int(x), Key::Int(y)) => x.cmp(y),
        (Key::Float(x), Key::Float(y)) => cmp_float(*x, *y),
        (Key::Numeric(x), Key::Numeric(y)) => x.cmp(y),
        (Key::Bytes(x), Key::Bytes(y)) => x.cmp(y),
        _ => Ordering::Equal,
    }
}

/// Canonical bytes for equality (DISTINCT): equal values give equal bytes.
pub fn canonical(type_oid: u32, binary: bool, v: &[u8]) -> Vec<u8> {
    match sortable(type_oid) {
        Some(_) => match decode(type_oid, binary, v) {
            Some(Key::Int(i)) => i.to_be_bytes().to_vec(),
            Some(Key::Float(f)) => {
                let f = if f == 0.0 { 0.0 } else { f };
                if f.is_nan() {
                    b"nan".to_vec()
                } else {
                    f.to_bits().to_be_bytes().to_vec()
                }
            }
            Some(Key::Numeric(n)) => format!("{n:?}").into_bytes(),
            Some(Key::Bytes(b)) => b,
            None => v.to_vec(),
        },
        None => v.to_vec(),
    }
}

/// A numeric value normalised for comparison: class (-Inf, finite, +Inf,
/// NaN), sign, decimal exponent and significant digits without leading or
/// trailing zeros (value = 0.d1d2… × 10^exp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Num {
    class: i8,
    negative: bool,
    exp: i64,
    digits: Vec<u8>,
}

impl Num {
    fn finite(negative: bool, mut digits: Vec<u8>, mut exp: i64) -> Num {
        let lead = digits.iter().take_while(|d| **d == 0).count();
        digits.drain(..lead);
        exp -= lead as i64;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Num {
                class: 0,
                negative: false,
                exp: 0,
                digits,
            };
        }
        Num {
            class: 0,
            negative,
            exp,
            digits,
        }
    }

    pub fn from_text(text: &str) -> Option<Num> {
        let special = |class| {
            Some(Num {
                class,
                negative: false,
                exp: 0,
                digits: Vec::new(),
            })
        };
        match text {
            "NaN" => return special(2),
            "Infinity" => return special(1),
            "-Infinity" => return special(-1),
            _ => {}
        }
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let mut digits = Vec::with_capacity(int.len() + frac.len());
        for c in int.bytes().chain(frac.bytes()) {
            if !c.is_ascii_digit() {
                return None;
            }
            digits.push(c - b'0');
        }
        Some(Num::finite(negative, digits, int.len() as i64))
    }

    pub fn from_binary(v: &[u8]) -> Option<Num> {
        if v.len() < 8 {
            return None;
        }
        let ndigits = i16::from_be_bytes([v[0], v[1]]).max(0) as usize;
        let weight = i16::from_be_bytes([v[2], v[3]]) as i64;
        let sign = u16::from_be_bytes([v[4], v[5]]);
        let special = |class| Num {
            class,
            negative: false,
            exp: 0,
            digits: Vec::new(),
        };
        match sign {
            0xC000 => return Some(special(2)),
            0xD000 => return Some(special(1)),
            0xF000 => return Some(special(-1)),
            0x0000 | 0x4000 => {}
            _ => return None,
        }
        if v.len() < 8 + 2 * ndigits {
            return None;
        }
        let mut digits = Vec::with_capacity(ndigits * 4);
        for i in 0..ndigits {
            let d = u16::from_be_bytes([v[8 + 2 * i], v[9 + 2 * i]]);
            if d > 9999 {
                return None;
            }
            digits.extend_from_slice(&[
                (d / 1000) as u8,
                (d / 100 % 10) as u8,
                (d / 10 % 10) as u8,
                (d % 10) as u8,
            ]);
        }
        Some(Num::finite(sign == 0x4000, digits, 4 * (weight + 1)))
    }
}

impl Ord for Num {
    fn cmp(&self, other: &Num) -> Ordering {
        let rank = |n: &Num| -> i8 {
            match n.class {
                0 if n.digits.is_empty() => 0,
                0 if n.negative => -1,
                0 => 1,
                c => c * 2, // -Inf -2, +Inf 2, NaN 4
            }
        };
        let (ra, rb) = (rank(self), rank(other));
        if ra != rb || ra == 0 || ra.abs() >= 2 {
            return ra.cmp(&rb);
        }
        let magnitude = self
            .exp
            .cmp(&other.exp)
            .then_with(|| self.digits.cmp(&other.digits));
        if self.negative {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

impl PartialOrd for Num {
    fn partial_cmp(&self, other: &Num) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days since 2000-01-01 from an ISO date (`YYYY-MM-DD[ BC]`), or ±infinity.
fn parse_date(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let mut parts = body.splitn(3, '-');
    let y = digits(parts.next()?)?;
    let m = digits(parts.next()?)?;
    let d = digits(parts.next()?)?;
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d))
}

/// Proleptic Gregorian day number (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Microseconds since midnight from `HH:MM:SS[.ffffff]`.
fn parse_time(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, ':');
    let h = digits(parts.next()?)?;
    let m = digits(parts.next()?)?;
    let sec = parts.next()?;
    let (s, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let s = digits(s)?;
    let mut micros = 0i64;
    if !frac.is_empty() {
        if !frac.is_ascii() {
            return None;
        }
        let f = &frac[..frac.len().min(6)];
        micros = digits(f)? * 10i64.pow(6 - f.len() as u32);
    }
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// Microseconds (UTC for timestamptz) from ISO `YYYY-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]][ BC]`.
fn parse_timestamp(text: &str, with_zone: bool) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let (date, rest) = body.split_once(' ')?;
    let (time, offset) = if with_zone {
        let at = rest.rfind(['+', '-'])?;
        (&rest[..at], Some(&rest[at..]))
    } else {
        (rest, None)
    };
    let date_text = if bc {
        format!("{date} BC")
    } else {
        date.to_string()
    };
    let days = parse_date(&date_text)?;
    let mut micros = days * 86_400_000_000 + parse_time(time)?;
    if let Some(off) = offset {
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let mut secs = 0;
        for (i, part) in off[1..].split(':').enumerate() {
            let unit = [3600, 60, 1].get(i).copied()?;
            secs += digits(part)? * unit;
        }
        micros -= sign * secs * 1_000_000;
    }
    Some(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &str) -> Num {
        Num::from_text(s).unwrap()
    }

    #[test]
    fn numeric_order() {
        let mut v: Vec<Num> = [
            "NaN",
            "10",
            "-1.5",
            "0",
            "0.000",
            "2.50",
            "2.5",
            "-Infinity",
            "Infinity",
            "-10",
            "0.01",
            "100.0",
        ]
        .iter()
        .map(|s| num(s))
        .collect();
        v.sort();
        let order: Vec<String> = v.iter().map(|n| format!("{n:?}")).collect();
        assert_eq!(v[0], num("-Infinity"));
        assert_eq!(v[1], num("-10"));
        assert_eq!(v[2], num("-1.5"));
        assert_eq!(num("0"), num("0.000"));
        assert_eq!(num("2.5"), num("2.50"));
        assert_eq!(v[v.len() - 1], num("NaN"), "{order:?}");
        assert_eq!(v[v.len() - 2], num("Infinity"));
        assert!(num("100.0") > num("10"));
        assert!(num("0.01") < num("2.5"));
        // binary 12.5 = ndigits 2, weight 0, sign 0, dscale 1, digits [12, 5000]
        let bin = [0, 2, 0, 0, 0, 0, 0, 1, 0, 12, 0x13, 0x88];
        assert_eq!(Num::from_binary(&bin).unwrap(), num("12.5"));
    }

    #[test]
    fn floats_dates_times() {
        assert_eq!(cmp_float(f64::NAN, f64::INFINITY), Ordering::Greater);
        assert_eq!(cmp_float(-0.0, 0.0), Ordering::Equal);
        assert!(parse_date("1970-01-02") == Some(1));
        assert!(parse_date("0001-01-01 BC") < parse_date("0001-01-01"));
        assert!(
            parse_timestamp("2020-01-01 10:00:00+02", true)
                < parse_timestamp("2020-01-01 09:00:00+00", true)
        );
        assert!(parse_time("10:00:00.5") > parse_time("10:00:00.25"));
    }
}
