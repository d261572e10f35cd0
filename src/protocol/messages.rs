//! Typed views of the messages the proxy must read, borrowed from the frame
//! body (no copies), and writers for the ones it rewrites.

use bytes::{BufMut, BytesMut};

use super::ProtocolError;

/// A cursor over a message body.
pub struct Cursor<'a> {
    tag: u8,
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(tag: u8, data: &'a [u8]) -> Self {
        Cursor { tag, data }
    }

    fn malformed(&self, what: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            tag: self.tag,
            what,
        }
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        // Unnamed statements and portals: most names are empty.
        if let Some((&0, rest)) = self.data.split_first() {
            self.data = rest;
            return Ok("");
        }
        let end =
            nul_position(self.data).ok_or_else(|| self.malformed("missing string terminator"))?;
        let text = utf8(&self.data[..end]).ok_or(ProtocolError::Utf8 { tag: self.tag })?;
        self.data = &self.data[end + 1..];
        Ok(text)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&first, rest) = self
            .data
            .split_first()
            .ok_or_else(|| self.malformed("message too short"))?;
        self.data = rest;
        Ok(first)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let bytes = self.bytes(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let bytes = self.bytes(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.data.len() < n {
            return Err(self.malformed("message too short"));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
}

/// `bytes` as UTF-8 text, checked word-at-a-time when it is ASCII (SQL
/// texts and key values nearly always are): a fraction of a full
/// validation, which was 3% of the routed hot path.
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// Index of the first NUL byte, eight bytes at a time (statement texts are
/// scanned on every Parse and Query).
fn nul_position(data: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut chunks = data.chunks_exact(8);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_le_bytes(word);
        // The lowest flagged byte is always a real zero (borrows only
        // flag bytes above one).
        let zero = v.wrapping_sub(ONES) & !v & HIGHS;
        if zero != 0 {
            return Some(base + (zero.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == 0)
        .map(|i| base + i)
}

/// `Query`: the SQL text.
pub fn query_text(body: &[u8]) -> Result<&str, ProtocolError> {
    Cursor::new(b'Q', body).cstr()
}

/// `Query`: the SQL text's bytes, whatever their encoding.
pub fn query_bytes(body: &[u8]) -> Result<&[u8], ProtocolError> {
    body.iter()
        .position(|&b| b == 0)
        .map(|end| &body[..end])
        .ok_or(ProtocolError::Malformed {
            tag: b'Q',
            what: "missing string terminator",
        })
}

/// `Parse`: statement name, SQL text, and the raw parameter-type section.
#[derive(Debug, Clone, Copy)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub query: &'a str,
    /// Parameter count (i16) followed by the OIDs, exactly as sent.
    pub param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Parse<'a>, ProtocolError> {
        let mut cursor = Cursor::new(b'P', body);
        let name = cursor.cstr()?;
        let query = cursor.cstr()?;
        let param_types = cursor.rest();
        let mut check = Cursor::new(b'P', param_types);
        let count = check.i16()?;
        if count < 0 || check.rest().len() != count as usize * 4 {
            return Err(ProtocolError::Malformed {
                tag: b'P',
                what: "parameter type count does not match",
            });
        }
        Ok(Parse {
            name,
            query,
            param_types,
        })
    }

    /// Writes a Parse with another statement name.
    pub fn encode_as(&self, name: &str, out: &mut BytesMut) {
        let len = 4 + name.len() + 1 + self.query.len() + 1 + self.param_types.len();
        out.reserve(len + 1);
        out.put_u8(b'P');
        out.put_i32(len as i32);
        put_cstr(out, name);
        put_cstr(out, self.query);
        out.put_slice(self.param_types);
    }
}

/// `Bind`: portal and statement names; the rest (formats, values) stays raw.
#[derive(Debug, Clone, Copy)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Bind<'a>, ProtocolError> {
        let mut cursor = Cursor::new(b'B', body);
        let portal = cursor.cstr()?;
        let statement = cursor.cstr()?;
        Ok(Bind {
            portal,
            statement,
            rest: cursor.rest(),
        })
    }

    /// Writes the Bind with another statement name.
    pub fn encode_as(&self, statement: &str, out: &mut BytesMut) {
        let len = 4 + self.portal.len() + 1 + statement.len() + 1 + self.rest.len();
        out.reserve(len + 1);
        out.put_u8(b'B');
        out.put_i32(len as i32);
        put_cstr(out, self.portal);
        put_cstr(out, statement);
        out.put_slice(self.rest);
    }
}

/// `Describe` and `Close`: `S` (statement) or `P` (portal) and a name.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a str,
}

impl<'a> Target<'a> {
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Target<'a>, ProtocolError> {
        let mut cursor = Cursor::new(tag, body);
        let kind = cursor.u8()?;
        if kind != b'S' && kind != b'P' {
            return Err(ProtocolError::Malformed {
                tag,
                what: "target must be 'S' or 'P'",
            });
        }
        let name = cursor.cstr()?;
        Ok(Target { kind, name })
    }

    pub fn encode_as(&self, tag: u8, name: &str, out: &mut BytesMut) {
        let len = 4 + 1 + name.len() + 1;
        out.reserve(len + 1);
        out.put_u8(tag);
        out.put_i32(len as i32);
        out.put_u8(self.kind);
        put_cstr(out, name);
    }
}

/// `ReadyForQuery` status: `I` idle, `T` in a transaction, `E` failed transaction.
pub fn ready_status(body: &[u8]) -> Result<u8, ProtocolError> {
    match body {
        [status @ (b'I' | b'T' | b'E')] => Ok(*status),
        _ => Err(ProtocolError::Malformed {
            tag: b'Z',
            what: "bad transaction status",
        }),
    }
}

/// The fields of an `ErrorResponse`/`NoticeResponse` that the proxy looks
/// at, as text `S`: `&str` borrowed from a body ([`error_fields`]) or owned
/// text from another decoder of the same fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields<S> {
    /// `V` (non-localised) when sent, else `S`.
    pub severity: S,
    pub code: S,
    pub message: S,
    pub detail: Option<S>,
    pub hint: Option<S>,
}

impl<S: AsRef<str> + Default> ErrorFields<S> {
    /// The one reading of the field codes, from `(code, text)` in message
    /// order (a later field of the same code wins, except that `S` never
    /// replaces a severity already known).
    pub fn from_fields(fields: impl IntoIterator<Item = (u8, S)>) -> Self {
        let mut out = ErrorFields::default();
        for (kind, value) in fields {
            match kind {
                b'V' => out.severity = value,
                b'S' if out.severity.as_ref().is_empty() => out.severity = value,
                b'C' => out.code = value,
                b'M' => out.message = value,
                b'D' => out.detail = Some(value),
                b'H' => out.hint = Some(value),
                _ => {}
            }
        }
        out
    }
}

/// The result columns of a statement as Postgres compares them when it
/// re-plans one (`cached plan must not change result type`): names, types
/// and type modifiers, in the OIDs clients see. Table OIDs and column
/// numbers differ between shards and are left out. Hashed, so a client's
/// remembered description costs one word.
pub struct ResultShape(std::collections::hash_map::DefaultHasher);

impl ResultShape {
    /// A shape of `columns` columns (`None`: NoData, no result rows).
    pub fn new(columns: Option<i16>) -> ResultShape {
        use std::hash::Hash;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        columns.hash(&mut hasher);
        ResultShape(hasher)
    }

    pub fn column(&mut self, name: &str, type_oid: u32, type_len: i16, typmod: i32) {
        use std::hash::Hash;
        (name, type_oid, type_len, typmod).hash(&mut self.0);
    }

    pub fn finish(self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

/// [`ResultShape`] of a RowDescription (`T`) or NoData (`n`) body; `None`
/// if the body is malformed.
pub fn result_shape(tag: u8, body: &[u8]) -> Option<u64> {
    if tag != super::tag::ROW_DESCRIPTION {
        return Some(ResultShape::new(None).finish());
    }
    let mut cursor = Cursor::new(tag, body);
    let columns = cursor.i16().ok()?;
    let mut shape = ResultShape::new(Some(columns));
    for _ in 0..columns {
        let name = cursor.cstr().ok()?;
        let _table = cursor.i32().ok()?;
        let _column = cursor.i16().ok()?;
        let type_oid = cursor.i32().ok()? as u32;
        let type_len = cursor.i16().ok()?;
        let typmod = cursor.i32().ok()?;
        let _format = cursor.i16().ok()?;
        shape.column(name, type_oid, type_len, typmod);
    }
    Some(shape.finish())
}

/// [`result_shape`] of the RowDescription or NoData among `frames` (a
/// Describe's answer).
pub fn result_shape_in(frames: &[u8]) -> Option<u64> {
    let (tag, body) = find_message(frames, |tag| {
        matches!(tag, super::tag::ROW_DESCRIPTION | super::tag::NO_DATA)
    })?;
    result_shape(tag, body)
}

/// The parameter type OIDs of the ParameterDescription among `frames` (a
/// Describe's answer).
pub fn parameter_types_in(frames: &[u8]) -> Option<Vec<u32>> {
    let (_, body) = find_message(frames, |tag| tag == super::tag::PARAMETER_DESCRIPTION)?;
    let mut cursor = Cursor::new(super::tag::PARAMETER_DESCRIPTION, body);
    let count = cursor.i16().ok()?;
    (0..count)
        .map(|_| cursor.i32().ok().map(|oid| oid as u32))
        .collect()
}

/// The tag and body of the first whole message among `frames` whose tag
/// `wanted` accepts.
pub fn find_message(frames: &[u8], wanted: impl Fn(u8) -> bool) -> Option<(u8, &[u8])> {
    let mut rest = frames;
    while rest.len() >= 5 {
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = 1 + length;
        if length < 4 || end > rest.len() {
            return None;
        }
        if wanted(rest[0]) {
            return Some((rest[0], &rest[5..end]));
        }
        rest = &rest[end..];
    }
    None
}

/// Every field of an `ErrorResponse`/`NoticeResponse` body in order, as
/// `(code, bytes)`, up to the terminator or the first field without one.
pub fn error_field_bytes(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&kind, after) = rest.split_first()?;
        if kind == 0 {
            return None;
        }
        let Some(end) = nul_position(after) else {
            rest = &[];
            return None;
        };
        rest = &after[end + 1..];
        Some((kind, &after[..end]))
    })
}

/// [`error_field_bytes`] as text, up to the first field that is not UTF-8.
fn error_field_texts(body: &[u8]) -> impl Iterator<Item = (u8, &str)> {
    error_field_bytes(body).map_while(|(kind, value)| Some((kind, utf8(value)?)))
}

/// The fields the proxy looks at (up to the first non-UTF-8 field).
pub fn error_fields(body: &[u8]) -> ErrorFields<&str> {
    ErrorFields::from_fields(error_field_texts(body))
}

/// Every field of an ErrorResponse or NoticeResponse, in order (up to the
/// first non-UTF-8 field).
pub fn error_field_list(body: &[u8]) -> Vec<(u8, &str)> {
    error_field_texts(body).collect()
}

/// `CommandComplete` tag, e.g. `INSERT 0 1`, `COMMIT`.
pub fn command_tag(body: &[u8]) -> &str {
    Cursor::new(b'C', body).cstr().unwrap_or("")
}

/// `ParameterStatus`: name and value.
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut cursor = Cursor::new(b'S', body);
    Ok((cursor.cstr()?, cursor.cstr()?))
}

/// Checks the body of a `SASLInitialResponse` ('p' during SCRAM: mechanism
/// name, an i32 length, then that many bytes or -1 for none) before pgwire
/// decodes it: pgwire 0.42's `into_sasl_initial_response` panics when the
/// length is missing or larger than what follows (found by
/// `tests/fuzz` `frontend_decoder`). Postgres requires the length to match
/// the rest exactly.
pub fn check_sasl_initial_response(body: &[u8]) -> Result<(), ProtocolError> {
    let malformed = |what| ProtocolError::Malformed { tag: b'p', what };
    let nul = nul_position(body).ok_or(malformed("missing SASL mechanism name"))?;
    let rest = &body[nul + 1..];
    let Some((length, data)) = rest.split_first_chunk::<4>() else {
        return Err(malformed("missing SASL response length"));
    };
    match i32::from_be_bytes(*length) {
        -1 if data.is_empty() => Ok(()),
        n if n >= 0 && n as usize == data.len() => Ok(()),
        _ => Err(malformed("SASL response length does not match the message")),
    }
}

pub fn put_cstr(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz input that made pgwire panic: 32 announced bytes, 28 sent.
    #[test]
    fn sasl_initial_response_lengths() {
        let mut body = b"SCRAM-SHA-256\0\0\0\0\x20".to_vec();
        body.extend_from_slice(b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        assert!(check_sasl_initial_response(&body).is_err());
        body[17] = 28;
        assert_eq!(check_sasl_initial_response(&body), Ok(()));
        assert!(check_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xff").is_ok());
        for bad in [
            &b"SCRAM-SHA-256"[..],
            b"SCRAM-SHA-256\0\0\0",
            b"x\0\xff\xff\xff\xfe",
        ] {
            assert!(check_sasl_initial_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parse_roundtrip_with_new_name() {
        let mut buf = BytesMut::new();
        let original = Parse {
            name: "s1",
            query: "select $1",
            param_types: &[0, 1, 0, 0, 0, 23],
        };
        original.encode_as("sg_abc", &mut buf);
        let (frame, len) = super::super::next_frame(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!(len, buf.len());
        let decoded = Parse::decode(frame.body).unwrap();
        assert_eq!(
            (decoded.name, decoded.query, decoded.param_types),
            ("sg_abc", "select $1", &[0u8, 1, 0, 0, 0, 23][..])
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert!(Parse::decode(b"name").is_err());
        assert!(Parse::decode(b"n\0q\0\x00\x02\0\0\0\x17").is_err());
        assert!(Bind::decode(b"\0").is_err());
        assert!(Target::decode(b'D', b"X\0").is_err());
        assert!(ready_status(b"").is_err());
        assert_eq!(error_fields(b"Sxx").code, "");
    }

    #[test]
    fn error_fields_read_code_and_message() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0";
        let fields = error_fields(body);
        assert_eq!(
            (fields.severity, fields.code, fields.message),
            ("ERROR", "42P01", "relation \"x\" does not exist")
        );
        assert_eq!((fields.detail, fields.hint), (None, None));
        let body = b"SFEHLER\0VERROR\0C23505\0Mdup\0Dkey (a)=(1)\0Hfix it\0nt_pkey\0\0";
        let fields = error_fields(body);
        assert_eq!(
            (fields.severity, fields.detail, fields.hint),
            ("ERROR", Some("key (a)=(1)"), Some("fix it"))
        );
        assert_eq!(error_field_list(body).last(), Some(&(b'n', "t_pkey")));
        // Localised severity only; a field after a non-UTF-8 one is not read.
        let fields = error_fields(b"SFATAL\0M\xff\0C28P01\0\0");
        assert_eq!((fields.severity, fields.code), ("FATAL", ""));
        // Empty values, a missing terminator.
        assert_eq!(
            error_field_list(b"M\0D\0C123"),
            vec![(b'M', ""), (b'D', "")]
        );
        let raw: Vec<_> = error_field_bytes(b"M\xff\0\0Mlater\0").collect();
        assert_eq!(raw, vec![(b'M', &b"\xff"[..])]);
    }

    #[test]
    fn strings_with_and_without_terminator_and_utf8() {
        let mut cursor = Cursor::new(
            b'P',
            b"SELECT abalance FROM pgbench_accounts WHERE aid = $1\0\0rest",
        );
        assert_eq!(
            cursor.cstr().unwrap(),
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        );
        assert_eq!(cursor.cstr().unwrap(), "");
        assert!(cursor.cstr().is_err());
        let mut cursor = Cursor::new(b'P', "välue ünïcode text\0".as_bytes());
        assert_eq!(cursor.cstr().unwrap(), "välue ünïcode text");
        let mut cursor = Cursor::new(b'P', b"bad \xff\xfe utf8\0");
        assert!(matches!(cursor.cstr(), Err(ProtocolError::Utf8 { .. })));
    }

    proptest::proptest! {
        #[test]
        fn nul_position_finds_the_first_zero(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            proptest::prop_assert_eq!(nul_position(&data), data.iter().position(|&b| b == 0));
        }
    }

    proptest::proptest! {
        /// The frontend decoder never panics, whatever the bytes.
        #[test]
        fn decoders_never_panic(tag in proptest::prelude::any::<u8>(), body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = query_text(&body);
            let _ = Parse::decode(&body);
            let _ = Bind::decode(&body);
            let _ = Target::decode(tag, &body);
            let _ = ready_status(&body);
            let _ = error_fields(&body);
            let _ = error_field_bytes(&body).count();
            let _ = command_tag(&body);
            let _ = parameter_status(&body);
            let mut framed = vec![tag];
            framed.extend_from_slice(&body);
            let _ = super::super::next_frame(&framed, 1 << 20);
        }
    }
}
