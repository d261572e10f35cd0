//! Multi-shard portals fetched in parts: Execute with `max_rows` > 0, as
//! JDBC's fetch size, asyncpg cursors and psycopg's named cursors do.
//!
//! Postgres answers such an Execute with at most `max_rows` DataRows and
//! PortalSuspended, and the next Execute continues where it stopped. The
//! fan-out executor produces a whole result, so shardgate runs it in a task
//! of its own that owns the shard connections and writes the merged
//! protocol stream into a small channel. The session takes rows from that
//! stream as the client asks for them; while the client does not ask, the
//! channel stays full, the task waits, and the shards wait on their sockets:
//! a result fetched in parts is streamed, never held whole.
//!
//! The shard connections are busy while the fan-out streams. When the
//! client sends anything else that needs a backend (another statement of
//! its transaction, between two fetches), the rest of the stream is read
//! into memory first ("parked", bounded by `max_merge_memory`, 53200
//! beyond) and the connections come back to the session; later Executes
//! are served from memory. Writes that commit with two-phase commit are
//! buffered anyway (their answer waits for the commit), as Postgres itself
//! runs a DML statement to completion before handing out its RETURNING rows.
//!
//! Lifetime as in Postgres: a portal created outside a transaction block
//! ends at Sync, one created inside ends with the transaction; Close ends
//! it early (the rest is cancelled or drained); the unnamed portal is
//! replaced by the next Bind.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use super::{Attached, Session};
use crate::executor::fanout::{self, tag_count, FanoutOutcome};
use crate::metrics;
use crate::protocol::messages::{self, Target};
use crate::protocol::synth::{self, ProxyError};
use crate::protocol::tag;

/// Chunks (each up to the executor's 32 KiB flush size) the fan-out task
/// may run ahead of the client.
const CHANNEL_CHUNKS: usize = 2;

/// A multi-shard portal that has answered at least one Execute.
pub(super) struct SuspendedPortal {
    name: String,
    /// Created inside a transaction block (lives until it ends) or not
    /// (lives until Sync).
    pub(super) in_transaction: bool,
    /// Merged protocol frames not yet sent to the client.
    buffered: BytesMut,
    /// The RowDescription, for a Describe(portal) after the first Execute.
    description: Option<Bytes>,
    /// The statement returned rows: the final CommandComplete then counts
    /// the rows of the last Execute, as Postgres' does.
    returns_rows: bool,
    /// The error that ended the fan-out, reported where its rows end.
    failure: Option<ProxyError>,
    /// All rows were fetched: a further Execute answers no rows and this
    /// tag head with 0, as Postgres does for a portal at its end.
    exhausted: Option<String>,
    /// The fan-out still running, when the stream is not all in `buffered`.
    live: Option<Live>,
}

/// A fan-out running in its own task for a suspended portal.
pub(super) struct Live {
    rx: mpsc::Receiver<Bytes>,
    task: JoinHandle<LiveEnd>,
    /// (shard, pid, secret) of the shard connections, for CancelRequests
    /// while the client waits for a part.
    cancel_keys: Vec<(usize, i32, i32)>,
    /// What the session needs to take the connections back.
    context: LiveContext,
    started: Instant,
}

/// What the fan-out task hands back.
pub(super) struct LiveEnd {
    pub(super) group: Vec<Attached>,
    pub(super) result: Result<FanoutOutcome, ProxyError>,
    /// Per shard of the statement: whether it may have written.
    pub(super) wrote: Vec<(usize, bool)>,
}

/// The sending half of the stream, as the executor's client writer.
pub(super) struct ChannelWriter {
    tx: PollSender<Bytes>,
}

impl ChannelWriter {
    /// A writer and the receiving end of its stream.
    pub(super) fn channel() -> (ChannelWriter, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (
            ChannelWriter {
                tx: PollSender::new(tx),
            },
            rx,
        )
    }
}

/// A portal's rows go to the session through a channel; the session
/// watches the client itself.
impl crate::executor::fanout::ClientSink for ChannelWriter {}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let gone = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        match self.tx.poll_reserve(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(gone())),
            Poll::Ready(Ok(())) => match self.tx.send_item(Bytes::copy_from_slice(buf)) {
                Ok(()) => Poll::Ready(Ok(buf.len())),
                Err(_) => Poll::Ready(Err(gone())),
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl SuspendedPortal {
    /// A portal whose whole answer is already known (a committed write).
    pub(super) fn buffered(name: &str, in_transaction: bool, frames: BytesMut) -> Self {
        SuspendedPortal {
            name: name.to_string(),
            in_transaction,
            buffered: frames,
            description: None,
            returns_rows: false,
            failure: None,
            exhausted: None,
            live: None,
        }
    }

    /// A portal streaming from a running fan-out.
    pub(super) fn live(
        name: &str,
        rx: mpsc::Receiver<Bytes>,
        task: JoinHandle<LiveEnd>,
        live: LiveContext,
        cancel_keys: Vec<(usize, i32, i32)>,
    ) -> Self {
        let in_transaction = live.in_transaction;
        SuspendedPortal {
            live: Some(Live {
                rx,
                task,
                cancel_keys,
                context: live,
                started: Instant::now(),
            }),
            ..SuspendedPortal::buffered(name, in_transaction, BytesMut::new())
        }
    }

    pub(super) fn is(&self, name: &str) -> bool {
        self.name == name
    }

    pub(super) fn is_live(&self) -> bool {
        self.live.is_some()
    }
}

/// Where the session's backends were before a live fan-out took them.
pub(super) struct LiveContext {
    pub(super) current_shard: Option<usize>,
    pub(super) in_transaction: bool,
    /// The shards the fan-out runs on (for the metrics).
    pub(super) shards: Vec<usize>,
    pub(super) broadcast: bool,
}

/// `FETCH` / `MOVE` as far as shardgate needs it.
#[derive(Debug, PartialEq, Eq)]
struct CursorCommand {
    fetch: bool,
    /// Rows forward (0: ALL); None for any other direction.
    forward: Option<i32>,
    portal: String,
}

impl CursorCommand {
    /// `FETCH|MOVE [direction] [FROM|IN] name` (Postgres' grammar); None
    /// for any other statement.
    fn parse(sql: &str) -> Option<CursorCommand> {
        let sql = sql.trim().trim_end_matches(';').trim_end();
        let mut words: Vec<&str> = sql.split_ascii_whitespace().collect();
        let fetch = match words.first()?.to_ascii_lowercase().as_str() {
            "fetch" => true,
            "move" => false,
            _ => return None,
        };
        let name = words.pop()?;
        let portal = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_ascii_lowercase(),
        };
        let mut rest: Vec<String> = words
            .get(1..)
            .unwrap_or_default()
            .iter()
            .map(|w| w.to_ascii_lowercase())
            .collect();
        if matches!(rest.last().map(String::as_str), Some("from" | "in")) {
            rest.pop();
        }
        let count = |w: &str| w.parse::<i32>().ok().filter(|n| *n > 0);
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let forward = match rest[..] {
            [] | ["next"] | ["forward"] => Some(1),
            ["all"] | ["forward", "all"] => Some(0),
            // 0 re-reads the current row, negative counts go backward.
            [n] | ["forward", n] => count(n),
            _ => None,
        };
        Some(CursorCommand {
            fetch,
            forward,
            portal,
        })
    }
}

/// How far one Execute got in the buffered frames.
enum Served {
    /// `max_rows` rows sent: PortalSuspended.
    Suspended,
    /// The statement's CommandComplete was sent.
    Completed,
    /// No complete frame left in the buffer.
    NeedMore,
}

/// Moves frames from the portal's buffer to `out` until `max_rows` DataRows
/// (0: no limit) were sent this Execute, or the statement completed.
fn take_frames(
    portal: &mut SuspendedPortal,
    max_rows: i32,
    delivered: &mut i64,
    out: &mut BytesMut,
) -> Served {
    if let Some(head) = &portal.exhausted {
        synth::command_complete(out, &format!("{head} 0"));
        return Served::Completed;
    }
    loop {
        if max_rows > 0 && *delivered >= i64::from(max_rows) {
            // PortalSuspended.
            out.extend_from_slice(&[b's', 0, 0, 0, 4]);
            return Served::Suspended;
        }
        let Some(len) = complete_frame(&portal.buffered) else {
            return Served::NeedMore;
        };
        let frame = portal.buffered.split_to(len);
        match frame[0] {
            b'D' => {
                *delivered += 1;
                portal.returns_rows = true;
                out.extend_from_slice(&frame);
            }
            b'T' => {
                portal.returns_rows = true;
                let frame = frame.freeze();
                out.extend_from_slice(&frame);
                portal.description = Some(frame);
            }
            b'C' => {
                let tag = frame
                    .get(5..frame.len().saturating_sub(1))
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .unwrap_or("");
                if portal.returns_rows {
                    // Postgres counts the rows of this Execute only.
                    let (head, _) = tag_count(tag);
                    synth::command_complete(out, &format!("{head} {delivered}"));
                    portal.exhausted = Some(head.to_string());
                } else {
                    out.extend_from_slice(&frame);
                }
                return Served::Completed;
            }
            _ => out.extend_from_slice(&frame),
        }
    }
}

/// Length of the first frame in `buf` when it is all there.
fn complete_frame(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize + 1;
    (buf.len() >= len && len >= 5).then_some(len)
}

impl Session {
    /// Index of the suspended portal `name`.
    pub(super) fn suspended_portal(&self, name: &str) -> Option<usize> {
        self.suspended.iter().position(|p| p.is(name))
    }

    /// The transaction block ended: its portals end with it. (A portal
    /// still streaming holds the connections and is ended by the statement
    /// that parks it, never by a status change.)
    pub(super) fn drop_ended_transaction_portals(&mut self) {
        self.suspended.retain(|p| !p.in_transaction || p.is_live());
    }

    /// Whether a portal still streams from shard connections it holds.
    pub(super) fn has_live_portal(&self) -> bool {
        self.suspended.iter().any(SuspendedPortal::is_live)
    }

    /// Whether a client message needs the shard connections a live portal
    /// holds. Fetches of the suspended portal itself, Sync, Flush and a
    /// Parse shardgate answers itself do not.
    pub(super) fn needs_backends(&self, tag: u8, body: &[u8]) -> bool {
        match tag {
            tag::SYNC | tag::FLUSH | tag::TERMINATE => false,
            // Routing mode answers every Parse itself.
            tag::PARSE => self.shared.router.is_none(),
            tag::QUERY => messages::query_text(body)
                .ok()
                .and_then(CursorCommand::parse)
                .is_none_or(|c| self.suspended_portal(&c.portal).is_none()),
            tag::EXECUTE => {
                let name = messages::Cursor::new(tag, body).cstr().unwrap_or("\u{0}");
                self.suspended_portal(name).is_none()
            }
            tag::DESCRIBE | tag::CLOSE => match Target::decode(tag, body) {
                Ok(t) => !(t.kind == b'P' && self.suspended_portal(t.name).is_some()),
                Err(_) => true,
            },
            _ => true,
        }
    }

    /// Execute of a suspended portal: up to `max_rows` rows of its stream
    /// (0: all the rest), then PortalSuspended or its CommandComplete.
    pub(super) async fn serve_portal(&mut self, index: usize, max_rows: i32) {
        let _ = self.advance_portal(index, max_rows, false).await;
    }

    /// Takes up to `max_rows` rows (0: all) of a suspended portal's stream:
    /// to the client with PortalSuspended / CommandComplete, or, for SQL
    /// `MOVE` (`discard`), dropped and counted. Returns the rows taken, or
    /// None when the fan-out's error was reported instead.
    async fn advance_portal(&mut self, index: usize, max_rows: i32, discard: bool) -> Option<i64> {
        // No backend is attached: take the output buffer from the pool it
        // is parked in between parts.
        crate::frontend::buffers::ensure(&mut self.client_out);
        if let Some(live) = self.suspended.get(index).and_then(|p| p.live.as_ref()) {
            self.cancel.set_fanout(live.cancel_keys.clone());
        }
        let taken = self.take_rows(index, max_rows, discard).await;
        if self.has_live_portal() {
            // Idle again between parts (a finished fan-out cleared it).
            self.cancel.set_fanout(Vec::new());
        }
        taken
    }

    async fn take_rows(&mut self, index: usize, max_rows: i32, discard: bool) -> Option<i64> {
        let mut delivered = 0i64;
        let mut scratch = BytesMut::new();
        loop {
            let portal = self.suspended.get_mut(index)?;
            let out = if discard {
                scratch.clear();
                &mut scratch
            } else {
                &mut self.client_out
            };
            match take_frames(portal, max_rows, &mut delivered, out) {
                Served::Suspended => return Some(delivered),
                Served::Completed => {
                    if let Some(live) = portal.live.take() {
                        // The task ends right after its CommandComplete.
                        let ended = finish_live(live, false).await;
                        let _ = self.conclude_live(ended).await;
                    }
                    // A portal at its end stays until Sync / transaction end
                    // / Close when it returned rows (Execute again: 0 rows).
                    if self
                        .suspended
                        .get(index)
                        .is_some_and(|p| p.exhausted.is_none())
                    {
                        self.suspended.remove(index);
                    }
                    return Some(delivered);
                }
                Served::NeedMore => {}
            }
            let next = match portal.live.as_mut() {
                Some(live) => live.rx.recv().await,
                None => None,
            };
            match next {
                Some(chunk) => {
                    portal.buffered.extend_from_slice(&chunk);
                    if self.client_out.len() >= fanout::engine::FLUSH_AT
                        && self.flush_client().await.is_err()
                    {
                        // The client is gone; the session ends at its next read.
                        self.client_out.clear();
                    }
                }
                None => match portal.live.take() {
                    Some(live) => {
                        let ended = finish_live(live, false).await;
                        let failure = self.conclude_live(ended).await;
                        if let Some(portal) = self.suspended.get_mut(index) {
                            portal.failure = portal.failure.take().or(failure);
                        }
                    }
                    None => {
                        // The stream ended without a CommandComplete: its error.
                        let portal = self.suspended.remove(index);
                        let error = portal.failure.unwrap_or_else(|| {
                            ProxyError::error(
                                "XX000",
                                "a multi-shard result ended without completion",
                            )
                        });
                        // Skips to Sync (or ends the simple query) and, in a
                        // transaction block, aborts it on the backend too,
                        // as the error would have in Postgres.
                        self.report(error, !discard);
                        return None;
                    }
                },
            }
        }
    }

    /// SQL `MOVE` / `FETCH` naming a suspended portal (asyncpg's
    /// `Cursor.forward` sends `MOVE FORWARD n portal`). MOVE forward is
    /// answered from the stream; FETCH and backward moves are refused.
    /// Returns false when `sql` is no such statement.
    pub(super) async fn cursor_statement(&mut self, sql: &str) -> bool {
        let Some(command) = CursorCommand::parse(sql) else {
            return false;
        };
        let Some(index) = self.suspended_portal(&command.portal) else {
            return false;
        };
        let count = match command.forward {
            Some(count) if !command.fetch => count,
            _ => {
                let error = if command.fetch {
                    ProxyError::error("0A000", "FETCH from a multi-shard portal is not supported")
                        .with_hint(
                            "fetch its rows with Execute (a row limit), or use MOVE to skip rows",
                        )
                } else {
                    ProxyError::error("55000", "cursor can only scan forward")
                };
                self.report(error, false);
                return true;
            }
        };
        if let Some(moved) = self.advance_portal(index, count, true).await {
            let mut out = BytesMut::new();
            synth::command_complete(&mut out, &format!("MOVE {moved}"));
            synth::ready_for_query(&mut out, self.status);
            self.queue.local(out, &mut self.client_out);
        }
        true
    }

    /// Describe of a suspended portal: its RowDescription again (NoData
    /// when it returns no rows).
    pub(super) fn describe_suspended(&mut self, index: usize) {
        let mut out = BytesMut::new();
        match self
            .suspended
            .get(index)
            .and_then(|p| p.description.clone())
        {
            Some(description) => out.extend_from_slice(&description),
            None => out.extend_from_slice(&[b'n', 0, 0, 0, 4]),
        }
        self.queue.local(out, &mut self.client_out);
    }

    /// Reads the rest of a live portal's stream into memory so its shard
    /// connections come back (another statement needs them). Past
    /// `max_merge_memory` the fan-out is stopped and the portal fails with
    /// 53200 where its buffered rows end.
    pub(super) async fn park_live_portals(&mut self) {
        let limit = self.shared.fanout.max_merge_memory();
        for index in 0..self.suspended.len() {
            let Some(live) = self.suspended[index].live.take() else {
                continue;
            };
            let mut live = live;
            let mut over = false;
            while let Some(chunk) = live.rx.recv().await {
                let portal = &mut self.suspended[index];
                portal.buffered.extend_from_slice(&chunk);
                if portal.buffered.len() as u64 > limit {
                    over = true;
                    break;
                }
            }
            let ended = finish_live(live, over).await;
            let failure = self.conclude_live(ended).await;
            let portal = &mut self.suspended[index];
            if over {
                portal.failure = Some(
                    ProxyError::error(
                        "53200",
                        format!(
                            "a multi-shard result fetched in parts had to be held in memory (another \
                             statement needed its shard connections) and exceeds max_merge_memory \
                             ({limit} bytes)"
                        ),
                    )
                    .with_hint(
                        "fetch the whole result before running other statements, or raise \
                         max_merge_memory",
                    ),
                );
            } else {
                portal.failure = portal.failure.take().or(failure);
            }
        }
    }

    /// Ends portals: `keep` says which stay. Live ones are stopped (their
    /// autocommit work cancelled, the rest drained) and their connections
    /// taken back.
    pub(super) async fn close_portals(&mut self, keep: impl Fn(&SuspendedPortal) -> bool) {
        let mut index = 0;
        while index < self.suspended.len() {
            if keep(&self.suspended[index]) {
                index += 1;
                continue;
            }
            let portal = self.suspended.remove(index);
            if let Some(live) = portal.live {
                let end = finish_live(live, true).await;
                // A stopped fan-out's error (its client went away) is no error.
                let _ = self.conclude_live(end).await;
            }
        }
    }

    /// Takes back the connections of a finished live fan-out; returns the
    /// fan-out's error (None when it succeeded or was stopped on purpose).
    async fn conclude_live(&mut self, ended: Ended) -> Option<ProxyError> {
        let Ended {
            end:
                LiveEnd {
                    mut group,
                    result,
                    wrote,
                },
            context: live,
            started,
            stopped,
        } = ended;
        for (shard, wrote) in wrote {
            if let Some(a) = group.iter_mut().find(|a| a.shard == shard) {
                a.wrote |= wrote;
            }
        }
        self.shared.metrics.multi_query_done(
            &live.shards,
            if live.broadcast {
                metrics::Route::Broadcast
            } else {
                metrics::Route::Fanout
            },
            started.elapsed(),
        );
        let error = match result {
            Err(error) if !stopped => Some(error),
            _ => None,
        };
        self.restore_group(group, live.current_shard, live.in_transaction)
            .await;
        error
    }
}

/// A live fan-out whose task ended.
pub(super) struct Ended {
    end: LiveEnd,
    context: LiveContext,
    started: Instant,
    /// The session stopped it (its error, if any, is not the client's).
    stopped: bool,
}

/// Waits for a live fan-out's task. `stop`: the stream is not wanted any
/// more (dropping the receiver makes the executor stop merging, cancel
/// autocommit work and drain the shards).
async fn finish_live(live: Live, stop: bool) -> Ended {
    let Live {
        rx,
        task,
        context,
        started,
        ..
    } = live;
    drop(rx);
    let end = task.await.unwrap_or_else(|e| LiveEnd {
        // The task panicked: its connections are gone with it.
        group: Vec::new(),
        result: Err(ProxyError::error(
            "XX000",
            format!("the multi-shard statement failed internally: {e}"),
        )),
        wrote: Vec::new(),
    });
    Ended {
        end,
        context,
        started,
        stopped: stop,
    }
}

/// Frames of a stream, for tests.
#[cfg(test)]
fn frames(mut buf: &[u8]) -> Vec<u8> {
    use bytes::Buf;
    let mut tags = Vec::new();
    while let Some(len) = complete_frame(buf) {
        tags.push(buf[0]);
        buf.advance(len);
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: usize, tag: &str) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[b'T', 0, 0, 0, 6, 0, 0]);
        for _ in 0..rows {
            b.extend_from_slice(&[b'D', 0, 0, 0, 6, 0, 0]);
        }
        synth::command_complete(&mut b, tag);
        b
    }

    #[test]
    fn rows_are_handed_out_in_parts_with_postgres_counts() {
        let mut p = SuspendedPortal::buffered("", false, stream(5, "SELECT 5"));
        let mut out = BytesMut::new();
        let mut n = 0;
        assert!(matches!(
            take_frames(&mut p, 2, &mut n, &mut out),
            Served::Suspended
        ));
        assert_eq!(frames(&out), b"TDDs");
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 2, &mut n, &mut out),
            Served::Suspended
        ));
        assert_eq!(frames(&out), b"DDs");
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 2, &mut n, &mut out),
            Served::Completed
        ));
        assert_eq!(frames(&out), b"DC");
        assert!(out.ends_with(b"SELECT 1\0"));
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 2, &mut n, &mut out),
            Served::Completed
        ));
        assert_eq!(frames(&out), b"C");
        assert!(out.ends_with(b"SELECT 0\0"));
    }

    #[test]
    fn exactly_max_rows_left_suspends_then_completes_with_zero() {
        let mut p = SuspendedPortal::buffered("", false, stream(2, "SELECT 2"));
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 2, &mut n, &mut out),
            Served::Suspended
        ));
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 2, &mut n, &mut out),
            Served::Completed
        ));
        assert!(out.ends_with(b"SELECT 0\0"));
    }

    #[test]
    fn statements_without_rows_keep_their_tag() {
        let mut b = BytesMut::new();
        synth::command_complete(&mut b, "UPDATE 7");
        let mut p = SuspendedPortal::buffered("", false, b);
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 1, &mut n, &mut out),
            Served::Completed
        ));
        assert!(out.ends_with(b"UPDATE 7\0"));
    }

    #[test]
    fn cursor_commands() {
        let cmd = |fetch, forward, portal: &str| {
            Some(CursorCommand {
                fetch,
                forward,
                portal: portal.to_string(),
            })
        };
        let parse = CursorCommand::parse;
        assert_eq!(
            parse("MOVE FORWARD 10 __asyncpg_p1__"),
            cmd(false, Some(10), "__asyncpg_p1__")
        );
        assert_eq!(parse("move 5 in C1;"), cmd(false, Some(5), "c1"));
        assert_eq!(parse("MOVE \"My\"\"C\""), cmd(false, Some(1), "My\"C"));
        assert_eq!(parse("MOVE ALL FROM c"), cmd(false, Some(0), "c"));
        assert_eq!(parse("MOVE BACKWARD 2 c"), cmd(false, None, "c"));
        assert_eq!(parse("MOVE ABSOLUTE 2 c"), cmd(false, None, "c"));
        assert_eq!(parse("MOVE -1 c"), cmd(false, None, "c"));
        assert_eq!(parse("FETCH 3 FROM c"), cmd(true, Some(3), "c"));
        assert_eq!(parse("SELECT 1"), None);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let full = stream(1, "SELECT 1");
        let mut p = SuspendedPortal::buffered("", false, BytesMut::from(&full[..10]));
        let (mut out, mut n) = (BytesMut::new(), 0);
        assert!(matches!(
            take_frames(&mut p, 0, &mut n, &mut out),
            Served::NeedMore
        ));
        assert_eq!(frames(&out), b"T");
    }
}
