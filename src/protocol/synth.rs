//! Messages shardgate writes itself (errors, ReadyForQuery, completions).
//!
//! Errors and notices go through pgwire's typed messages so every field is
//! encoded the way clients expect; the tiny fixed-shape messages are written
//! directly because they sit on the hot path.

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, NoticeResponse};
use pgwire::messages::Message;

use super::messages::put_cstr;

/// An error or notice shardgate reports itself, with a SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Every other field, in order, as a shard sent it (position, context,
    /// schema, table, column, data type, constraint, file, line, routine):
    /// ORMs map errors by them (SQLAlchemy, Django: constraint names).
    /// (A boxed slice: errors travel in `Result`s and stay small.) An
    /// entry of kind [`RAW_BYTES`] is no field but a mark (see there).
    pub extra: Box<[(u8, String)]>,
}

/// Marks (as an `extra` entry of this kind, which no field has) an error
/// whose text fields hold a shard's bytes, one per `char` (U+0000–U+00FF):
/// it wrote them in a client_encoding that is not UTF-8 (LATIN9, …), and
/// they go back to the client as those bytes. (A mark, not a flag: one
/// more field would make every `Result<_, ProxyError>` larger.)
const RAW_BYTES: u8 = 0;

impl ProxyError {
    /// What Postgres answers when a statement's result columns changed
    /// after the client prepared (and described) it.
    /// Drivers recognise it by its routine, not its (translatable) message:
    /// asyncpg turns it into `InvalidCachedStatementError` and re-prepares.
    pub fn result_changed() -> ProxyError {
        ProxyError {
            extra: Box::new([
                (b'F', "plancache.c".to_string()),
                (b'R', "RevalidateCachedQuery".to_string()),
            ]),
            ..ProxyError::error("0A000", "cached plan must not change result type")
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        ProxyError {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
            extra: Box::default(),
        }
    }

    /// A shard's ErrorResponse body as the client's error: every field as
    /// the shard sent it, and the shard named on a line added to CONTEXT
    /// (a field clients show but do not parse). `context_note` follows it.
    pub fn from_shard(body: &[u8], shard: &str, context_note: &str) -> ProxyError {
        let mut error = ProxyError::error("XX000", String::new());
        let mut context = None;
        let mut extra = Vec::new();
        use crate::protocol::messages::error_field_bytes;
        // Text in a client_encoding other than UTF-8: kept byte for byte.
        let raw = error_field_bytes(body).any(|(_, v)| std::str::from_utf8(v).is_err());
        if raw {
            extra.push((RAW_BYTES, String::new()));
        }
        let text = |v: &[u8]| -> String {
            match std::str::from_utf8(v) {
                Ok(s) if !raw => s.to_string(),
                _ => v.iter().map(|&b| char::from(b)).collect(),
            }
        };
        for (kind, value) in error_field_bytes(body) {
            let value = &*text(value);
            match kind {
                b'S' => {
                    if let Some(severity) = ["ERROR", "FATAL", "PANIC", "WARNING", "NOTICE"]
                        .into_iter()
                        .find(|s| *s == value)
                    {
                        error.severity = severity;
                    }
                }
                b'V' => {}
                b'C' => error.code = crate::backend::intern_sqlstate(value.as_bytes()),
                b'M' => error.message = value.to_string(),
                b'D' => error.detail = Some(value.to_string()),
                b'H' => error.hint = Some(value.to_string()),
                b'W' => context = Some(value.to_string()),
                other => extra.push((other, value.to_string())),
            }
        }
        let note = format!("on shard \"{shard}\"{context_note}");
        let context = match context {
            Some(c) => format!("{c}\n{note}"),
            None => note,
        };
        extra.push((b'W', context));
        error.extra = extra.into_boxed_slice();
        error
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        ProxyError {
            severity: "FATAL",
            ..Self::error(code, message)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The fields in Postgres' order: S, V (non-localised severity), C, M, D, H.
    fn fields(&self) -> Vec<(u8, String)> {
        let mut fields = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(detail) = &self.detail {
            fields.push((b'D', detail.clone()));
        }
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint.clone()));
        }
        fields.extend(self.extra.iter().filter(|(k, _)| *k != RAW_BYTES).cloned());
        fields
    }

    /// See [`RAW_BYTES`].
    fn raw_bytes(&self) -> bool {
        self.extra.iter().any(|(k, _)| *k == RAW_BYTES)
    }

    /// Appends this as an `ErrorResponse`.
    pub fn encode(&self, out: &mut BytesMut) {
        if self.raw_bytes() {
            return self.encode_raw(b'E', out);
        }
        // Encoding into a BytesMut cannot fail for these messages.
        let _ = ErrorResponse::new(self.fields()).encode(out);
    }

    /// See [`RAW_BYTES`]: each char of a field is one byte
    /// (a char beyond U+00FF, from text shardgate added, as UTF-8).
    fn encode_raw(&self, tag: u8, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(tag);
        out.put_i32(0);
        for (kind, value) in self.fields() {
            out.put_u8(kind);
            for c in value.chars() {
                match u8::try_from(u32::from(c)) {
                    Ok(byte) if byte != 0 => out.put_u8(byte),
                    Ok(_) => {}
                    Err(_) => {
                        let mut utf8 = [0u8; 4];
                        out.put_slice(c.encode_utf8(&mut utf8).as_bytes());
                    }
                }
            }
            out.put_u8(0);
        }
        out.put_u8(0);
        let length = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&length.to_be_bytes());
    }

    /// Appends this as a `NoticeResponse` (severity should be WARNING/NOTICE).
    pub fn encode_notice(&self, out: &mut BytesMut) {
        if self.raw_bytes() {
            return self.encode_raw(b'N', out);
        }
        let _ = NoticeResponse::new(self.fields()).encode(out);
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_slice(&[b'Z', 0, 0, 0, 5, status]);
}

/// BindComplete, as bytes.
pub const BIND_COMPLETE: &[u8] = &[b'2', 0, 0, 0, 4];

/// ParseComplete, as bytes.
pub const PARSE_COMPLETE: &[u8] = &[b'1', 0, 0, 0, 4];

pub fn parse_complete(out: &mut BytesMut) {
    out.put_slice(&[b'1', 0, 0, 0, 4]);
}

pub fn bind_complete(out: &mut BytesMut) {
    out.put_slice(&[b'2', 0, 0, 0, 4]);
}

pub fn close_complete(out: &mut BytesMut) {
    out.put_slice(&[b'3', 0, 0, 0, 4]);
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    out.put_u8(b'C');
    out.put_i32((4 + tag.len() + 1) as i32);
    put_cstr(out, tag);
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    out.put_u8(b'S');
    out.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    put_cstr(out, name);
    put_cstr(out, value);
}

/// A frontend `Query` message (used for statements the proxy itself sends).
pub fn query(out: &mut BytesMut, sql: &str) {
    out.put_u8(b'Q');
    out.put_i32((4 + sql.len() + 1) as i32);
    put_cstr(out, sql);
}

/// A one-column text result (RowDescription, one DataRow per line,
/// CommandComplete `tag`), for answers shardgate makes itself.
pub fn text_result(out: &mut BytesMut, column: &str, lines: &[&str], tag: &str) {
    let rows: Vec<[&str; 1]> = lines.iter().map(|line| [*line]).collect();
    table_result(out, &[column], &rows, tag);
}

/// A result of text columns (RowDescription, a DataRow per row,
/// CommandComplete `tag`), for answers shardgate makes itself.
pub fn table_result<R: AsRef<[C]>, C: AsRef<str>>(
    out: &mut BytesMut,
    columns: &[&str],
    rows: &[R],
    tag: &str,
) {
    // RowDescription: each field type text (25), text format.
    let body: usize = columns.iter().map(|c| c.len() + 1 + 18).sum();
    out.put_u8(b'T');
    out.put_i32((4 + 2 + body) as i32);
    out.put_i16(columns.len() as i16);
    for column in columns {
        put_cstr(out, column);
        out.put_i32(0); // table OID
        out.put_i16(0); // column number
        out.put_i32(25); // type OID: text
        out.put_i16(-1); // type size
        out.put_i32(-1); // type modifier
        out.put_i16(0); // text format
    }
    for row in rows {
        let cells = row.as_ref();
        let body: usize = cells.iter().map(|c| 4 + c.as_ref().len()).sum();
        out.put_u8(b'D');
        out.put_i32((4 + 2 + body) as i32);
        out.put_i16(cells.len() as i16);
        for cell in cells {
            let cell = cell.as_ref();
            out.put_i32(cell.len() as i32);
            out.put_slice(cell.as_bytes());
        }
    }
    command_complete(out, tag);
}

/// EmptyQueryResponse: the answer to a query of only whitespace.
pub fn empty_query(out: &mut BytesMut) {
    out.put_slice(&[b'I', 0, 0, 0, 4]);
}

/// A Flush: the backend sends what it has without waiting for a Sync.
pub fn flush(out: &mut BytesMut) {
    out.put_slice(&[b'H', 0, 0, 0, 4]);
}

pub fn sync(out: &mut BytesMut) {
    out.put_slice(&[b'S', 0, 0, 0, 4]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{messages, next_frame};

    #[test]
    fn error_response_carries_code_and_message() {
        let mut out = BytesMut::new();
        ProxyError::error("53300", "too many clients")
            .with_hint("raise pool.size")
            .encode(&mut out);
        let (frame, len) = next_frame(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(len, out.len());
        assert_eq!(frame.tag, b'E');
        let fields = messages::error_fields(frame.body);
        assert_eq!((fields.code, fields.message), ("53300", "too many clients"));
    }
}
