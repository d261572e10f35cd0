//! Control statements on a raw backend connection.
//!
//! The proxy forwards client bytes untouched, but a few statements are its
//! own: `BEGIN` on a shard a transaction reaches late, `PREPARE TRANSACTION`,
//! `COMMIT PREPARED`, the decision row of a two-phase commit. [`run`] sends
//! one simple-protocol `Query` on a pooled [`BackendConnection`] and reads up
//! to its ReadyForQuery, keeping only what a caller needs: the command tags,
//! the server's error, the new transaction status. Rows are skipped.
//!
//! Precondition: the connection has answered everything sent before (the
//! session has seen its ReadyForQuery), so the first bytes read belong to
//! this query.

use std::time::Duration;

use bytes::{Buf, BytesMut};

use crate::backend::BackendConnection;
use crate::protocol::messages::{command_tag, error_fields, ready_status};
use crate::protocol::synth::{self, ProxyError};
use crate::protocol::{next_frame, tag, MAX_BACKEND_MESSAGE};

/// A control statement failed. Each variant names the shard; a lost or
/// confused connection is also marked broken so the pool discards it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The server answered with an ErrorResponse.
    #[error("shard {shard}: {message}")]
    Server {
        shard: String,
        sqlstate: &'static str,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
        /// FATAL/PANIC, or the connection closed after it: the session is
        /// gone, and the error may predate the statement (e.g. 57P01 queued
        /// when the server died), so whether it ran is unknown.
        fatal: bool,
    },
    /// The connection failed (EOF, reset, write error).
    #[error("shard {shard}: connection lost: {reason}")]
    Lost { shard: String, reason: String },
    /// No ReadyForQuery within the caller's bound.
    #[error("shard {shard}: no answer within {}ms", .timeout.as_millis())]
    Timeout { shard: String, timeout: Duration },
    /// The server sent something that is not valid protocol.
    #[error("shard {shard}: protocol error: {reason}")]
    Protocol { shard: String, reason: String },
}

impl ControlError {
    /// The SQLSTATE a client should see for this failure.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ControlError::Server { sqlstate, .. } => sqlstate,
            ControlError::Lost { .. } | ControlError::Timeout { .. } => "08006",
            ControlError::Protocol { .. } => "08P01",
        }
    }

    pub fn shard(&self) -> &str {
        match self {
            ControlError::Server { shard, .. }
            | ControlError::Lost { shard, .. }
            | ControlError::Timeout { shard, .. }
            | ControlError::Protocol { shard, .. } => shard,
        }
    }

    /// True when the connection is gone or unusable, so whether the
    /// statement took effect is unknown.
    pub fn outcome_unknown(&self) -> bool {
        !matches!(self, ControlError::Server { fatal: false, .. })
    }

    /// The error for a client, naming the shard (the server's detail and
    /// hint are kept).
    pub fn to_proxy_error(&self) -> ProxyError {
        let mut error = ProxyError::error(self.sqlstate(), self.to_string());
        if let ControlError::Server { detail, hint, .. } = self {
            error.detail = detail.clone();
            error.hint = hint.clone();
        }
        error
    }
}

/// Runs `sql` (one or more statements, simple protocol) and returns the
/// command tag of each statement that completed, e.g. `["COMMIT"]`. Updates
/// the connection's transaction status from the ReadyForQuery. A server
/// error is returned after ReadyForQuery, so the connection stays usable.
pub async fn run(conn: &mut BackendConnection, sql: &str) -> Result<Vec<String>, ControlError> {
    let mut out = BytesMut::with_capacity(sql.len() + 6);
    synth::query(&mut out, sql);
    if let Err(e) = conn.write_all(&out).await {
        return Err(lost(conn, &e.to_string()));
    }
    let mut buf = BytesMut::with_capacity(512);
    let mut tags = Vec::new();
    let mut error: Option<ControlError> = None;
    loop {
        loop {
            let (frame_tag, total, status) = match next_frame(&buf, MAX_BACKEND_MESSAGE) {
                Ok(Some((frame, total))) => {
                    let mut status = None;
                    match frame.tag {
                        tag::COMMAND_COMPLETE => tags.push(command_tag(frame.body).to_owned()),
                        tag::ERROR_RESPONSE if error.is_none() => {
                            error = Some(server_error(conn.shard_name(), frame.body));
                        }
                        tag::READY_FOR_QUERY => match ready_status(frame.body) {
                            Ok(s) => status = Some(s),
                            Err(e) => return Err(protocol(conn, e.to_string())),
                        },
                        _ => {}
                    }
                    (frame.tag, total, status)
                }
                Ok(None) => break,
                Err(e) => return Err(protocol(conn, e.to_string())),
            };
            buf.advance(total);
            if frame_tag == tag::COPY_IN_RESPONSE {
                // Control SQL never copies; refuse so the server ends it.
                let mut fail = BytesMut::new();
                fail.extend_from_slice(&copy_fail("shardgate: COPY is not a control statement"));
                if let Err(e) = conn.write_all(&fail).await {
                    return Err(lost(conn, &e.to_string()));
                }
            }
            if let Some(status) = status {
                conn.unread(&buf);
                conn.set_transaction_status(status);
                return match error {
                    Some(e) => Err(e),
                    None => Ok(tags),
                };
            }
        }
        match conn.read_buf(&mut buf).await {
            Ok(0) => {
                // A FATAL error (e.g. 57P01 at shutdown) says more than EOF.
                return Err(match error {
                    Some(ControlError::Server {
                        shard,
                        sqlstate,
                        message,
                        detail,
                        hint,
                        ..
                    }) => ControlError::Server {
                        shard,
                        sqlstate,
                        message,
                        detail,
                        hint,
                        fatal: true,
                    },
                    _ => lost(conn, "the server closed the connection"),
                });
            }
            Ok(_) => {}
            Err(e) => return Err(lost(conn, &e.to_string())),
        }
    }
}

/// [`run`] bounded by `timeout`; on timeout the connection is marked broken
/// (its answer may still arrive, so it cannot be reused).
pub async fn run_within(
    conn: &mut BackendConnection,
    sql: &str,
    timeout: Duration,
) -> Result<Vec<String>, ControlError> {
    match tokio::time::timeout(timeout, run(conn, sql)).await {
        Ok(result) => result,
        Err(_) => {
            conn.mark_broken();
            Err(ControlError::Timeout {
                shard: conn.shard_name().to_owned(),
                timeout,
            })
        }
    }
}

/// A string as a SQL literal (`'` doubled; standard_conforming_strings is
/// on in every supported Postgres).
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn lost(conn: &mut BackendConnection, reason: &str) -> ControlError {
    conn.mark_broken();
    ControlError::Lost {
        shard: conn.shard_name().to_owned(),
        reason: reason.to_owned(),
    }
}

fn protocol(conn: &mut BackendConnection, reason: String) -> ControlError {
    conn.mark_broken();
    ControlError::Protocol {
        shard: conn.shard_name().to_owned(),
        reason,
    }
}

fn copy_fail(message: &str) -> Vec<u8> {
    let mut out = vec![b'f'];
    out.extend_from_slice(&((4 + message.len() + 1) as i32).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.push(0);
    out
}

/// The fields of an ErrorResponse body that a client needs.
fn server_error(shard: &str, body: &[u8]) -> ControlError {
    let fields = error_fields(body);
    ControlError::Server {
        shard: shard.to_owned(),
        sqlstate: static_sqlstate(fields.code),
        message: fields.message.to_owned(),
        detail: fields.detail.map(str::to_owned),
        hint: fields.hint.map(str::to_owned),
        fatal: matches!(fields.severity, "FATAL" | "PANIC"),
    }
}

/// A SQLSTATE as `&'static str` (what [`ProxyError`] carries): common codes
/// from a table, other well-formed ones interned (bounded, so a misbehaving
/// server cannot grow memory), anything else `XX000`.
pub fn static_sqlstate(code: &str) -> &'static str {
    crate::backend::intern_sqlstate(code.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_read_without_panics() {
        let body = b"SERROR\0VERROR\0C40001\0Mcould not serialize\0Dsome detail\0Hretry\0\0";
        match server_error("s1", body) {
            ControlError::Server {
                sqlstate,
                message,
                detail,
                hint,
                fatal,
                ..
            } => {
                assert!(!fatal);
                assert_eq!(sqlstate, "40001");
                assert_eq!(message, "could not serialize");
                assert_eq!(detail.as_deref(), Some("some detail"));
                assert_eq!(hint.as_deref(), Some("retry"));
            }
            other => panic!("{other:?}"),
        }
        assert!(server_error("s1", b"SFATAL\0C57P01\0\0").outcome_unknown());
        assert_eq!(server_error("s1", b"C4").sqlstate(), "XX000");
        assert_eq!(server_error("s1", b"").sqlstate(), "XX000");
    }

    #[test]
    fn sqlstates_are_static_and_bounded() {
        assert_eq!(static_sqlstate("22012"), "22012");
        assert!(std::ptr::eq(
            static_sqlstate("22012"),
            static_sqlstate("22012")
        ));
        assert_eq!(static_sqlstate("2201"), "XX000");
        assert_eq!(static_sqlstate("22o12"), "XX000");
    }

    #[test]
    fn literals_double_quotes() {
        assert_eq!(literal("a'b"), "'a''b'");
    }
}
