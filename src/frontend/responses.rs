//! The order of responses the client is owed.
//!
//! Every message sent to a backend leaves a slot here saying what answer
//! completes it; answers shardgate makes itself (a ParseComplete for a
//! statement the backend already has, an error) are slots too. Backend
//! messages fill slots front to back, local slots are released when they reach
//! the front, so the client sees exactly the order Postgres would produce,
//! even across pipelines, backend switches and errors.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::protocol::tag;

/// What completes a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Simple `Query` or `FunctionCall`: everything up to ReadyForQuery.
    UntilReady,
    /// A Parse; the statement hash (0: unnamed) is forgotten if it fails.
    Parse(u64),
    Bind,
    Close,
    /// A Describe of a statement; a named one's hash (0: unnamed), so its
    /// result columns are remembered ([`ResponseQueue::take_described`]).
    DescribeStatement(u64),
    DescribePortal,
    Execute,
    Sync,
    /// A Parse shardgate inserted (statement missing on this backend): its
    /// ParseComplete is swallowed, its error is the client's error.
    HiddenParse(u64),
    /// A Close shardgate inserted (evicting a cached statement): swallowed.
    HiddenClose,
    /// A Describe shardgate inserted to learn the result columns of this
    /// backend's copy of a statement (hash): swallowed; an error is the
    /// client's error.
    HiddenDescribe(u64),
    /// A Bind / Execute shardgate inserted (the BEGIN that turns a batch's
    /// implicit transaction into a regular one): swallowed; an error is
    /// the client's error.
    HiddenBind,
    HiddenExecute,
    /// A statement shardgate sent on its own behalf (`SET …` replay): every
    /// answer through ReadyForQuery is swallowed; an error is reported.
    HiddenQuery,
    /// A statement that fails on purpose to abort the backend's transaction
    /// after shardgate reported an error in it: every answer is dropped.
    HiddenAbort,
}

#[derive(Debug)]
pub enum Slot {
    Backend(Expect),
    /// Bytes shardgate answers itself, released in order.
    Local(BytesMut),
}

/// What to do with one backend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Swallow,
    /// Dropped without a trace (answers to [`Expect::HiddenAbort`]).
    Discard,
}

#[derive(Debug, Default)]
pub struct ResponseQueue {
    slots: VecDeque<Slot>,
    /// The backend hit an error in an extended-protocol batch and ignores
    /// everything until the next Sync.
    backend_skipping: bool,
    /// Statements whose Parse failed or was skipped: not on the backend.
    pub failed_statements: Vec<u64>,
    /// Statements whose Parse the backend rejected (not just skipped): as
    /// in Postgres, the client's name for them must not exist either.
    pub rejected_statements: Vec<u64>,
    /// Extended-protocol messages were sent since the last Sync (or simple
    /// query): the backend will not answer them all before that Sync.
    batch_open: bool,
    /// Length of the output right after the last answer appended by
    /// [`ResponseQueue::local_slice_retractable`], while nothing else has
    /// gone through the queue since: that answer may still be taken back
    /// ([`ResponseQueue::retract`]).
    retractable: Option<usize>,
    /// How many slots are local answers: none (the usual case) makes
    /// releasing them after every backend message a single test.
    locals: usize,
    /// The message just classified ended the Describe of the statement
    /// with this hash (and whether shardgate sent it).
    described: Option<(u64, bool)>,
}

impl ResponseQueue {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// See the field of the same name.
    pub fn batch_open(&self) -> bool {
        self.batch_open
    }

    /// The backend is ignoring messages until the next Sync (it failed).
    pub fn backend_skipping(&self) -> bool {
        self.backend_skipping
    }

    /// Records a message forwarded to the backend.
    pub fn sent(&mut self, expect: Expect) {
        self.retractable = None;
        self.batch_open = !matches!(
            expect,
            Expect::Sync | Expect::UntilReady | Expect::HiddenQuery | Expect::HiddenAbort
        );
        match expect {
            Expect::Sync | Expect::UntilReady | Expect::HiddenQuery | Expect::HiddenAbort => {
                self.backend_skipping = false;
                self.slots.push_back(Slot::Backend(expect));
            }
            // The backend will not answer these until the Sync.
            _ if self.backend_skipping => {}
            _ => self.slots.push_back(Slot::Backend(expect)),
        }
    }

    /// An answer made by shardgate, released when its turn comes.
    pub fn local(&mut self, bytes: BytesMut, out: &mut BytesMut) {
        self.retractable = None;
        if self.backend_skipping {
            return;
        }
        self.slots.push_back(Slot::Local(bytes));
        self.locals += 1;
        self.release_locals(out);
    }

    /// [`ResponseQueue::local`] for a small fixed answer: appended to `out`
    /// at once when nothing is owed before it (no allocation), else queued.
    pub fn local_slice(&mut self, bytes: &[u8], out: &mut BytesMut) {
        self.retractable = None;
        if self.backend_skipping {
            return;
        }
        if self.slots.is_empty() {
            out.extend_from_slice(bytes);
        } else {
            self.slots.push_back(Slot::Local(BytesMut::from(bytes)));
            self.locals += 1;
        }
    }

    /// [`ResponseQueue::local_slice`] for an answer the caller may want to
    /// take back with [`ResponseQueue::retract`] (a ParseComplete shardgate
    /// gave for a Parse it will send on after all, whose backend answer can
    /// then reach the client instead). Returns whether it is retractable:
    /// it went straight into `out`.
    pub fn local_slice_retractable(&mut self, bytes: &[u8], out: &mut BytesMut) -> bool {
        self.local_slice(bytes, out);
        if !self.backend_skipping && self.slots.is_empty() {
            self.retractable = Some(out.len());
        }
        self.retractable.is_some()
    }

    /// Takes back the answer of the last
    /// [`ResponseQueue::local_slice_retractable`] from the end of `out`, if
    /// nothing has gone through the queue since and `out` still ends with
    /// it. True if it was removed: the caller must then send the backend a
    /// message whose answer replaces it.
    pub fn retract(&mut self, bytes: &[u8], out: &mut BytesMut) -> bool {
        let ok = self.retractable.take() == Some(out.len())
            && self.slots.is_empty()
            && out.ends_with(bytes);
        if ok {
            out.truncate(out.len() - bytes.len());
        }
        ok
    }

    fn release_locals(&mut self, out: &mut BytesMut) {
        if self.locals == 0 {
            return;
        }
        while let Some(Slot::Local(_)) = self.slots.front() {
            if let Some(Slot::Local(bytes)) = self.slots.pop_front() {
                self.locals -= 1;
                out.extend_from_slice(&bytes);
            }
        }
    }

    /// See the field of the same name: the RowDescription or NoData just
    /// classified describes this statement (hash, hidden).
    pub fn take_described(&mut self) -> Option<(u64, bool)> {
        self.described.take()
    }

    fn front_expect(&self) -> Option<Expect> {
        match self.slots.front() {
            Some(Slot::Backend(expect)) => Some(*expect),
            _ => None,
        }
    }

    /// Classifies one backend message (by tag) and advances the queue.
    /// Locals that become due are appended to `out` *after* the caller has
    /// forwarded this message; call [`ResponseQueue::after`] for that.
    pub fn on_backend(&mut self, tag: u8) -> Disposition {
        self.retractable = None;
        self.described = None;
        // Asynchronous messages belong to no slot.
        if matches!(
            tag,
            tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS | tag::NOTIFICATION
        ) {
            return match self.front_expect() {
                Some(Expect::HiddenQuery) if tag == tag::NOTICE_RESPONSE => Disposition::Swallow,
                Some(Expect::HiddenAbort) if tag == tag::NOTICE_RESPONSE => Disposition::Discard,
                _ => Disposition::Forward,
            };
        }
        let Some(expect) = self.front_expect() else {
            // Unsolicited (e.g. FATAL at shutdown): the client should see it.
            return Disposition::Forward;
        };
        let (done, disposition) = match (expect, tag) {
            (Expect::HiddenQuery, tag::READY_FOR_QUERY) => (true, Disposition::Swallow),
            (Expect::HiddenAbort, tag::READY_FOR_QUERY) => (true, Disposition::Discard),
            (Expect::HiddenAbort, _) => (false, Disposition::Discard),
            (Expect::HiddenQuery, _) => (false, Disposition::Swallow),
            (Expect::UntilReady, tag::READY_FOR_QUERY) => (true, Disposition::Forward),
            (Expect::UntilReady, _) => (false, Disposition::Forward),
            (_, tag::ERROR_RESPONSE) => {
                if let Expect::Parse(hash) | Expect::HiddenParse(hash) = expect {
                    if hash != 0 {
                        self.rejected_statements.push(hash);
                    }
                }
                self.pop_failed();
                self.skip_to_sync();
                return Disposition::Forward;
            }
            (Expect::HiddenClose, tag::CLOSE_COMPLETE) => (true, Disposition::Swallow),
            (Expect::HiddenBind, tag::BIND_COMPLETE) => (true, Disposition::Swallow),
            (Expect::HiddenExecute, tag::COMMAND_COMPLETE) => (true, Disposition::Swallow),
            (Expect::Parse(_), tag::PARSE_COMPLETE)
            | (Expect::Bind, tag::BIND_COMPLETE)
            | (Expect::Close, tag::CLOSE_COMPLETE) => (true, Disposition::Forward),
            (Expect::HiddenParse(_), tag::PARSE_COMPLETE) => (true, Disposition::Swallow),
            (Expect::DescribeStatement(_), tag::PARAMETER_DESCRIPTION) => {
                (false, Disposition::Forward)
            }
            (Expect::HiddenDescribe(_), tag::PARAMETER_DESCRIPTION) => {
                (false, Disposition::Swallow)
            }
            (Expect::DescribeStatement(hash), tag::ROW_DESCRIPTION | tag::NO_DATA) => {
                if hash != 0 {
                    self.described = Some((hash, false));
                }
                (true, Disposition::Forward)
            }
            (Expect::HiddenDescribe(hash), tag::ROW_DESCRIPTION | tag::NO_DATA) => {
                self.described = Some((hash, true));
                (true, Disposition::Swallow)
            }
            (Expect::DescribePortal, tag::ROW_DESCRIPTION | tag::NO_DATA) => {
                (true, Disposition::Forward)
            }
            (Expect::Execute, tag::COMMAND_COMPLETE | tag::EMPTY_QUERY | tag::PORTAL_SUSPENDED) => {
                (true, Disposition::Forward)
            }
            (Expect::Sync, tag::READY_FOR_QUERY) => (true, Disposition::Forward),
            _ => (false, Disposition::Forward),
        };
        if done {
            self.slots.pop_front();
        }
        disposition
    }

    /// Releases local answers that are now at the front.
    pub fn after(&mut self, out: &mut BytesMut) {
        self.retractable = None;
        self.release_locals(out);
    }

    /// After an error in an extended batch the backend skips to the Sync;
    /// so do the slots (local ones too: Postgres would not have answered them).
    fn skip_to_sync(&mut self) {
        while let Some(slot) = self.slots.front() {
            match slot {
                Slot::Backend(Expect::Sync) => return,
                _ => self.pop_failed(),
            }
        }
        self.backend_skipping = true;
    }

    /// Drops the front slot of a message that failed or was skipped.
    fn pop_failed(&mut self) {
        match self.slots.pop_front() {
            Some(Slot::Backend(Expect::Parse(hash) | Expect::HiddenParse(hash))) if hash != 0 => {
                self.failed_statements.push(hash);
            }
            Some(Slot::Local(_)) => self.locals -= 1,
            _ => {}
        }
    }

    /// Forget everything (the backend is gone). Its failed statements go
    /// too: they were about that backend's copies, and a FATAL that ended
    /// it rejected no statement. (Kept, they were applied to the next
    /// backend: its fresh copy was forgotten and created again, `42P05`.)
    pub fn clear(&mut self) {
        self.failed_statements.clear();
        self.rejected_statements.clear();
        self.retractable = None;
        self.locals = 0;
        self.slots.clear();
        self.backend_skipping = false;
        self.batch_open = false;
        self.described = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_backend_leaves_no_failed_statements_for_the_next() {
        let mut queue = ResponseQueue::default();
        queue.sent(Expect::HiddenParse(7));
        queue.sent(Expect::Bind);
        // The backend ends with a FATAL while the Parse is in flight.
        queue.on_backend(tag::ERROR_RESPONSE);
        assert_eq!(queue.failed_statements, vec![7]);
        queue.clear();
        assert!(queue.failed_statements.is_empty());
        assert!(queue.rejected_statements.is_empty());
    }

    #[test]
    fn local_answers_wait_for_earlier_backend_answers() {
        let mut queue = ResponseQueue::default();
        let mut out = BytesMut::new();
        queue.sent(Expect::Parse(0));
        queue.local(BytesMut::from(&b"LOCAL"[..]), &mut out);
        assert!(out.is_empty(), "must wait for the ParseComplete");
        queue.sent(Expect::Sync);
        assert_eq!(queue.on_backend(tag::PARSE_COMPLETE), Disposition::Forward);
        queue.after(&mut out);
        assert_eq!(&out[..], b"LOCAL");
        assert_eq!(queue.on_backend(tag::READY_FOR_QUERY), Disposition::Forward);
        assert!(queue.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_including_locals() {
        let mut queue = ResponseQueue::default();
        let mut out = BytesMut::new();
        queue.sent(Expect::Parse(0));
        queue.sent(Expect::Bind);
        queue.local(BytesMut::from(&b"X"[..]), &mut out);
        queue.sent(Expect::Execute);
        queue.on_backend(tag::ERROR_RESPONSE);
        queue.after(&mut out);
        assert!(out.is_empty());
        assert_eq!(queue.locals, 0, "the skipped local is no longer counted");
        // Messages after the error and before Sync leave no slot.
        queue.sent(Expect::Execute);
        queue.sent(Expect::Sync);
        assert_eq!(queue.on_backend(tag::READY_FOR_QUERY), Disposition::Forward);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_direct_answer_can_be_retracted_until_the_queue_moves() {
        let mut queue = ResponseQueue::default();
        let mut out = BytesMut::from(&b"earlier"[..]);
        assert!(queue.local_slice_retractable(b"12345", &mut out));
        assert!(queue.retract(b"12345", &mut out));
        assert_eq!(&out[..], b"earlier");
        // Only once.
        assert!(!queue.retract(b"12345", &mut out));
        // Not after anything went through the queue.
        assert!(queue.local_slice_retractable(b"12345", &mut out));
        queue.sent(Expect::HiddenQuery);
        assert!(!queue.retract(b"12345", &mut out));
        assert_eq!(&out[..], b"earlier12345");
        // Not when it had to wait behind a backend answer.
        assert!(!queue.local_slice_retractable(b"67890", &mut out));
        assert!(!queue.retract(b"67890", &mut out));
        // Not when the output changed behind the queue's back.
        let mut out = BytesMut::new();
        let mut queue = ResponseQueue::default();
        assert!(queue.local_slice_retractable(b"12345", &mut out));
        out.clear();
        out.extend_from_slice(b"xx345");
        assert!(!queue.retract(b"12345", &mut out));
    }

    #[test]
    fn hidden_parse_and_query_are_swallowed() {
        let mut queue = ResponseQueue::default();
        queue.sent(Expect::HiddenQuery);
        assert_eq!(
            queue.on_backend(tag::COMMAND_COMPLETE),
            Disposition::Swallow
        );
        assert_eq!(queue.on_backend(tag::READY_FOR_QUERY), Disposition::Swallow);
        queue.sent(Expect::HiddenParse(7));
        queue.sent(Expect::Bind);
        assert_eq!(queue.on_backend(tag::PARSE_COMPLETE), Disposition::Swallow);
        assert_eq!(queue.on_backend(tag::BIND_COMPLETE), Disposition::Forward);
    }
}
