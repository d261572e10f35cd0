//! Literal extraction: `… WHERE aid = 12345` becomes `… WHERE aid = $1` with
//! the parameter `12345`, so simple-protocol statements that differ only in
//! their constants share one cached analysis. Without it every such
//! statement (psql, pgbench -M simple, ORMs that inline values) is a cache
//! miss and pays a full parse (~8 µs, as much as the whole proxy hop).
//!
//! Only integer literals and plain single-quoted strings are replaced;
//! anything else (decimals, `E''`/`B''`/`X''`/`U&''` strings, dollar quotes,
//! identifiers, comments, existing `$n`) stays as written. When the
//! normalized text does not analyse (a literal where Postgres allows no
//! parameter, e.g. `INTERVAL '1 day'`), the router uses the original text.

use std::borrow::Cow;

use super::route::Param;
use crate::sharding::oid;

/// The most parameters a statement can have bound: Bind counts them in an
/// int16 (Postgres: 65535).
pub const MAX_PARAMS: usize = u16::MAX as usize;

/// The normalized text and the parameters of that form: NULL for each of
/// the statement's own `$1..$first_param` (nothing is bound to them), then
/// the literals taken out, in `$n` order. Literals borrow from `sql` unless
/// they had to be rewritten (`''` escapes, `007`): a simple-protocol query
/// costs no allocation per literal. The text is written to `out` (cleared
/// first), a buffer the caller reuses, and where each literal was to
/// `spans` (see [`match_literals`]). `None`: nothing to extract.
pub fn extract_literals<'a>(
    sql: &'a str,
    first_param: usize,
    out: &mut String,
    spans: &mut Vec<LiteralSpan>,
) -> Option<Vec<Param<'a>>> {
    // Takes the literal at `start..end` out: the text before it is copied,
    // a placeholder written, the parameter and where it was kept.
    let take = |out: &mut String,
                params: &mut Vec<Param<'a>>,
                spans: &mut Vec<LiteralSpan>,
                copied: &mut usize,
                span: LiteralSpan,
                param: Param<'a>| {
        out.push_str(&sql[*copied..span.start]);
        params.push(param);
        spans.push(span);
        push_placeholder(out, params.len());
        *copied = span.end;
    };
    spans.clear();
    if first_param > MAX_PARAMS {
        // No client can bind that many (`SELECT $99999999999, 1`); allocating
        // a NULL for each would abort the process (found by tests/fuzz).
        return None;
    }
    let bytes = sql.as_bytes();
    out.clear();
    out.reserve(sql.len() + 4);
    let mut params: Vec<Param<'_>> = Vec::with_capacity(first_param + 2);
    params.resize(first_param, Param::null());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                // Nested comments, as in Postgres.
                let mut depth = 0;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'"' {
                        if bytes.get(i + 1) == Some(&b'"') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // `$n` parameters and `$tag$ … $tag$` dollar quotes.
                let start = i;
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if i < bytes.len() && bytes[i] == b'$' {
                    let tag = &sql[start..=i];
                    i += 1;
                    match sql[i..].find(tag) {
                        Some(end) => i += end + tag.len(),
                        None => return None,
                    }
                }
            }
            b'\'' => {
                // A prefix letter (E'', B'', X'', U&'', N'') makes it special.
                let prefixed = i > 0 && {
                    let p = bytes[i - 1];
                    p.is_ascii_alphanumeric() || p == b'_' || p == b'&'
                };
                let start = i;
                i += 1;
                // Borrowed from `sql` unless a `''` escape needs rewriting.
                let mut value: Cow<'_, str> = Cow::Borrowed("");
                let mut closed = false;
                let mut seg = i;
                while i < bytes.len() {
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            let owned = value.to_mut();
                            owned.push_str(&sql[seg..=i]);
                            i += 2;
                            seg = i;
                            continue;
                        }
                        match &mut value {
                            Cow::Owned(owned) => owned.push_str(&sql[seg..i]),
                            borrowed => *borrowed = Cow::Borrowed(&sql[seg..i]),
                        }
                        closed = true;
                        break;
                    }
                    i += 1;
                }
                if !closed {
                    return None;
                }
                i += 1;
                // Adjacent strings separated by a newline continue each other.
                let continued = sql[i..]
                    .bytes()
                    .take_while(|c| c.is_ascii_whitespace())
                    .any(|c| c == b'\n')
                    && sql[i..].trim_start().starts_with('\'');
                if !prefixed && !continued {
                    let span = LiteralSpan {
                        start,
                        end: i,
                        kind: LiteralKind::String,
                    };
                    let param = Param::text_cow(value, None);
                    take(out, &mut params, spans, &mut copied, span, param);
                }
            }
            b'-' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
                && unary_position(bytes, i) =>
            {
                // A negative integer literal: one parameter, sign included.
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                let word_after = i < bytes.len() && {
                    let n = bytes[i];
                    n.is_ascii_alphanumeric() || n == b'_' || n == b'.'
                };
                if !word_after {
                    if let Some(value) = integer_literal(&sql[start..i]) {
                        let span = LiteralSpan::integer(start, i);
                        let param = Param::text_cow(value, Some(oid::INT8));
                        take(out, &mut params, spans, &mut copied, span, param);
                    }
                }
            }
            b'0'..=b'9' => {
                let word_before = i > 0 && {
                    let p = bytes[i - 1];
                    p.is_ascii_alphanumeric() || p == b'_' || p == b'$' || p == b'.'
                };
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                let word_after = i < bytes.len() && {
                    let n = bytes[i];
                    n.is_ascii_alphanumeric() || n == b'_' || n == b'.'
                };
                if !word_before && !word_after {
                    if let Some(value) = integer_literal(&sql[start..i]) {
                        let span = LiteralSpan::integer(start, i);
                        let param = Param::text_cow(value, Some(oid::INT8));
                        take(out, &mut params, spans, &mut copied, span, param);
                    }
                } else {
                    while i < bytes.len()
                        && (bytes[i].is_ascii_alphanumeric()
                            || bytes[i] == b'_'
                            || bytes[i] == b'.')
                    {
                        i += 1;
                    }
                }
            }
            c if IDENTIFIER[c as usize] => {
                // Identifiers and keywords: most of a statement's bytes.
                i += 1;
                while i < bytes.len() && IDENTIFIER_OR_DIGIT[bytes[i] as usize] {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    if params.len() == first_param {
        return None;
    }
    out.push_str(&sql[copied..]);
    Some(params)
}

/// Where a literal was taken out of a text, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralSpan {
    pub start: usize,
    pub end: usize,
    pub kind: LiteralKind,
}

impl LiteralSpan {
    fn integer(start: usize, end: usize) -> LiteralSpan {
        LiteralSpan {
            start,
            end,
            kind: LiteralKind::Integer,
        }
    }
}

/// What kind of literal a [`LiteralSpan`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiteralKind {
    /// An integer, with its sign when it has one.
    Integer,
    /// A plain single-quoted string.
    String,
}

/// The parameters of `sql` when it is `template` with other literals in the
/// same places (`template`'s literals at `spans`, its own `$n` up to
/// `first_param`): the text between the literals compared as bytes instead
/// of lexed again (the simple protocol's hot path: `… WHERE aid = 17` after
/// `… WHERE aid = 42`). `None` when it differs anywhere else; the caller
/// then extracts the literals in full. Same parameters as
/// [`extract_literals`] would give, since the bytes around each literal,
/// which decide what counts as one, are the same.
pub fn match_literals<'a>(
    template: &str,
    spans: &[LiteralSpan],
    first_param: usize,
    sql: &'a str,
) -> Option<Vec<Param<'a>>> {
    let (old, new) = (template.as_bytes(), sql.as_bytes());
    let mut params: Vec<Param<'a>> = Vec::with_capacity(first_param + spans.len());
    params.resize(first_param, Param::null());
    let (mut at_old, mut at_new) = (0, 0);
    for span in spans {
        let between = old.get(at_old..span.start)?;
        if new.get(at_new..at_new + between.len())? != between {
            return None;
        }
        at_new += between.len();
        let (param, end) = match span.kind {
            // Signed exactly when the template's was: `x -5` has the literal
            // `5`, and `x --5` a comment.
            LiteralKind::Integer => integer_at(sql, at_new, old.get(span.start) == Some(&b'-'))?,
            LiteralKind::String => string_at(sql, at_new)?,
        };
        params.push(param);
        at_old = span.end;
        at_new = end;
    }
    (old.get(at_old..)? == new.get(at_new..)?).then_some(params)
}

/// The integer literal starting at `at` (with a `-` when `signed`) and its end.
fn integer_at(sql: &str, at: usize, signed: bool) -> Option<(Param<'_>, usize)> {
    let bytes = sql.as_bytes();
    if signed && bytes.get(at) != Some(&b'-') {
        return None;
    }
    let digits_from = at + usize::from(signed);
    let end = digits_from
        + bytes
            .get(digits_from..)?
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
    if end == digits_from {
        return None;
    }
    let value = integer_literal(&sql[at..end])?;
    Some((Param::text_cow(value, Some(oid::INT8)), end))
}

/// The plain string literal starting at `at` and its end. Strings holding
/// `$` are left to the full extraction: `$n` in them moves the numbering
/// of the literal-free form (see [`max_param`]).
fn string_at(sql: &str, at: usize) -> Option<(Param<'_>, usize)> {
    let bytes = sql.as_bytes();
    if bytes.get(at) != Some(&b'\'') {
        return None;
    }
    let mut value: Cow<'_, str> = Cow::Borrowed("");
    let (mut i, mut seg) = (at + 1, at + 1);
    loop {
        match bytes.get(i)? {
            b'$' => return None,
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => {
                value.to_mut().push_str(&sql[seg..=i]);
                i += 2;
                seg = i;
            }
            b'\'' => {
                match &mut value {
                    Cow::Owned(owned) => owned.push_str(&sql[seg..i]),
                    borrowed => *borrowed = Cow::Borrowed(&sql[seg..i]),
                }
                return Some((Param::text_cow(value, None), i + 1));
            }
            _ => i += 1,
        }
    }
}

/// Bytes that start an identifier or keyword (letters, `_`, non-ASCII).
const IDENTIFIER: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphabetic() || c == b'_' || c >= 0x80;
        b += 1;
    }
    table
};

/// Bytes that continue an identifier or keyword.
const IDENTIFIER_OR_DIGIT: [bool; 256] = {
    let mut table = IDENTIFIER;
    let mut b = b'0';
    while b <= b'9' {
        table[b as usize] = true;
        b += 1;
    }
    table
};

/// Appends `$n` (`write!` would go through the formatting machinery for
/// every literal of every simple query).
fn push_placeholder(out: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.push('$');
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

/// An integer literal's value as an int8 parameter's text: the literal as
/// written when that is already canonical (no leading zeros, no `-0`), else
/// its canonical form; `None` when it does not fit in 64 bits.
fn integer_literal(text: &str) -> Option<Cow<'_, str>> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.starts_with('0') || (digits == "0" && !text.starts_with('-'));
    // Up to 18 digits always fit: no need to parse what routing parses anyway.
    if canonical && digits.len() <= 18 {
        return Some(Cow::Borrowed(text));
    }
    let v = text.parse::<i64>().ok()?;
    Some(if canonical {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(v.to_string())
    })
}

/// A `-` at `i` is a sign (not subtraction) when what precedes it is an
/// operator or an opening bracket or comma.
fn unary_position(bytes: &[u8], i: usize) -> bool {
    let previous = bytes[..i].iter().rev().find(|c| !c.is_ascii_whitespace());
    matches!(
        previous,
        None | Some(b'=' | b'<' | b'>' | b'(' | b',' | b'[' | b'+' | b'*' | b'/' | b'%')
    )
}

/// The highest `$n` in `sql` (outside strings and comments is not checked:
/// a `$n` inside a string only makes the numbering start higher).
pub fn max_param(sql: &str) -> usize {
    // Most texts with inlined values have no `$` at all (a fast search).
    let Some(first) = sql.find('$') else {
        return 0;
    };
    let bytes = sql.as_bytes();
    let mut max = 0;
    let mut i = first;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let start = i + 1;
            let mut j = start;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            if j > start {
                if let Ok(n) = sql[start..j].parse::<usize>() {
                    max = max.max(n);
                }
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract(sql: &str, first_param: usize) -> Option<(String, Vec<Param<'_>>)> {
        let mut out = String::new();
        extract_literals(sql, first_param, &mut out, &mut Vec::new()).map(|params| (out, params))
    }

    /// Matching against a template gives what a full extraction gives, or
    /// declines.
    #[test]
    fn matched_literals_equal_extracted_ones() {
        let cases = [
            (
                "SELECT abalance FROM a WHERE aid = 42;",
                "SELECT abalance FROM a WHERE aid = 123456;",
            ),
            (
                "SELECT * FROM t WHERE k = -5 AND s = 'x'",
                "SELECT * FROM t WHERE k = -77 AND s = 'it''s'",
            ),
            (
                "SELECT * FROM t WHERE k = 5 AND s = 'x'",
                "SELECT * FROM t WHERE k = 007 AND s = ''",
            ),
            ("SELECT $1, 7", "SELECT $1, 8"),
            ("SELECT 1", "SELECT 1"),
        ];
        for (template, sql) in cases {
            let (mut out, mut spans) = (String::new(), Vec::new());
            let first = max_param(template);
            extract_literals(template, first, &mut out, &mut spans).expect("literals");
            let matched = match_literals(template, &spans, first, sql).expect(sql);
            let (_, extracted) = extract(sql, max_param(sql)).expect(sql);
            assert_eq!(matched, extracted, "{sql}");
        }
        let declined = [
            (
                "SELECT * FROM t WHERE k = 5",
                "SELECT * FROM t WHERE k = 5 OR true",
            ),
            ("SELECT * FROM t WHERE k = 5", "SELECT * FROM t WHERE k = x"),
            (
                "SELECT * FROM t WHERE s = 'a'",
                "SELECT * FROM t WHERE s = '$2'",
            ),
            (
                "SELECT * FROM t WHERE s = 'a'",
                "SELECT * FROM t WHERE s = 'a",
            ),
            (
                "SELECT * FROM t WHERE k = 5",
                "SELECT * FROM t WHERE k = 99999999999999999999",
            ),
            (
                "SELECT * FROM t WHERE k = 5;",
                "SELECT * FROM t WHERE k = 5.5;",
            ),
            ("SELECT * FROM t WHERE k = 5", "SELECT * FROM u WHERE k = 5"),
            ("SELECT x -5", "SELECT x --5"),
            (
                "SELECT * FROM t WHERE k = -5",
                "SELECT * FROM t WHERE k = 5",
            ),
            (
                "SELECT * FROM t WHERE k = 5",
                "SELECT * FROM t WHERE k = -5",
            ),
        ];
        for (template, sql) in declined {
            let (mut out, mut spans) = (String::new(), Vec::new());
            extract_literals(template, max_param(template), &mut out, &mut spans)
                .expect("literals");
            assert_eq!(match_literals(template, &spans, 0, sql), None, "{sql}");
        }
    }

    /// The fuzz input that aborted the process: a `$n` far beyond any
    /// bindable parameter made extraction allocate a NULL for each.
    #[test]
    fn placeholders_are_written_in_decimal() {
        for n in [1, 9, 10, 99, 100, 65_535, usize::MAX] {
            let mut out = String::from("x");
            push_placeholder(&mut out, n);
            assert_eq!(out, format!("x${n}"));
        }
    }

    #[test]
    fn huge_parameter_numbers_are_not_allocated() {
        let sql =
            "UPDATE PREPARE double_it(inp) AS Spgbench_accounts SET abELECT $55555555555555555al5";
        assert_eq!(extract(sql, max_param(sql)), None);
        let sql = "SELECT $99999999, 1";
        assert_eq!(extract(sql, max_param(sql)), None);
        let sql = "SELECT $2, 7";
        let (text, params) = extract(sql, max_param(sql)).expect("extracted");
        assert_eq!((text.as_str(), params.len()), ("SELECT $2, $3", 3));
    }

    fn norm(sql: &str) -> Option<(String, Vec<String>)> {
        extract(sql, 0).map(|(s, p)| {
            (
                s,
                p.into_iter()
                    .map(|p| String::from_utf8(p.value.unwrap_or_default().into_owned()).unwrap())
                    .collect(),
            )
        })
    }

    #[test]
    fn integers_and_strings_become_parameters() {
        assert_eq!(
            norm("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"),
            Some((
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
                vec!["12345".into()]
            ))
        );
        assert_eq!(
            norm("INSERT INTO t (a, b) VALUES (1, 'it''s'), (-2, 'x')"),
            Some((
                "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)".into(),
                vec!["1".into(), "it's".into(), "-2".into(), "x".into()]
            ))
        );
    }

    #[test]
    fn subtraction_is_not_a_sign() {
        assert_eq!(
            norm("SELECT a -5, b - 6 FROM t WHERE c = -7"),
            Some((
                "SELECT a -$1, b - $2 FROM t WHERE c = $3".into(),
                vec!["5".into(), "6".into(), "-7".into()]
            ))
        );
    }

    #[test]
    fn everything_else_stays() {
        assert_eq!(norm("SELECT t1.c2 FROM t1"), None);
        assert_eq!(norm("SELECT 1.5, 2e3, E'a\\n', B'01', X'ff', U&'x'"), None);
        assert_eq!(norm("SELECT $1, \"col 1\" /* 5 */ -- 7\n"), None);
        assert_eq!(norm("SELECT $$ 1 'x' $$, $tag$ 2 $tag$"), None);
        // Numbering continues after the statement's own parameters.
        let (sql, _) = extract("SELECT * FROM t WHERE a = $1 AND b = 3", 1).unwrap();
        assert_eq!(sql, "SELECT * FROM t WHERE a = $1 AND b = $2");
        assert_eq!(max_param("SELECT $1, $12"), 12);
        assert_eq!(max_param("SELECT 1"), 0);
        // 19 digits: beyond int8, left as written.
        assert_eq!(norm("SELECT 99999999999999999999"), None);
        assert!(norm("SELECT 999999999999999999").is_some());
        // Unterminated input is left to the parser.
        assert_eq!(norm("SELECT 'open"), None);
    }

    #[test]
    fn literals_borrow_the_text_unless_it_is_rewritten() {
        let sql = "SELECT * FROM t WHERE a = $1 AND b = 42 AND c = 'x' AND d = 'it''s' AND e = 007 AND f = -0 AND g = 0";
        let (normalized, params) = extract(sql, 1).expect("literals");
        assert_eq!(
            normalized,
            "SELECT * FROM t WHERE a = $1 AND b = $2 AND c = $3 AND d = $4 AND e = $5 AND f = $6 AND g = $7"
        );
        // $1 is the statement's own: NULL (nothing bound), then the literals.
        assert_eq!(params[0].value, None);
        let values: Vec<(&[u8], bool)> = params[1..]
            .iter()
            .map(|p| {
                let v = p.value.as_ref().expect("a literal is not NULL");
                (v.as_ref(), matches!(v, Cow::Borrowed(_)))
            })
            .collect();
        assert_eq!(
            values,
            vec![
                (&b"42"[..], true),
                (&b"x"[..], true),
                (&b"it's"[..], false),
                (&b"7"[..], false),
                (&b"0"[..], false),
                (&b"0"[..], true),
            ]
        );
        assert_eq!(params[1].type_oid, Some(oid::INT8));
        assert_eq!(params[2].type_oid, None);
    }
}
