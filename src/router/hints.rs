//! Routing hints a client can give: a leading comment
//! `/* shardgate: shard=s1 */` or `/* shardgate: key=42 */`, and the session
//! settings `SET shardgate.shard = 's1'` / `SET shardgate.sharding_key = '42'`.
//!
//! sqlparser drops comments, so hints are read from the raw text.

/// A hint found in a statement or a session setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint<'a> {
    Shard(&'a str),
    Key(&'a str),
}

/// The hint in a comment at the very start of `sql` (after whitespace).
pub fn leading_hint(sql: &str) -> Option<Hint<'_>> {
    let rest = sql.trim_ascii_start().strip_prefix("/*")?;
    let end = rest.find("*/")?;
    let body = rest[..end].trim().strip_prefix("shardgate:")?.trim();
    let (name, value) = body.split_once('=')?;
    let value = value.trim().trim_matches(|c| c == '\'' || c == '"');
    match name.trim() {
        "shard" => Some(Hint::Shard(value)),
        "key" | "sharding_key" => Some(Hint::Key(value)),
        _ => None,
    }
}

/// A `SET shardgate.<name> = <value>`, `SET shardgate.<name> TO <value>`,
/// or `RESET shardgate.<name>` statement (one statement, optional `;`).
/// Returns the setting name and the new value (`None` for RESET / DEFAULT).
pub fn shardgate_setting(sql: &str) -> Option<(&str, Option<String>)> {
    // Decided by the first letter for almost every statement (this runs for
    // every simple query), before the text is trimmed at both ends.
    if !matches!(
        sql.trim_ascii_start().as_bytes().first(),
        Some(b's' | b'S' | b'r' | b'R')
    ) {
        return None;
    }
    let text = sql.trim().trim_end_matches(';').trim_end();
    // `get` rather than slicing: a multi-byte character may straddle the prefix length.
    let lower_starts =
        |s: &str, p: &str| s.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
    if lower_starts(text, "reset ") {
        let name = text[6..].trim();
        let name = strip_namespace(name)?;
        return Some((name, None));
    }
    if !lower_starts(text, "set ") {
        return None;
    }
    let mut rest = text[4..].trim_start();
    for scope in ["session ", "local "] {
        if lower_starts(rest, scope) {
            rest = rest[scope.len()..].trim_start();
        }
    }
    let split = rest.find(|c: char| c == '=' || c.is_whitespace())?;
    let name = strip_namespace(&rest[..split])?;
    let mut value = rest[split..].trim_start();
    if let Some(v) = value.strip_prefix('=') {
        value = v;
    } else if lower_starts(value, "to ") {
        value = &value[3..];
    } else {
        return None;
    }
    let value = value.trim();
    if value.eq_ignore_ascii_case("default") {
        return Some((name, None));
    }
    let unquoted = if value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'') {
        value[1..value.len() - 1].replace("''", "'")
    } else {
        value.to_string()
    };
    Some((name, Some(unquoted)))
}

fn strip_namespace(name: &str) -> Option<&str> {
    let name = name.trim();
    match (name.get(..10), name.get(10..)) {
        (Some(head), Some(rest)) if !rest.is_empty() && head.eq_ignore_ascii_case("shardgate.") => {
            Some(rest)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_hints() {
        assert_eq!(
            leading_hint("/* shardgate: shard=s1 */ select 1"),
            Some(Hint::Shard("s1"))
        );
        assert_eq!(
            leading_hint("  /*shardgate: key='42'*/select"),
            Some(Hint::Key("42"))
        );
        assert_eq!(leading_hint("select /* shardgate: shard=s1 */ 1"), None);
        assert_eq!(leading_hint("/* other: shard=s1 */ select 1"), None);
        assert_eq!(leading_hint("/* shardgate: shard=s1"), None);
    }

    #[test]
    fn session_settings() {
        assert_eq!(
            shardgate_setting("SET shardgate.shard = 's1'"),
            Some(("shard", Some("s1".into())))
        );
        assert_eq!(
            shardgate_setting("set session shardgate.sharding_key to 42;"),
            Some(("sharding_key", Some("42".into())))
        );
        assert_eq!(
            shardgate_setting("RESET shardgate.shard"),
            Some(("shard", None))
        );
        assert_eq!(
            shardgate_setting("SET shardgate.shard TO DEFAULT"),
            Some(("shard", None))
        );
        assert_eq!(shardgate_setting("SET search_path = x"), None);
        assert_eq!(shardgate_setting("SET shardgate.shard"), None);
    }
}
