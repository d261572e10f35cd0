//! Coordinated apply: every step is one atomic group over all participating
//! shards, committed with two-phase commit and a decision record on the
//! coordinator shard (ARCHITECTURE §2.9, the Citus pattern):
//!
//! 1. `BEGIN` on every shard, the step's statements, the ledger update;
//! 2. `PREPARE TRANSACTION 'shardgate_mig_<run>_<step>_<shard>'` on every
//!    participant but the coordinator (the first participating shard);
//! 3. the coordinator inserts the decision row and `COMMIT`s: that local
//!    commit is the global commit;
//! 4. `COMMIT PREPARED` everywhere else.
//!
//! A failure before 3 rolls every shard back. A crash between 2 and 3 leaves
//! prepared transactions without a decision (rolled back by `recover`); a
//! crash after 3 leaves them with one (committed by `recover`). Nothing is
//! kept locally, so any machine with the map can recover. Only one migrator
//! runs at a time: a session advisory lock on the map's first shard.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use tokio_postgres::Client;

use super::graph::{Graph, Target};
use super::ledger::{self, GID_PREFIX};
use super::plan::{self, Direction, Plan, Step};
use super::{MigrateError, Result};
use crate::backend::{connect_control, MIGRATE_APPLICATION};
use crate::config::{Config, FunctionKind, ShardConfig, TenantMode};
use crate::executor::rollback::{roll_back_clients, Pending};

/// Advisory-lock key of the migrator ("shardgate.migrate" as 8 bytes).
pub const LOCK_KEY: i64 = 0x7368_6172_6467_6d69;

/// Environment variable that makes the migrator abort at a two-phase-commit
/// point (`prepare`: after the PREPAREs of the first group, before the
/// decision; `decision`: right after the decision commit) or after the N-th
/// committed batch of a batched step (`batch:N`). For crash tests.
pub const CRASH_ENV: &str = "SHARDGATE_MIGRATE_CRASH_AFTER";

/// Knobs of a run.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Shard names to work on; empty means every shard of the map.
    pub shards: Vec<String>,
    /// Accept applied revisions whose file changed (records the new checksum).
    pub accept_changed: bool,
    /// How long to wait for another migrator to finish.
    pub lock_wait: Duration,
    /// Postgres `lock_timeout` for each step, so one blocked shard fails the
    /// group instead of hanging the whole fleet.
    pub lock_timeout: Duration,
    pub connect_timeout: Duration,
    /// When the selected shards are at different revisions, bring each
    /// group of shards at the same revisions from there to the target
    /// (instead of refusing). Each group moves in its own atomic groups.
    pub allow_divergent: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            shards: Vec::new(),
            accept_changed: false,
            lock_wait: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            allow_divergent: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub run_id: String,
    /// Participating shards, coordinator first.
    pub shards: Vec<String>,
    /// Steps applied, in order: (revision, direction).
    pub steps: Vec<(String, &'static str)>,
    /// Version rows on every participant afterwards.
    pub heads: Vec<String>,
    /// In-doubt transactions resolved before the run.
    pub recovered: RecoverReport,
    /// What happened on each participant, in map order (the authoritative
    /// per-shard answer; `steps`/`heads` above are the first shard's).
    pub per_shard: Vec<ShardResult>,
}

/// One shard's part of a run.
#[derive(Debug, Clone, Default)]
pub struct ShardResult {
    pub shard: String,
    /// Version rows before the run.
    pub from: Vec<String>,
    /// Steps applied here: (revision, direction).
    pub steps: Vec<(String, &'static str)>,
    /// Version rows after the run.
    pub heads: Vec<String>,
    /// Batched steps (data, tenants): revision and what this shard did.
    pub batches: Vec<(String, super::batch::BatchOutcome)>,
}

/// The offline plan of one shard (`plan --sql`).
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub shard: String,
    pub plan: Plan,
    /// Tenant schemas found on the shard (for `scope: tenants` steps).
    pub tenant_schemas: Vec<String>,
}

/// Prepared transactions resolved by `recover`: (shard, gid).
#[derive(Debug, Clone, Default)]
pub struct RecoverReport {
    pub committed: Vec<(String, String)>,
    pub rolled_back: Vec<(String, String)>,
}

/// One shard's state for `status`.
#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub shard: String,
    /// Version rows (current heads).
    pub heads: Vec<String>,
    /// Revisions `up` would apply to reach every head.
    pub pending: Vec<String>,
    /// Prepared migrator transactions (in doubt when no migrator runs).
    pub in_doubt: Vec<String>,
    /// Applied revisions whose file changed since.
    pub changed: Vec<String>,
    /// A problem reading this shard's state (unknown applied revision…).
    pub problem: Option<String>,
    /// Non-transactional steps interrupted on this shard (resumed by the
    /// next `up`/`down`), see [`super::nontx::partial`].
    pub partial: Vec<String>,
}

/// An open connection to one shard.
pub(super) struct Conn {
    pub(super) name: String,
    pub(super) client: Client,
}

/// The migrator for one shard map and migrations folder.
pub struct Migrator {
    shards: Vec<ShardConfig>,
    dir: PathBuf,
    graph: Graph,
    /// `schema_template`s of the map's schema-mode tenant functions: which
    /// schemas a `scope: tenants` revision runs in.
    tenant_templates: super::batch::TenantSchemas,
}

impl Migrator {
    /// Loads the revisions of `dir` for these shards.
    pub fn new(shards: Vec<ShardConfig>, dir: &Path) -> Result<Migrator> {
        if shards.is_empty() {
            return Err(MigrateError::Invalid("the map has no shards".into()));
        }
        Ok(Migrator {
            graph: Graph::load(dir)?,
            shards,
            dir: dir.to_path_buf(),
            tenant_templates: super::batch::TenantSchemas::default(),
        })
    }

    /// The shards, `migrations.dir` and tenant schemas of a loaded shard map.
    /// The migrator of the map's migration set `name` (`migrations.sets`),
    /// or of the shards' own tree when `name` is `None`. A set's databases
    /// must be its own: two ledgers in one database would fight.
    pub fn from_config_set(config: &Config, name: Option<&str>) -> Result<Migrator> {
        let Some(name) = name else {
            return Migrator::from_config(config);
        };
        let Some(set) = config.migrations.sets.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = config
                .migrations
                .sets
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Err(MigrateError::Invalid(format!(
                "the shard map has no migration set `{name}` (sets: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        let same = |a: &ShardConfig, b: &ShardConfig| {
            a.host == b.host && a.port == b.port && a.database == b.database
        };
        let others = config.shards.iter().map(|s| ("shard", s)).chain(
            config
                .migrations
                .sets
                .iter()
                .filter(|s| s.name != name)
                .flat_map(|s| s.databases.iter().map(|d| ("another set's database", d))),
        );
        for (kind, other) in others {
            if let Some(db) = set.databases.iter().find(|d| same(d, other)) {
                return Err(MigrateError::Invalid(format!(
                    "migration set `{name}`: database `{}` ({}:{}/{}) is also {kind} `{}`; each set needs databases of its own (its ledger lives in them)",
                    db.name, db.host, db.port, db.database, other.name
                )));
            }
        }
        Migrator::new(set.databases.clone(), &set.dir)
    }

    pub fn from_config(config: &Config) -> Result<Migrator> {
        let mut tenants = super::batch::TenantSchemas::default();
        for f in &config.functions {
            if let FunctionKind::Tenant {
                mode: TenantMode::Schema,
                schema_template,
                tenants: listed,
                ..
            } = &f.kind
            {
                tenants.templates.push(schema_template.clone());
                tenants.listed.extend(
                    listed
                        .iter()
                        .map(|(t, _)| schema_template.replace("{tenant}", t)),
                );
            }
        }
        Ok(
            Migrator::new(config.shards.clone(), &config.migrations.dir)?
                .with_tenant_schemas(tenants),
        )
    }

    /// Sets which schemas are tenant schemas for `scope: tenants` revisions
    /// (`templates: ["tenant_{tenant}"]`: every schema named `tenant_<id>`).
    pub fn with_tenant_schemas(mut self, tenants: super::batch::TenantSchemas) -> Migrator {
        self.tenant_templates = tenants;
        self
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The named shards in map order; empty = all.
    fn select(&self, names: &[String]) -> Result<Vec<&ShardConfig>> {
        for name in names {
            if !self.shards.iter().any(|s| &s.name == name) {
                let known: Vec<&str> = self.shards.iter().map(|s| s.name.as_str()).collect();
                return Err(MigrateError::Invalid(format!(
                    "no shard named `{name}`; the map has {}",
                    known.join(", ")
                )));
            }
        }
        Ok(self
            .shards
            .iter()
            .filter(|s| names.is_empty() || names.contains(&s.name))
            .collect())
    }

    /// Waits for the migration lock on the map's first shard (whatever the
    /// `--shards` selection, so runs on different subsets also exclude each
    /// other). The lock lives as long as the returned connection.
    async fn lock(&self, opts: &ApplyOptions) -> Result<Conn> {
        let shard = &self.shards[0];
        let conn = connect(shard, opts.connect_timeout).await?;
        let deadline = Instant::now() + opts.lock_wait;
        let mut last_note: Option<Instant> = None;
        loop {
            let got: bool = conn
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|e| shard_error(&conn.name, "taking the migration lock", &e))?;
            if got {
                return Ok(conn);
            }
            if Instant::now() >= deadline {
                return Err(MigrateError::Locked {
                    shard: shard.name.clone(),
                    seconds: opts.lock_wait.as_secs(),
                });
            }
            // Say so once, then every few seconds, not on every retry.
            if last_note.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(5)) {
                tracing::info!(shard = %shard.name, "another migrator holds the migration lock: waiting up to {}s", opts.lock_wait.as_secs());
                last_note = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Upgrades every selected shard to `target` (default `heads`).
    pub async fn upgrade(&self, target: &str, opts: &ApplyOptions) -> Result<ApplyReport> {
        self.run(Direction::Up, target, opts).await
    }

    /// Downgrades every selected shard to `target`.
    pub async fn downgrade(&self, target: &str, opts: &ApplyOptions) -> Result<ApplyReport> {
        self.run(Direction::Down, target, opts).await
    }

    async fn run(
        &self,
        direction: Direction,
        spec: &str,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport> {
        let selected = self.select(&opts.shards)?;
        let _lock = self.lock(opts).await?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        let ensured = join_all(conns.iter().map(|c| async move {
            ledger::ensure(&c.client)
                .await
                .map_err(|e| shard_error(&c.name, "creating the ledger", &e))
        }))
        .await;
        ensured.into_iter().collect::<Result<Vec<()>>>()?;
        let recovered = recover_on(&conns, conns.len() == self.shards.len()).await?;
        let run_id = new_run_id();
        let names: Vec<String> = conns.iter().map(|c| c.name.clone()).collect();
        let rows = read_rows(&conns).await?;
        if !opts.allow_divergent && rows.windows(2).any(|w| w[0] != w[1]) {
            return Err(MigrateError::Divergent(divergence(&names, &rows)));
        }
        // Shards at the same revisions form one group (all of them, unless
        // --allow-divergent found several). Every group is planned and
        // checked before any group runs.
        let mut groups: Vec<(Vec<String>, Vec<Conn>)> = Vec::new();
        for (conn, current) in conns.into_iter().zip(rows) {
            match groups.iter_mut().find(|(r, _)| *r == current) {
                Some((_, members)) => members.push(conn),
                None => groups.push((current, vec![conn])),
            }
        }
        let mut plans = Vec::with_capacity(groups.len());
        for (current, members) in &groups {
            self.check_checksums(members, current, opts.accept_changed, &run_id)
                .await?;
            let plan = plan::make(&self.graph, current, spec, direction)?;
            preflight(members, &plan).await?;
            plans.push(plan);
        }
        let mut per_shard: Vec<ShardResult> = Vec::new();
        let mut group_no = 0usize;
        for ((current, members), plan) in groups.iter().zip(&plans) {
            let mut results: Vec<ShardResult> = members
                .iter()
                .map(|c| ShardResult {
                    shard: c.name.clone(),
                    from: current.clone(),
                    heads: current.clone(),
                    ..ShardResult::default()
                })
                .collect();
            for (n, step) in plan.steps.iter().enumerate() {
                group_no += 1;
                tracing::info!(
                    revision = %step.revision,
                    direction = step.direction.as_str(),
                    shards = members.len(),
                    "migrate: step {} of {}",
                    n + 1,
                    plan.steps.len()
                );
                let group = format!("{GID_PREFIX}{run_id}_{group_no}");
                let outcomes = self.run_step(members, step, &group, &run_id, opts).await?;
                for result in &mut results {
                    result
                        .steps
                        .push((step.revision.clone(), step.direction.as_str()));
                    result.heads = step.rows_after.clone();
                    if let Some(o) = outcomes.iter().find(|o| o.shard == result.shard) {
                        result.batches.push((step.revision.clone(), o.clone()));
                    }
                }
            }
            per_shard.extend(results);
        }
        per_shard.sort_by_key(|r| names.iter().position(|n| *n == r.shard));
        let first = per_shard.first().cloned().unwrap_or_default();
        Ok(ApplyReport {
            run_id,
            shards: names,
            steps: first.steps,
            heads: first.heads,
            recovered,
            per_shard,
        })
    }

    /// One step on a group of shards: an atomic group; or statements shard
    /// by shard (non-transactional) or checkpointed batches (data, tenants)
    /// followed by the ledger update as one atomic group, so heads still
    /// move together.
    async fn run_step(
        &self,
        conns: &[Conn],
        step: &Step,
        group: &str,
        run_id: &str,
        opts: &ApplyOptions,
    ) -> Result<Vec<super::batch::BatchOutcome>> {
        if step.batching.is_some() {
            let outcomes = super::batch::run_step(
                conns,
                step,
                run_id,
                opts.lock_timeout,
                opts.accept_changed,
                &self.tenant_templates,
            )
            .await?;
            let ledger_step = Step {
                statements: vec![super::batch::clear_statement(step)],
                batching: None,
                ..step.clone()
            };
            run_group(conns, &ledger_step, group, run_id, opts.lock_timeout).await?;
            return Ok(outcomes);
        }
        if step.transactional {
            run_group(conns, step, group, run_id, opts.lock_timeout).await?;
            return Ok(Vec::new());
        }
        for c in conns {
            super::nontx::ensure(&c.client)
                .await
                .map_err(|e| shard_error(&c.name, "creating the progress table", &e))?;
        }
        super::nontx::run_step(conns, step, run_id, opts.lock_timeout, opts.accept_changed).await?;
        let ledger_step = Step {
            statements: vec![super::nontx::clear_statement(step)],
            ..step.clone()
        };
        run_group(conns, &ledger_step, group, run_id, opts.lock_timeout).await?;
        Ok(Vec::new())
    }

    /// Refuses (or with `accept` records) applied revisions whose file changed.
    async fn check_checksums(
        &self,
        conns: &[Conn],
        current: &[String],
        accept: bool,
        run_id: &str,
    ) -> Result<()> {
        let applied = self.graph.applied(current)?;
        let all_stored = join_all(conns.iter().map(|c| async move {
            ledger::checksums(&c.client)
                .await
                .map_err(|e| shard_error(&c.name, "reading the ledger", &e))
        }))
        .await;
        for (c, stored) in conns.iter().zip(all_stored) {
            let stored = stored?;
            for (revision, sum) in &stored {
                let Some(file) = self.graph.get(revision) else {
                    continue;
                };
                if !applied.contains(revision) || &file.checksum == sum {
                    continue;
                }
                if !accept {
                    return Err(MigrateError::Changed {
                        shard: c.name.clone(),
                        revision: revision.clone(),
                        file: file.up_path.display().to_string(),
                        applied: sum.clone(),
                        now: file.checksum.clone(),
                    });
                }
                let entry = ledger::Entry {
                    revision,
                    direction: "accept",
                    checksum: Some(&file.checksum),
                    run_id,
                    started_at: SystemTime::now(),
                };
                ledger::record(&c.client, &entry)
                    .await
                    .map_err(|e| shard_error(&c.name, "recording the accepted checksum", &e))?;
            }
        }
        Ok(())
    }

    /// What `up`/`down` would do from the selected shards' (agreed) state.
    pub async fn plan(
        &self,
        spec: &str,
        direction: Direction,
        opts: &ApplyOptions,
    ) -> Result<Plan> {
        let selected = self.select(&opts.shards)?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        let rows = read_rows(&conns).await?;
        if rows.windows(2).any(|w| w[0] != w[1]) {
            let names: Vec<String> = conns.iter().map(|c| c.name.clone()).collect();
            return Err(MigrateError::Divergent(divergence(&names, &rows)));
        }
        let current = rows.into_iter().next().unwrap_or_default();
        plan::make(&self.graph, &current, spec, direction)
    }

    /// The plan of each selected shard from its own state (for `plan --sql`,
    /// which needs no agreement between shards), with the tenant schemas
    /// found there.
    pub async fn plan_per_shard(
        &self,
        spec: &str,
        direction: Direction,
        opts: &ApplyOptions,
    ) -> Result<Vec<ShardPlan>> {
        let selected = self.select(&opts.shards)?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        let mut out = Vec::new();
        for c in &conns {
            let current = ledger::rows(&c.client)
                .await
                .map_err(|e| shard_error(&c.name, "reading the ledger", &e))?;
            let plan = plan::make(&self.graph, &current, spec, direction)?;
            let tenant_schemas = if plan
                .steps
                .iter()
                .any(|s| matches!(s.batching, Some(plan::Batching::Tenants { .. })))
            {
                super::batch::tenant_schemas(&c.client, &self.tenant_templates)
                    .await
                    .map_err(|e| shard_error(&c.name, "listing tenant schemas", &e))?
            } else {
                Vec::new()
            };
            out.push(ShardPlan {
                shard: c.name.clone(),
                plan,
                tenant_schemas,
            });
        }
        Ok(out)
    }

    /// Each selected shard's applied history (the ledger's
    /// `shardgate.history`, oldest first).
    pub async fn applied_history(
        &self,
        opts: &ApplyOptions,
    ) -> Result<Vec<(String, Vec<ledger::HistoryRow>)>> {
        let selected = self.select(&opts.shards)?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        let mut out = Vec::new();
        for c in &conns {
            let rows = ledger::history(&c.client)
                .await
                .map_err(|e| shard_error(&c.name, "reading the history", &e))?;
            out.push((c.name.clone(), rows));
        }
        Ok(out)
    }

    /// Per-shard heads, pending revisions, in-doubt transactions, changed files.
    pub async fn status(&self, opts: &ApplyOptions) -> Result<Vec<ShardStatus>> {
        let selected = self.select(&opts.shards)?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        // Shards are read concurrently: status must stay fast on many shards.
        join_all(conns.iter().map(|c| self.shard_status(c)))
            .await
            .into_iter()
            .collect()
    }

    async fn shard_status(&self, c: &Conn) -> Result<ShardStatus> {
        let read = |e: tokio_postgres::Error| shard_error(&c.name, "reading the ledger", &e);
        let heads = ledger::rows(&c.client).await.map_err(read)?;
        let in_doubt = ledger::in_doubt(&c.client).await.map_err(read)?;
        let stored = ledger::checksums(&c.client).await.map_err(read)?;
        let mut partial = super::nontx::partial(&c.client).await.map_err(read)?;
        partial.extend(super::batch::partial(&c.client).await.map_err(read)?);
        let mut status = ShardStatus {
            shard: c.name.clone(),
            heads: heads.clone(),
            pending: Vec::new(),
            in_doubt,
            changed: Vec::new(),
            problem: None,
            partial,
        };
        match self.graph.applied(&heads) {
            Ok(applied) => {
                let all = Target::Revisions(self.graph.heads().to_vec());
                status.pending = self.graph.upgrade_steps(&heads, &all)?;
                status.changed = stored
                    .iter()
                    .filter(|(r, sum)| {
                        applied.contains(*r)
                            && self.graph.get(r).is_some_and(|f| &f.checksum != *sum)
                    })
                    .map(|(r, _)| r.clone())
                    .collect();
                status.changed.sort();
            }
            Err(e) => status.problem = Some(e.to_string()),
        }
        Ok(status)
    }

    /// Sets the version rows to `target` without running SQL (Alembic's
    /// `stamp`; heads on unrelated branches are kept). Per shard.
    pub async fn stamp(
        &self,
        spec: &str,
        opts: &ApplyOptions,
    ) -> Result<Vec<(String, Vec<String>)>> {
        let selected = self.select(&opts.shards)?;
        let _lock = self.lock(opts).await?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        let run_id = new_run_id();
        let mut out = Vec::new();
        for c in &conns {
            let fail = |what: &str, e: tokio_postgres::Error| shard_error(&c.name, what, &e);
            ledger::ensure(&c.client)
                .await
                .map_err(|e| fail("creating the ledger", e))?;
            let current = ledger::rows(&c.client)
                .await
                .map_err(|e| fail("reading the ledger", e))?;
            let target = self.graph.resolve(spec, &current)?;
            let before = self.graph.applied(&current)?;
            let rows = stamp_rows(&self.graph, &current, &target);
            let after = self.graph.applied(&rows)?;
            let started = SystemTime::now();
            c.client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| fail("BEGIN", e))?;
            let body = async {
                ledger::set_rows(&c.client, &rows).await?;
                let mut changed: Vec<&String> = after.symmetric_difference(&before).collect();
                changed.sort();
                for revision in changed {
                    let checksum = if after.contains(revision) {
                        self.graph.get(revision).map(|r| r.checksum.as_str())
                    } else {
                        None
                    };
                    let entry = ledger::Entry {
                        revision,
                        direction: "stamp",
                        checksum,
                        run_id: &run_id,
                        started_at: started,
                    };
                    ledger::record(&c.client, &entry).await?;
                }
                c.client.batch_execute("COMMIT").await
            };
            if let Err(e) = body.await {
                let _ = c.client.batch_execute("ROLLBACK").await;
                return Err(fail("stamping", e));
            }
            out.push((c.name.clone(), rows));
        }
        Ok(out)
    }

    /// Compares the selected shards' schemas (catalog fingerprints) and
    /// ledger heads; see [`super::verify`]. Takes no lock: it only reads, and
    /// reads each shard in one snapshot.
    pub async fn verify(&self, opts: &ApplyOptions) -> Result<super::verify::VerifyReport> {
        let selected = self.select(&opts.shards)?;
        super::verify::verify(&selected, opts).await
    }

    /// Resolves in-doubt migrator transactions on every shard of the map:
    /// commit where the group's decision row exists, roll back where none
    /// does. Takes the migration lock, so it never races a running migrator.
    pub async fn recover(&self, opts: &ApplyOptions) -> Result<RecoverReport> {
        let selected = self.select(&[])?;
        let _lock = self.lock(opts).await?;
        let conns = connect_all(&selected, opts.connect_timeout).await?;
        recover_on(&conns, true).await
    }

    /// Writes a new revision folder; parents are `head` (resolved; `base`
    /// for a new root) or the single current head of the graph.
    pub fn new_revision(
        &self,
        message: &str,
        head: Option<&str>,
        branch_labels: &[String],
        depends_on: &[String],
    ) -> Result<PathBuf> {
        let parents = match head {
            Some(spec) => match self.graph.resolve(spec, &[])? {
                Target::Revisions(ids) => ids,
                _ => Vec::new(),
            },
            None => match self.graph.heads() {
                [] => Vec::new(),
                [one] => vec![one.clone()],
                _ => return Err(super::GraphError::MultipleHeadsForNew.into()),
            },
        };
        self.write_revision(message, &parents, branch_labels, depends_on)
    }

    /// Writes a merge revision of `revisions` (default: every head).
    pub fn merge(&self, message: &str, revisions: &[String]) -> Result<PathBuf> {
        let mut parents = Vec::new();
        if revisions.is_empty() {
            parents = self.graph.heads().to_vec();
        } else {
            for spec in revisions {
                if let Target::Revisions(ids) = self.graph.resolve(spec, &[])? {
                    parents.extend(ids);
                }
            }
        }
        if parents.len() < 2 {
            return Err(MigrateError::Invalid(
                "a merge needs at least two revisions (there is a single head)".into(),
            ));
        }
        self.write_revision(message, &parents, &[], &[])
    }

    fn write_revision(
        &self,
        message: &str,
        parents: &[String],
        branch_labels: &[String],
        depends_on: &[String],
    ) -> Result<PathBuf> {
        let mut deps = Vec::new();
        for spec in depends_on {
            match self.graph.resolve(spec, &[])? {
                Target::Revisions(ids) => deps.extend(ids),
                _ => return Err(MigrateError::Invalid(format!("cannot depend on `{spec}`"))),
            }
        }
        let id = loop {
            let candidate = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
            if self.graph.get(&candidate).is_none() {
                break candidate;
            }
        };
        let mut slug: String = message
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        slug = slug
            .split('_')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("_");
        slug.truncate(40);
        if slug.is_empty() {
            slug = "revision".into();
        }
        let dir = self.dir.join(format!("{id}_{slug}"));
        let io = |e: std::io::Error| MigrateError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let header = super::revision::render_header(&id, message, parents, branch_labels, &deps);
        std::fs::write(
            dir.join("up.sql"),
            format!("{header}\n-- upgrade SQL here\n"),
        )
        .map_err(io)?;
        std::fs::write(dir.join("down.sql"), format!("-- revert {id}\n")).map_err(io)?;
        // Re-read what we wrote so a bad label or graph is reported, not left on disk.
        let checked = super::revision::load(&dir)
            .map_err(|e| MigrateError::Revisions(vec![e]))
            .and_then(|written| {
                let mut all: Vec<_> = self.graph.ordered().cloned().collect();
                all.push(written);
                Graph::build(all).map_err(MigrateError::from)
            });
        if let Err(e) = checked {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(dir)
    }
}

/// Version rows for a stamp: the target, plus current heads on branches
/// unrelated to it.
fn stamp_rows(graph: &Graph, current: &[String], target: &Target) -> Vec<String> {
    let mut rows: Vec<String> = match target {
        Target::Base => Vec::new(),
        Target::BranchBase(label) => current
            .iter()
            .filter(|h| !graph.labels_of(h).contains(label))
            .cloned()
            .collect(),
        Target::Revisions(ids) => {
            let mut rows: Vec<String> = current
                .iter()
                .filter(|h| {
                    ids.iter().all(|t| {
                        !graph.ancestors(std::slice::from_ref(t), false).contains(*h)
                            && !graph.ancestors(std::slice::from_ref(*h), false).contains(t)
                    })
                })
                .cloned()
                .collect();
            rows.extend(ids.iter().cloned());
            rows
        }
    };
    rows.sort();
    rows.dedup();
    graph.heads_of(&graph.ancestors(&rows, false))
}

/// Twelve hex characters, unique enough per run (no `_`, see `group_of`).
fn new_run_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// A gid-safe form of a shard name.
fn gid_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

pub(super) fn shard_error(shard: &str, doing: &str, e: &tokio_postgres::Error) -> MigrateError {
    MigrateError::Shard {
        shard: shard.to_owned(),
        message: format!("{doing}: {}", describe(e)),
    }
}

/// The server's message (with SQLSTATE and detail) rather than tokio-postgres' "db error".
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            text
        }
        None => e.to_string(),
    }
}

pub(super) async fn connect(shard: &ShardConfig, timeout: Duration) -> Result<Conn> {
    let client = connect_control(shard, MIGRATE_APPLICATION, timeout)
        .await
        .map_err(|e| MigrateError::Connect {
            shard: shard.name.clone(),
            message: describe(&e),
        })?;
    Ok(Conn {
        name: shard.name.clone(),
        client,
    })
}

async fn connect_all(shards: &[&ShardConfig], timeout: Duration) -> Result<Vec<Conn>> {
    join_all(shards.iter().map(|s| connect(s, timeout)))
        .await
        .into_iter()
        .collect()
}

/// Every participant's version rows (read concurrently), in `conns` order.
async fn read_rows(conns: &[Conn]) -> Result<Vec<Vec<String>>> {
    join_all(conns.iter().map(|c| async move {
        ledger::rows(&c.client)
            .await
            .map_err(|e| shard_error(&c.name, "reading the ledger", &e))
    }))
    .await
    .into_iter()
    .collect()
}

/// `s0: a, b; s1: base` for the divergence error.
fn divergence(names: &[String], rows: &[Vec<String>]) -> String {
    names
        .iter()
        .zip(rows)
        .map(|(name, rows)| {
            let rows = if rows.is_empty() {
                "base".to_owned()
            } else {
                rows.join(", ")
            };
            format!("{name}: {rows}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Refuses a fleet that cannot prepare (every step, non-transactional ones
/// included, ends in a two-phase-commit ledger group).
async fn preflight(conns: &[Conn], plan: &Plan) -> Result<()> {
    if conns.len() < 2 || plan.steps.is_empty() {
        return Ok(());
    }
    for c in &conns[1..] {
        let value: String = c
            .client
            .query_one("SELECT current_setting('max_prepared_transactions')", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| shard_error(&c.name, "reading max_prepared_transactions", &e))?;
        if value.trim() == "0" {
            return Err(MigrateError::Shard {
                shard: c.name.clone(),
                message: "max_prepared_transactions = 0: two-phase commit is disabled; set it above 0 (restart needed) to migrate atomically".into(),
            });
        }
    }
    Ok(())
}

/// Where a participant's transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxState {
    Idle,
    Open,
    Prepared,
}

/// Phase one on one shard: run the step and prepare (the coordinator stays open).
async fn phase_one(
    c: &Conn,
    coordinator: bool,
    step: &Step,
    gid: &str,
    run_id: &str,
    lock_timeout: Duration,
) -> (TxState, Result<()>) {
    let started = SystemTime::now();
    if let Err(e) = c.client.batch_execute("BEGIN").await {
        return (TxState::Idle, Err(shard_error(&c.name, "BEGIN", &e)));
    }
    let body = async {
        c.client
            .batch_execute(&format!(
                "SET LOCAL lock_timeout = {}",
                lock_timeout.as_millis().max(1)
            ))
            .await
            .map_err(|e| shard_error(&c.name, "setting lock_timeout", &e))?;
        for statement in &step.statements {
            c.client.batch_execute(&statement.sql).await.map_err(|e| {
                MigrateError::Statement(Box::new(super::StatementFailure {
                    shard: c.name.clone(),
                    revision: step.revision.clone(),
                    file: step.file.clone(),
                    line: statement.line,
                    statement: statement.sql.clone(),
                    message: describe(&e),
                }))
            })?;
        }
        let ledger_error =
            |e: tokio_postgres::Error| shard_error(&c.name, "updating the ledger", &e);
        ledger::set_rows(&c.client, &step.rows_after)
            .await
            .map_err(ledger_error)?;
        let entry = ledger::Entry {
            revision: &step.revision,
            direction: step.direction.as_str(),
            checksum: Some(&step.checksum),
            run_id,
            started_at: started,
        };
        ledger::record(&c.client, &entry)
            .await
            .map_err(ledger_error)?;
        Ok(())
    };
    if let Err(e) = body.await {
        return (TxState::Open, Err(e));
    }
    if coordinator {
        return (TxState::Open, Ok(()));
    }
    match c
        .client
        .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
        .await
    {
        Ok(()) => (TxState::Prepared, Ok(())),
        // A failed PREPARE ends the transaction; a lost connection may have
        // prepared it, and then `recover` rolls it back (no decision).
        Err(e) => (
            TxState::Idle,
            Err(shard_error(&c.name, "PREPARE TRANSACTION", &e)),
        ),
    }
}

fn crash_point(point: &str) {
    if std::env::var(CRASH_ENV).as_deref() == Ok(point) {
        eprintln!("shardgate migrate: {CRASH_ENV}={point}: aborting now");
        std::process::abort();
    }
}

/// One atomic group: the step on every participant, all or nothing.
async fn run_group(
    conns: &[Conn],
    step: &Step,
    group: &str,
    run_id: &str,
    lock_timeout: Duration,
) -> Result<()> {
    let gids: Vec<String> = conns
        .iter()
        .map(|c| format!("{group}_{}", gid_name(&c.name)))
        .collect();
    let results = join_all(
        conns
            .iter()
            .enumerate()
            .map(|(i, c)| phase_one(c, i == 0, step, &gids[i], run_id, lock_timeout)),
    )
    .await;
    let states: Vec<TxState> = results.iter().map(|(s, _)| *s).collect();
    let first_error = results.into_iter().find_map(|(_, r)| r.err());
    if let Some(error) = first_error {
        abort_group(conns, &states, &gids).await;
        return Err(error);
    }
    crash_point("prepare");
    let coordinator = &conns[0];
    let decision = async {
        if conns.len() > 1 {
            coordinator
                .client
                .execute(
                    "INSERT INTO shardgate.decisions (gid_prefix) VALUES ($1)",
                    &[&group],
                )
                .await?;
        }
        coordinator.client.batch_execute("COMMIT").await
    };
    if let Err(e) = decision.await {
        if coordinator.client.is_closed() {
            return Err(MigrateError::Shard {
                shard: coordinator.name.clone(),
                message: format!(
                    "lost the coordinator while committing revision {}: the outcome is in doubt; run `shardgate migrate recover`: {}",
                    step.revision,
                    describe(&e)
                ),
            });
        }
        abort_group(conns, &states, &gids).await;
        return Err(shard_error(
            &coordinator.name,
            "committing the decision",
            &e,
        ));
    }
    crash_point("decision");
    let commits = join_all(conns.iter().zip(&gids).skip(1).map(|(c, gid)| async move {
        c.client
            .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
            .await
            .map_err(|e| (c.name.clone(), describe(&e)))
    }))
    .await;
    if let Some(Err((shard, message))) = commits.into_iter().find(|r| r.is_err()) {
        return Err(MigrateError::Shard {
            shard,
            message: format!(
                "revision {} is committed (decision recorded) but COMMIT PREPARED failed: {message}; run `shardgate migrate recover`",
                step.revision
            ),
        });
    }
    if conns.len() > 1 {
        // Every participant committed: the decision is no longer needed.
        let _ = coordinator
            .client
            .execute(
                "DELETE FROM shardgate.decisions WHERE gid_prefix = $1",
                &[&group],
            )
            .await;
    }
    Ok(())
}

/// Rolls every participant back (best effort: what cannot be rolled back now
/// stays prepared without a decision, and `recover` rolls it back).
async fn abort_group(conns: &[Conn], states: &[TxState], gids: &[String]) {
    let failures =
        roll_back_clients(conns.iter().zip(states).zip(gids).map(|((c, state), gid)| {
            let pending = match state {
                TxState::Idle => Pending::Idle,
                TxState::Open => Pending::Open,
                TxState::Prepared => Pending::Prepared(gid),
            };
            (&c.client, pending)
        }))
        .await;
    for (i, sql, e) in failures {
        let shard = conns.get(i).map_or("?", |c| c.name.as_str());
        tracing::warn!(shard = %shard, "{sql} failed: {}; `shardgate migrate recover` will resolve it", describe(&e));
    }
}

/// Resolves the migrator's prepared transactions on `conns` (caller holds the
/// lock). Decisions are looked up on every connected shard, since the
/// coordinator is the first shard of whatever selection ran. With `all`
/// (every shard of the map connected), spent decision rows are deleted.
async fn recover_on(conns: &[Conn], all: bool) -> Result<RecoverReport> {
    // Read every shard concurrently (this runs before every `up`/`down`).
    let read = join_all(conns.iter().map(|c| async move {
        let decisions = ledger::decisions(&c.client)
            .await
            .map_err(|e| shard_error(&c.name, "reading decisions", &e))?;
        let gids = ledger::in_doubt(&c.client)
            .await
            .map_err(|e| shard_error(&c.name, "reading pg_prepared_xacts", &e))?;
        Ok::<_, MigrateError>((decisions, gids))
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let mut decided: HashSet<String> = HashSet::new();
    let mut has_decisions = Vec::with_capacity(read.len());
    for (decisions, _) in &read {
        decided.extend(decisions.iter().cloned());
        has_decisions.push(!decisions.is_empty());
    }
    let mut report = RecoverReport::default();
    for (c, (_, gids)) in conns.iter().zip(read) {
        for gid in gids {
            let commit = ledger::group_of(&gid).is_some_and(|g| decided.contains(&g));
            let sql = if commit {
                format!("COMMIT PREPARED '{gid}'")
            } else {
                format!("ROLLBACK PREPARED '{gid}'")
            };
            c.client
                .batch_execute(&sql)
                .await
                .map_err(|e| shard_error(&c.name, &sql, &e))?;
            tracing::info!(shard = %c.name, "recover: {sql}");
            let entry = (c.name.clone(), gid);
            if commit {
                report.committed.push(entry);
            } else {
                report.rolled_back.push(entry);
            }
        }
    }
    if all {
        // Under the migration lock no decision is added meanwhile.
        for (c, _) in conns.iter().zip(has_decisions).filter(|(_, has)| *has) {
            c.client
                .execute("DELETE FROM shardgate.decisions", &[])
                .await
                .map_err(|e| shard_error(&c.name, "deleting spent decisions", &e))?;
        }
    }
    Ok(report)
}
