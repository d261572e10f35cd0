//! Errors talking to a shard, each naming the shard and carrying the
//! SQLSTATE the front end reports to the client.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// Something went wrong getting or using a backend connection.
///
/// `Clone` because one connect failure is reported to every client waiting
/// for that shard's pool at the time (see `ShardPool::checkout`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The shard could not be reached: connection refused, I/O error during
    /// startup, the server closed the connection, ...
    #[error("shard {shard} ({addr}) is unavailable: {reason}")]
    Unavailable {
        shard: String,
        addr: String,
        reason: String,
    },
    /// Connect + startup + authentication did not finish within `connect_timeout`.
    #[error(
        "shard {shard} ({addr}) is unavailable: no answer within connect_timeout ({})",
        fmt_duration(*timeout)
    )]
    ConnectTimeout {
        shard: String,
        addr: String,
        timeout: Duration,
    },
    /// The shard was paused by an operator (the admin console's PAUSE) for
    /// the whole of `pool.pause_timeout`.
    #[error(
        "shard {shard} is paused (PAUSE in the admin console) and was not resumed within \
         pool.pause_timeout ({})",
        fmt_duration(*timeout)
    )]
    Paused { shard: String, timeout: Duration },
    /// Every pooled connection stayed checked out for `checkout_timeout`.
    #[error(
        "too many clients waiting for shard {shard}: no connection free within {} (pool size {size})",
        fmt_duration(*timeout)
    )]
    PoolExhausted {
        shard: String,
        timeout: Duration,
        size: u32,
    },
    /// The server answered with an ErrorResponse (during startup, e.g. `28P01`
    /// bad password or `3D000` unknown database, or during a reset); its
    /// SQLSTATE is kept so the client sees the real cause.
    #[error("shard {shard}: {}", .error.message)]
    Server {
        shard: String,
        error: Box<ServerError>,
    },
    /// Authentication could not be carried out on our side: no password in
    /// the shard map, a method we do not implement, a bad SCRAM exchange.
    #[error("shard {shard}: authentication failed: {reason}")]
    Auth { shard: String, reason: String },
    /// The server sent something that is not valid protocol at this point.
    #[error("shard {shard} ({addr}): protocol error: {reason}")]
    Protocol {
        shard: String,
        addr: String,
        reason: String,
    },
    /// A pooled connection failed its cheap health check (EOF, stray bytes,
    /// not idle). Only seen by the pool itself, which then opens a new one.
    #[error("shard {shard}: backend connection is broken")]
    Broken { shard: String },
    /// No connection (free or new) within `pool.query_timeout`: the bound on
    /// a statement waiting for a hung shard, whose connections are stuck
    /// and whose postmaster never answers a connect.
    #[error(
        "canceling statement due to query_timeout: no connection to shard {shard} within {}",
        fmt_duration(*timeout)
    )]
    QueryTimeout { shard: String, timeout: Duration },
}

impl BackendError {
    /// The SQLSTATE to report to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            BackendError::Unavailable { .. }
            | BackendError::ConnectTimeout { .. }
            | BackendError::Broken { .. } => "08006",
            BackendError::PoolExhausted { .. } => "53300",
            BackendError::Paused { .. } => "57P03",
            BackendError::Server { error, .. } => error.sqlstate,
            BackendError::Auth { .. } => "28000",
            BackendError::Protocol { .. } => "08P01",
            BackendError::QueryTimeout { .. } => "57014",
        }
    }

    /// Name of the shard the error is about.
    pub fn shard(&self) -> &str {
        match self {
            BackendError::Unavailable { shard, .. }
            | BackendError::ConnectTimeout { shard, .. }
            | BackendError::PoolExhausted { shard, .. }
            | BackendError::Paused { shard, .. }
            | BackendError::Server { shard, .. }
            | BackendError::Auth { shard, .. }
            | BackendError::Protocol { shard, .. }
            | BackendError::Broken { shard }
            | BackendError::QueryTimeout { shard, .. } => shard,
        }
    }

    /// True when the shard itself is unreachable (as opposed to busy or
    /// rejecting us); what a `backend_up` gauge wants to know.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            BackendError::Unavailable { .. } | BackendError::ConnectTimeout { .. }
        )
    }
}

/// The fields of a backend ErrorResponse (boxed in [`BackendError::Server`]
/// to keep the error small).
#[derive(Debug, Clone)]
pub struct ServerError {
    pub sqlstate: &'static str,
    /// `FATAL`, `ERROR`, ... (the non-localized severity when sent).
    pub severity: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// `5s`, `1500ms`: how durations appear in the shard map, so messages match it.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// `0.4 ms`, `170 ms`, `2.05 s`: how long something actually took, for
/// messages that must not be confused with a configured limit.
pub(crate) fn fmt_elapsed(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// Turn a SQLSTATE sent by a backend into a `&'static str`.
///
/// `sqlstate()` returns `&'static str` so callers can keep codes around
/// freely. Common codes come from a table; anything else that is
/// well-formed (5 of `[0-9A-Z]`) is interned, at most [`MAX_INTERNED`]
/// distinct codes per process so a misbehaving server cannot grow memory
/// without bound. Malformed or overflow codes fall back to `XX000`.
pub fn intern_sqlstate(code: &[u8]) -> &'static str {
    const KNOWN: &[&str] = &[
        "08006", "08001", "08004", "08P01", "0A000", "25P02", "28000", "28P01", "3D000", "40001",
        "40P01", "42501", "42601", "42P01", "53300", "57014", "57P01", "57P02", "57P03", "XX000",
    ];
    let valid = code.len() == 5
        && code
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    let Some(code) = std::str::from_utf8(code).ok().filter(|_| valid) else {
        return "XX000";
    };
    if let Some(known) = KNOWN.iter().find(|k| **k == code) {
        return known;
    }
    static INTERNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut guard = match INTERNED.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let set = guard.get_or_insert_with(HashSet::new);
    if let Some(existing) = set.get(code) {
        return existing;
    }
    if set.len() >= MAX_INTERNED {
        return "XX000";
    }
    let leaked: &'static str = Box::leak(code.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// Bound on distinct interned SQLSTATEs (Postgres defines about 260).
const MAX_INTERNED: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_shard_and_limits() {
        let e = BackendError::Unavailable {
            shard: "s1".into(),
            addr: "127.0.0.1:5433".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "shard s1 (127.0.0.1:5433) is unavailable: connection refused"
        );
        assert_eq!(e.sqlstate(), "08006");
        let e = BackendError::PoolExhausted {
            shard: "s1".into(),
            timeout: Duration::from_secs(5),
            size: 20,
        };
        assert_eq!(
            e.to_string(),
            "too many clients waiting for shard s1: no connection free within 5s (pool size 20)"
        );
        assert_eq!(e.sqlstate(), "53300");
        let e = BackendError::ConnectTimeout {
            shard: "s0".into(),
            addr: "10.0.0.1:5432".into(),
            timeout: Duration::from_millis(1500),
        };
        assert!(e
            .to_string()
            .contains("no answer within connect_timeout (1500ms)"));
        assert_eq!(fmt_elapsed(Duration::from_micros(400)), "0.4 ms");
        assert_eq!(fmt_elapsed(Duration::from_millis(170)), "170 ms");
        assert_eq!(fmt_elapsed(Duration::from_millis(2046)), "2.05 s");
        assert_eq!(e.sqlstate(), "08006");
    }

    #[test]
    fn sqlstates_are_interned_or_rejected() {
        assert_eq!(intern_sqlstate(b"28P01"), "28P01");
        assert_eq!(intern_sqlstate(b"22012"), "22012");
        assert!(std::ptr::eq(
            intern_sqlstate(b"22012"),
            intern_sqlstate(b"22012")
        ));
        assert_eq!(intern_sqlstate(b"abc"), "XX000");
        assert_eq!(intern_sqlstate(b"2801\xff"), "XX000");
        assert_eq!(intern_sqlstate(b"28p01"), "XX000");
    }
}
