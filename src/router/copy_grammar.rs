//! COPY's own grammar, read far enough to route it.
//!
//! sqlparser knows only part of COPY: it rejects `WITH (FREEZE ON)` (what
//! `pgbench -i` sends), `HEADER MATCH`, a `WHERE` clause, the PG 16/17
//! options (`DEFAULT`, `ON_ERROR`, `LOG_VERBOSITY`), `FORCE_QUOTE *` and
//! several old forms. Routing needs only the table, its column list, the
//! direction, where the rows come from and the options that change how a row
//! is split into fields. [`for_parser`] reads the statement as Postgres'
//! grammar does (gram.y: `CopyStmt`, `copy_opt_list`,
//! `copy_generic_opt_list`) and writes an equivalent statement that
//! sqlparser accepts, with only those parts. The client's own text is what
//! the shards receive, so every option is still checked and applied by them.

/// A token of the COPY statement.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A keyword or unquoted identifier, lower-cased.
    Word(String),
    /// A quoted identifier, as written between the quotes.
    Quoted(String),
    /// A string constant, unescaped.
    Str(String),
    /// A number, as written.
    Num(String),
    /// One punctuation character: `( ) , . * ;` and others.
    Punct(char),
}

/// Splits `sql` into tokens; `None` on an unterminated quote.
fn tokenize(sql: &str) -> Option<Vec<(Tok, usize)>> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && bytes.get(i + 1) == Some(&b'*') {
            // Comments nest in Postgres.
            let mut depth = 0;
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            if depth != 0 {
                return None;
            }
        } else if c == b'"' {
            let (text, end) = quoted(sql, i + 1, b'"', false)?;
            out.push((Tok::Quoted(text), start));
            i = end;
        } else if c == b'\'' {
            let (text, end) = quoted(sql, i + 1, b'\'', false)?;
            out.push((Tok::Str(text), start));
            i = end;
        } else if (c == b'e' || c == b'E') && bytes.get(i + 1) == Some(&b'\'') {
            let (text, end) = quoted(sql, i + 2, b'\'', true)?;
            out.push((Tok::Str(text), start));
            i = end;
        } else if c == b'$' && dollar_tag(&bytes[i..]).is_some() {
            let tag_len = dollar_tag(&bytes[i..])?;
            let tag = &sql[i..i + tag_len];
            let body_start = i + tag_len;
            let body_len = sql[body_start..].find(tag)?;
            out.push((
                Tok::Str(sql[body_start..body_start + body_len].to_string()),
                start,
            ));
            i = body_start + body_len + tag_len;
        } else if c.is_ascii_digit()
            || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                i += 1;
            }
            out.push((Tok::Num(sql[start..i].to_string()), start));
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || bytes[i] == b'_'
                    || bytes[i] == b'$'
                    || bytes[i] >= 0x80)
            {
                i += 1;
            }
            out.push((Tok::Word(sql[start..i].to_lowercase()), start));
        } else {
            let ch = sql[i..].chars().next()?;
            out.push((Tok::Punct(ch), start));
            i += ch.len_utf8();
        }
    }
    Some(out)
}

/// `$tag$` at the start of `b`: its length.
fn dollar_tag(b: &[u8]) -> Option<usize> {
    let end = b[1..].iter().position(|c| *c == b'$')? + 1;
    b[1..end]
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        .then_some(end + 1)
}

/// The text of a quoted token starting after its opening quote; doubled
/// quotes stand for one; `escapes`: an `E'…'` string with backslash escapes.
fn quoted(sql: &str, from: usize, quote: u8, escapes: bool) -> Option<(String, usize)> {
    let bytes = sql.as_bytes();
    let mut out: Vec<u8> = Vec::new();
    let mut i = from;
    while i < bytes.len() {
        let c = bytes[i];
        if c == quote {
            if bytes.get(i + 1) == Some(&quote) {
                out.push(quote);
                i += 2;
                continue;
            }
            return Some((String::from_utf8(out).ok()?, i + 1));
        }
        if escapes && c == b'\\' {
            let next = *bytes.get(i + 1)?;
            i += 2;
            match next {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'0'..=b'7' => {
                    let mut value = u32::from(next - b'0');
                    let mut digits = 1;
                    while digits < 3 && bytes.get(i).is_some_and(|d| (b'0'..=b'7').contains(d)) {
                        value = value * 8 + u32::from(bytes[i] - b'0');
                        i += 1;
                        digits += 1;
                    }
                    out.push(u8::try_from(value).ok()?);
                }
                other => out.push(other),
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    None
}

/// What routing keeps of the statement's options.
#[derive(Debug, Default)]
struct Options {
    format: Option<String>,
    delimiter: Option<String>,
    null: Option<String>,
    quote: Option<String>,
    escape: Option<String>,
    header: bool,
    force_not_null: Vec<String>,
    force_null: Vec<String>,
    encoding: Option<String>,
}

struct Reader<'a> {
    sql: &'a str,
    toks: Vec<(Tok, usize)>,
    at: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|(t, _)| t)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).map(|(t, _)| t.clone());
        self.at += 1;
        t
    }

    fn word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Word(x)) if x == w) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn punct(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn offset(&self) -> usize {
        self.toks
            .get(self.at)
            .map(|(_, o)| *o)
            .unwrap_or(self.sql.len())
    }

    /// An identifier, written back as SQL (quoted when it was).
    fn ident(&mut self) -> Option<String> {
        match self.next()? {
            Tok::Word(w) => Some(w),
            Tok::Quoted(q) => Some(quote_ident(&q)),
            _ => None,
        }
    }

    /// `name [. name [. name]]`.
    fn qualified_name(&mut self) -> Option<String> {
        let mut name = self.ident()?;
        while self.punct('.') {
            name.push('.');
            name.push_str(&self.ident()?);
        }
        Some(name)
    }

    /// `( col, … )`.
    fn column_list(&mut self) -> Option<Vec<String>> {
        let mut cols = Vec::new();
        if !self.punct('(') {
            return None;
        }
        loop {
            cols.push(self.ident()?);
            if self.punct(')') {
                return Some(cols);
            }
            if !self.punct(',') {
                return None;
            }
        }
    }

    /// A parenthesised query: its text as written.
    fn query_text(&mut self) -> Option<String> {
        let start = self.offset();
        let mut depth = 0usize;
        loop {
            match self.next()? {
                Tok::Punct('(') => depth += 1,
                Tok::Punct(')') if depth == 0 => {
                    let end = self.toks[self.at - 1].1;
                    return Some(self.sql[start..end].to_string());
                }
                Tok::Punct(')') => depth -= 1,
                _ => {}
            }
        }
    }

    /// An option argument in the generic form: a string, word, number,
    /// `*` or a parenthesised list.
    fn generic_arg(&mut self) -> Option<Arg> {
        match self.peek()? {
            Tok::Punct(',') | Tok::Punct(')') => None,
            Tok::Punct('(') => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    match self.next()? {
                        Tok::Punct(')') => return Some(Arg::List(items)),
                        Tok::Punct(',') => {}
                        Tok::Word(w) => items.push(w),
                        Tok::Quoted(q) => items.push(quote_ident(&q)),
                        Tok::Str(s) => items.push(quote_ident(&s)),
                        _ => return Some(Arg::Other),
                    }
                }
            }
            Tok::Punct('*') => {
                self.at += 1;
                Some(Arg::Star)
            }
            Tok::Punct('+') | Tok::Punct('-') => {
                self.at += 1;
                match self.next()? {
                    Tok::Num(n) => Some(Arg::Text(n)),
                    _ => Some(Arg::Other),
                }
            }
            _ => match self.next()? {
                Tok::Word(w) => Some(Arg::Text(w)),
                Tok::Quoted(q) => Some(Arg::Text(q)),
                Tok::Str(s) => Some(Arg::Text(s)),
                Tok::Num(n) => Some(Arg::Text(n)),
                Tok::Punct(_) => Some(Arg::Other),
            },
        }
    }

    /// `(name [arg], …)`, the form of Postgres 9.0 on.
    fn generic_options(&mut self, o: &mut Options) -> Option<()> {
        loop {
            let name = match self.next()? {
                Tok::Word(w) => w,
                Tok::Quoted(q) => q.to_lowercase(),
                _ => return None,
            };
            let arg = self.generic_arg();
            let text = |a: &Option<Arg>| match a {
                Some(Arg::Text(t)) => Some(t.clone()),
                _ => None,
            };
            let list = |a: Option<Arg>| match a {
                Some(Arg::List(l)) => l,
                _ => Vec::new(),
            };
            match name.as_str() {
                "format" => o.format = text(&arg),
                "delimiter" => o.delimiter = text(&arg),
                "null" => o.null = text(&arg),
                "quote" => o.quote = text(&arg),
                "escape" => o.escape = text(&arg),
                "encoding" => o.encoding = text(&arg),
                // `HEADER MATCH` has a header line like `HEADER true`.
                "header" => o.header = text(&arg).is_none_or(|t| truthy(&t)),
                "force_not_null" => o.force_not_null = list(arg),
                "force_null" => o.force_null = list(arg),
                // FREEZE, FORCE_QUOTE, DEFAULT, ON_ERROR, LOG_VERBOSITY and
                // unknown options: the shards apply or refuse them.
                _ => {}
            }
            if self.punct(')') {
                return Some(());
            }
            if !self.punct(',') {
                return None;
            }
        }
    }

    /// The pre-9.0 option list: `BINARY`, `CSV`, `HEADER`, `DELIMITER [AS] 'x'`, …
    fn legacy_options(&mut self, o: &mut Options) -> Option<()> {
        loop {
            let Some(Tok::Word(w)) = self.peek().cloned() else {
                return Some(());
            };
            if w == "where" {
                return Some(());
            }
            self.at += 1;
            let string_arg = |r: &mut Self| {
                r.word("as");
                match r.next()? {
                    Tok::Str(s) => Some(s),
                    _ => None,
                }
            };
            match w.as_str() {
                "binary" => o.format = Some("binary".into()),
                "csv" => o.format = Some("csv".into()),
                "freeze" => {}
                "header" => o.header = true,
                "delimiter" => o.delimiter = Some(string_arg(self)?),
                "null" => o.null = Some(string_arg(self)?),
                "quote" => o.quote = Some(string_arg(self)?),
                "escape" => o.escape = Some(string_arg(self)?),
                "encoding" => o.encoding = Some(string_arg(self)?),
                "force" => {
                    if self.word("quote") {
                        if !self.punct('*') {
                            self.bare_columns()?;
                        }
                    } else if self.word("not") {
                        if !self.word("null") {
                            return None;
                        }
                        o.force_not_null = self.bare_columns()?;
                    } else if self.word("null") {
                        o.force_null = self.bare_columns()?;
                    } else {
                        return None;
                    }
                }
                _ => return None,
            }
        }
    }

    /// `col, col` without parentheses (legacy FORCE lists).
    fn bare_columns(&mut self) -> Option<Vec<String>> {
        let mut cols = vec![self.ident()?];
        while self.punct(',') {
            cols.push(self.ident()?);
        }
        Some(cols)
    }
}

enum Arg {
    Text(String),
    List(Vec<String>),
    Star,
    Other,
}

fn truthy(t: &str) -> bool {
    !matches!(
        t.to_ascii_lowercase().as_str(),
        "false" | "off" | "0" | "f" | "n" | "no"
    )
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An equivalent of the COPY statement `sql` that sqlparser reads: the same
/// table, columns or query, direction, source and the options that shape a
/// row. `None`: not a single COPY statement as Postgres' grammar has it.
pub fn for_parser(sql: &str) -> Option<String> {
    let toks = tokenize(sql)?;
    let mut r = Reader { sql, toks, at: 0 };
    if !r.word("copy") {
        return None;
    }
    let mut o = Options::default();
    // `COPY BINARY t`: the pre-7.3 form, still in the grammar.
    if r.word("binary") {
        o.format = Some("binary".into());
    }
    let mut out = String::from("COPY ");
    let is_query = r.punct('(');
    if is_query {
        let query = r.query_text()?;
        out.push('(');
        out.push_str(&query);
        out.push(')');
    } else {
        out.push_str(&r.qualified_name()?);
        if r.peek() == Some(&Tok::Punct('(')) {
            let cols = r.column_list()?;
            out.push_str(" (");
            out.push_str(&cols.join(", "));
            out.push(')');
        }
    }
    let to = if r.word("to") {
        true
    } else if r.word("from") && !is_query {
        false
    } else {
        return None;
    };
    let program = r.word("program");
    let endpoint = match r.next()? {
        Tok::Word(w) if w == "stdin" && !to && !program => "STDIN".to_string(),
        Tok::Word(w) if w == "stdout" && to && !program => "STDOUT".to_string(),
        Tok::Str(s) if program => format!("PROGRAM {}", quote_str(&s)),
        Tok::Str(s) => quote_str(&s),
        _ => return None,
    };
    // `[USING] DELIMITERS 'x'` (pre-7.3).
    if r.word("using") && !matches!(r.peek(), Some(Tok::Word(w)) if w == "delimiters") {
        return None;
    }
    if r.word("delimiters") {
        match r.next()? {
            Tok::Str(s) => o.delimiter = Some(s),
            _ => return None,
        }
    }
    r.word("with");
    if r.punct('(') {
        r.generic_options(&mut o)?;
    } else {
        r.legacy_options(&mut o)?;
    }
    if r.word("where") {
        if to {
            return None;
        }
        // Rows are filtered by each shard after routing: nothing to read.
        let mut depth = 0usize;
        while let Some(t) = r.peek() {
            match t {
                Tok::Punct(';') if depth == 0 => break,
                Tok::Punct('(') => depth += 1,
                Tok::Punct(')') => depth = depth.saturating_sub(1),
                _ => {}
            }
            r.at += 1;
        }
    }
    while r.punct(';') {}
    if r.peek().is_some() {
        return None;
    }
    out.push_str(if to { " TO " } else { " FROM " });
    out.push_str(&endpoint);
    let mut parts = Vec::new();
    if let Some(f) = &o.format {
        parts.push(format!("FORMAT {}", f.to_ascii_lowercase()));
    }
    for (name, value) in [
        ("DELIMITER", &o.delimiter),
        ("NULL", &o.null),
        ("QUOTE", &o.quote),
        ("ESCAPE", &o.escape),
        ("ENCODING", &o.encoding),
    ] {
        if let Some(v) = value {
            parts.push(format!("{name} {}", quote_str(v)));
        }
    }
    if o.header {
        parts.push("HEADER true".into());
    }
    if !o.force_not_null.is_empty() {
        parts.push(format!("FORCE_NOT_NULL ({})", o.force_not_null.join(", ")));
    }
    if !o.force_null.is_empty() {
        parts.push(format!("FORCE_NULL ({})", o.force_null.join(", ")));
    }
    if !parts.is_empty() {
        out.push_str(" WITH (");
        out.push_str(&parts.join(", "));
        out.push(')');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::for_parser;

    #[test]
    fn forms_postgres_accepts() {
        let cases = [
            (
                "copy pgbench_accounts from stdin with (freeze on)",
                "COPY pgbench_accounts FROM STDIN",
            ),
            (
                "COPY t (a, \"B\") FROM STDIN (FORMAT csv, HEADER match, FREEZE, DEFAULT '\\D')",
                "COPY t (a, \"B\") FROM STDIN WITH (FORMAT csv, HEADER true)",
            ),
            (
                "copy s.t from stdin where id > 5 and (b < 3);",
                "COPY s.t FROM STDIN",
            ),
            (
                "copy t from stdin with csv header quote as '\"' force not null a, b",
                "COPY t FROM STDIN WITH (FORMAT csv, QUOTE '\"', HEADER true, FORCE_NOT_NULL (a, b))",
            ),
            (
                "COPY BINARY t FROM STDIN",
                "COPY t FROM STDIN WITH (FORMAT binary)",
            ),
            (
                "copy t from stdin using delimiters '|'",
                "COPY t FROM STDIN WITH (DELIMITER '|')",
            ),
            (
                "copy t from stdin (delimiter E'\\t', null '', on_error ignore, header false)",
                "COPY t FROM STDIN WITH (DELIMITER '\t', NULL '')",
            ),
            (
                "copy (select 1, ')' from t where x in (1,2)) to stdout (format csv, force_quote *)",
                "COPY (select 1, ')' from t where x in (1,2)) TO STDOUT WITH (FORMAT csv)",
            ),
            (
                "copy t to program 'gzip > x' with binary",
                "COPY t TO PROGRAM 'gzip > x' WITH (FORMAT binary)",
            ),
            ("copy t from '/tmp/x'", "COPY t FROM '/tmp/x'"),
        ];
        for (sql, want) in cases {
            assert_eq!(for_parser(sql).as_deref(), Some(want), "{sql}");
        }
    }

    #[test]
    fn not_copy_statements() {
        for sql in [
            "select 1",
            "copy t",
            "copy t from stdout",
            "copy (select 1) from stdin",
            "copy t to stdout where a > 1",
            "copy t from stdin with (format 'csv'",
            "copy t from stdin; select 1",
        ] {
            assert_eq!(for_parser(sql), None, "{sql}");
        }
    }

    #[test]
    fn rewritten_forms_parse_with_sqlparser() {
        use sqlparser::dialect::PostgreSqlDialect;
        use sqlparser::parser::Parser;
        for sql in [
            "copy pgbench_accounts from stdin with (freeze on)",
            "COPY t (a, \"B\") FROM STDIN (FORMAT csv, HEADER match, FREEZE)",
            "copy t from stdin where id > 5",
            "copy t from stdin with csv header quote as '\"' force not null a, b",
            "copy t from stdin (delimiter E'\\t', null '')",
            "copy (select 1 from t) to stdout (format csv, force_quote *)",
        ] {
            let text = for_parser(sql).expect(sql);
            assert!(
                Parser::parse_sql(&PostgreSqlDialect {}, &text).is_ok(),
                "{sql} -> {text}"
            );
        }
    }
}
