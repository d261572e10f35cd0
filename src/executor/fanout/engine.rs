//! The scatter/gather loop: send each target its batch, read every shard
//! concurrently (whichever has data), hand rows to a [`Merge`], stream the
//! merged output to the client, and always read each shard to its
//! ReadyForQuery (cancelling shards whose work is no longer needed).

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::{join_all, poll_fn, select_all, FutureExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::wire::{decode_row_description, Field, Row};
use super::{FanoutExecutor, ShardConn};
use crate::backend::send_cancel;
use crate::protocol::messages::ResultShape;
use crate::protocol::synth::ProxyError;
use crate::protocol::{next_frame, tag, MAX_BACKEND_MESSAGE};

/// Output is written to the client whenever it exceeds this, so large results stream.
pub const FLUSH_AT: usize = 32 * 1024;

/// A row with its decoded sort keys (empty when the merge does not sort).
pub struct Entry {
    pub row: Row,
    pub keys: Vec<Option<super::value::Key>>,
}

/// A merge primitive tree as the loop sees it.
pub trait Merge {
    /// k-way merge by [`Merge::less`] (true) or concatenation as rows arrive.
    fn ordered(&self) -> bool;
    /// Called once, when every shard has described its result (None: no rows).
    fn header(&mut self, fields: Option<&[Field]>, out: &mut BytesMut) -> Result<(), ProxyError>;
    /// Decodes what the merge needs of a row as it arrives (merges that
    /// do not sort need nothing).
    fn prepare(&self, row: Row) -> Result<Entry, ProxyError> {
        Ok(Entry {
            row,
            keys: Vec::new(),
        })
    }
    /// The k-way order (unused by merges that do not sort).
    fn less(&self, _a: &Entry, _b: &Entry) -> bool {
        false
    }
    /// Whether the columns this merge gets are the client's result (false
    /// for a step whose rows feed another: their columns are shardgate's).
    fn faces_client(&self) -> bool {
        true
    }
    /// The client's columns among the shards' (a merge that added hidden
    /// sort columns leaves them out).
    fn client_columns<'f>(&self, fields: &'f [Field]) -> &'f [Field] {
        fields
    }
    /// Called instead of [`Merge::header`] when the shards start COPY TO STDOUT.
    fn copy_header(&mut self, _response: &[u8], _out: &mut BytesMut) -> Result<(), ProxyError> {
        Err(
            ProxyError::error("0A000", "COPY started on a shard in a fan-out statement")
                .with_hint("COPY each shard with a routing hint"),
        )
    }
    /// Takes the next merged row from target `pos`; false = no more rows wanted.
    fn row(&mut self, pos: usize, entry: Entry, out: &mut BytesMut) -> Result<bool, ProxyError>;
}

/// Bytes of rows held by one fan-out, against `max_merge_memory`.
pub struct Memory {
    pub used: u64,
    pub limit: u64,
}

impl Memory {
    pub fn add(&mut self, n: usize) -> Result<(), ProxyError> {
        self.used += n as u64;
        if self.used > self.limit {
            return Err(ProxyError::error(
                "53200",
                format!(
                    "the cross-shard merge needs more than max_merge_memory ({} bytes)",
                    self.limit
                ),
            )
            .with_hint("add a LIMIT, aggregate fewer groups, restrict the query by the sharding key, or raise max_merge_memory"));
        }
        Ok(())
    }
    pub fn sub(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n as u64);
    }
}

/// One target's side of the exchange.
struct Stream {
    buf: BytesMut,
    rows: VecDeque<Entry>,
    fields: Option<Vec<Field>>,
    /// CopyOutResponse body, for COPY TO STDOUT.
    copy: Option<Bytes>,
    described: bool,
    tags: Vec<String>,
    /// No more rows will come (CommandComplete, EmptyQuery, error, dead).
    finished: bool,
    ready: Option<u8>,
    dead: bool,
    canceled: bool,
    entry_status: u8,
    error: Option<ProxyError>,
    name: String,
    /// The shard's index (its type OIDs are translated to the first shard's).
    shard: usize,
    /// NoticeResponse frames to pass on (first target only: the shards run
    /// the same statement, so their notices repeat).
    notices: Option<Vec<Bytes>>,
}

/// What the shards said, besides the rows.
pub struct Gathered {
    pub tags: Vec<Vec<String>>,
    pub statuses: Vec<u8>,
}

/// What a client's connection showed while the shards were working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Closed (EOF, an error, or a Terminate as its last words).
    Gone,
    /// It sent more (a pipeline): still there; watching stops here, since
    /// telling EOF apart would mean reading those bytes.
    Talking,
}

/// Where merged output goes: a client's socket, or a buffer. A socket also
/// tells when its client vanished while the shards were still working and
/// nothing was being written (a long aggregate, `pg_sleep`): their
/// statements are then cancelled instead of running to the end.
pub trait ClientSink: AsyncWrite + Unpin {
    /// Ready with what the connection showed; pending while it is quiet.
    /// The default is never ready: buffers and channels have no peer.
    fn poll_presence(&mut self, _cx: &mut Context<'_>) -> Poll<Presence> {
        Poll::Pending
    }
}

impl ClientSink for Vec<u8> {}

/// Where the merged output goes.
pub struct Output<'o, W> {
    pub out: &'o mut BytesMut,
    pub client: &'o mut W,
    pub client_lost: bool,
    /// Write merged output before every wait for the shards.
    pub eager: bool,
    /// Watch the client for a close while waiting for the shards.
    pub watching: bool,
    /// The result columns the client was told (see `FanoutProtocol`).
    pub expected_shape: Option<u64>,
}

impl<W: ClientSink> Output<'_, W> {
    pub async fn flush_if_full(&mut self) {
        if self.out.len() >= FLUSH_AT {
            self.flush().await;
        }
    }
    pub async fn flush(&mut self) {
        if self.client_lost {
            self.out.clear();
            return;
        }
        if !self.out.is_empty() && self.client.write_all(self.out).await.is_err() {
            self.client_lost = true;
        }
        self.out.clear();
    }
}

/// Sends `batches[i]` (None: nothing) to `targets[i]` and merges the answers.
pub async fn gather<W: ClientSink, M: Merge>(
    ex: &FanoutExecutor,
    targets: &mut [ShardConn<'_>],
    batches: &[Option<BytesMut>],
    merge: &mut M,
    output: &mut Output<'_, W>,
    memory: &mut Memory,
) -> Result<Gathered, ProxyError> {
    let mut streams: Vec<Stream> = targets
        .iter()
        .map(|t| Stream {
            buf: BytesMut::with_capacity(16 * 1024),
            rows: VecDeque::new(),
            fields: None,
            copy: None,
            described: false,
            tags: Vec::new(),
            finished: false,
            ready: None,
            dead: false,
            canceled: false,
            entry_status: t.conn.transaction_status(),
            error: None,
            name: t.conn.shard_name().to_string(),
            shard: 0,
            notices: None,
        })
        .collect();
    if let Some(first) = streams.first_mut() {
        first.notices = Some(Vec::new());
    }
    let type_oids = ex.type_oids().get();
    for (i, t) in targets.iter_mut().enumerate() {
        streams[i].shard = t.shard;
        match batches.get(i).and_then(|b| b.as_ref()) {
            None => {
                let s = &mut streams[i];
                s.finished = true;
                s.described = true;
                s.ready = Some(t.conn.transaction_status());
            }
            Some(batch) => {
                let translated;
                let batch = match &type_oids {
                    // Declared parameter types in this shard's OIDs.
                    Some(map) => {
                        let mut copy = batch.clone();
                        map.rewrite_parse_frames(t.shard, &mut copy);
                        translated = copy;
                        &translated
                    }
                    None => batch,
                };
                if t.conn.write_all(batch).await.is_err() {
                    let s = &mut streams[i];
                    s.dead = true;
                    s.finished = true;
                    s.described = true;
                    s.error = Some(lost(&s.name));
                }
            }
        }
    }
    let deadline = Some(ex.query_timeout())
        .filter(|t| !t.is_zero())
        .map(|t| tokio::time::Instant::now() + t);
    let mut first_error: Option<ProxyError> = streams.iter().find_map(|s| s.error.clone());
    let mut draining = first_error.is_some();
    let mut header_done = false;
    let mut want_more = true;
    if draining {
        cancel_unfinished(ex, targets, &mut streams, true).await;
    }
    loop {
        // Parse what has arrived.
        for (i, s) in streams.iter_mut().enumerate() {
            if let Err(e) = pump(
                s,
                merge,
                memory,
                draining || !want_more,
                type_oids.as_deref(),
            ) {
                targets[i].conn.mark_broken();
                s.dead = true;
                s.finished = true;
                s.described = true;
                s.error.get_or_insert(e);
            }
        }
        if let Some(notices) = streams.first_mut().and_then(|s| s.notices.as_mut()) {
            for n in notices.drain(..) {
                output.out.extend_from_slice(&n);
            }
        }
        // Errors end the merge: cancel the rest and drain.
        for s in streams.iter_mut() {
            if let Some(e) = s.error.take() {
                let ignorable = s.canceled && e.code == "57014";
                if !ignorable && first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
        if first_error.is_some() && !draining {
            draining = true;
            cancel_unfinished(ex, targets, &mut streams, true).await;
        }
        if draining {
            for s in streams.iter_mut() {
                for e in s.rows.drain(..) {
                    memory.sub(e.row.footprint());
                }
            }
        }
        // Header once every shard has described its result.
        if !draining && !header_done && streams.iter().all(|s| s.described) {
            header_done = true;
            let result = agree(&streams)
                .and_then(|fields| {
                    expected_columns(&*merge, fields, output.expected_shape)?;
                    Ok(fields)
                })
                .and_then(|fields| match agree_copy(&streams)? {
                    Some(response) => merge.copy_header(response, output.out),
                    None => merge.header(fields, output.out),
                })
                .and_then(|()| {
                    // Rows that arrived with the description were decoded
                    // before the merge knew the column types: decode again.
                    for s in streams.iter_mut() {
                        let queued: Vec<Entry> = s.rows.drain(..).collect();
                        for e in queued {
                            s.rows.push_back(merge.prepare(e.row)?);
                        }
                    }
                    Ok(())
                });
            if let Err(e) = result {
                first_error = Some(e);
                draining = true;
                cancel_unfinished(ex, targets, &mut streams, true).await;
                continue;
            }
        }
        // Merge.
        if header_done && !draining && want_more {
            let more = match emit(merge, &mut streams, memory, output.out) {
                Ok(more) => more,
                Err(e) => {
                    first_error = Some(e);
                    draining = true;
                    cancel_unfinished(ex, targets, &mut streams, true).await;
                    continue;
                }
            };
            output.flush_if_full().await;
            if !more || output.client_lost {
                // No more rows wanted: the window is full, or nobody takes
                // them (the client left, or the session dropped a portal
                // fetched in parts). Read the shards to their end; only
                // autocommit work is cancelled: a cancel inside a
                // transaction block would abort the transaction.
                want_more = false;
                for s in streams.iter_mut() {
                    for e in s.rows.drain(..) {
                        memory.sub(e.row.footprint());
                    }
                }
                cancel_unfinished(ex, targets, &mut streams, false).await;
            }
        }
        if streams.iter().all(|s| s.ready.is_some() || s.dead) {
            break;
        }
        // Read from the shards that can make progress.
        let discard = draining || !want_more;
        let mut reads = Vec::new();
        for (i, (t, s)) in targets.iter_mut().zip(streams.iter_mut()).enumerate() {
            if s.ready.is_some() || s.dead {
                continue;
            }
            if !discard && !s.rows.is_empty() {
                continue;
            }
            let conn = &mut *t.conn;
            let buf = &mut s.buf;
            reads.push(async move { (i, conn.read_buf(buf).await) }.boxed());
        }
        if reads.is_empty() {
            drop(reads);
            // Every unfinished shard has rows the merge has not taken: only
            // possible before the header, when a shard has not described yet.
            first_error.get_or_insert_with(|| {
                ProxyError::error("XX000", "fan-out merge stalled (internal error)")
            });
            if !draining {
                draining = true;
                cancel_unfinished(ex, targets, &mut streams, true).await;
            }
            continue;
        }
        if output.eager && !output.out.is_empty() {
            drop(reads);
            output.flush().await;
            continue;
        }
        let watching = output.watching && !output.client_lost;
        let client = &mut *output.client;
        let presence = poll_fn(|cx| {
            if watching {
                client.poll_presence(cx).map(Some)
            } else {
                Poll::Pending
            }
        });
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            biased;
            ((i, result), _, _) = select_all(reads) => Ok((i, result)),
            presence = presence => Err(presence),
            () = timer => Err(None),
        };
        let (i, result) = match read {
            Ok(read) => read,
            Err(None) => {
                // query_timeout: the shards still working are given up (a
                // hung server may never answer, nor take a cancel); the
                // rest are cancelled.
                let mut late = Vec::new();
                for (t, s) in targets.iter_mut().zip(streams.iter_mut()) {
                    if s.ready.is_none() && !s.dead {
                        // A backend that is merely slow stops; a hung one
                        // never hears it (the task gives up on its own).
                        if let Some(shard) = ex.shards.get(t.shard).cloned() {
                            let (pid, secret) = t.conn.cancel_key();
                            crate::backend::send_cancel_in_background(shard, pid, secret);
                        }
                        t.conn.mark_broken();
                        s.dead = true;
                        s.finished = true;
                        s.described = true;
                        late.push(s.name.clone());
                    }
                }
                first_error.get_or_insert(ProxyError::error(
                    "57014",
                    format!(
                        "canceling statement due to query_timeout: shard {} did not answer within {:?}",
                        late.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
                        ex.query_timeout(),
                    ),
                ));
                draining = true;
                continue;
            }
            Err(Some(Presence::Talking)) => {
                output.watching = false;
                continue;
            }
            Err(Some(Presence::Gone)) => {
                // Nobody will read the answer: stop every shard's work, also
                // inside a transaction (the session ends and rolls it back).
                output.client_lost = true;
                first_error.get_or_insert_with(|| {
                    ProxyError::error(
                        "08006",
                        "the client closed its connection during the statement",
                    )
                });
                if !draining {
                    draining = true;
                    cancel_unfinished(ex, targets, &mut streams, true).await;
                }
                continue;
            }
        };
        match result {
            Ok(0) | Err(_) => {
                let s = &mut streams[i];
                s.dead = true;
                s.finished = true;
                s.described = true;
                if !s.canceled {
                    s.error = Some(lost(&s.name));
                }
            }
            Ok(_) => {}
        }
    }
    output.flush_if_full().await;
    let statuses = streams.iter().map(|s| s.ready.unwrap_or(b'E')).collect();
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(Gathered {
        tags: streams.into_iter().map(|s| s.tags).collect(),
        statuses,
    })
}

fn lost(shard: &str) -> ProxyError {
    ProxyError::error("08006", format!("lost the connection to shard {shard}"))
        .with_detail(format!("on shard {shard}"))
}

/// The client described the statement before: its rows must have the
/// columns it was told (else 0A000, as Postgres after a schema change).
fn expected_columns<M: Merge>(
    merge: &M,
    fields: Option<&[Field]>,
    expected: Option<u64>,
) -> Result<(), ProxyError> {
    let Some(expected) = expected.filter(|_| merge.faces_client()) else {
        return Ok(());
    };
    let shape = match fields {
        None => ResultShape::new(None).finish(),
        Some(fields) => {
            let columns = merge.client_columns(fields);
            let mut shape = ResultShape::new(Some(columns.len() as i16));
            for f in columns {
                shape.column(&f.name, f.type_oid, f.type_len, f.typmod);
            }
            shape.finish()
        }
    };
    if shape == expected {
        Ok(())
    } else {
        Err(ProxyError::result_changed())
    }
}

/// Checks that all shards describe the same columns (schema drift otherwise).
fn agree(streams: &[Stream]) -> Result<Option<&[Field]>, ProxyError> {
    let mut first: Option<(&str, &[Field])> = None;
    for s in streams {
        let Some(f) = &s.fields else { continue };
        match first {
            None => first = Some((&s.name, f)),
            Some((name, g)) => {
                let same = f.len() == g.len()
                    && f.iter().zip(g.iter()).all(|(a, b)| {
                        a.name == b.name && a.type_oid == b.type_oid && a.typmod == b.typmod
                    });
                if !same {
                    return Err(ProxyError::error(
                        "42804",
                        format!(
                            "shards {name} and {} return different columns for this query (schema drift)",
                            s.name
                        ),
                    )
                    .with_hint("compare the table definitions on the shards (shardgate migrate verify)"));
                }
            }
        }
    }
    Ok(first.map(|(_, f)| f))
}

/// The shards' CopyOutResponse, which must agree (format and columns).
fn agree_copy(streams: &[Stream]) -> Result<Option<&[u8]>, ProxyError> {
    let mut first: Option<(&str, &Bytes)> = None;
    for s in streams {
        let Some(c) = &s.copy else { continue };
        match first {
            None => first = Some((&s.name, c)),
            Some((name, d)) if d != c => {
                return Err(ProxyError::error(
                    "42804",
                    format!(
                        "shards {name} and {} answer COPY with different columns (schema drift)",
                        s.name
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(first.map(|(_, c)| c.as_ref()))
}

/// Moves merged rows from the queues into the merge while possible.
fn emit<M: Merge>(
    merge: &mut M,
    streams: &mut [Stream],
    memory: &mut Memory,
    out: &mut BytesMut,
) -> Result<bool, ProxyError> {
    if !merge.ordered() {
        for (pos, s) in streams.iter_mut().enumerate() {
            while let Some(e) = s.rows.pop_front() {
                memory.sub(e.row.footprint());
                if !merge.row(pos, e, out)? {
                    return Ok(false);
                }
            }
        }
        return Ok(true);
    }
    loop {
        let mut best: Option<usize> = None;
        for pos in 0..streams.len() {
            let s = &streams[pos];
            match s.rows.front() {
                None if !s.finished => return Ok(true), // must hear from this shard first
                None => {}
                Some(e) => {
                    let better = match best.and_then(|b| streams[b].rows.front()) {
                        Some(current) => merge.less(e, current),
                        None => true,
                    };
                    if better {
                        best = Some(pos);
                    }
                }
            }
        }
        let Some(b) = best else { return Ok(true) };
        let Some(e) = streams[b].rows.pop_front() else {
            return Ok(true);
        };
        memory.sub(e.row.footprint());
        if !merge.row(b, e, out)? {
            return Ok(false);
        }
    }
}

/// Parses complete frames of one shard.
fn pump<M: Merge>(
    s: &mut Stream,
    merge: &M,
    memory: &mut Memory,
    discard: bool,
    type_oids: Option<&crate::protocol::type_oids::TypeOids>,
) -> Result<(), ProxyError> {
    loop {
        let (frame_tag, len) = match next_frame(&s.buf, MAX_BACKEND_MESSAGE) {
            Ok(Some((frame, len))) => (frame.tag, len),
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(ProxyError::error(
                    "08P01",
                    format!("invalid message from shard {}: {e}", s.name),
                ))
            }
        };
        let frame = s.buf.split_to(len).freeze();
        let body = frame.slice(5..);
        match frame_tag {
            tag::DATA_ROW => {
                if discard || s.canceled {
                    continue;
                }
                let row = Row::decode(body).map_err(|e| {
                    ProxyError::error("08P01", format!("invalid row from shard {}: {e}", s.name))
                })?;
                if s.error.is_some() {
                    continue;
                }
                if let Err(e) = memory.add(row.footprint()) {
                    s.error = Some(e);
                    continue;
                }
                match merge.prepare(row) {
                    Ok(entry) => s.rows.push_back(entry),
                    Err(e) => {
                        s.error.get_or_insert(e);
                    }
                }
            }
            tag::ROW_DESCRIPTION => {
                let mut fields = decode_row_description(&body).map_err(|e| {
                    ProxyError::error(
                        "08P01",
                        format!("invalid RowDescription from shard {}: {e}", s.name),
                    )
                })?;
                if let Some(map) = type_oids {
                    for field in &mut fields {
                        field.type_oid = map.client_oid(s.shard, field.type_oid);
                    }
                }
                if s.fields.is_none() {
                    s.fields = Some(fields);
                }
                s.described = true;
            }
            tag::NO_DATA => s.described = true,
            tag::COMMAND_COMPLETE => {
                s.tags
                    .push(crate::protocol::messages::command_tag(&body).to_string());
                s.finished = true;
                s.described = true;
            }
            tag::EMPTY_QUERY | tag::PORTAL_SUSPENDED => {
                s.finished = true;
                s.described = true;
            }
            tag::ERROR_RESPONSE => {
                s.error
                    .get_or_insert(ProxyError::from_shard(&body, &s.name, ""));
                s.finished = true;
                s.described = true;
            }
            tag::READY_FOR_QUERY => {
                let status = crate::protocol::messages::ready_status(&body)
                    .map_err(|e| ProxyError::error("08P01", format!("shard {}: {e}", s.name)))?;
                s.ready = Some(status);
                s.finished = true;
                s.described = true;
            }
            tag::COPY_OUT_RESPONSE => {
                s.copy = Some(body);
                s.described = true;
            }
            tag::COPY_DATA => {
                if discard || s.canceled || s.error.is_some() {
                    continue;
                }
                let row = Row {
                    body,
                    cells: Vec::new(),
                };
                if let Err(e) = memory.add(row.footprint()) {
                    s.error = Some(e);
                    continue;
                }
                s.rows.push_back(Entry {
                    row,
                    keys: Vec::new(),
                });
            }
            tag::COPY_DONE => {}
            tag::NOTICE_RESPONSE => {
                if let Some(n) = s.notices.as_mut() {
                    n.push(frame);
                }
            }
            tag::COPY_IN_RESPONSE | tag::COPY_BOTH_RESPONSE => {
                return Err(ProxyError::error(
                    "0A000",
                    format!("COPY started on shard {} in a fan-out statement", s.name),
                )
                .with_hint("COPY each shard with a routing hint"));
            }
            // ParseComplete, BindComplete, notices, ParameterStatus, notifications.
            _ => {}
        }
    }
}

/// Cancels shards still working. `always`: also inside transaction blocks
/// (on errors, where the transaction is failed anyway).
async fn cancel_unfinished(
    ex: &FanoutExecutor,
    targets: &mut [ShardConn<'_>],
    streams: &mut [Stream],
    always: bool,
) {
    let mut cancels = Vec::new();
    for (t, s) in targets.iter().zip(streams.iter_mut()) {
        if s.finished || s.dead || s.canceled || (!always && s.entry_status != b'I') {
            continue;
        }
        let Some(shard) = ex.shard_config(t.shard) else {
            continue;
        };
        s.canceled = true;
        let (pid, secret) = t.conn.cancel_key();
        cancels.push(async move {
            let _ = send_cancel(shard, pid, secret).await;
        });
    }
    if !cancels.is_empty() {
        join_all(cancels).await;
    }
}

/// A DataRow frame's body from raw bytes (tests and synthesised rows).
pub fn row_from_frame(frame: &[u8]) -> Option<Row> {
    Row::decode(Bytes::copy_from_slice(frame.get(5..)?)).ok()
}
