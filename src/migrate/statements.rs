//! Splitting a revision's SQL into statements.
//!
//! Each statement is sent on its own so a failure can name the statement (and
//! its line in the file), and so non-transactional statements such as
//! `CREATE INDEX CONCURRENTLY` are never wrapped in an implicit transaction
//! block by a multi-statement simple query. The splitter understands quotes,
//! `E''` escapes, quoted identifiers, dollar quoting and both comment styles.
//! (`BEGIN ATOMIC … END` function bodies are not understood: write such
//! functions with a dollar-quoted body.)

/// One statement and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub line: usize,
}

/// Splits `sql` at top-level semicolons; comment-only pieces are dropped.
/// `Err((line, message))` for an unterminated quote or comment.
pub fn split(sql: &str) -> Result<Vec<Statement>, (usize, String)> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    let mut line = 1;
    let mut has_code = false;
    let mut start_line = 1;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let opened = line;
                let mut depth = 0usize;
                loop {
                    if i >= bytes.len() {
                        return Err((opened, "unterminated /* comment".into()));
                    }
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
                        if bytes[i] == b'\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                }
            }
            b'\'' | b'"' => {
                if !has_code {
                    has_code = true;
                    start_line = line;
                }
                let escapes = c == b'\''
                    && i > 0
                    && matches!(bytes[i - 1], b'e' | b'E')
                    && (i < 2 || !(bytes[i - 2].is_ascii_alphanumeric() || bytes[i - 2] == b'_'));
                let opened = line;
                i += 1;
                loop {
                    if i >= bytes.len() {
                        return Err((opened, "unterminated quoted string or identifier".into()));
                    }
                    let b = bytes[i];
                    if b == b'\n' {
                        line += 1;
                    }
                    if escapes && b == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b == c {
                        if bytes.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            b'$' if dollar_tag(bytes, i).is_some() => {
                if !has_code {
                    has_code = true;
                    start_line = line;
                }
                let tag_len = dollar_tag(bytes, i).unwrap_or(1);
                let tag = &bytes[i..i + tag_len];
                let opened = line;
                i += tag_len;
                loop {
                    if i >= bytes.len() {
                        return Err((opened, "unterminated dollar-quoted string".into()));
                    }
                    if bytes[i..].starts_with(tag) {
                        i += tag_len;
                        break;
                    }
                    if bytes[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            b';' => {
                if has_code {
                    out.push(Statement {
                        sql: sql[start..i].trim().to_owned(),
                        line: start_line,
                    });
                }
                has_code = false;
                i += 1;
                start = i;
            }
            _ => {
                if !c.is_ascii_whitespace() && !has_code {
                    has_code = true;
                    start_line = line;
                }
                i += 1;
            }
        }
    }
    if has_code {
        out.push(Statement {
            sql: sql[start..].trim().to_owned(),
            line: start_line,
        });
    }
    Ok(out)
}

/// Length of a dollar-quote opener `$tag$` at `i`, if one starts there (a `$`
/// inside an identifier or a `$1` parameter is not one).
fn dollar_tag(bytes: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
        return None;
    }
    let mut j = i + 1;
    while j < bytes.len() {
        let b = bytes[j];
        if b == b'$' {
            return Some(j - i + 1);
        }
        let ok = if j == i + 1 {
            b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
        } else {
            b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
        };
        if !ok {
            return None;
        }
        j += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqls(text: &str) -> Vec<String> {
        split(text).unwrap().into_iter().map(|s| s.sql).collect()
    }

    #[test]
    fn splits_and_keeps_lines() {
        let s = split("-- header\nCREATE TABLE a(x int);\n\nINSERT INTO a VALUES (1);\n-- tail\n")
            .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].line, 2);
        assert_eq!(s[1].line, 4);
        assert_eq!(s[1].sql, "INSERT INTO a VALUES (1)");
    }

    #[test]
    fn quotes_comments_and_dollars_hide_semicolons() {
        let text = "SELECT 'a;''b', \"x;y\", E'\\';' /* c; /* nested; */ */;\nCREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\nDO $$ BEGIN PERFORM 1; END $$;\nSELECT $1;";
        let s = sqls(text);
        assert_eq!(s.len(), 4, "{s:?}");
        assert!(s[1].contains("SELECT 1; $body$"));
        assert!(s[2].starts_with("DO $$"));
    }

    #[test]
    fn unterminated_is_an_error_with_line() {
        assert_eq!(split("SELECT 1;\nSELECT 'oops;\n").unwrap_err().0, 2);
        assert_eq!(split("\n\n/* x").unwrap_err().0, 3);
        assert_eq!(split("SELECT $a$ x").unwrap_err().0, 1);
    }

    #[test]
    fn comment_only_pieces_are_dropped() {
        assert!(sqls("-- nothing\n;\n/* */;").is_empty());
    }
}
