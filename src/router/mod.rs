//! SQL routing: where a statement goes.
//!
//! - [`shardmap`]: the shard map as the router needs it (functions, table rules).
//! - [`analyze`]: sqlparser walk → [`Analysis`] (parameter-independent, cached).
//! - [`route`]: the decision ([`Route`]) and its errors ([`RouteError`]).
//! - [`cache`]: [`Router`], the cached entry point the proxy uses.
//! - [`explain`]: the human explanation behind `shardgate route`.
//! - [`copy_grammar`]: COPY as Postgres' grammar has it, rewritten for sqlparser.
//! - [`hints`]: routing hints from comments and `SET shardgate.…`.
//! - [`uniqueness`]: unique constraints the shards could only enforce per shard.
//! - [`volatile`]: functions whose value differs per shard (replicated writes, sequences).

pub mod analyze;
pub mod cache;
pub mod catalog;
pub mod copy_grammar;
pub mod effects;
pub mod explain;
pub mod hints;
pub mod normalize;
pub mod route;
pub mod shardmap;
pub mod uniqueness;
pub mod volatile;

pub use analyze::{analyze, Analysis, Cond, Placement, Plan, StatementKind, TableUse, ValueExpr};
pub use cache::{Memo, Router};
pub use route::{Param, ParamFormat, Route, RouteError};
pub use shardmap::{MapFunction, RouterError, ShardMap, TableRule};
