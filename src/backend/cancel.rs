//! CancelRequest: how a client's cancel reaches the backend running its query.
//!
//! Postgres accepts a cancel only on a fresh connection carrying the
//! backend's pid and secret key (from BackendKeyData), so the proxy maps the
//! client's key to the backend's and sends this on the client's behalf.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connection::{open_stream, Stream};
use crate::config::ShardConfig;

/// Bound on connecting and sending: a cancel that cannot be delivered
/// promptly is useless, and the caller must not hang on a dead shard.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on waiting for the server to close after the request; the server
/// closes once it has signalled the backend, so waiting makes the cancel
/// effectively synchronous without depending on it.
const CANCEL_LINGER: Duration = Duration::from_secs(1);

/// Open a new connection to `shard`, send CancelRequest (length 16, code
/// 80877102, pid, secret) and close it. The server sends no reply.
pub async fn send_cancel(
    shard: &ShardConfig,
    backend_pid: i32,
    secret: i32,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(16);
    frontend::cancel_request(backend_pid, secret, &mut buf);
    let send = async {
        let mut stream = open_stream(&shard.host, shard.port).await?;
        stream.write_all(&buf).await?;
        Ok::<Stream, std::io::Error>(stream)
    };
    let mut stream = match tokio::time::timeout(CANCEL_TIMEOUT, send).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "cancel request to shard {} not delivered within {:?}",
                    shard.name, CANCEL_TIMEOUT
                ),
            ))
        }
    };
    let mut sink = [0u8; 64];
    // Errors or timeout here do not matter: the request was written.
    let _ = tokio::time::timeout(CANCEL_LINGER, stream.read(&mut sink)).await;
    Ok(())
}

/// [`send_cancel`] without waiting for it: for a backend being given up on
/// (past `query_timeout`), which a hung server may never let us reach.
pub fn send_cancel_in_background(shard: ShardConfig, backend_pid: i32, secret: i32) {
    tokio::spawn(async move {
        let _ = send_cancel(&shard, backend_pid, secret).await;
    });
}
