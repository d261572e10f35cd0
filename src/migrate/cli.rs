//! `shardgate migrate …`: clap arguments and the command runners.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::apply::{ApplyOptions, Migrator};
use super::plan::Direction;
use super::{ledger, MigrateError};
use crate::civil_time::CivilTime;
use crate::config::{Config, LoadError};

/// `shardgate migrate --config FILE [--shards s0,s1] <command>`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The shard map (its `migrations.dir` holds the revisions).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Work on the map's migration set NAME (`migrations.sets`) instead of
    /// the shards' own revisions.
    #[arg(long, global = true)]
    pub set: Option<String>,
    /// Only these shards (comma-separated names); default: every shard.
    #[arg(long, value_delimiter = ',', global = true)]
    pub shards: Vec<String>,
    /// Every shard (the default; for symmetry with --shards).
    #[arg(long, global = true, conflicts_with = "shards")]
    pub all_shards: bool,
    /// Seconds to wait for another migrator's lock.
    #[arg(long, default_value_t = 30, global = true)]
    pub lock_wait: u64,
    /// Postgres lock_timeout per step, in milliseconds.
    #[arg(long, default_value_t = 10_000, global = true)]
    pub lock_timeout: u64,
    #[command(subcommand)]
    pub command: MigrateCommand,
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Write a new revision folder (parent: the current head, or --head).
    New {
        message: String,
        /// Parent revision (`base` starts a new branch; `label@head`, an id…).
        #[arg(long)]
        head: Option<String>,
        #[arg(long = "branch-label")]
        branch_label: Vec<String>,
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
    },
    /// Upgrade every shard to TARGET (default: heads), one atomic group per revision.
    Up {
        #[arg(default_value = "heads")]
        target: String,
        /// Accept applied revisions whose file changed since.
        #[arg(long)]
        accept_changed: bool,
        /// Shards at different revisions: bring each from its own revisions
        /// to TARGET (default: refuse and name each shard's revisions).
        #[arg(long)]
        allow_divergent: bool,
    },
    /// Downgrade every shard to TARGET.
    Down {
        target: String,
        #[arg(long)]
        accept_changed: bool,
        /// Shards at different revisions: bring each from its own revisions to TARGET.
        #[arg(long)]
        allow_divergent: bool,
    },
    /// Per shard: current heads, pending revisions, in-doubt transactions
    /// (`--verbose`: also each shard's applied history).
    Status {
        #[arg(long, short)]
        verbose: bool,
    },
    /// The revision history (newest first); `-r A:B` limits it. With
    /// `--shard S` (or `--applied`, every selected shard): what was applied
    /// there, from its ledger (revision, direction, checksum, run, times, who).
    History {
        #[arg(short = 'r', long = "rev-range")]
        range: Option<String>,
        /// The applied history of this shard.
        #[arg(long, conflicts_with = "range")]
        shard: Option<String>,
        /// The applied history of every selected shard.
        #[arg(long, conflicts_with = "range")]
        applied: bool,
    },
    /// The head revisions of the migrations folder.
    Heads,
    /// Branch points and their branches.
    Branches,
    /// Write a merge revision of the given revisions (default: all heads).
    Merge {
        #[arg(short, long, default_value = "merge heads")]
        message: String,
        revisions: Vec<String>,
    },
    /// Set the ledger to TARGET without running SQL.
    Stamp {
        target: String,
        /// Only this shard.
        #[arg(long)]
        shard: Option<String>,
    },
    /// The steps `up` (or `down` with --down) would run, with their SQL.
    Plan {
        #[arg(default_value = "heads")]
        target: String,
        #[arg(long)]
        down: bool,
        /// Write one psql script per shard (`<shard>.sql`) into this folder.
        #[arg(long, value_name = "DIR")]
        sql: Option<PathBuf>,
        /// Shards at different revisions: plan each group of shards from
        /// its own revisions (what `up --allow-divergent` would run).
        #[arg(long)]
        allow_divergent: bool,
    },
    /// Resolve in-doubt prepared transactions left by a crashed migrator.
    Recover,
    /// Compare the shards' schemas (catalog fingerprints) and ledger heads.
    /// Exit 0: all shards agree; 1: drift (each differing object is
    /// printed); 2: verify could not run (connection or catalog error).
    Verify,
}

/// Exit code of `verify` when it could not compare (so scripts can tell
/// "the shards differ" (1) from "could not look" (2)).
pub const VERIFY_ERROR_EXIT: u8 = 2;

/// Runs a `migrate` command; errors go to stderr with exit code 1.
pub fn run(args: MigrateArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let verify = matches!(args.command, MigrateCommand::Verify);
    match runtime.block_on(execute(args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("shardgate migrate: {error}");
            if verify {
                // 1 means drift for verify; a failure to look must not read as one.
                ExitCode::from(VERIFY_ERROR_EXIT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn load(args: &MigrateArgs) -> Result<Migrator, MigrateError> {
    let Some(path) = &args.config else {
        return Err(MigrateError::Invalid("--config FILE is required".into()));
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(LoadError::Invalid(errors)) => return Err(MigrateError::Invalid(errors.to_string())),
        Err(error) => return Err(MigrateError::Invalid(error.to_string())),
    };
    Migrator::from_config_set(&config, args.set.as_deref())
}

async fn execute(args: MigrateArgs) -> Result<ExitCode, MigrateError> {
    let migrator = load(&args)?;
    let mut opts = ApplyOptions {
        shards: args.shards.clone(),
        lock_wait: Duration::from_secs(args.lock_wait),
        lock_timeout: Duration::from_millis(args.lock_timeout),
        ..ApplyOptions::default()
    };
    let graph = migrator.graph();
    let up = matches!(args.command, MigrateCommand::Up { .. });
    match args.command {
        MigrateCommand::New {
            message,
            head,
            branch_label,
            depends_on,
        } => {
            let dir =
                migrator.new_revision(&message, head.as_deref(), &branch_label, &depends_on)?;
            println!("wrote {}", dir.display());
        }
        MigrateCommand::Merge { message, revisions } => {
            let dir = migrator.merge(&message, &revisions)?;
            println!("wrote {}", dir.display());
        }
        MigrateCommand::Up {
            target,
            accept_changed,
            allow_divergent,
        }
        | MigrateCommand::Down {
            target,
            accept_changed,
            allow_divergent,
        } => {
            opts.accept_changed = accept_changed;
            opts.allow_divergent = allow_divergent;
            let report = if up {
                migrator.upgrade(&target, &opts).await?
            } else {
                migrator.downgrade(&target, &opts).await?
            };
            for (shard, gid) in &report.recovered.committed {
                println!("recovered: committed {gid} on {shard}");
            }
            for (shard, gid) in &report.recovered.rolled_back {
                println!("recovered: rolled back {gid} on {shard}");
            }
            let uniform = report
                .per_shard
                .windows(2)
                .all(|w| w[0].from == w[1].from && w[0].heads == w[1].heads);
            if uniform {
                for (revision, direction) in &report.steps {
                    let described = graph
                        .get(revision)
                        .map_or(String::new(), |r| r.message.clone());
                    println!(
                        "{direction} {revision} on {}: {described}",
                        report.shards.join(", ")
                    );
                }
                if report.steps.is_empty() {
                    println!("nothing to do");
                }
            } else {
                for shard in &report.per_shard {
                    let steps: Vec<String> = shard
                        .steps
                        .iter()
                        .map(|(r, d)| format!("{d} {r}"))
                        .collect();
                    println!(
                        "{}: from {}: {}",
                        shard.shard,
                        rows_text(&shard.from),
                        if steps.is_empty() {
                            "nothing to do".to_owned()
                        } else {
                            steps.join(", ")
                        }
                    );
                }
            }
            for shard in &report.per_shard {
                for (revision, batch) in &shard.batches {
                    println!(
                        "  {}: {revision}: {} batch(es), {} row(s)/schema(s){}",
                        shard.shard,
                        batch.batches,
                        batch.units,
                        if batch.resumed {
                            " (resumed from a checkpoint)"
                        } else {
                            ""
                        }
                    );
                }
            }
            if uniform {
                println!("heads: {}", rows_text(&report.heads));
            } else {
                for shard in &report.per_shard {
                    println!("{} heads: {}", shard.shard, rows_text(&shard.heads));
                }
            }
        }
        MigrateCommand::Status { verbose } => {
            let mut drift = false;
            let statuses = migrator.status(&opts).await?;
            for s in &statuses {
                println!("{}:", s.shard);
                println!("  current: {}", rows_text(&s.heads));
                if let Some(problem) = &s.problem {
                    println!("  problem: {problem}");
                    drift = true;
                }
                if s.pending.is_empty() {
                    println!("  pending: none");
                } else {
                    println!("  pending: {} ({})", s.pending.len(), s.pending.join(", "));
                }
                if s.in_doubt.is_empty() {
                    println!("  in doubt: none");
                } else {
                    println!(
                        "  in doubt: {} (run `shardgate migrate recover`)",
                        s.in_doubt.join(", ")
                    );
                }
                for partial in &s.partial {
                    println!("  partly applied (non-transactional): {partial}");
                }
                if !s.changed.is_empty() {
                    println!("  changed since applied: {}", s.changed.join(", "));
                }
            }
            if verbose {
                for (shard, rows) in migrator.applied_history(&opts).await? {
                    println!("{shard} history:");
                    print_history(&rows);
                }
            }
            if statuses.windows(2).any(|w| w[0].heads != w[1].heads) {
                println!("shards disagree on their current revisions");
                drift = true;
            }
            if drift {
                return Ok(ExitCode::FAILURE);
            }
        }
        MigrateCommand::History { shard, applied, .. } if shard.is_some() || applied => {
            if let Some(shard) = shard {
                opts.shards = vec![shard];
            }
            for (shard, rows) in migrator.applied_history(&opts).await? {
                println!("{shard}:");
                print_history(&rows);
            }
        }
        MigrateCommand::History { range, .. } => {
            let current = if range.as_deref().is_some_and(|r| r.contains("current")) {
                let statuses = migrator.status(&opts).await?;
                statuses
                    .into_iter()
                    .next()
                    .map(|s| s.heads)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            for id in graph.history(range.as_deref(), &current)? {
                println!("{}", graph.describe(&id));
            }
        }
        MigrateCommand::Heads => {
            for id in graph.heads() {
                println!("{}", graph.tagged(id));
            }
        }
        MigrateCommand::Branches => {
            for r in graph.ordered() {
                if graph.is_branch_point(&r.id) {
                    println!("{}, {}", graph.tagged(&r.id), r.message);
                    for child in graph.children(&r.id) {
                        let message = graph.get(child).map_or("", |c| c.message.as_str());
                        println!("    -> {}, {message}", graph.tagged(child));
                    }
                }
            }
        }
        MigrateCommand::Stamp { target, shard } => {
            if let Some(shard) = shard {
                opts.shards = vec![shard];
            }
            for (shard, rows) in migrator.stamp(&target, &opts).await? {
                println!("{shard}: stamped {}", rows_text(&rows));
            }
        }
        MigrateCommand::Plan {
            target,
            down,
            sql: Some(dir),
            ..
        } => {
            let direction = if down { Direction::Down } else { Direction::Up };
            std::fs::create_dir_all(&dir)
                .map_err(|e| MigrateError::Io(format!("{}: {e}", dir.display())))?;
            for p in migrator.plan_per_shard(&target, direction, &opts).await? {
                let path = dir.join(format!("{}.sql", p.shard));
                let script = super::plan::offline_sql(&p.shard, &p.plan, &p.tenant_schemas);
                std::fs::write(&path, script)
                    .map_err(|e| MigrateError::Io(format!("{}: {e}", path.display())))?;
                println!(
                    "{}: {} step(s) -> {}",
                    p.shard,
                    p.plan.steps.len(),
                    path.display()
                );
            }
        }
        MigrateCommand::Plan {
            target,
            down,
            sql: None,
            allow_divergent,
        } => {
            let direction = if down { Direction::Down } else { Direction::Up };
            if allow_divergent {
                // One plan per group of shards at the same revisions.
                let mut groups: Vec<(Vec<String>, super::plan::Plan)> = Vec::new();
                for p in migrator.plan_per_shard(&target, direction, &opts).await? {
                    match groups.iter_mut().find(|(_, plan)| plan.from == p.plan.from) {
                        Some((shards, _)) => shards.push(p.shard),
                        None => groups.push((vec![p.shard], p.plan)),
                    }
                }
                for (shards, plan) in &groups {
                    println!("shards {}:", shards.join(", "));
                    print_plan(plan);
                }
            } else {
                print_plan(&migrator.plan(&target, direction, &opts).await?);
            }
        }
        MigrateCommand::Verify => {
            let report = migrator.verify(&opts).await?;
            for ((shard, fingerprint), (_, heads)) in report.fingerprints.iter().zip(&report.heads)
            {
                println!(
                    "{shard}: fingerprint {} ({} objects), heads {}",
                    fingerprint.digest(),
                    fingerprint.objects.len(),
                    rows_text(heads)
                );
            }
            if report.agrees() {
                println!("no drift: all {} shards agree", report.fingerprints.len());
            } else {
                println!("drift: {} difference(s)", report.drift.len());
                for drift in &report.drift {
                    println!("  {drift}");
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        MigrateCommand::Recover => {
            let report = migrator.recover(&opts).await?;
            for (shard, gid) in &report.committed {
                println!("committed {gid} on {shard}");
            }
            for (shard, gid) in &report.rolled_back {
                println!("rolled back {gid} on {shard}");
            }
            if report.committed.is_empty() && report.rolled_back.is_empty() {
                println!("no in-doubt transactions ({}%)", ledger::GID_PREFIX);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A plan as `plan` prints it: where from, each step with how it runs and its SQL.
fn print_plan(plan: &super::plan::Plan) {
    println!("from: {}", rows_text(&plan.from));
    println!("to: {}", plan.target);
    if plan.steps.is_empty() {
        println!("nothing to do");
    }
    for (n, step) in plan.steps.iter().enumerate() {
        let how = match (&step.batching, step.transactional) {
            (Some(super::plan::Batching::Keys { table, key, size }), _) => format!(
                "data batches of {size} rows of {table} by {key}, each its own transaction, checkpointed and resumable, shards in parallel; then the ledger as one atomic group"
            ),
            (Some(super::plan::Batching::Tenants { size }), _) => format!(
                "in every tenant schema ({size} schemas per transaction, search_path set to each), checkpointed and resumable; then the ledger as one atomic group"
            ),
            (None, true) => "one atomic group on every shard".to_owned(),
            (None, false) => "non-transactional: shard by shard, statement by statement, resumable; then the ledger as one atomic group".to_owned(),
        };
        println!(
            "-- step {} ({how}): {} {} ({})",
            n + 1,
            step.direction.as_str(),
            step.revision,
            step.file
        );
        for statement in &step.statements {
            println!("{};", statement.sql);
        }
        println!("-- version rows after: {}", rows_text(&step.rows_after));
    }
}

/// One line per ledger history row, oldest first.
fn print_history(rows: &[ledger::HistoryRow]) {
    if rows.is_empty() {
        println!("  (nothing applied)");
    }
    for row in rows {
        let started = chrono_text(row.started_at);
        let finished = chrono_text(row.finished_at);
        println!(
            "  {} {:<6} checksum {} run {} started {started} finished {finished} by {}{}",
            row.revision,
            row.direction,
            row.checksum.as_deref().unwrap_or("-"),
            row.run_id,
            row.applied_by,
            row.client
                .as_deref()
                .map_or(String::new(), |c| format!(" ({c})"))
        );
    }
}

/// UTC `YYYY-MM-DD HH:MM:SS.mmm`.
fn chrono_text(at: std::time::SystemTime) -> String {
    match CivilTime::of(at) {
        Some(t) => format!("{} {}.{:03}", t.date(), t.time(), t.micros / 1_000),
        None => "before 1970".into(),
    }
}

fn rows_text(rows: &[String]) -> String {
    if rows.is_empty() {
        "base".into()
    } else {
        rows.join(", ")
    }
}
