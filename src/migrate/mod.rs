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
//! - [`batch`]: batched data revisions (`batch: key=id size=5000`) and
//!   tenant-schema revisions (`scope: tenants`), checkpointed per shard;
//! - [`verify`]: schema fingerprints per shard and the objects that differ;
//! - [`cli`]: the `shardgate migrate` subcommands.
//!
//! # Library API ("running migrations programmatically")
//!
//! [`Migrator`] offers the CLI's operations to Rust programs. Build it from
//! a loaded shard map ([`Migrator::from_config`]) or from shards and a
//! folder ([`Migrator::new`]); every call takes [`ApplyOptions`] (shard
//! selection, lock wait, `lock_timeout`, `accept_changed`,
//! `allow_divergent`) and answers per shard:
//!
//! | call | returns |
//! |---|---|
//! | [`Migrator::upgrade`] / [`Migrator::downgrade`] | [`ApplyReport`]: run id, in-doubt transactions resolved first, and [`ShardResult`] per shard (from, steps, heads, [`BatchOutcome`]s) |
//! | [`Migrator::status`] | [`ShardStatus`] per shard: heads, pending, in doubt, changed files, partly applied steps |
//! | [`Migrator::applied_history`] | each shard's ledger history ([`HistoryRow`]: revision, direction, checksum, run id, times, who) |
//! | [`Migrator::plan`] / [`Migrator::plan_per_shard`] | the [`Plan`] (steps with their SQL); per shard with its tenant schemas |
//! | [`Migrator::verify`] | [`VerifyReport`]: catalog [`Fingerprint`] and heads per shard, the [`Drift`] between them |
//! | [`Migrator::stamp`] | each shard's version rows after the stamp |
//! | [`Migrator::recover`] | [`RecoverReport`]: prepared transactions committed / rolled back, per shard |
//! | [`Migrator::new_revision`] / [`Migrator::merge`] | the folder written |
//!
//! Errors are [`MigrateError`]; those about one shard name it (and the
//! statement, file and line when a statement failed). For example:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shardgate::migrate::{ApplyOptions, Migrator};
//! let config = shardgate::config::Config::load(std::path::Path::new("shardgate.yaml"))?;
//! let migrator = Migrator::from_config(&config)?;
//! let report = migrator.upgrade("heads", &ApplyOptions::default()).await?;
//! for shard in &report.per_shard {
//!     println!("{}: {} step(s), now at {:?}", shard.shard, shard.steps.len(), shard.heads);
//! }
//! # Ok(()) }
//! ```

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
