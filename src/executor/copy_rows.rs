//! Row framing for `COPY … FROM STDIN`, free of I/O.
//!
//! A client's CopyData chunks do not align with rows, so routing each row
//! to its shard needs Postgres' own reading of the stream: where a row
//! ends (text: newline-terminated with backslash escapes; csv: quoted
//! fields may span lines; binary: a header, then tuples of length-prefixed
//! fields, then a -1 trailer) and what the key field holds (de-escaped,
//! compared with the NULL marker as Postgres does). [`RowFramer`] follows
//! `CopyReadLineText` / `CopyReadAttributesText` / `CopyReadAttributesCSV`
//! and the binary reader of PostgreSQL 15, including line numbering, and
//! hands out every row's bytes unchanged (a shard re-reads them itself).
//!
//! Memory: only the row in progress is kept across chunks.

use std::borrow::Cow;

/// `COPY`'s data format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// The COPY options that change how rows are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    pub format: CopyFormat,
    pub delimiter: u8,
    /// The NULL marker (compared with the raw field, before de-escaping).
    pub null: Vec<u8>,
    /// CSV only.
    pub quote: u8,
    /// CSV only (text always escapes with a backslash).
    pub escape: u8,
    pub header: bool,
    /// CSV `FORCE_NOT_NULL` names the key column: an unquoted NULL marker
    /// is the string itself.
    pub key_force_not_null: bool,
    /// CSV `FORCE_NULL` names the key column: a quoted NULL marker is NULL.
    pub key_force_null: bool,
}

impl CopyOptions {
    /// Postgres' defaults for `format`.
    pub fn new(format: CopyFormat) -> CopyOptions {
        let csv = format == CopyFormat::Csv;
        CopyOptions {
            format,
            delimiter: if csv { b',' } else { b'\t' },
            null: if csv { Vec::new() } else { b"\\N".to_vec() },
            quote: b'"',
            escape: b'"',
            header: false,
            key_force_not_null: false,
            key_force_null: false,
        }
    }
}

/// Bad COPY data, as Postgres would report it (the line is Postgres'
/// `cur_lineno`: the header is line 1; binary counts tuples).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct CopyDataError {
    pub sqlstate: &'static str,
    pub line: u64,
    /// The column the error is about, if one.
    pub column: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

/// What the framer hands out.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes every shard needs once, before any row: the HEADER line of
    /// text/csv, the file header of binary.
    Header(&'a [u8]),
    /// One row: its bytes as received (terminator included) and its key
    /// field: de-escaped text (text/csv) or the field's bytes (binary);
    /// `None` when NULL.
    Row {
        bytes: &'a [u8],
        key: Option<Cow<'a, [u8]>>,
        line: u64,
    },
}

/// The binary format's signature.
pub const BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// The binary format's trailer (a field count of -1).
pub const BINARY_TRAILER: [u8; 2] = [0xff, 0xff];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Unknown,
    Nl,
    Cr,
    CrNl,
}

/// Resumable scan of the text/csv row in progress.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    /// Offset in the row of the next byte to look at.
    pos: usize,
    in_quote: bool,
    last_was_esc: bool,
    /// CSV newlines inside quotes seen so far (Postgres counts them as lines).
    embedded_lines: u64,
}

enum LineEnd {
    /// A row: content ends at `content`, the next row starts at `next`.
    Row {
        content: usize,
        next: usize,
    },
    /// The end-of-data marker `\.`; content before it (if any) is a row.
    Marker {
        content: usize,
    },
    Incomplete,
}

/// Splits a COPY FROM STDIN stream into rows and finds each row's key.
#[derive(Debug)]
pub struct RowFramer {
    opts: CopyOptions,
    /// Position of the key among the copied columns.
    key: usize,
    /// Names of the copied columns, in order (their count is the field
    /// count every row must have).
    columns: Vec<String>,
    /// The row in progress (bytes from earlier chunks).
    carry: Vec<u8>,
    scan: Scan,
    eol: Eol,
    line: u64,
    header_pending: bool,
    /// The end-of-data marker or binary trailer was seen: the rest is ignored
    /// (text/csv, as Postgres does) or an error (binary).
    ended: bool,
    binary_header_done: bool,
}

impl RowFramer {
    /// `columns`: the copied columns in order; `key`: the key's position.
    pub fn new(opts: CopyOptions, columns: Vec<String>, key: usize) -> RowFramer {
        let header_pending = opts.header && opts.format != CopyFormat::Binary;
        RowFramer {
            opts,
            key,
            columns,
            carry: Vec::new(),
            scan: Scan::default(),
            eol: Eol::Unknown,
            line: 0,
            header_pending,
            ended: false,
            binary_header_done: false,
        }
    }

    pub fn format(&self) -> CopyFormat {
        self.opts.format
    }

    /// Bytes held for the row in progress.
    pub fn carried(&self) -> usize {
        self.carry.len()
    }

    /// The line number of the last row handed out (or being read).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The line terminator rows end with (for a last row without one).
    fn eol_bytes(&self) -> &'static [u8] {
        match self.eol {
            Eol::Unknown | Eol::Nl => b"\n",
            Eol::Cr => b"\r",
            Eol::CrNl => b"\r\n",
        }
    }

    /// Feeds one chunk of COPY data; `emit` gets every complete piece.
    pub fn feed<F>(&mut self, chunk: &[u8], emit: &mut F) -> Result<(), CopyDataError>
    where
        F: FnMut(Piece<'_>) -> Result<(), CopyDataError>,
    {
        if self.ended {
            return self.after_end(chunk);
        }
        if self.carry.is_empty() {
            let used = self.process(chunk, false, emit)?;
            if !self.ended {
                self.carry.extend_from_slice(&chunk[used..]);
            } else {
                self.after_end(&chunk[used..])?;
            }
        } else {
            let mut data = std::mem::take(&mut self.carry);
            data.extend_from_slice(chunk);
            let used = self.process(&data, false, emit)?;
            if self.ended {
                self.after_end(&data[used..])?;
            } else {
                data.drain(..used);
                self.carry = data;
            }
        }
        Ok(())
    }

    /// End of the client's data (CopyDone): the last row, if unterminated.
    pub fn finish<F>(&mut self, emit: &mut F) -> Result<(), CopyDataError>
    where
        F: FnMut(Piece<'_>) -> Result<(), CopyDataError>,
    {
        if self.ended {
            return Ok(());
        }
        let data = std::mem::take(&mut self.carry);
        if self.opts.format == CopyFormat::Binary {
            if !data.is_empty() {
                return Err(self.error("22P04", None, "unexpected EOF in COPY data"));
            }
            if !self.binary_header_done {
                // Postgres reads the header first: an empty stream is an error.
                return Err(self.error("22P04", None, "COPY file signature not recognized"));
            }
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let used = self.process(&data, true, emit)?;
        if used < data.len() && !self.ended {
            // Only an unterminated row is left: it goes out with the
            // stream's terminator, unless that would change its meaning for
            // the shard (a trailing backslash would escape it; a CSV `\.`
            // would become the end-of-data marker).
            let rest = &data[used..];
            let trailing = rest.iter().rev().take_while(|b| **b == b'\\').count();
            let csv = self.opts.format == CopyFormat::Csv;
            if (!csv && trailing % 2 == 1) || (csv && rest == b"\\.") {
                let mut e = self.error(
                    "22P04",
                    None,
                    "the last row of COPY data ends unterminated in a backslash sequence",
                );
                e.line = self.line + 1;
                e.hint = Some("end the data with a newline".into());
                return Err(e);
            }
            let mut row = rest.to_vec();
            row.extend_from_slice(self.eol_bytes());
            self.scan = Scan::default();
            let used = self.process(&row, true, emit)?;
            if used != row.len() && !self.ended {
                let mut e = self.error(
                    "22P04",
                    None,
                    "could not find the end of the last row of COPY data",
                );
                e.line = self.line + 1;
                return Err(e);
            }
        }
        Ok(())
    }

    fn after_end(&mut self, rest: &[u8]) -> Result<(), CopyDataError> {
        if self.opts.format == CopyFormat::Binary && !rest.is_empty() {
            return Err(self.error("22P04", None, "received copy data after EOF marker"));
        }
        Ok(())
    }

    fn error(&self, sqlstate: &'static str, column: Option<usize>, message: &str) -> CopyDataError {
        CopyDataError {
            sqlstate,
            line: self.line,
            column: column.and_then(|c| self.columns.get(c).cloned()),
            message: message.to_string(),
            hint: None,
        }
    }

    /// Emits every complete piece of `data`; returns the bytes used.
    fn process<F>(&mut self, data: &[u8], eof: bool, emit: &mut F) -> Result<usize, CopyDataError>
    where
        F: FnMut(Piece<'_>) -> Result<(), CopyDataError>,
    {
        match self.opts.format {
            CopyFormat::Binary => self.process_binary(data, emit),
            CopyFormat::Text | CopyFormat::Csv => self.process_lines(data, eof, emit),
        }
    }

    fn process_lines<F>(
        &mut self,
        data: &[u8],
        eof: bool,
        emit: &mut F,
    ) -> Result<usize, CopyDataError>
    where
        F: FnMut(Piece<'_>) -> Result<(), CopyDataError>,
    {
        let mut start = 0;
        while start < data.len() {
            let row = &data[start..];
            let end = if self.opts.format == CopyFormat::Csv {
                self.find_csv_line(row, eof)?
            } else {
                self.find_text_line(row, eof)?
            };
            match end {
                LineEnd::Incomplete => return Ok(start),
                LineEnd::Row { content, next } => {
                    self.line += 1 + self.scan.embedded_lines;
                    self.scan = Scan::default();
                    self.emit_line(&row[..next], &row[..content], emit)?;
                    start += next;
                }
                LineEnd::Marker { content } => {
                    self.scan = Scan::default();
                    if content > 0 {
                        self.line += 1;
                        // The row keeps a terminator so the shard reads it whole.
                        let mut bytes = row[..content].to_vec();
                        bytes.extend_from_slice(self.eol_bytes());
                        self.emit_line(&bytes, &row[..content], emit)?;
                    }
                    self.ended = true;
                    return Ok(data.len());
                }
            }
        }
        Ok(start)
    }

    fn emit_line<F>(
        &mut self,
        bytes: &[u8],
        content: &[u8],
        emit: &mut F,
    ) -> Result<(), CopyDataError>
    where
        F: FnMut(Piece<'_>) -> Result<(), CopyDataError>,
    {
        if self.header_pending {
            self.header_pending = false;
            return emit(Piece::Header(bytes));
        }
        let key = if self.opts.format == CopyFormat::Csv {
            self.csv_key(content)?
        } else {
            self.text_key(content)?
        };
        emit(Piece::Row {
            bytes,
            key,
            line: self.line,
        })
    }

    /// `\r` / `\n` outside quotes, following the stream's line-ending style.
    fn line_break(
        &mut self,
        row: &[u8],
        i: usize,
        eof: bool,
    ) -> Result<Option<LineEnd>, CopyDataError> {
        let csv = self.opts.format == CopyFormat::Csv;
        let (cr_message, cr_hint, nl_message, nl_hint) = if csv {
            (
                "unquoted carriage return found in data",
                "Use quoted CSV field to represent carriage return.",
                "unquoted newline found in data",
                "Use quoted CSV field to represent newline.",
            )
        } else {
            (
                "literal carriage return found in data",
                "Use \"\\r\" to represent carriage return.",
                "literal newline found in data",
                "Use \"\\n\" to represent newline.",
            )
        };
        let fail = |this: &Self, message: &str, hint: &str| {
            let mut e = this.error("22P04", None, message);
            e.line = this.line + 1 + this.scan.embedded_lines;
            e.hint = Some(hint.to_string());
            e
        };
        match row[i] {
            b'\r' => match self.eol {
                Eol::Unknown | Eol::CrNl => {
                    let Some(&next) = row.get(i + 1) else {
                        if !eof {
                            return Ok(Some(LineEnd::Incomplete));
                        }
                        if self.eol == Eol::CrNl {
                            return Err(fail(self, cr_message, cr_hint));
                        }
                        self.eol = Eol::Cr;
                        return Ok(Some(LineEnd::Row {
                            content: i,
                            next: i + 1,
                        }));
                    };
                    if next == b'\n' {
                        self.eol = Eol::CrNl;
                        Ok(Some(LineEnd::Row {
                            content: i,
                            next: i + 2,
                        }))
                    } else if self.eol == Eol::CrNl {
                        Err(fail(self, cr_message, cr_hint))
                    } else {
                        self.eol = Eol::Cr;
                        Ok(Some(LineEnd::Row {
                            content: i,
                            next: i + 1,
                        }))
                    }
                }
                Eol::Nl => Err(fail(self, cr_message, cr_hint)),
                Eol::Cr => Ok(Some(LineEnd::Row {
                    content: i,
                    next: i + 1,
                })),
            },
            _ => match self.eol {
                Eol::Cr | Eol::CrNl => Err(fail(self, nl_message, nl_hint)),
                Eol::Unknown | Eol::Nl => {
                    self.eol = Eol::Nl;
                    Ok(Some(LineEnd::Row {
                        content: i,
                        next: i + 1,
                    }))
                }
            },
        }
    }

    /// After `\.` at `dot + 1`: whether it is the end-of-data marker.
    /// `Ok(None)`: not a marker (CSV data); `Incomplete`: need more bytes.
    fn marker(&self, row: &[u8], dot: usize, eof: bool) -> Result<Option<LineEnd>, CopyDataError> {
        let csv = self.opts.format == CopyFormat::Csv;
        let corrupt = |message: &str| {
            let mut e = self.error("22P04", None, message);
            e.line = self.line + 1;
            e
        };
        let mut at = dot + 1;
        if self.eol == Eol::CrNl {
            match row.get(at) {
                None if !eof => return Ok(Some(LineEnd::Incomplete)),
                Some(b'\r') => at += 1,
                Some(b'\n') if !csv => {
                    return Err(corrupt(
                        "end-of-copy marker does not match previous newline style",
                    ))
                }
                _ if csv => return Ok(None),
                _ => return Err(corrupt("end-of-copy marker corrupt")),
            }
        }
        let next = match row.get(at) {
            None if !eof => return Ok(Some(LineEnd::Incomplete)),
            None => None,
            Some(c) => Some(*c),
        };
        match next {
            Some(c @ (b'\r' | b'\n')) => {
                let matches = match self.eol {
                    Eol::Nl | Eol::CrNl => c == b'\n',
                    Eol::Cr => c == b'\r',
                    Eol::Unknown => true,
                };
                if !matches {
                    return Err(corrupt(
                        "end-of-copy marker does not match previous newline style",
                    ));
                }
                Ok(Some(LineEnd::Marker {
                    content: dot.saturating_sub(1),
                }))
            }
            _ if csv => Ok(None),
            _ => Err(corrupt("end-of-copy marker corrupt")),
        }
    }

    fn find_text_line(&mut self, row: &[u8], eof: bool) -> Result<LineEnd, CopyDataError> {
        let mut i = self.scan.pos;
        while i < row.len() {
            match row[i] {
                b'\\' => {
                    let Some(&next) = row.get(i + 1) else {
                        if eof {
                            // A trailing backslash: the line ends here.
                            i += 1;
                            continue;
                        }
                        self.scan.pos = i;
                        return Ok(LineEnd::Incomplete);
                    };
                    if next == b'.' {
                        match self.marker(row, i + 1, eof)? {
                            Some(LineEnd::Incomplete) => {
                                self.scan.pos = i;
                                return Ok(LineEnd::Incomplete);
                            }
                            Some(LineEnd::Marker { .. }) => {
                                return Ok(LineEnd::Marker { content: i })
                            }
                            _ => {}
                        }
                    }
                    // Anything after a backslash is data, a newline too.
                    i += 2;
                }
                b'\r' | b'\n' => match self.line_break(row, i, eof)? {
                    Some(LineEnd::Incomplete) => {
                        self.scan.pos = i;
                        return Ok(LineEnd::Incomplete);
                    }
                    Some(end) => return Ok(end),
                    None => i += 1,
                },
                _ => i += 1,
            }
        }
        self.scan.pos = i.min(row.len());
        Ok(LineEnd::Incomplete)
    }

    fn find_csv_line(&mut self, row: &[u8], eof: bool) -> Result<LineEnd, CopyDataError> {
        let quote = self.opts.quote;
        // Postgres: an escape equal to the quote is no escape (the quote toggles).
        let escape = (self.opts.escape != quote).then_some(self.opts.escape);
        let mut i = self.scan.pos;
        while i < row.len() {
            let c = row[i];
            if i == 0 && c == b'\\' {
                match row.get(1) {
                    None if !eof => return Ok(LineEnd::Incomplete),
                    Some(b'.') => match self.marker(row, 1, eof)? {
                        Some(LineEnd::Incomplete) => return Ok(LineEnd::Incomplete),
                        Some(LineEnd::Marker { .. }) => return Ok(LineEnd::Marker { content: 0 }),
                        _ => {}
                    },
                    _ => {}
                }
            }
            if c == b'\r' && !self.scan.in_quote && row.get(i + 1).is_none() && !eof {
                // Decide CR vs CRLF once the next byte is here.
                self.scan.pos = i;
                return Ok(LineEnd::Incomplete);
            }
            if self.scan.in_quote && Some(c) == escape {
                self.scan.last_was_esc = !self.scan.last_was_esc;
            }
            if c == quote && !self.scan.last_was_esc {
                self.scan.in_quote = !self.scan.in_quote;
            }
            if Some(c) != escape {
                self.scan.last_was_esc = false;
            }
            let counted = if self.eol == Eol::Nl { b'\n' } else { b'\r' };
            if self.scan.in_quote && c == counted {
                self.scan.embedded_lines += 1;
            }
            if (c == b'\r' || c == b'\n') && !self.scan.in_quote {
                match self.line_break(row, i, eof)? {
                    Some(LineEnd::Incomplete) => {
                        // Undo this byte's state change: it is looked at again.
                        self.scan.pos = i;
                        return Ok(LineEnd::Incomplete);
                    }
                    Some(end) => return Ok(end),
                    None => {}
                }
            }
            i += 1;
        }
        self.scan.pos = i;
        if eof && self.scan.in_quote {
            let mut e = self.error("22P04", None, "unterminated CSV quoted field");
            e.line = self.line + 1 + self.scan.embedded_lines;
            return Err(e);
        }
        Ok(LineEnd::Incomplete)
    }

    /// The key field of a text row (`content`: without its terminator).
    fn text_key<'a>(&self, content: &'a [u8]) -> Result<Option<Cow<'a, [u8]>>, CopyDataError> {
        let delimiter = self.opts.delimiter;
        let mut field = 0;
        let mut start = 0;
        let mut key_span = None;
        let mut i = 0;
        while i < content.len() {
            let c = content[i];
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == delimiter {
                if field == self.key {
                    key_span = Some((start, i));
                }
                field += 1;
                start = i + 1;
            }
            i += 1;
        }
        if field == self.key {
            key_span = Some((start, content.len()));
        }
        let fields = field + 1;
        self.check_field_count(fields)?;
        let Some((from, to)) = key_span else {
            return Err(self.missing(fields));
        };
        let raw = &content[from..to.min(content.len())];
        if raw == self.opts.null.as_slice() {
            return Ok(None);
        }
        if !raw.contains(&b'\\') {
            return Ok(Some(Cow::Borrowed(raw)));
        }
        Ok(Some(Cow::Owned(unescape_text(raw))))
    }

    /// The key field of a CSV row.
    fn csv_key<'a>(&self, content: &'a [u8]) -> Result<Option<Cow<'a, [u8]>>, CopyDataError> {
        let delimiter = self.opts.delimiter;
        let quote = self.opts.quote;
        let escape = self.opts.escape;
        let mut field = 0;
        let mut key: Option<(Vec<u8>, bool, usize, usize)> = None;
        let mut value = Vec::new();
        let mut saw_quote = false;
        let mut start = 0;
        let mut in_quote = false;
        let mut i = 0;
        let want = self.key;
        loop {
            let end_of_field = i >= content.len() || (!in_quote && content[i] == delimiter);
            if end_of_field {
                if in_quote {
                    return Err(self.error("22P04", None, "unterminated CSV quoted field"));
                }
                if field == want {
                    key = Some((std::mem::take(&mut value), saw_quote, start, i));
                }
                field += 1;
                if i >= content.len() {
                    break;
                }
                i += 1;
                start = i;
                saw_quote = false;
                continue;
            }
            let c = content[i];
            if in_quote {
                if c == escape && escape != quote {
                    if let Some(&next) = content.get(i + 1) {
                        if next == escape || next == quote {
                            if field == want {
                                value.push(next);
                            }
                            i += 2;
                            continue;
                        }
                    }
                }
                if c == quote {
                    // With escape == quote, a doubled quote is one quote.
                    if escape == quote && content.get(i + 1) == Some(&quote) {
                        if field == want {
                            value.push(quote);
                        }
                        i += 2;
                        continue;
                    }
                    in_quote = false;
                    i += 1;
                    continue;
                }
            } else if c == quote {
                in_quote = true;
                saw_quote = true;
                i += 1;
                continue;
            }
            if field == want {
                value.push(c);
            }
            i += 1;
        }
        self.check_field_count(field)?;
        let Some((value, quoted, from, to)) = key else {
            return Err(self.missing(field));
        };
        let null = self.opts.null.as_slice();
        let raw = &content[from..to];
        if !quoted && raw == null && !self.opts.key_force_not_null {
            return Ok(None);
        }
        if self.opts.key_force_null && value == null {
            return Ok(None);
        }
        if !quoted {
            return Ok(Some(Cow::Borrowed(raw)));
        }
        Ok(Some(Cow::Owned(value)))
    }

    fn check_field_count(&self, fields: usize) -> Result<(), CopyDataError> {
        if fields > self.columns.len() {
            return Err(self.error("22P04", None, "extra data after last expected column"));
        }
        if fields < self.columns.len() {
            return Err(self.missing(fields));
        }
        Ok(())
    }

    fn missing(&self, fields: usize) -> CopyDataError {
        let name = self.columns.get(fields).cloned().unwrap_or_default();
        let mut e = self.error(
            "22P04",
            None,
            &format!("missing data for column \"{name}\""),
        );
        e.column = Some(name);
        e
    }

    fn process_binary<F>(&mut self, data: &[u8], emit: &mut F) -> Result<usize, CopyDataError>
    where
        F: FnMut(Piece<'_>) -> Result<(), CopyDataError>,
    {
        let mut at = 0;
        if !self.binary_header_done {
            // Signature, flags, header extension length, extension.
            if data.len() < 19 {
                if !data.starts_with(&BINARY_SIGNATURE[..data.len().min(11)]) {
                    return Err(self.error("22P04", None, "COPY file signature not recognized"));
                }
                return Ok(0);
            }
            if &data[..11] != BINARY_SIGNATURE {
                return Err(self.error("22P04", None, "COPY file signature not recognized"));
            }
            let extension = i32::from_be_bytes([data[15], data[16], data[17], data[18]]);
            if extension < 0 {
                return Err(self.error(
                    "22P04",
                    None,
                    "invalid COPY file header (negative length)",
                ));
            }
            let total = 19 + extension as usize;
            if data.len() < total {
                return Ok(0);
            }
            self.binary_header_done = true;
            emit(Piece::Header(&data[..total]))?;
            at = total;
        }
        loop {
            let rest = &data[at..];
            if rest.len() < 2 {
                return Ok(at);
            }
            let count = i16::from_be_bytes([rest[0], rest[1]]);
            if count == -1 {
                self.ended = true;
                return Ok(at + 2);
            }
            let line = self.line + 1;
            if count as i64 != self.columns.len() as i64 {
                let mut e = self.error(
                    "22P04",
                    None,
                    &format!(
                        "row field count is {count}, expected {}",
                        self.columns.len()
                    ),
                );
                e.line = line;
                return Err(e);
            }
            let mut pos = 2;
            let mut key = None;
            let mut complete = true;
            for field in 0..count as usize {
                let Some(len_bytes) = rest.get(pos..pos + 4) else {
                    complete = false;
                    break;
                };
                let len =
                    i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
                pos += 4;
                if len == -1 {
                    continue;
                }
                if len < -1 {
                    let mut e = self.error("22P04", Some(field), "invalid field size");
                    e.line = line;
                    return Err(e);
                }
                let len = len as usize;
                if rest.len() < pos + len {
                    complete = false;
                    break;
                }
                if field == self.key {
                    key = Some((pos, pos + len));
                }
                pos += len;
            }
            if !complete {
                return Ok(at);
            }
            self.line = line;
            let bytes = &rest[..pos];
            emit(Piece::Row {
                bytes,
                key: key.map(|(from, to)| Cow::Borrowed(&bytes[from..to])),
                line,
            })?;
            at += pos;
        }
    }
}

/// Text format de-escaping (`CopyReadAttributesText`).
fn unescape_text(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let octal = |c: u8| (b'0'..=b'7').contains(&c);
    while i < raw.len() {
        let c = raw[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = raw.get(i) else {
            break;
        };
        i += 1;
        let byte = match e {
            b'0'..=b'7' => {
                let mut value = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d) if octal(d) => {
                            value = (value << 3) + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                (value & 0xff) as u8
            }
            b'x' => match raw.get(i).and_then(|h| (*h as char).to_digit(16)) {
                Some(first) => {
                    i += 1;
                    let mut value = first;
                    if let Some(second) = raw.get(i).and_then(|h| (*h as char).to_digit(16)) {
                        value = (value << 4) + second;
                        i += 1;
                    }
                    (value & 0xff) as u8
                }
                None => b'x',
            },
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            other => other,
        };
        out.push(byte);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type Got = Vec<(Vec<u8>, Option<Vec<u8>>, u64)>;

    fn frame_in(
        opts: CopyOptions,
        columns: &[&str],
        key: usize,
        chunks: &[&[u8]],
    ) -> Result<(Vec<Vec<u8>>, Got), CopyDataError> {
        let mut framer = RowFramer::new(opts, columns.iter().map(|s| s.to_string()).collect(), key);
        let mut headers = Vec::new();
        let mut rows = Vec::new();
        let mut emit = |p: Piece<'_>| {
            match p {
                Piece::Header(h) => headers.push(h.to_vec()),
                Piece::Row { bytes, key, line } => {
                    rows.push((bytes.to_vec(), key.map(|k| k.into_owned()), line))
                }
            }
            Ok(())
        };
        for chunk in chunks {
            framer.feed(chunk, &mut emit)?;
        }
        framer.finish(&mut emit)?;
        Ok((headers, rows))
    }

    /// Every split of `data` into two and three chunks gives the same result.
    fn frame_all_splits(
        opts: CopyOptions,
        columns: &[&str],
        key: usize,
        data: &[u8],
    ) -> Result<(Vec<Vec<u8>>, Got), CopyDataError> {
        let whole = frame_in(opts.clone(), columns, key, &[data]);
        for a in 0..=data.len() {
            let two = frame_in(opts.clone(), columns, key, &[&data[..a], &data[a..]]);
            assert_eq!(two, whole, "split at {a}");
            for b in a..=data.len().min(a + 3) {
                let three = frame_in(
                    opts.clone(),
                    columns,
                    key,
                    &[&data[..a], &data[a..b], &data[b..]],
                );
                assert_eq!(three, whole, "split at {a}, {b}");
            }
        }
        whole
    }

    fn keys(rows: &Got) -> Vec<Option<String>> {
        rows.iter()
            .map(|(_, k, _)| k.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()))
            .collect()
    }

    #[test]
    fn text_rows_and_keys() {
        let data = b"1\tann\n2\tb\\tob\n\\N\tnull key\n4\\\n2\tlf in key\n\\x35\t\\\\N\n";
        let (headers, rows) =
            frame_all_splits(CopyOptions::new(CopyFormat::Text), &["id", "name"], 0, data).unwrap();
        assert!(headers.is_empty());
        assert_eq!(
            keys(&rows),
            vec![
                Some("1".into()),
                Some("2".into()),
                None,
                Some("4\n2".into()),
                Some("5".into())
            ]
        );
        assert_eq!(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let joined: Vec<u8> = rows.iter().flat_map(|r| r.0.clone()).collect();
        assert_eq!(joined, data.to_vec());
        // Key in the second column.
        let (_, rows) = frame_all_splits(
            CopyOptions::new(CopyFormat::Text),
            &["name", "id"],
            1,
            b"a\t7\r\nb\t8\r\n",
        )
        .unwrap();
        assert_eq!(keys(&rows), vec![Some("7".into()), Some("8".into())]);
        assert_eq!(rows[1].0, b"b\t8\r\n");
    }

    #[test]
    fn text_last_row_without_newline_and_end_marker() {
        let (_, rows) =
            frame_all_splits(CopyOptions::new(CopyFormat::Text), &["id"], 0, b"1\n2").unwrap();
        assert_eq!(rows[1].0, b"2\n");
        let (_, rows) = frame_all_splits(
            CopyOptions::new(CopyFormat::Text),
            &["id"],
            0,
            b"1\n\\.\n3\n",
        )
        .unwrap();
        assert_eq!(keys(&rows), vec![Some("1".into())]);
        let e = frame_in(
            CopyOptions::new(CopyFormat::Text),
            &["id"],
            0,
            &[b"1\n\\.x\n"],
        )
        .unwrap_err();
        assert_eq!(e.message, "end-of-copy marker corrupt");
    }

    #[test]
    fn text_field_count_and_line_errors() {
        let e = frame_in(
            CopyOptions::new(CopyFormat::Text),
            &["id", "name"],
            0,
            &[b"1\ta\n2\n"],
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "missing data for column \"name\"")
        );
        let e = frame_in(
            CopyOptions::new(CopyFormat::Text),
            &["id", "name"],
            0,
            &[b"1\ta\tb\n"],
        )
        .unwrap_err();
        assert_eq!(e.message, "extra data after last expected column");
        let e = frame_in(
            CopyOptions::new(CopyFormat::Text),
            &["id"],
            0,
            &[b"1\n2\r\n"],
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "literal carriage return found in data")
        );
    }

    #[test]
    fn csv_quotes_newlines_header_and_nulls() {
        let mut opts = CopyOptions::new(CopyFormat::Csv);
        opts.header = true;
        let data = b"name,id\n\"a,b\",1\n\"multi\nline \"\"q\"\"\",\"2\"\n,\n\"x\",\"\"\nlast,7";
        let (headers, rows) = frame_all_splits(opts.clone(), &["name", "id"], 1, data).unwrap();
        assert_eq!(headers, vec![b"name,id\n".to_vec()]);
        assert_eq!(
            keys(&rows),
            vec![
                Some("1".into()),
                Some("2".into()),
                None,
                Some("".into()),
                Some("7".into())
            ]
        );
        // Lines count physical lines, as Postgres' cur_lineno does.
        assert_eq!(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            vec![2, 4, 5, 6, 7]
        );
        let e = frame_in(opts, &["name", "id"], 1, &[b"h\n\"open,1\n"]).unwrap_err();
        assert_eq!(e.message, "unterminated CSV quoted field");
    }

    #[test]
    fn csv_escape_and_delimiter_options() {
        let mut opts = CopyOptions::new(CopyFormat::Csv);
        opts.delimiter = b';';
        opts.escape = b'\\';
        opts.null = b"NULL".to_vec();
        let data = b"\"\\\"1\";x\nNULL;y\n\"NULL\";z\n";
        let (_, rows) = frame_all_splits(opts.clone(), &["id", "v"], 0, data).unwrap();
        assert_eq!(
            keys(&rows),
            vec![Some("\"1".into()), None, Some("NULL".into())]
        );
        opts.key_force_null = true;
        let (_, rows) = frame_in(opts, &["id", "v"], 0, &[b"\"NULL\";z\n"]).unwrap();
        assert_eq!(keys(&rows), vec![None]);
    }

    #[test]
    fn binary_tuples_across_chunks() {
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&0i32.to_be_bytes());
        for (id, name) in [(1i64, Some("a")), (2, None)] {
            data.extend_from_slice(&2i16.to_be_bytes());
            data.extend_from_slice(&8i32.to_be_bytes());
            data.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(n) => {
                    data.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    data.extend_from_slice(n.as_bytes());
                }
                None => data.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        data.extend_from_slice(&BINARY_TRAILER);
        let opts = CopyOptions::new(CopyFormat::Binary);
        let (headers, rows) = frame_all_splits(opts.clone(), &["id", "name"], 0, &data).unwrap();
        assert_eq!(headers[0].len(), 19);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].1.as_deref(), Some(&2i64.to_be_bytes()[..]));
        let mut after = data.clone();
        after.push(0);
        assert_eq!(
            frame_in(opts.clone(), &["id", "name"], 0, &[&after])
                .unwrap_err()
                .message,
            "received copy data after EOF marker"
        );
        let e = frame_in(opts, &["id"], 0, &[&data]).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (1, "row field count is 2, expected 1")
        );
    }

    #[test]
    fn unescape_matches_postgres() {
        assert_eq!(unescape_text(b"a\\tb\\101\\x41\\q\\\\"), b"a\tbAAq\\");
    }

    fn any_options() -> impl proptest::strategy::Strategy<Value = CopyOptions> {
        use proptest::prelude::*;
        (
            0..3u8,
            any::<bool>(),
            prop::sample::select(vec![b',', b'\t', b'|']),
        )
            .prop_map(|(f, header, delimiter)| {
                let format = [CopyFormat::Text, CopyFormat::Csv, CopyFormat::Binary][f as usize];
                let mut o = CopyOptions::new(format);
                o.header = header;
                if format != CopyFormat::Binary {
                    o.delimiter = delimiter;
                }
                o
            })
    }

    proptest::proptest! {
        /// Arbitrary input never panics, and how it is cut into chunks
        /// never changes the rows found.
        #[test]
        fn framing_is_total_and_chunking_invariant(
            opts in any_options(),
            data in proptest::collection::vec(
                proptest::sample::select(vec![b'1', b'a', b',', b'\t', b'|', b'"', b'\\', b'.', b'\n', b'\r', 0xff, 0]),
                0..200,
            ),
            cut in 0usize..200,
        ) {
            let cut = cut.min(data.len());
            let whole = frame_in(opts.clone(), &["id", "v"], 0, &[&data]);
            let split = frame_in(opts, &["id", "v"], 0, &[&data[..cut], &data[cut..]]);
            proptest::prop_assert_eq!(whole, split);
        }
    }
}
