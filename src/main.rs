//! The `shardgate` command line: `check`, `demo` (and, as they land, `serve`, `route`, `migrate`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardgate::config::{Config, LoadError};

#[derive(Parser)]
#[command(name = "shardgate", version, about = "A PostgreSQL sharding proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a shard map.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a shard map: exit 0 with a summary, or 1 with every error (file:line:column).
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Also connect to the shards and compare each table's placement in
        /// the map with the one recorded there (exit 1 if any differs).
        #[arg(long)]
        shards: bool,
    },
    /// Recorded table placements (placement epochs).
    #[command(subcommand)]
    Placement(PlacementCommand),
    /// Start N local Postgres clusters with an example sharded schema and print how to connect.
    Demo {
        #[arg(long, default_value_t = 3)]
        shards: usize,
    },
    /// Explain where a statement goes: shards, function, key values found.
    Route {
        #[arg(long, short)]
        config: PathBuf,
        sql: String,
        #[arg(long = "param")]
        params: Vec<String>,
    },
    /// Versioned schema revisions applied to every shard in lockstep.
    Migrate(shardgate::migrate::cli::MigrateArgs),
}

#[derive(Subcommand)]
enum PlacementCommand {
    /// Record the map's placement of a table on every shard (two-phase
    /// commit), after its rows were moved to it by hand; prints what it overwrote.
    Accept {
        #[arg(long)]
        table: String,
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHARDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Check { config, shards } => check(&config, shards),
        Command::Placement(PlacementCommand::Accept { table, config }) => {
            placement_accept(&config, &table)
        }
        Command::Route {
            config,
            sql,
            params,
        } => shardgate::router::explain::run_route_command(&config, &sql, &params),
        Command::Migrate(args) => shardgate::migrate::cli::run(args),
        Command::Demo { shards } => match shardgate::demo::run(shards) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("shardgate demo: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let threads = config.threads;
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else if threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    } else {
        // 0: tokio's default, one worker per CPU.
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Before the (possibly slow) start: a SIGHUP meanwhile must not end
        // the process, which is the signal's default action.
        let hangups = hangups();
        match shardgate::server::start(config).await {
            Ok(server) => {
                tracing::info!(address = %server.address, "shardgate listening");
                if let Some(hangups) = hangups {
                    reload_on_hangup(hangups, server.cluster.clone(), path.to_path_buf());
                }
                tokio::select! {
                    () = shardgate::demo::wait_for_shutdown_async() => {}
                    () = server.cluster.shutdown_requested() => {
                        tracing::info!("SHUTDOWN from the admin console");
                    }
                }
                let grace = server.cluster.current().config.shutdown_timeout;
                server.shutdown(grace).await;
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("shardgate serve: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP (what `systemctl reload` and many tools send), caught so that it
/// reloads the map instead of ending the process (the default action).
fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(error) => {
            tracing::warn!(%error, "cannot handle SIGHUP: it will end the process");
            None
        }
    }
}

/// Each SIGHUP re-reads the map file and reloads it (see `cluster`); an
/// invalid or unsafe map is logged and the running one stays.
fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    cluster: std::sync::Arc<shardgate::cluster::Cluster>,
    path: PathBuf,
) {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(path = %path.display(), "SIGHUP: reloading the shard map");
            let config = Config::load(&path).map_err(|error| error.to_string());
            // The outcome is logged and counted by `reload`.
            let _ = cluster.reload(config).await;
        }
    });
}

/// A single-threaded runtime for the commands that talk to the shards.
fn block_on<T>(work: impl std::future::Future<Output = T>) -> Result<T, ExitCode> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Ok(runtime.block_on(work)),
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn placement_accept(path: &Path, table: &str) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    match block_on(shardgate::placement::cli::accept_table(&config, table)) {
        Ok(Ok(report)) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Ok(Err(error)) => {
            eprintln!("shardgate placement accept: {error}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

fn check(path: &Path, shards: bool) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print!("{}", shardgate::check::summary(&config));
            if !shards {
                return ExitCode::SUCCESS;
            }
            match block_on(shardgate::placement::cli::check_shards(&config)) {
                Ok((text, true)) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Ok((text, false)) => {
                    print!("{text}");
                    ExitCode::FAILURE
                }
                Err(code) => code,
            }
        }
        Err(LoadError::Invalid(errors)) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            eprintln!("{} error(s) in {}", errors.0.len(), path.display());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
