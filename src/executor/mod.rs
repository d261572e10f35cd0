//! Query execution beyond single-shard pass-through.
//!
//! - [`fanout`]: statements that run on several shards at once, with
//!   results merged exactly as one Postgres holding all rows would answer.

pub mod fanout;
