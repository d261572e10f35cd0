//! Protocol pieces the fan-out executor needs beyond `crate::protocol`:
//! decoding a client's Bind parameters, encoding the extended-protocol batch
//! sent to each shard, and reading RowDescription / DataRow / ErrorResponse
//! bodies. All decoding is bounds-checked: shard and client bytes are never
//! trusted.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::messages::{put_cstr, Cursor};
use crate::protocol::ProtocolError;

/// The client's Bind, decoded: parameter formats and values, result formats.
#[derive(Debug, Clone, Default)]
pub struct BindParams {
    /// One format code per parameter (expanded from Bind's 0/1/n list).
    pub formats: Vec<i16>,
    pub values: Vec<Option<Bytes>>,
    /// Result format codes as sent: empty (all text), one (for all) or one per column.
    pub result_formats: Vec<i16>,
}

impl BindParams {
    /// Decodes the part of a Bind after the portal and statement names.
    pub fn decode(rest: &[u8]) -> Result<BindParams, ProtocolError> {
        let mut c = Cursor::new(b'B', rest);
        let nformats = c.i16()?.max(0) as usize;
        let mut codes = Vec::with_capacity(nformats);
        for _ in 0..nformats {
            codes.push(c.i16()?);
        }
        let nparams = c.i16()?.max(0) as usize;
        let mut values = Vec::with_capacity(nparams);
        for _ in 0..nparams {
            let len = c.i32()?;
            if len < 0 {
                values.push(None);
            } else {
                values.push(Some(Bytes::copy_from_slice(c.bytes(len as usize)?)));
            }
        }
        let nres = c.i16()?.max(0) as usize;
        let mut result_formats = Vec::with_capacity(nres);
        for _ in 0..nres {
            result_formats.push(c.i16()?);
        }
        let formats = match codes.len() {
            0 => vec![0; nparams],
            1 => vec![codes[0]; nparams],
            n if n == nparams => codes,
            _ => {
                return Err(ProtocolError::Malformed {
                    tag: b'B',
                    what: "parameter format count does not match",
                })
            }
        };
        Ok(BindParams {
            formats,
            values,
            result_formats,
        })
    }

    /// The result format of visible column `i` (0 text, 1 binary).
    pub fn result_format(&self, i: usize) -> i16 {
        match self.result_formats.len() {
            0 => 0,
            1 => self.result_formats[0],
            _ => self.result_formats.get(i).copied().unwrap_or(0),
        }
    }

    /// Parameter `n` (1-based) as an integer, for `LIMIT $n` / `OFFSET $n`.
    pub fn int_param(&self, n: usize) -> Option<Option<i64>> {
        let value = self.values.get(n.checked_sub(1)?)?;
        let Some(bytes) = value else {
            return Some(None);
        };
        if self.formats.get(n - 1).copied().unwrap_or(0) == 1 {
            match bytes.len() {
                2 => Some(Some(i16::from_be_bytes([bytes[0], bytes[1]]) as i64)),
                4 => Some(Some(
                    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as i64,
                )),
                8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(bytes);
                    Some(Some(i64::from_be_bytes(b)))
                }
                _ => None,
            }
        } else {
            std::str::from_utf8(bytes)
                .ok()?
                .trim()
                .parse::<i64>()
                .ok()
                .map(Some)
        }
    }
}

/// One parameter as sent to a shard.
#[derive(Debug, Clone)]
pub struct OutParam {
    pub type_oid: u32,
    pub format: i16,
    pub value: Option<Bytes>,
}

/// Appends Parse(unnamed) + Bind(unnamed) + Describe(portal) + Execute(all) + Sync.
pub fn extended_batch(out: &mut BytesMut, sql: &str, params: &[OutParam], result_formats: &[i16]) {
    // Parse
    let len = 4 + sql.len() + 2 + 2 + 4 * params.len();
    out.put_u8(b'P');
    out.put_i32(len as i32);
    put_cstr(out, "");
    put_cstr(out, sql);
    out.put_i16(params.len() as i16);
    for p in params {
        out.put_u32(p.type_oid);
    }
    // Bind
    let mut body = BytesMut::new();
    put_cstr(&mut body, "");
    put_cstr(&mut body, "");
    body.put_i16(params.len() as i16);
    for p in params {
        body.put_i16(p.format);
    }
    body.put_i16(params.len() as i16);
    for p in params {
        match &p.value {
            None => body.put_i32(-1),
            Some(v) => {
                body.put_i32(v.len() as i32);
                body.put_slice(v);
            }
        }
    }
    body.put_i16(result_formats.len() as i16);
    for f in result_formats {
        body.put_i16(*f);
    }
    out.put_u8(b'B');
    out.put_i32(4 + body.len() as i32);
    out.put_slice(&body);
    // Describe portal, Execute, Sync
    out.put_slice(&[b'D', 0, 0, 0, 6, b'P', 0]);
    out.put_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
    out.put_slice(&[b'S', 0, 0, 0, 4]);
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub typmod: i32,
    pub format: i16,
}

/// Decodes a RowDescription body.
pub fn decode_row_description(body: &[u8]) -> Result<Vec<Field>, ProtocolError> {
    let mut c = Cursor::new(b'T', body);
    let n = c.i16()?.max(0) as usize;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let name = c.cstr()?.to_string();
        let table_oid = c.i32()? as u32;
        let attnum = c.i16()?;
        let type_oid = c.i32()? as u32;
        let type_len = c.i16()?;
        let typmod = c.i32()?;
        let format = c.i16()?;
        fields.push(Field {
            name,
            table_oid,
            attnum,
            type_oid,
            type_len,
            typmod,
            format,
        });
    }
    Ok(fields)
}

/// Appends a RowDescription frame.
pub fn encode_row_description(out: &mut BytesMut, fields: &[Field]) {
    let mut body = BytesMut::new();
    body.put_i16(fields.len() as i16);
    for f in fields {
        put_cstr(&mut body, &f.name);
        body.put_u32(f.table_oid);
        body.put_i16(f.attnum);
        body.put_u32(f.type_oid);
        body.put_i16(f.type_len);
        body.put_i32(f.typmod);
        body.put_i16(f.format);
    }
    out.put_u8(b'T');
    out.put_i32(4 + body.len() as i32);
    out.put_slice(&body);
}

/// A DataRow: its body bytes and the (start, end) of each non-NULL value.
#[derive(Debug, Clone)]
pub struct Row {
    pub body: Bytes,
    pub cells: Vec<Option<(u32, u32)>>,
}

impl Row {
    pub fn decode(body: Bytes) -> Result<Row, ProtocolError> {
        let malformed = ProtocolError::Malformed {
            tag: b'D',
            what: "malformed DataRow",
        };
        if body.len() < 2 {
            return Err(malformed);
        }
        let n = i16::from_be_bytes([body[0], body[1]]).max(0) as usize;
        let mut cells = Vec::with_capacity(n);
        let mut pos = 2usize;
        for _ in 0..n {
            if body.len() < pos + 4 {
                return Err(malformed);
            }
            let len = i32::from_be_bytes([body[pos], body[pos + 1], body[pos + 2], body[pos + 3]]);
            pos += 4;
            if len < 0 {
                cells.push(None);
            } else {
                let end = pos + len as usize;
                if end > body.len() {
                    return Err(malformed);
                }
                cells.push(Some((pos as u32, end as u32)));
                pos = end;
            }
        }
        Ok(Row { body, cells })
    }

    pub fn cell(&self, i: usize) -> Option<&[u8]> {
        self.cells
            .get(i)
            .copied()
            .flatten()
            .map(|(s, e)| &self.body[s as usize..e as usize])
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Appends this row as a DataRow frame with only the first `keep`
    /// columns (hidden sort columns are last); untouched bytes when all kept.
    pub fn encode(&self, out: &mut BytesMut, keep: usize) {
        if keep >= self.cells.len() {
            out.put_u8(b'D');
            out.put_i32(4 + self.body.len() as i32);
            out.put_slice(&self.body);
            return;
        }
        // Cells are contiguous: the kept ones are a prefix of the body.
        let prefix = self.cells[..keep].iter().fold(2usize, |pos, c| match c {
            Some((_, e)) => *e as usize,
            None => pos + 4,
        });
        out.put_u8(b'D');
        out.put_i32((4 + prefix) as i32);
        out.put_i16(keep as i16);
        out.put_slice(&self.body[2..prefix]);
    }

    /// Approximate memory held by this row.
    pub fn footprint(&self) -> usize {
        self.body.len() + self.cells.len() * 12 + 64
    }
}

/// Appends a DataRow from cells.
pub fn encode_data_row(out: &mut BytesMut, cells: &[Option<&[u8]>]) {
    let len: usize = cells.iter().map(|c| 4 + c.map_or(0, |v| v.len())).sum();
    out.put_u8(b'D');
    out.put_i32((4 + 2 + len) as i32);
    out.put_i16(cells.len() as i16);
    for c in cells {
        match c {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
}

/// SQLSTATE codes are `&'static str` in
/// [`ProxyError`](crate::protocol::synth::ProxyError); codes from shards
/// are interned (bounded, malformed codes become XX000).
pub fn intern_sqlstate(code: &str) -> &'static str {
    crate::backend::intern_sqlstate(code.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_prefix_encoding_strips_hidden_columns() {
        let mut out = BytesMut::new();
        encode_data_row(&mut out, &[Some(b"1"), None, Some(b"abc")]);
        let row = Row::decode(Bytes::copy_from_slice(&out[5..])).unwrap();
        let mut stripped = BytesMut::new();
        row.encode(&mut stripped, 2);
        let again = Row::decode(Bytes::copy_from_slice(&stripped[5..])).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.cell(0), Some(&b"1"[..]));
        assert_eq!(again.cell(1), None);
        let mut none = BytesMut::new();
        encode_data_row(&mut none, &[None, None, Some(b"x")]);
        let row = Row::decode(Bytes::copy_from_slice(&none[5..])).unwrap();
        let mut s = BytesMut::new();
        row.encode(&mut s, 2);
        let again = Row::decode(Bytes::copy_from_slice(&s[5..])).unwrap();
        assert_eq!((again.len(), again.cell(0), again.cell(1)), (2, None, None));
    }

    #[test]
    fn malformed_rows_are_errors() {
        assert!(Row::decode(Bytes::from_static(b"\x00")).is_err());
        assert!(Row::decode(Bytes::from_static(b"\x00\x01\x00\x00\x00\x09ab")).is_err());
        assert!(BindParams::decode(b"\x00\x02").is_err());
    }
}
