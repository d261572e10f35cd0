//! `COPY … FROM STDIN` into a sharded table: every row goes to the shard
//! its key names, in one pass, atomically across shards.
//!
//! Hooks (called by the session): [`Session::routed_copy_in`] decides
//! whether a simple query is such a COPY and starts it; while it runs,
//! the client's CopyData / CopyDone / CopyFail go to
//! [`Session::copy_in_message`].

use super::{Attach, Session};
use crate::router::Router;

/// State of a COPY FROM STDIN being routed row by row.
#[derive(Debug)]
pub(super) struct CopyIn {}

impl Session {
    /// If `sql` is a COPY FROM STDIN into a sharded table, starts it and
    /// returns how the query was handled; `None`: not such a COPY.
    pub(super) async fn routed_copy_in(
        &mut self,
        _router: &Router,
        _frame: &[u8],
        _sql: &str,
    ) -> Option<Attach> {
        None
    }

    /// A CopyData, CopyDone or CopyFail from the client during a routed COPY.
    pub(super) async fn copy_in_message(&mut self, _tag: u8, _frame: &[u8]) {}
}
