//! The coordinated migrator (`shardgate migrate`): Alembic-grade revisions
//! applied to every shard in lockstep.
//!
//! - [`revision`]: a revision folder, its header and checksum;
//! - [`statements`]: splitting SQL into statements (to name the failing one);
//! - [`graph`]: the revision graph with Alembic's rules and target syntax;
//! - [`ledger`]: the per-shard ledger in schema `shardgate`;
//! - [`plan`]: what `up`/`down` will do on each shard;
//! - [`apply`]: running a plan as two-phase-commit groups, locking, recovery;
//! - [`nontx`]: `transactional: false` revisions, shard by shard, resumable;
//! - [`verify`]: schema fingerprints per shard and the objects that differ;
//! - [`cli`]: the `shardgate migrate` subcommands.
//!
//! The library API is [`Migrator`]: the same operations the CLI runs, for
//! Rust programs ("running migrations programmatically").

pub mod apply;
pub mod batch;
pub mod cli;
pub mod graph;
pub mod ledger;
pub mod nontx;
pub mod plan;
pub mod revision;
pub mod statements;
pub mod verify;

pub use apply::{
    ApplyOptions, ApplyReport, Migrator, RecoverReport, ShardPlan, ShardResult, ShardStatus,
};
pub use batch::{BatchOutcome, TenantSchemas};
pub use graph::{Graph, GraphError, Target};
pub use ledger::HistoryRow;
pub use plan::{Batching, Direction, Plan, Step};
pub use revision::{Revision, RevisionError};
pub use verify::{Drift, Fingerprint, VerifyReport};

/// Everything the migrator can fail with. Shard-level errors name the shard
/// (and the statement, when one failed) so the operator knows where to look.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Revisions(Vec<RevisionError>),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("shard {shard}: cannot connect: {message}")]
    Connect { shard: String, message: String },
    #[error("shard {shard}: {message}")]
    Shard { shard: String, message: String },
    #[error(transparent)]
    Statement(Box<StatementFailure>),
    #[error("{0}")]
    Invalid(String),
    #[error("revision {revision} ({file}) changed after it was applied on shard {shard} (checksum {applied} applied, {now} on disk); restore the file or run again with --accept-changed")]
    Changed {
        shard: String,
        revision: String,
        file: String,
        applied: String,
        now: String,
    },
    #[error("another migrator holds the migration lock on shard {shard}; gave up after {seconds}s (is a migration running? `status` shows in-doubt transactions)")]
    Locked { shard: String, seconds: u64 },
    #[error("shards disagree on their current revisions ({0}); run `up --allow-divergent` to bring each shard from its own revisions to the target, or align them with `stamp --shard` / `up --shards`; `status` shows each shard")]
    Divergent(String),
    #[error("{0}")]
    Io(String),
}

/// A revision statement that failed on a shard (boxed in [`MigrateError`]
/// to keep the error small).
#[derive(Debug, Clone, thiserror::Error)]
#[error("shard {shard}: revision {revision} ({file}:{line}) failed: {message}\n  statement: {statement}")]
pub struct StatementFailure {
    pub shard: String,
    pub revision: String,
    pub file: String,
    pub line: usize,
    pub statement: String,
    pub message: String,
}

/// Short result alias for the migrator.
pub type Result<T, E = MigrateError> = std::result::Result<T, E>;
