//! Postgres wire protocol, free of I/O: framing, the few typed messages the
//! proxy must understand, and encoders for the messages it synthesises.
//!
//! Everything else is forwarded as bytes (ARCHITECTURE.md §2.1): a frame is a
//! tag byte and a big-endian length that counts itself, so the proxy can find
//! message boundaries without decoding bodies.

pub mod messages;
pub mod synth;
pub mod type_oids;

use thiserror::Error;

/// Largest message accepted from a backend.
pub const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// Frontend tags.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';

    // Backend tags.
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const NOTIFICATION: u8 = b'A';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const NO_DATA: u8 = b'n';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const EMPTY_QUERY: u8 = b'I';
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {length} for message type '{}'", char::from(*tag))]
    InvalidLength { tag: u8, length: i64 },
    #[error("message type '{}' of {length} bytes exceeds the limit of {limit} bytes", char::from(*tag))]
    TooLarge {
        tag: u8,
        length: usize,
        limit: usize,
    },
    #[error("malformed '{}' message: {what}", char::from(*tag))]
    Malformed { tag: u8, what: &'static str },
    #[error("invalid UTF-8 in '{}' message", char::from(*tag))]
    Utf8 { tag: u8 },
}

/// A complete message inside a buffer: `tag`, and the body without tag and length.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

/// The total length (tag + length field + body) of the message at the start of
/// `buf`, or `Ok(None)` when its header is not complete yet.
pub fn frame_length(buf: &[u8], limit: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let length = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if length < 4 {
        return Err(ProtocolError::InvalidLength {
            tag,
            length: i64::from(length),
        });
    }
    let total = length as usize + 1;
    if total > limit {
        return Err(ProtocolError::TooLarge {
            tag,
            length: total,
            limit,
        });
    }
    Ok(Some(total))
}

/// The message at the start of `buf` if it is complete, with its total length.
pub fn next_frame(buf: &[u8], limit: usize) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    match frame_length(buf, limit)? {
        Some(total) if buf.len() >= total => Ok(Some((
            Frame {
                tag: buf[0],
                body: &buf[5..total],
            },
            total,
        ))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let msg = [b'Q', 0, 0, 0, 8, b's', b'e', b'l', 0];
        let (frame, len) = next_frame(&msg, 100).unwrap().unwrap();
        assert_eq!((frame.tag, frame.body, len), (b'Q', &b"sel\0"[..], 9));
        assert_eq!(next_frame(&msg[..6], 100).unwrap().map(|f| f.1), None);
        assert!(matches!(
            frame_length(&[b'Q', 0, 0, 0, 3], 100),
            Err(ProtocolError::InvalidLength { .. })
        ));
        assert!(matches!(
            frame_length(&[b'Q', 0x7f, 0, 0, 0], 100),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            frame_length(&[b'Q', 0xff, 0, 0, 0], 100),
            Err(ProtocolError::InvalidLength { .. })
        ));
    }
}
