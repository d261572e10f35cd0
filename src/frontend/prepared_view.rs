//! `pg_prepared_statements` as the client would see it from Postgres.
//!
//! A client's protocol-level statements live on shardgate's backends under
//! shared server names (`sg_<hash>`), created lazily on whichever backend
//! runs them, and a backend holds other clients' statements too: read
//! through shardgate, the view showed statements the client never prepared
//! and missed its own (psycopg's and asyncpg's tests count its rows; #14-D4).
//! A statement that reads the view gets, in its place, a relation of the
//! client's own statements — its names, texts and Parse times, with the
//! plan counters and inferred parameter types of the backend's copy when
//! the backend that runs the statement has one — plus that backend's
//! SQL-level `PREPARE`s. The view's own row type shapes the rows
//! (`jsonb_populate_record`), so every server version's columns come out.

use std::time::SystemTime;

use crate::civil_time::CivilTime;

/// One of the client's protocol-level statements.
pub struct Listed<'a> {
    pub name: &'a str,
    pub server_name: &'a str,
    pub query: &'a str,
    pub param_types: Vec<u32>,
    pub prepared_at: SystemTime,
}

const VIEW: &[u8] = b"pg_prepared_statements";

/// Words after a relation that are not an alias of it.
const NOT_ALIAS: &[&str] = &[
    "where",
    "order",
    "group",
    "having",
    "limit",
    "offset",
    "join",
    "inner",
    "left",
    "right",
    "full",
    "cross",
    "natural",
    "on",
    "using",
    "union",
    "intersect",
    "except",
    "window",
    "fetch",
    "for",
    "returning",
    "tablesample",
];

/// `sql` with every reference to the view replaced by the client's
/// listing; `None` when it names the view nowhere outside strings,
/// comments and quoted identifiers.
pub fn rewrite(sql: &str, statements: &[Listed<'_>]) -> Option<String> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 512);
    let mut copied = 0;
    let mut relation: Option<String> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(end) = skip_literal(bytes, i) {
            i = end;
            continue;
        }
        if !is_word(b) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_word(bytes[i]) {
            i += 1;
        }
        if !bytes[start..i].eq_ignore_ascii_case(VIEW) {
            continue;
        }
        // `x.pg_prepared_statements` of another schema, or
        // `pg_prepared_statements.column` (the alias we keep): left alone.
        let mut from = start;
        if start > 0 && bytes[start - 1] == b'.' {
            let qualifier_end = start - 1;
            let mut q = qualifier_end;
            while q > 0 && is_word(bytes[q - 1]) {
                q -= 1;
            }
            if !bytes[q..qualifier_end].eq_ignore_ascii_case(b"pg_catalog") {
                continue;
            }
            from = q;
        }
        let after = skip_space(bytes, i);
        if bytes.get(after) == Some(&b'.') {
            continue;
        }
        let listing = relation.get_or_insert_with(|| listing(statements));
        out.push_str(&sql[copied..from]);
        out.push_str(listing);
        if !has_alias(bytes, after) {
            out.push_str(" AS pg_prepared_statements");
        }
        copied = i;
    }
    relation?;
    out.push_str(&sql[copied..]);
    Some(out)
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// Whether the token at `at` is an alias of the relation before it.
fn has_alias(bytes: &[u8], at: usize) -> bool {
    let mut end = at;
    while end < bytes.len() && is_word(bytes[end]) {
        end += 1;
    }
    if end == at {
        // `"alias"` is one too; `,`, `)`, `;` and the end are not.
        return bytes.get(at) == Some(&b'"');
    }
    let word = &bytes[at..end];
    word.eq_ignore_ascii_case(b"as")
        || !NOT_ALIAS
            .iter()
            .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
}

/// Past whitespace and comments.
fn skip_space(bytes: &[u8], mut i: usize) -> usize {
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        match (bytes.get(i), bytes.get(i + 1)) {
            (Some(b'-'), Some(b'-')) | (Some(b'/'), Some(b'*')) => {
                i = skip_literal(bytes, i).unwrap_or(bytes.len());
            }
            _ => return i,
        }
    }
}

/// The end of a string, quoted identifier or comment starting at `i`.
fn skip_literal(bytes: &[u8], i: usize) -> Option<usize> {
    let b = bytes[i];
    let next = bytes.get(i + 1).copied();
    match b {
        b'\'' => {
            // E'…' strings take backslash escapes.
            let escapes =
                i > 0 && (bytes[i - 1] | 0x20) == b'e' && (i < 2 || !is_word(bytes[i - 2]));
            let mut j = i + 1;
            while j < bytes.len() {
                match bytes[j] {
                    b'\\' if escapes => j += 2,
                    b'\'' if bytes.get(j + 1) == Some(&b'\'') => j += 2,
                    b'\'' => return Some(j + 1),
                    _ => j += 1,
                }
            }
            Some(bytes.len())
        }
        b'"' => {
            let mut j = i + 1;
            while j < bytes.len() {
                match bytes[j] {
                    b'"' if bytes.get(j + 1) == Some(&b'"') => j += 2,
                    b'"' => return Some(j + 1),
                    _ => j += 1,
                }
            }
            Some(bytes.len())
        }
        b'-' if next == Some(b'-') => Some(
            bytes[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(bytes.len(), |p| i + p + 1),
        ),
        b'/' if next == Some(b'*') => {
            let mut depth = 0usize;
            let mut j = i;
            while j + 1 < bytes.len() {
                match (bytes[j], bytes[j + 1]) {
                    (b'/', b'*') => {
                        depth += 1;
                        j += 2;
                    }
                    (b'*', b'/') => {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => j += 1,
                }
            }
            Some(bytes.len())
        }
        b'$' if i == 0 || !is_word(bytes[i - 1]) => {
            // $tag$ … $tag$ (not a $1 parameter).
            let mut j = i + 1;
            while j < bytes.len() && is_word(bytes[j]) && bytes[j] != b'$' {
                j += 1;
            }
            if bytes.get(j) != Some(&b'$') || bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                return None;
            }
            let tag = &bytes[i..=j];
            let body = j + 1;
            Some(
                bytes[body..]
                    .windows(tag.len())
                    .position(|w| w == tag)
                    .map_or(bytes.len(), |p| body + p + tag.len()),
            )
        }
        _ => None,
    }
}

/// The relation standing in for the view.
fn listing(statements: &[Listed<'_>]) -> String {
    let mut json = String::from("[");
    for (n, s) in statements.iter().enumerate() {
        if n > 0 {
            json.push(',');
        }
        json.push_str("{\"server\":");
        json_string(&mut json, s.server_name);
        json.push_str(",\"name\":");
        json_string(&mut json, s.name);
        json.push_str(",\"statement\":");
        json_string(&mut json, s.query);
        json.push_str(",\"prepare_time\":\"");
        json.push_str(&rfc3339(s.prepared_at));
        json.push_str("\",\"parameter_types\":[");
        for (k, oid) in s.param_types.iter().enumerate() {
            if k > 0 {
                json.push(',');
            }
            // regtype reads a number as an OID (0 shows as `-`).
            json.push_str(&format!("\"{oid}\""));
        }
        json.push_str("],\"from_sql\":false,\"generic_plans\":0,\"custom_plans\":0}");
    }
    json.push(']');
    let quote = dollar_quote(&json);
    format!(
        "(SELECT r.* FROM pg_catalog.jsonb_array_elements({quote}{json}{quote}::jsonb) AS c(j) \
         CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::pg_catalog.pg_prepared_statements, \
         c.j || COALESCE((SELECT pg_catalog.to_jsonb(p) - 'name' - 'statement' - 'prepare_time' \
         FROM pg_catalog.pg_prepared_statements p WHERE p.name = c.j ->> 'server'), '{{}}'::jsonb)) AS r \
         UNION ALL SELECT * FROM pg_catalog.pg_prepared_statements WHERE from_sql)"
    )
}

/// A dollar-quote tag that does not occur in `text`.
fn dollar_quote(text: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = if n == 0 {
            "$sg$".to_string()
        } else {
            format!("$sg{n}$")
        };
        if !text.contains(&tag) {
            return tag;
        }
        n += 1;
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` of a wall-clock time.
fn rfc3339(at: SystemTime) -> String {
    let t = CivilTime::of(at).unwrap_or(CivilTime::EPOCH);
    format!("{}T{}.{:06}Z", t.date(), t.time(), t.micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn one() -> Vec<Listed<'static>> {
        vec![Listed {
            name: "_pg3_0",
            server_name: "sg_00000000000000ab",
            query: "select 'a' \"q\" \\ $sg$",
            param_types: vec![23, 0],
            prepared_at: UNIX_EPOCH + Duration::from_micros(1_765_134_000_123_456),
        }]
    }

    #[test]
    fn names_outside_strings_and_comments_are_replaced() {
        let sql = "select count(*) from pg_prepared_statements where name != '' \
                   -- pg_prepared_statements\n and 'pg_prepared_statements' <> $$pg_prepared_statements$$";
        let out = rewrite(sql, &one()).expect("rewritten");
        assert_eq!(
            out.matches("FROM pg_catalog.pg_prepared_statements p")
                .count(),
            1
        );
        assert!(
            out.contains(") AS pg_prepared_statements where name != ''"),
            "{out}"
        );
        assert!(out.ends_with("-- pg_prepared_statements\n and 'pg_prepared_statements' <> $$pg_prepared_statements$$"));
        assert!(
            out.contains("$sg1$"),
            "the text holds $sg$: another tag: {out}"
        );
    }

    #[test]
    fn aliases_qualifiers_and_other_schemas() {
        let out = rewrite(
            "SELECT p.name FROM pg_catalog.pg_prepared_statements p",
            &[],
        )
        .expect("rewritten");
        assert!(out.starts_with("SELECT p.name FROM (SELECT"), "{out}");
        assert!(out.ends_with("WHERE from_sql) p"), "{out}");
        let out = rewrite("SELECT * FROM PG_PREPARED_STATEMENTS AS x, t", &[]).expect("rewritten");
        assert!(out.ends_with("WHERE from_sql) AS x, t"), "{out}");
        let out = rewrite(
            "SELECT pg_prepared_statements.name FROM pg_prepared_statements",
            &[],
        )
        .expect("rewritten");
        assert!(
            out.starts_with("SELECT pg_prepared_statements.name FROM (SELECT"),
            "{out}"
        );
        assert!(out.ends_with("AS pg_prepared_statements"), "{out}");
        assert_eq!(
            rewrite("SELECT * FROM app.pg_prepared_statements", &[]),
            None
        );
        assert_eq!(rewrite("SELECT 'pg_prepared_statements'", &[]), None);
        assert_eq!(rewrite("SELECT \"pg_prepared_statements\"", &[]), None);
    }

    #[test]
    fn the_listing_escapes_text_and_dates_each_statement() {
        let out = listing(&one());
        assert!(out.contains(r#""name":"_pg3_0""#), "{out}");
        assert!(
            out.contains(r#""statement":"select 'a' \"q\" \\ $sg$""#),
            "{out}"
        );
        assert!(out.contains(r#""parameter_types":["23","0"]"#), "{out}");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_micros(1_765_134_000_123_456)),
            "2025-12-07T19:00:00.123456Z"
        );
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
