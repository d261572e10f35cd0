//! Whether a client is still there while shardgate waits for shards on its
//! behalf, told without reading its bytes: a peek at the socket.
//!
//! Postgres notices a vanished client only when it next writes or reads; a
//! proxy running a statement on several shards must notice sooner, or the
//! shards work to the end for nobody (#15-4).

use std::task::{Context, Poll};

use pgwire::tokio::server::MaybeTls;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

use crate::executor::fanout::{ClientSink, Presence};

/// A Terminate message: a client that sent it has nothing more to say.
pub const TERMINATE_FRAME: [u8; 5] = [b'X', 0, 0, 0, 4];

impl ClientSink for MaybeTls {
    fn poll_presence(&mut self, cx: &mut Context<'_>) -> Poll<Presence> {
        match self {
            MaybeTls::Plain(tcp) => peek_presence(tcp, cx),
            // Under TLS the peek sees records, not messages: EOF still shows.
            MaybeTls::Tls(tls) => peek_presence(tls.get_ref().0, cx),
            // No listener of shardgate's hands out other kinds.
            _ => Poll::Pending,
        }
    }
}

fn peek_presence(tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<Presence> {
    let mut probe = [0u8; 5];
    let mut buf = ReadBuf::new(&mut probe);
    match tcp.poll_peek(cx, &mut buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Presence::Gone),
        Poll::Ready(Ok(_)) if buf.filled() == TERMINATE_FRAME => Poll::Ready(Presence::Gone),
        Poll::Ready(Ok(_)) => Poll::Ready(Presence::Talking),
    }
}
