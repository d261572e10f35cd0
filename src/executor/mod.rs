//! Executor: what happens to a statement once the router has decided where
//! it goes (ARCHITECTURE §1), beyond single-shard pass-through.
//!
//! - [`fanout`]: statements that run on several shards at once, with
//!   results merged exactly as one Postgres holding all rows would answer.
//! - [`twophase`]: atomic commit of client transactions that wrote on
//!   several shards; [`recovery`] resolves what crashed coordinators left.
//! - [`control`]: control statements on raw backend connections.
//! - [`copy_rows`]: COPY FROM STDIN row framing (rows routed one by one).

pub mod control;
pub mod copy_rows;
pub mod fanout;
pub mod recovery;
pub mod rollback;
pub mod twophase;
