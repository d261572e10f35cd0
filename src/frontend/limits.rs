//! Bounds on what clients can make the proxy hold (issue #15-6).
//!
//! * **Large messages share one budget** (`max_client_memory`). A session
//!   reads a message larger than [`SMALL`] only after it has reserved twice
//!   its size from the budget (the read buffer, and the copy queued for the
//!   shard), all at once from the length header: reserving piece by piece
//!   would let N half-read messages exhaust the budget and wait for each
//!   other forever. A session that cannot reserve stops reading its socket
//!   (backpressure) until others are done; the budget is fair (FIFO) and at
//!   least twice `max_message_size`, so every allowed message gets through.
//!   The reservation is returned once both buffers are small again.
//! * **Logins are bounded** (`max_pending_logins`, `login_timeout`): a
//!   connection that has not authenticated holds a slot; beyond the cap new
//!   ones are refused at once.
//! * **Freed memory goes back to the system.** glibc keeps freed heap memory
//!   for reuse (after 2,000 half-open connections closed the proxy stayed
//!   +12 MB); [`Trim`] calls `malloc_trim` at most once a second after a
//!   burst of logins ended or large buffers were freed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use futures::FutureExt;
use pgwire::tokio::server::MaybeTls;
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::buffers;
use crate::protocol::frame_length;
use crate::protocol::synth::ProxyError;

/// A message longer than `max_message_size`, refused from its header: the
/// rest of it cannot be skipped reliably, so the connection closes.
pub fn too_large(tag: u8, length: usize, limit: usize) -> ProxyError {
    ProxyError::fatal(
        "54000",
        format!(
            "message type '{}' of {length} bytes exceeds max_message_size ({limit} bytes)",
            char::from(tag)
        ),
    )
    .with_hint("raise max_message_size in the shard map (Postgres itself accepts up to 1 GB), or send less per message")
}

/// Buffers up to this capacity are a session's own (what it reads small
/// messages with); beyond it capacity is charged to `max_client_memory`.
pub const SMALL: usize = 64 * 1024;

/// The proxy-wide budget for large client messages, and the login slots.
pub struct ClientLimiter {
    budget: Arc<Semaphore>,
    pending_logins: AtomicUsize,
    max_pending_logins: usize,
    pub trim: Trim,
}

impl ClientLimiter {
    pub fn new(limits: &crate::config::ClientLimits) -> ClientLimiter {
        ClientLimiter {
            budget: Arc::new(Semaphore::new(
                limits.max_client_memory.min(Semaphore::MAX_PERMITS),
            )),
            pending_logins: AtomicUsize::new(0),
            max_pending_logins: limits.max_pending_logins,
            trim: Trim::default(),
        }
    }

    /// A session's share of the budget (none until it reads a large message).
    pub fn session(self: &Arc<Self>) -> ClientMemory {
        ClientMemory {
            limiter: self.clone(),
            held: None,
        }
    }

    /// Bytes of the budget not reserved right now.
    pub fn available(&self) -> usize {
        self.budget.available_permits()
    }

    /// A login slot, or `None` when `max_pending_logins` are in use.
    pub fn login(self: &Arc<Self>) -> Option<LoginSlot> {
        let previous = self.pending_logins.fetch_add(1, Ordering::AcqRel);
        let slot = LoginSlot {
            limiter: self.clone(),
        };
        // Dropping the slot undoes the increment either way.
        (previous < self.max_pending_logins).then_some(slot)
    }

    /// Connections that have not authenticated yet.
    pub fn pending_logins(&self) -> usize {
        self.pending_logins.load(Ordering::Acquire)
    }
}

/// One connection between accept and authenticated (or gone).
pub struct LoginSlot {
    limiter: Arc<ClientLimiter>,
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        let before = self.limiter.pending_logins.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            // The last pending login ended: what a burst of them held is free.
            self.limiter.trim.request();
        }
    }
}

/// Asks for `malloc_trim`; [`Trim::run_if_requested`] does it (at most once
/// per call, which the server makes once a second).
#[derive(Default)]
pub struct Trim {
    requested: AtomicBool,
}

impl Trim {
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Returns freed heap memory to the system if asked to since the last run.
    pub fn run_if_requested(&self) -> bool {
        if !self.requested.swap(false, Ordering::AcqRel) {
            return false;
        }
        release_free_memory();
        true
    }
}

/// glibc keeps freed memory (fragmented small chunks, large buffers below
/// its dynamic mmap threshold) in the heap; `malloc_trim(0)` hands free
/// pages anywhere in the heap back. Other allocators return memory themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only inspects and releases the allocator's own
    // free chunks under its locks; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// A session's reservation from the budget.
pub struct ClientMemory {
    limiter: Arc<ClientLimiter>,
    held: Option<OwnedSemaphorePermit>,
}

impl ClientMemory {
    fn held(&self) -> usize {
        self.held.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Gives the reservation back once the session's buffers are small
    /// again, shrinking them (a buffer grown for one large message would
    /// otherwise stay allocated as long as the session has a backend).
    fn settle(&mut self, input: &mut BytesMut, output: &mut BytesMut) -> bool {
        if self.held.is_none() {
            return false;
        }
        if output.is_empty() && output.capacity() > SMALL {
            *output = BytesMut::new();
        }
        let input_small = input.capacity() <= SMALL
            || (input.len() <= SMALL && first_incomplete(input).is_none_or(|n| n <= SMALL));
        if !input_small || output.capacity() > SMALL {
            return false;
        }
        if input.capacity() > SMALL {
            *input = if input.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&input[..])
            };
        }
        self.held = None;
        self.limiter.trim.request();
        true
    }

    /// Makes room to read into `input`, reserving from the budget first
    /// when the message at its front is large. `None`: read nothing now
    /// (complete messages ahead of a large one must be handled first).
    async fn make_room(&mut self, input: &mut BytesMut, max_message: usize) -> Option<()> {
        let need = first_incomplete(input).unwrap_or(0);
        let offset = first_incomplete_offset(input);
        if need <= SMALL || need - offset > max_message {
            // Small, or oversized (refused from its header when handled).
            if input.capacity() >= SMALL && input.capacity() - input.len() < 4096 {
                return (input.capacity() > input.len()).then_some(());
            }
            buffers::ensure(input);
            return Some(());
        }
        if offset > 0 {
            // Read no further than the room there is until the complete
            // messages ahead were handled (then this one is at the front).
            return (input.capacity() > input.len()).then_some(());
        }
        // Twice: the read buffer, and the copy on its way to the shard.
        let charge = need.saturating_mul(2);
        let held = self.held();
        if charge > held {
            let more = u32::try_from(charge - held).ok()?;
            let permit = self
                .limiter
                .budget
                .clone()
                .acquire_many_owned(more)
                .await
                .ok()?;
            match &mut self.held {
                Some(held) => held.merge(permit),
                None => self.held = Some(permit),
            }
        }
        if input.capacity() < need {
            // Exactly the message: BytesMut's own growth would double.
            let mut grown = BytesMut::with_capacity(need);
            grown.extend_from_slice(input);
            *input = grown;
        }
        Some(())
    }
}

/// Bytes `buf` must hold to complete its first incomplete message (`None`
/// when its header is invalid: that is refused when handled).
fn first_incomplete(buf: &[u8]) -> Option<usize> {
    let offset = first_incomplete_offset(buf);
    let rest = &buf[offset..];
    if rest.len() < 5 {
        return Some(offset + 5);
    }
    match frame_length(rest, usize::MAX) {
        Ok(Some(total)) => Some(offset + total),
        _ => None,
    }
}

/// Where the first incomplete message of `buf` starts.
fn first_incomplete_offset(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Ok(Some(total)) = frame_length(&buf[at..], usize::MAX) {
        if buf.len() - at < total {
            break;
        }
        at += total;
    }
    at
}

/// Reads what the client sent into `input`, within the session's share of
/// `max_client_memory`. A plain TCP client is awaited without a buffer
/// (readiness first), so idle clients hold none. `output` is the session's
/// buffer towards the shard (empty here: flushed before every read); it is
/// shrunk with `input` when a large message has gone through.
pub async fn read_client(
    client: &mut MaybeTls,
    input: &mut BytesMut,
    output: &mut BytesMut,
    memory: &mut ClientMemory,
    max_message: usize,
) -> std::io::Result<usize> {
    match client {
        MaybeTls::Plain(tcp) => {
            // A client streaming large messages (COPY's 64 KiB CopyData)
            // keeps its buffer while more is ready; the reservation goes
            // back when it would wait. Without a reservation there is
            // nothing to give back, and the readiness checks cost two
            // polls per message on the hot path (~240 instructions).
            if memory.held.is_some() && tcp.readable().now_or_never().is_none() {
                memory.settle(input, output);
                tcp.readable().await?;
            }
            if input.capacity() == 0 {
                return read_idle(tcp, input).await;
            }
        }
        _ => {
            memory.settle(input, output);
        }
    }
    if memory.make_room(input, max_message).await.is_none() {
        // Waits here until the caller's other branch (the shard's answers)
        // lets it handle what is buffered.
        std::future::pending::<()>().await;
    }
    // `read_buf` (not `try_read_buf`): tokio's poll_read treats a short
    // read as "drained" and clears readiness, saving the extra recv()
    // that would otherwise return EAGAIN on every message (strace).
    match client {
        MaybeTls::Plain(tcp) => tcp.read_buf(input).await,
        other => other.read_buf(input).await,
    }
}

/// Waits for a client whose buffers are parked (between transactions)
/// without taking one, so an idle client holds no read buffer.
///
/// Readiness alone is not enough: the startup packet is read with
/// exact-size reads, which leave tokio's readiness set, so a read started
/// right away found nothing, kept its 8 KiB buffer and waited on it (8 KiB
/// of every idle authenticated client, issue #16). A read that finds
/// nothing clears the readiness and parks the buffer again.
async fn read_idle(
    tcp: &mut tokio::net::TcpStream,
    input: &mut BytesMut,
) -> std::io::Result<usize> {
    loop {
        tcp.readable().await?;
        buffers::ensure(input);
        // One poll: a short read or EAGAIN clears readiness (see below).
        if let Some(read) = tcp.read_buf(input).now_or_never() {
            return read;
        }
        buffers::park(input);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tag: u8, total: usize) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((total - 1) as i32).to_be_bytes());
        out
    }

    #[test]
    fn incomplete_messages_are_found_behind_complete_ones() {
        let mut buf = vec![b'S', 0, 0, 0, 4];
        assert_eq!(first_incomplete_offset(&buf), 5);
        assert_eq!(first_incomplete(&buf), Some(10));
        buf.extend_from_slice(&header(b'Q', 1 << 20));
        assert_eq!(first_incomplete(&buf), Some(5 + (1 << 20)));
        assert_eq!(first_incomplete(&[b'Q', 0, 0, 0, 1]), None);
    }

    #[tokio::test]
    async fn a_large_message_waits_for_the_budget_and_gives_it_back() {
        let limits = crate::config::ClientLimits {
            max_message_size: 1 << 20,
            max_client_memory: 3 << 20,
            ..Default::default()
        };
        let limiter = Arc::new(ClientLimiter::new(&limits));
        let (mut a, mut b) = (limiter.session(), limiter.session());
        let mut input_a = BytesMut::from(&header(b'Q', 1 << 20)[..]);
        let mut input_b = input_a.clone();
        let mut output = BytesMut::new();
        assert_eq!(a.make_room(&mut input_a, 1 << 20).await, Some(()));
        assert_eq!(input_a.capacity(), 1 << 20, "grown exactly once");
        assert_eq!(limiter.available(), 1 << 20);
        // The second one does not fit until the first is done.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            b.make_room(&mut input_b, 1 << 20),
        )
        .await;
        assert!(waiting.is_err(), "the second large message must wait");
        input_a.clear();
        assert!(a.settle(&mut input_a, &mut output));
        assert_eq!(input_a.capacity(), 0, "the large buffer is freed");
        assert_eq!(limiter.available(), 3 << 20);
        assert_eq!(b.make_room(&mut input_b, 1 << 20).await, Some(()));
        drop(b);
        assert_eq!(limiter.available(), 3 << 20, "a session gives back on drop");
    }

    #[test]
    fn login_slots_are_capped_and_returned() {
        let limits = crate::config::ClientLimits {
            max_pending_logins: 2,
            ..Default::default()
        };
        let limiter = Arc::new(ClientLimiter::new(&limits));
        let one = limiter.login();
        let two = limiter.login();
        assert!(one.is_some() && two.is_some());
        assert!(limiter.login().is_none());
        assert_eq!(limiter.pending_logins(), 2);
        drop(one);
        assert!(limiter.login().is_some());
        drop(two);
        assert_eq!(limiter.pending_logins(), 0);
        assert!(limiter.trim.run_if_requested());
        assert!(!limiter.trim.run_if_requested());
    }
}
