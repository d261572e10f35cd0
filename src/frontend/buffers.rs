//! Message buffers lent to sessions only while they have traffic.
//!
//! An idle client must cost next to nothing (10,000 idle clients measured
//! 22 KB each when every session owned four 8 KiB buffers). Sessions take
//! buffers from this per-thread free list when data arrives and give them
//! back when they go idle, the way PgBouncer's sbuf does; taking and giving
//! is a Vec pop/push, cheaper than malloc/free of 8 KiB per transaction.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a fresh buffer; messages larger than this grow it.
pub const BUFFER_SIZE: usize = 8192;
/// Buffers that grew beyond this are freed rather than kept.
const MAX_KEPT: usize = 64 * 1024;
/// Idle buffers kept per thread, and their total capacity: buffers a
/// session filled without taking them from here (answers shardgate writes
/// itself) are parked too, so without a byte bound the list would keep
/// up to MAX_POOLED × MAX_KEPT (found by bench/fanout.sh: 139 MB after a
/// portal fetched in 3,000 parts).
const MAX_POOLED: usize = 4096;
const MAX_POOLED_BYTES: usize = 8 << 20;

thread_local! {
    static FREE: RefCell<(Vec<BytesMut>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

/// Makes sure `buf` has room to read into, taking a pooled buffer if it has none.
pub fn ensure(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = FREE
            .with(|free| {
                let mut free = free.borrow_mut();
                let taken = free.0.pop();
                if let Some(b) = &taken {
                    free.1 -= b.capacity();
                }
                taken
            })
            .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_SIZE));
    } else if buf.capacity() - buf.len() < 4096 {
        buf.reserve(BUFFER_SIZE);
    }
}

/// Returns an empty buffer to the pool; non-empty buffers are left alone.
pub fn park(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let mut taken = std::mem::take(buf);
    if taken.capacity() > MAX_KEPT {
        return;
    }
    taken.clear();
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        let bytes = free.1 + taken.capacity();
        if free.0.len() < MAX_POOLED && bytes <= MAX_POOLED_BYTES {
            free.1 = bytes;
            free.0.push(taken);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_parked_empty() {
        let mut buf = BytesMut::new();
        ensure(&mut buf);
        assert!(buf.capacity() >= 1024);
        buf.extend_from_slice(b"data");
        park(&mut buf);
        assert_eq!(&buf[..], b"data", "a buffer with data is not parked");
        buf.clear();
        park(&mut buf);
        assert_eq!(buf.capacity(), 0);
        let mut again = BytesMut::new();
        ensure(&mut again);
        assert!(again.capacity() >= 1024);
    }

    #[test]
    fn the_pool_is_bounded_in_bytes() {
        for _ in 0..2 * MAX_POOLED_BYTES / MAX_KEPT {
            let mut buf = BytesMut::with_capacity(MAX_KEPT);
            park(&mut buf);
        }
        let pooled = FREE.with(|free| free.borrow().1);
        assert!(pooled <= MAX_POOLED_BYTES, "{pooled}");
    }
}
